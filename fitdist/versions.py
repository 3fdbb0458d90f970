"""The versions fitdist is tested with, checked at start: a clear message instead of a failure deep
in a run. `pyproject.toml` states the same ranges to pip (a test keeps the two equal).

The code relies on APIs of recent torch (`torch.compiler.set_stance`, `get_total_norm`, fused
optimizers on CPU) and on DeepSpeed internals (its checkpoint engine, ZeRO-3 gathering) that
change between minor releases, so each range is the minor series tested, from the release tested."""

from __future__ import annotations

import os
import re
from importlib import metadata

from fitdist.errors import UserError

# package -> (lowest supported, first unsupported); tested: torch 2.14.1, torchvision 0.29.1, deepspeed 0.19.8
SUPPORTED = {
    "torch": ("2.14.1", "2.15"),
    "torchvision": ("0.29.1", "0.30"),
    "deepspeed": ("0.19.8", "0.20"),
}
OVERRIDE = "FITDIST_UNTESTED_VERSIONS"  # =1: run on other versions anyway


def requirement(package: str) -> str:
    """The pip requirement string, as in pyproject.toml."""
    low, high = SUPPORTED[package]
    return f"{package}>={low},<{high}"


def release(version: str) -> tuple[int, ...]:
    """`2.14.1+cu130` -> (2, 14, 1); pre-releases count as their release."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in found.group(0).split(".")) if found else ()


def check_versions(packages: tuple[str, ...] = ("torch", "torchvision"), installed: dict[str, str] | None = None) -> None:
    """A UserError naming the first installed package outside its supported range (packages not
    installed are skipped: a missing extra fails where it is imported, with its own message)."""
    if os.environ.get(OVERRIDE) == "1":
        return
    for package in packages:
        try:
            version = installed[package] if installed is not None else metadata.version(package)
        except (KeyError, metadata.PackageNotFoundError):
            continue
        low, high = SUPPORTED[package]
        if not release(low) <= release(version) < release(high):
            raise UserError(f"{package} {version} is installed, but fitdist supports {requirement(package)} "
                            f"(pip install '{requirement(package)}'; or {OVERRIDE}=1 to run on it untested)")
