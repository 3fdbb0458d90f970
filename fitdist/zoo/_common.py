"""Small helpers shared by the zoo: argument checks with clear errors, and weight init."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from fitdist.errors import UserError, did_you_mean


class ZooArgumentError(UserError, ValueError):
    """A bad architecture argument. A `UserError` (one line from the CLI) and a `ValueError`."""


def reject_unknown(factory: str, kwargs: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise `ZooArgumentError` naming any keyword `factory` does not take."""
    allowed = sorted(allowed)
    for key in kwargs:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            takes = ", ".join(allowed) if allowed else "none"
            raise ZooArgumentError(
                f"{factory}: unknown argument {key!r}{hint}; extra arguments it takes: {takes}"
            )


def check_positive_int(factory: str, name: str, value: Any) -> int:
    """`value` as an int >= 1, or a `ZooArgumentError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZooArgumentError(f"{factory}: {name} must be a positive integer, got {value!r}")
    return value


def check_fraction(factory: str, name: str, value: Any) -> float:
    """`value` in [0, 1) (a dropout rate), or a `ZooArgumentError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ZooArgumentError(f"{factory}: {name} must be in [0, 1), got {value!r}")
    return float(value)


INITS = "'kaiming', 'glorot_uniform' or 'uniform:A' (A > 0, e.g. 'uniform:0.05')"


def parse_init(factory: str, init: Any) -> tuple[str, float]:
    """`init` as `(kind, bound)`: ("kaiming", 0), ("glorot_uniform", 0) or ("uniform", A)."""
    if init in ("kaiming", "glorot_uniform"):
        return init, 0.0
    if isinstance(init, str) and init.startswith("uniform:"):
        try:
            bound = float(init.removeprefix("uniform:"))
        except ValueError:
            bound = float("nan")
        if bound > 0 and bound != float("inf"):
            return "uniform", bound
    raise ZooArgumentError(f"{factory}: init must be {INITS}, got {init!r}")


def init_weights(model: nn.Module, init: str = "kaiming", factory: str = "model") -> None:
    """Weight init of the zoo's models; BatchNorm as identity in every case.

    - `kaiming` (default): He init (fan_out) for convs, Linear layers left at PyTorch's default,
      the init RepDistiller's CIFAR models use;
    - `glorot_uniform`: every Conv/Linear weight U(±sqrt(6/(fan_in + fan_out))), a conv's fans
      being its in / out channels × kh·kw (Glorot & Bengio 2010); biases zero;
    - `uniform:A`: every Conv/Linear weight U(±A), biases zero: pylearn2's `irange`, which the
      maxout and FitNets CIFAR-10 yamls use.
    """
    kind, bound = parse_init(factory, init)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and (kind != "kaiming" or isinstance(m, nn.Conv2d)):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif kind == "glorot_uniform":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
