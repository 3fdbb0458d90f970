"""FitNet-style thin deep CNNs and the FitNets paper's CIFAR-10 nets (Romero et al. 2014).

`fitnet(...)` builds a configurable stack of 3×3 conv layers. Layer `i` (1-based) is the module
`conv{i}`, an `nn.Sequential` of

    conv3×3 (padding 1) → BatchNorm (if batch_norm) → ReLU or Maxout → MaxPool 2×2 (if i in
    pool_after)

so a hint path `conv5` is the output of the fifth conv layer *after* its activation and, where
listed, its pooling: this is what a layer outputs in the paper's pylearn2 models, where pooling
belongs to the layer. `conv5.0` is the bare convolution. After the last layer come `pool`
(global average or max pooling, then flatten), `hidden` (if hidden > 0: linear → ReLU/Maxout),
`dropout` (if dropout > 0) and `fc`, the classifier. The model is an `nn.Sequential` of these named
children, so it can be cut after any of them.

Paper models (appendix, CIFAR-10; the official FitNet-19 yaml in adri-romsor/FitNets agrees):

    fitnet1 (11 layers)  16 16 16 | 32 32 32 | 48 48 64 | max 8×8 | maxout 500 | softmax
    fitnet2 (11 layers)  16 32 32 | 48 64 80 | 96 96 128 | ...
    fitnet3 (13 layers)  32 48 64 64 | 80 80 80 80 | 128 128 128 | ...
    fitnet4 (19 layers)  32 32 32 48 48 | 80 × 6 | 128 × 6 | ...
    fitnet-teacher-cifar10: the maxout network of Goodfellow et al. 2013 (pylearn2
        `scripts/papers/maxout/cifar10.yaml`): conv 8×8×96 pad 4, pool 4/2; conv 8×8×192 pad 3,
        pool 4/2; conv 5×5×192 pad 3, pool 2/2; maxout 500; softmax.

("|" is a 2×2 max-pool; the final 8×8 max-pool over an 8×8 map is a global max-pool here, so any
input size works.) These are faithful by default: maxout units with 2 pieces, no BatchNorm, global
max pooling. Pass `batch_norm=True` for easier from-scratch training, or `unit="relu"`
(`maxout_pieces=1`) for a ReLU variant (conv parameters halve).

`fitnet` and the paper students take `unit="relu" | "maxout:K"` (the activation of every conv
layer, and of `hidden` unless `hidden_pieces` says otherwise) and `init="kaiming"` (default) |
`"glorot_uniform"` | `"uniform:A"` (pylearn2's `irange`, U(±A); see `_common.init_weights`).

Parameter counts: the paper's (~250K, ~862K, ~1.6M, ~2.5M; teacher ~9M) are reproduced by
counting the maxout FC layer with 2 pieces (FitNet 2 gives 861,928 weights exactly, teacher
9,044,360), so `hidden_pieces` defaults to 2. The released pylearn2 yamls use 5 pieces there
(pass `hidden_pieces=5`; FitNet 4 then has ~2.74M). FitNet 3 comes to 1.50M with the layer table
above, not the ~1.6M the paper quotes.

`PAPER_HINT_LAYERS` names the paper's guided layer (students) and hint layer (teacher): the
middle of each network, the end of its second pooled stage. FitNet 4's official config hints
its 11th conv layer (`h10`) from the teacher's second (`h1`); the others follow the same rule.
On 3×32×32 inputs the guided layers give 80 × 8 × 8 (32 × 8 × 8 for fitnet1) and the teacher's
hint 192 × 7 × 7, so the paper's convolutional regressor has a 2×2 kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fitdist.zoo._common import (
    ZooArgumentError,
    check_fraction,
    check_positive_int,
    init_weights,
    parse_init,
    reject_unknown,
)

PAPER_HINT_LAYERS: dict[str, str] = {
    "fitnet1": "conv6",
    "fitnet2": "conv6",
    "fitnet3": "conv8",
    "fitnet4": "conv11",
    "fitnet-teacher-cifar10": "conv2",
}

# Widths and 1-based pooled layers of the paper's students (appendix, CIFAR-10).
PAPER_FITNETS: dict[str, tuple[list[int], list[int]]] = {
    "fitnet1": ([16, 16, 16, 32, 32, 32, 48, 48, 64], [3, 6]),
    "fitnet2": ([16, 32, 32, 48, 64, 80, 96, 96, 128], [3, 6]),
    "fitnet3": ([32, 48, 64, 64, 80, 80, 80, 80, 128, 128, 128], [4, 8]),
    "fitnet4": ([32, 32, 32, 48, 48] + [80] * 6 + [128] * 6, [5, 11]),
}


class Maxout(nn.Module):
    """Maxout (Goodfellow et al. 2013): the max over `pieces` consecutive channels (dim 1)."""

    def __init__(self, pieces: int):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (x.shape[1] // self.pieces, self.pieces)).amax(dim=2)

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"


def _activation(pieces: int) -> nn.Module:
    return Maxout(pieces) if pieces > 1 else nn.ReLU()


class FitNet(nn.Sequential):
    """Thin deep CNN: `conv1`..`convN`, `pool`, [`hidden`], [`dropout`], `fc` (see module doc)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 16, 16, 32, 32, 32, 48, 48, 64),
        pool_after: Sequence[int] = (3, 6),
        batch_norm: bool = True,
        hidden: int = 0,
        dropout: float = 0.0,
        maxout_pieces: int | None = None,
        hidden_pieces: int | None = None,
        global_pool: str = "avg",
        name: str = "fitnet",
        unit: str | None = None,
        init: str = "kaiming",
    ):
        maxout_pieces = _pieces(name, unit, maxout_pieces)
        parse_init(name, init)  # a bad init fails before any layer is built
        widths, pool_after = _check_fitnet_args(
            name, widths, pool_after, hidden, dropout, maxout_pieces, global_pool
        )
        hidden_pieces = maxout_pieces if hidden_pieces is None else hidden_pieces
        check_positive_int(name, "hidden_pieces", hidden_pieces)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, width in enumerate(widths, start=1):
            # A maxout layer with k pieces computes k * width maps and keeps the max of each k.
            parts: list[nn.Module] = [
                nn.Conv2d(cin, width * maxout_pieces, 3, padding=1, bias=not batch_norm)
            ]
            if batch_norm:
                parts.append(nn.BatchNorm2d(width * maxout_pieces))
            parts.append(_activation(maxout_pieces))
            if i in pool_after:
                parts.append(nn.MaxPool2d(2))
            layers[f"conv{i}"] = nn.Sequential(*parts)
            cin = width
        pool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)
        layers["pool"] = nn.Sequential(pool, nn.Flatten())
        if hidden:
            layers["hidden"] = nn.Sequential(
                nn.Linear(cin, hidden * hidden_pieces), _activation(hidden_pieces)
            )
            cin = hidden
        if dropout:
            layers["dropout"] = nn.Dropout(dropout)
        layers["fc"] = nn.Linear(cin, num_classes)
        super().__init__(layers)
        init_weights(self, init, name)


def _pieces(name: str, unit: Any, maxout_pieces: Any) -> int:
    """Maxout pieces per unit from `unit` ("relu" | "maxout:K", K >= 2) and the older
    `maxout_pieces` (1 = ReLU); given both, they must agree. Neither: ReLU."""
    if unit is None:
        return 1 if maxout_pieces is None else maxout_pieces
    pieces = None
    if unit == "relu":
        pieces = 1
    elif isinstance(unit, str) and unit.startswith("maxout:"):
        k = unit.removeprefix("maxout:")
        pieces = int(k) if k.isdigit() and int(k) >= 2 else None
    if pieces is None:
        raise ZooArgumentError(f"{name}: unit must be 'relu' or 'maxout:K' with K >= 2 pieces, got {unit!r}")
    if maxout_pieces is not None and maxout_pieces != pieces:
        raise ZooArgumentError(f"{name}: unit {unit!r} and maxout_pieces={maxout_pieces!r} disagree; give unit alone")
    return pieces


def _check_fitnet_args(
    name: str,
    widths: Any,
    pool_after: Any,
    hidden: Any,
    dropout: Any,
    maxout_pieces: Any,
    global_pool: Any,
) -> tuple[list[int], set[int]]:
    """Validate `fitnet` arguments; every error names the argument at fault."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence) or not widths:
        raise ZooArgumentError(f"{name}: widths must be a non-empty list of ints, got {widths!r}")
    for w in widths:
        check_positive_int(name, "every entry of widths", w)
    if isinstance(pool_after, str | bytes) or not isinstance(pool_after, Sequence):
        raise ZooArgumentError(f"{name}: pool_after must be a list of ints, got {pool_after!r}")
    n = len(widths)
    for p in pool_after:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= n:
            raise ZooArgumentError(
                f"{name}: pool_after entry {p!r} is out of range: layers are numbered 1..{n} "
                f"(conv1..conv{n}, 1-based) for {n} widths"
            )
    if len(set(pool_after)) != len(pool_after):
        raise ZooArgumentError(f"{name}: pool_after has repeated layers: {list(pool_after)}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ZooArgumentError(f"{name}: hidden must be an int >= 0 (0 = none), got {hidden!r}")
    check_fraction(name, "dropout", dropout)
    check_positive_int(name, "maxout_pieces", maxout_pieces)
    if global_pool not in ("avg", "max"):
        raise ZooArgumentError(f"{name}: global_pool must be 'avg' or 'max', got {global_pool!r}")
    return list(widths), set(pool_after)


_FITNET_KWARGS = (
    "widths",
    "pool_after",
    "batch_norm",
    "hidden",
    "dropout",
    "maxout_pieces",
    "hidden_pieces",
    "global_pool",
    "unit",
    "init",
)


def fitnet(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Configurable thin deep CNN (module doc). Defaults: FitNet 1's widths with BN, ReLU, GAP.

    Keywords: widths, pool_after (1-based layer numbers), batch_norm=True, hidden=0,
    dropout=0.0, unit="relu" | "maxout:K" (K >= 2 pieces per unit; the older maxout_pieces=K,
    1 = ReLU, still works and must agree with unit when both are given), hidden_pieces (default:
    the conv layers' pieces), global_pool="avg" | "max", init="kaiming" | "glorot_uniform" |
    "uniform:A" (see `fitdist.zoo._common.init_weights`).
    """
    reject_unknown("fitnet", kwargs, _FITNET_KWARGS)
    return FitNet(num_classes, in_channels, **kwargs)


def _paper_factory(name: str) -> Callable[..., nn.Module]:
    widths, pool_after = PAPER_FITNETS[name]
    options = ("batch_norm", "dropout", "maxout_pieces", "hidden_pieces", "unit", "init")

    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        reject_unknown(name, kwargs, options)
        # hidden_pieces left unset follows maxout_pieces: 2 (the paper), or 1 for a ReLU variant.
        paper = {"batch_norm": False, "dropout": 0.0, "maxout_pieces": None if "unit" in kwargs else 2}
        paper.update(kwargs)
        return FitNet(
            num_classes,
            in_channels,
            widths,
            pool_after,
            hidden=500,
            global_pool="max",
            name=name,
            **paper,
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"FitNets paper CIFAR-10 student {name}: widths {widths}, 2×2 pools after layers "
        f"{pool_after}, global max pool, maxout 500, classifier. Guided layer: "
        f"{PAPER_HINT_LAYERS[name]}. Keywords: {', '.join(options)}."
    )
    return factory


fitnet1 = _paper_factory("fitnet1")
fitnet2 = _paper_factory("fitnet2")
fitnet3 = _paper_factory("fitnet3")
fitnet4 = _paper_factory("fitnet4")


class MaxoutTeacher(nn.Sequential):
    """Goodfellow et al.'s CIFAR-10 maxout net: `conv1`..`conv3`, `flatten`, `hidden`, `fc`.

    Pooling uses ceil mode, as pylearn2/cuda-convnet do: on 32×32 inputs the maps are
    96 × 16 × 16, 192 × 7 × 7 and 192 × 5 × 5. The FC layer's input size depends on the image
    size, hence `input_size` (a square side; 32 for CIFAR, 28 for Fashion-MNIST).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        maxout_pieces: int = 2,
        hidden_pieces: int = 2,
        dropout: float = 0.0,
    ):
        name = "fitnet-teacher-cifar10"
        check_positive_int(name, "input_size", input_size)
        check_positive_int(name, "maxout_pieces", maxout_pieces)
        check_positive_int(name, "hidden_pieces", hidden_pieces)
        check_fraction(name, "dropout", dropout)
        k = maxout_pieces
        convs = OrderedDict(
            conv1=self._layer(in_channels, 96, k, kernel=8, pad=4, pool=4, stride=2),
            conv2=self._layer(96, 192, k, kernel=8, pad=3, pool=4, stride=2),
            conv3=self._layer(192, 192, k, kernel=5, pad=3, pool=2, stride=2),
            flatten=nn.Flatten(),
        )
        with torch.no_grad():  # probe the flattened size for this input size
            probe = torch.zeros(1, in_channels, input_size, input_size)
            try:
                flat = nn.Sequential(convs)(probe).shape[1]
            except RuntimeError as err:
                raise ZooArgumentError(f"{name}: input_size {input_size} is too small") from err
        layers = OrderedDict(convs)
        layers["hidden"] = nn.Sequential(
            nn.Linear(flat, 500 * hidden_pieces), _activation(hidden_pieces)
        )
        if dropout:
            layers["dropout"] = nn.Dropout(dropout)
        layers["fc"] = nn.Linear(500, num_classes)
        super().__init__(layers)
        init_weights(self)

    @staticmethod
    def _layer(
        cin: int, cout: int, k: int, kernel: int, pad: int, pool: int, stride: int
    ) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout * k, kernel, padding=pad),
            _activation(k),
            nn.MaxPool2d(pool, stride, ceil_mode=True),
        )


def fitnet_teacher_cifar10(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """The FitNets paper's CIFAR-10 teacher (~9M params). Hint layer: `conv2` (192 × 7 × 7).

    Keywords: input_size=32, maxout_pieces=2, hidden_pieces=2 (5 in the pylearn2 yaml), dropout=0.
    """
    options = ("input_size", "maxout_pieces", "hidden_pieces", "dropout")
    reject_unknown("fitnet-teacher-cifar10", kwargs, options)
    return MaxoutTeacher(num_classes, in_channels, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fitnet": fitnet,
    "fitnet1": fitnet1,
    "fitnet2": fitnet2,
    "fitnet3": fitnet3,
    "fitnet4": fitnet4,
    "fitnet-teacher-cifar10": fitnet_teacher_cifar10,
}
