"""User-facing errors: the CLI turns a `UserError` into one line on stderr and exit status 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (config, path, data): reported in one line, no traceback."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates nearest to `name`, best first (difflib ratio)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.3)


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ` (did you mean: a, b?)` suffix, or an empty string when nothing is close."""
    near = closest(name, candidates, n)
    return f" (did you mean: {', '.join(near)}?)" if near else ""
