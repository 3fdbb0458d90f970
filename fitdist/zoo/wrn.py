"""Wide ResNets (Zagoruyko & Komodakis 2016, arXiv 1605.07146) as used by CRD / RepDistiller.

WRN-d-k: a 3×3 stem with 16 channels, three stages of `n = (d − 4) / 6` pre-activation blocks
with widths 16k, 32k, 64k, then BN-ReLU, global average pooling and a linear layer. Matches
HobbitLong/RepDistiller `models/wrn.py` (itself from szagoruyko/wide-residual-networks),
including its shortcut rule: when a block changes shape, the 1×1 shortcut conv reads the
*activated* input `relu(bn1(x))`, not `x`.

Differences from RepDistiller, none of which changes a parameter: `in_channels` is a parameter;
stages are plain `nn.Sequential`s (`block1.0`, not `block1.layer.0`); the final BN is `bn`
(RepDistiller: `bn1`); pooling is adaptive; `forward` returns logits only; no in-place ops.

Module paths for hints, with output shapes for a 3×32×32 input:

    conv1      16 × 32 × 32
    block1     16k × 32 × 32   (the stage's residual sum: pre-activation, as in RepDistiller)
    block2     32k × 16 × 16
    block3     64k ×  8 ×  8
    bn, relu   64k ×  8 ×  8   (`relu` = the post-activation features fed to pooling)
    avgpool    64k ×  1 ×  1
    fc         num_classes

Every module runs at most once per forward pass, so a forward hook on any path fires once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fitdist.zoo._common import (
    ZooArgumentError,
    check_fraction,
    check_positive_int,
    init_weights,
    reject_unknown,
)


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3, plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()  # not shared with relu1: a module run twice fires its hooks twice
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor`; `depth = 6n + 4`."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        name = f"wrn-{depth}-{widen_factor}"
        check_positive_int(name, "widen_factor", widen_factor)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ZooArgumentError(f"{name}: depth must be 6n+4 with n >= 1, got {depth!r}")
        check_fraction(name, "dropout", dropout)
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)  # RepDistiller zeroes linear biases in WRNs

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBasic(cin, cout, stride, dropout)]
        blocks += [WideBasic(cout, cout, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn(
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    depth: int | None = None,
    widen_factor: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Generic WRN: `wrn(depth=28, widen_factor=10)`. Extra keyword: `dropout` (default 0)."""
    if depth is None or widen_factor is None:
        raise ZooArgumentError("wrn: needs depth= and widen_factor=, e.g. depth=40, widen_factor=2")
    reject_unknown("wrn", kwargs, ("dropout",))
    return WideResNet(depth, widen_factor, num_classes, in_channels, **kwargs)


def _factory(depth: int, widen_factor: int) -> Callable[..., nn.Module]:
    name = f"wrn-{depth}-{widen_factor}"

    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        reject_unknown(name, kwargs, ("dropout",))
        return WideResNet(depth, widen_factor, num_classes, in_channels, **kwargs)

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"WRN-{depth}-{widen_factor} (RepDistiller `{factory.__name__}`)."
    return factory


wrn_16_1 = _factory(16, 1)
wrn_16_2 = _factory(16, 2)
wrn_40_1 = _factory(40, 1)
wrn_40_2 = _factory(40, 2)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn-16-1": wrn_16_1,
    "wrn-16-2": wrn_16_2,
    "wrn-40-1": wrn_40_1,
    "wrn-40-2": wrn_40_2,
    "wrn": wrn,
}
