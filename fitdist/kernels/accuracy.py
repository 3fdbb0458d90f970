"""How close a loss computed in floating point is to its exact value: the bound the tests of the
reference losses and of the fused kernels hold them to.

A result obtained through a chain of `n` roundings in a dtype with machine epsilon `eps` (a dot
product or sum of length n, a log-sum-exp over n classes, ...) differs from the exact result by at
most about `n · eps` times the magnitude of its terms (Higham, "Accuracy and Stability of
Numerical Algorithms", γ_n). That worst case needs every rounding to err the same way; rounding to
nearest is unbiased and successive roundings are nearly independent, so in practice the errors
add like a random walk and stay within a few `eps · √n`. `rtol` is that random-walk size times
`SAFETY`, a margin far beyond what any draw of inputs reaches (the largest ratio measured over
thousands of random cases is noted below), yet a real bug (a wrong mask, a dropped or doubled
block, a missing factor) is off by orders of magnitude more.

Tests compare a result with an exact one computed in float64 from the same inputs (float64's own
error is ~10⁻⁹ of fp32's, negligible), so fresh random inputs cannot make them flaky.
"""

from __future__ import annotations

import math

import torch

# Measured: the largest |error| / (eps · √n · magnitude) over the fp32 and bf16 kernel and
# reference checks of tests/test_kernels.py, 200 seeds (chunked PyTorch) and 15 (Triton under the
# interpreter), was 1.01: SAFETY = 16 leaves a margin of about 16×.
SAFETY = 16.0
# Besides its reductions, each term of a loss goes through a handful of elementwise roundings
# (scaling by 1/T, exp or log, adding a bias, subtracting, squaring): callers add this to n.
ELEMENTWISE = 8


def rtol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative bound for a result computed through a chain of `n` roundings in `dtype`."""
    return SAFETY * torch.finfo(dtype).eps * math.sqrt(max(1, n))


def assert_close(
    actual: torch.Tensor,
    exact: torch.Tensor,
    tol: float,
    magnitude: float | None = None,
    what: str = "",
) -> None:
    """Assert `|actual − exact| ≤ tol · magnitude` everywhere.

    `magnitude` is the size the rounding errors are relative to: the magnitude of the terms that
    were summed. It defaults to `max |exact|`: an element of a gradient that cancels to near zero
    still carries the rounding error of its neighbours' size, so it is judged against them.
    """
    a, e = actual.detach().double(), exact.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    mag = e.abs().max().item() if magnitude is None else magnitude
    err = (a - e).abs().max().item() if a.numel() else 0.0
    assert err <= tol * mag, (
        f"{what}: max |error| {err:.3e} > {tol:.2e} × {mag:.3e} "
        f"(error/magnitude {err / mag if mag else math.inf:.2e})"
    )
