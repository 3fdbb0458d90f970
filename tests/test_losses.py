"""The reference losses against their closed forms in float64, values and gradients, fp32 and bf16.

Tolerances come from `fp_accuracy.rtol` (the length of the reductions involved);
inputs are fresh each run, from the seed the `seed` fixture prints (FITDIST_TEST_SEED fixes it).
"""


import pytest
import torch
from fp_accuracy import (
    ELEMENTWISE,
    assert_close,
    kd_magnitude,
    rtol,
    softmax_magnitude,
)

from fitdist.losses import hint_loss, kd_loss


def kd_closed_form(s: torch.Tensor, t: torch.Tensor, T: float) -> tuple[torch.Tensor, float]:
    """T² · (1/B) Σ_b Σ_i p_t,i (log p_t,i − log p_s,i), written out in float64.

    Also returns the magnitude its fp32 rounding errors scale with (`accuracy.kd_magnitude`).
    """
    magnitude = kd_magnitude(s.detach(), t, T).mean().item()
    s, t = s.double() / T, t.double() / T
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    return T * T / s.shape[0] * (p_t * (p_t.log() - log_p_s)).sum(), magnitude


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
    s_T, t_T = s64.detach() / T, t.double() / T
    expected = T * (s_T.softmax(-1) - t_T.softmax(-1)) / shape[0]
    grad_mag = T * (softmax_magnitude(s_T) + softmax_magnitude(t_T)) / shape[0]
    assert_close(s.grad, expected, rtol(shape[-1] + ELEMENTWISE), grad_mag, what="kd grad")
    assert_close(s64.grad, expected, 1e-12, grad_mag, what="autograd of the closed form")


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
    rho = pred.detach().double().abs() + target.double().abs()  # what d's rounding scales with
    tol_sum, tol_elem = rtol(d.numel() + ELEMENTWISE), rtol(ELEMENTWISE)
    for name, scale in [("mean", 1.0 / d.numel()), ("paper", 0.5 / shape[0])]:
        loss = hint_loss(pred, target, name)
        assert_close(loss, scale * (d**2).sum(), tol_sum, scale * (rho**2).sum(), what=name)
        (grad,) = torch.autograd.grad(loss, pred)
        assert_close(grad, 2 * scale * d, tol_elem, 2 * scale * rho, what=f"d {name}")


def test_hint_in_fp32_for_bf16_inputs_and_rejects_bad_input(seed):
    p, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    out = hint_loss(p, t)
    assert out.dtype == torch.float32
    d = p.double() - t.double()  # bf16 values are exact in float64; the loss is fp32-accurate
    rho = p.double().abs() + t.double().abs()
    tol = rtol(d.numel() + ELEMENTWISE)
    assert_close(out, (d**2).mean(), tol, (rho**2).mean(), what="mean from bf16")
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="reduction"):
        hint_loss(p, t, "sum")
