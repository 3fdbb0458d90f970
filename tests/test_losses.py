"""The reference losses against their closed forms in float64, values and gradients, fp32 and bf16.

Tolerances come from `fitdist.kernels.accuracy.rtol` (the length of the reductions involved);
inputs are fresh each run, from the seed the `seed` fixture prints (FITDIST_TEST_SEED fixes it).
"""

import os
import random
import zlib

import pytest
import torch

from fitdist.kernels.accuracy import ELEMENTWISE, assert_close, rtol
from fitdist.losses import hint_loss, kd_loss

BASE_SEED = int(os.environ.get("FITDIST_TEST_SEED") or random.randrange(2**31))


@pytest.fixture
def seed(request) -> int:
    """This run's seed for this test: fresh each run unless FITDIST_TEST_SEED fixes it."""
    s = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(s)
    print(f"reproduce with FITDIST_TEST_SEED={BASE_SEED} (torch.manual_seed({s}) in this test)")
    return s


def kd_closed_form(s: torch.Tensor, t: torch.Tensor, T: float) -> tuple[torch.Tensor, float]:
    """T² · (1/B) Σ_b Σ_i p_t,i (log p_t,i − log p_s,i), written out in float64.

    Also returns the magnitude its rounding errors scale with, T²/B · Σ p_t (|log p_t| + |log p_s|).
    """
    s, t = s.double() / T, t.double() / T
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    scale = T * T / s.shape[0]
    magnitude = scale * (p_t * (p_t.log().abs() + log_p_s.abs())).sum().item()
    return scale * (p_t * (p_t.log() - log_p_s)).sum(), magnitude


def kd_tol(shape) -> float:
    """A log-sum-exp per row, then a sum over all B·K terms."""
    return rtol(shape[-1] + shape[0] * shape[-1] + ELEMENTWISE)


@pytest.mark.parametrize("shape", [(1, 2), (7, 10), (33, 1000)])
@pytest.mark.parametrize("T", [1.0, 3.0, 7.5])
def test_kd_value_and_grad_match_closed_form(shape, T, seed):
    s = (torch.randn(*shape) * 3).requires_grad_()
    t = torch.randn(*shape) * 3
    loss = kd_loss(s, t, T)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    ref, magnitude = kd_closed_form(s64, t, T)
    ref.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref, kd_tol(shape), magnitude, what="kd")
    # d/ds of T²·KL = T · (p_s − p_t) / B
    p_s = (s64.detach() / T).softmax(-1)
    expected = T * (p_s - (t.double() / T).softmax(-1)) / shape[0]
    assert_close(s.grad, expected, rtol(shape[-1] + ELEMENTWISE), what="kd grad")
    assert_close(s64.grad, expected, 1e-12, what="autograd of the closed form")  # float64


def test_kd_is_zero_for_equal_logits_and_positive_otherwise(seed):
    x = torch.randn(5, 10)
    _, magnitude = kd_closed_form(x, x, 4.0)
    assert_close(kd_loss(x, x.clone(), 4.0), torch.zeros(()), kd_tol(x.shape), magnitude)
    assert kd_loss(x, torch.randn(5, 10), 4.0).item() > 0


def test_kd_computes_in_fp32_from_bf16_and_under_autocast(seed):
    s, t = torch.randn(16, 100), torch.randn(16, 100)
    # The bf16 values are exact in float64: the reference from them must be fp32-accurate.
    ref, magnitude = kd_closed_form(s.bfloat16(), t.bfloat16(), 3.0)
    out = kd_loss(s.bfloat16(), t.bfloat16(), 3.0)
    assert out.dtype == torch.float32
    assert_close(out, ref, kd_tol(s.shape), magnitude, what="kd from bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = torch.randn(100, 100, requires_grad=True)
        logits = s @ w  # bf16 under autocast
        assert logits.dtype == torch.bfloat16
        val = kd_loss(logits, t, 3.0)
    assert val.dtype == torch.float32
    val.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_kd_teacher_gets_no_gradient_and_bad_temperature_is_rejected():
    s, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 7, 7), (4, 16, 3, 5)])
def test_hint_mean_and_paper_match_closed_forms(shape, seed):
    """mean: Σd²/numel (as F.mse_loss); paper: ½·Σd²/B (FitNets eq. 3 over the batch)."""
    pred = torch.randn(*shape, requires_grad=True)
    target = torch.randn(*shape)
    d = pred.detach().double() - target.double()
    tol_sum, tol_elem = rtol(d.numel() + ELEMENTWISE), rtol(ELEMENTWISE)
    mean = hint_loss(pred, target, "mean")
    assert_close(mean, (d**2).sum() / d.numel(), tol_sum, what="mean")
    (g_mean,) = torch.autograd.grad(mean, pred)
    assert_close(g_mean, 2 * d / d.numel(), tol_elem, what="d mean")
    paper = hint_loss(pred, target, "paper")
    assert_close(paper, 0.5 * (d**2).sum() / shape[0], tol_sum, what="paper")
    (g_paper,) = torch.autograd.grad(paper, pred)
    assert_close(g_paper, d / shape[0], tol_elem, what="d paper")


def test_hint_in_fp32_for_bf16_inputs_and_rejects_bad_input(seed):
    p, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    out = hint_loss(p, t)
    assert out.dtype == torch.float32
    d = p.double() - t.double()  # bf16 values are exact in float64; the loss is fp32-accurate
    assert_close(out, (d**2).mean(), rtol(d.numel() + ELEMENTWISE), what="mean from bf16")
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="reduction"):
        hint_loss(p, t, "sum")
