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

The magnitude is that of the terms, i.e. the same computation on absolute values, not that of
the result, which cancellation can make arbitrarily small; the `*_magnitude` helpers give it for
the losses' building blocks. Tests compare a result with an exact one computed in float64 from the
same inputs (float64's own error is ~10⁻⁹ of fp32's, negligible), elementwise against
`rtol(n) · magnitude`, so fresh random inputs cannot make them flaky.
"""

from __future__ import annotations

import math
import os
import random

import torch

# Measured: the largest |error| / (eps · √n · magnitude) over the fp32 and bf16 checks of
# tests/test_kernels.py and tests/test_losses.py, 200 seeds (chunked PyTorch and the references)
# and 15 (Triton under the interpreter), was 0.51: SAFETY = 16 leaves a margin of 30×.
SAFETY = 16.0
# Besides its reductions, each term of a loss goes through a handful of elementwise roundings
# (scaling by 1/T, exp or log, adding a bias, subtracting, squaring): callers add this to n.
ELEMENTWISE = 8


def rtol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative bound for a result computed through a chain of `n` roundings in `dtype`."""
    return SAFETY * torch.finfo(dtype).eps * math.sqrt(max(1, n))


def log_softmax_magnitude(v: torch.Tensor) -> torch.Tensor:
    """What the rounding error of `log_softmax(v, -1)` scales with, elementwise: |v| + |lse(v)|.

    log p = v − lse(v) is a difference of two numbers of that size: a log-probability near 0
    carries the rounding error of the logits, not of itself.
    """
    return v.abs() + v.logsumexp(-1, keepdim=True).abs()


def softmax_magnitude(v: torch.Tensor) -> torch.Tensor:
    """What the rounding error of `softmax(v, -1)` scales with, elementwise: p · (1 + |v| + |lse|).

    exp turns the absolute error of the exponent v − lse into a relative error of p: a tiny
    probability is known to a fraction of itself, not of the largest one.
    """
    return v.softmax(-1) * (1 + log_softmax_magnitude(v))


def kd_magnitude(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """What the rounding error of T² · Σ p_t (log p_t − log p_s), per row, scales with.

    To first order each term errs by δp_t·|log p_t − log p_s| + p_t·(δlog p_t + δlog p_s), with
    δp_t ∝ softmax_magnitude(t/T) and δlog p ∝ log_softmax_magnitude.
    """
    a, b = s.double() / temperature, t.double() / temperature
    gap = (b.log_softmax(-1) - a.log_softmax(-1)).abs()
    terms = softmax_magnitude(b) * gap + b.softmax(-1) * (
        log_softmax_magnitude(a) + log_softmax_magnitude(b)
    )
    return temperature**2 * terms.sum(-1)


def assert_close(
    actual: torch.Tensor,
    exact: torch.Tensor,
    tol: float,
    magnitude: float | torch.Tensor,
    what: str = "",
) -> None:
    """Assert `|actual − exact| ≤ tol · magnitude`, elementwise.

    `magnitude` is what the rounding errors scale with: the same computation on the absolute
    values of its terms (Σ|terms| for a sum, |W|ᵀ|dz| for a matmul), not the result itself, which
    cancellation can make arbitrarily small. A scalar, or a tensor of the result's shape.
    """
    a, e = actual.detach().double(), exact.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    mag = torch.as_tensor(magnitude, dtype=torch.float64).expand_as(e)
    excess = (a - e).abs() - tol * mag
    if excess.numel() and excess.max().item() > 0:
        i = excess.argmax()
        err, m = (a - e).abs().flatten()[i].item(), mag.flatten()[i].item()
        raise AssertionError(
            f"{what}: |error| {err:.3e} > {tol:.2e} × magnitude {m:.3e} at flat index {i.item()} "
            f"(error/magnitude {err / m if m else math.inf:.2e})"
        )


BASE_SEED = int(os.environ.get("FITDIST_TEST_SEED") or random.randrange(2**31))

