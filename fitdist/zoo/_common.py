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


def init_weights(model: nn.Module) -> None:
    """He init (fan_out) for convs, BN as identity: the init RepDistiller's CIFAR models use.

    Linear layers keep PyTorch's default init, as RepDistiller's ResNets and WRNs do.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
