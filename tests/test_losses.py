"""The reference losses against their closed forms, values and gradients, fp32 and bf16."""

import math

import pytest
import torch
import torch.nn.functional as F

from fitdist.losses import hint_loss, kd_loss


def kd_closed_form(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T² · (1/B) Σ_b Σ_i p_t,i (log p_t,i − log p_s,i), written out in float64."""
    s, t = s.double() / T, t.double() / T
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    return T * T * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()


@pytest.mark.parametrize("shape", [(1, 2), (7, 10), (33, 1000)])
@pytest.mark.parametrize("T", [1.0, 3.0, 7.5])
def test_kd_value_and_grad_match_closed_form(shape, T):
    g = torch.Generator().manual_seed(hash((shape, T)) % 2**31)
    s = (torch.randn(*shape, generator=g) * 3).requires_grad_()
    t = torch.randn(*shape, generator=g) * 3
    loss = kd_loss(s, t, T)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    ref = kd_closed_form(s64, t, T)
    ref.backward()
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-7)
    # d/ds of T²·KL = T · (p_s − p_t) / B
    expected = T * (F.softmax(s64.detach() / T, -1) - F.softmax(t.double() / T, -1)) / shape[0]
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(s64.grad, expected)


def test_kd_is_zero_for_equal_logits_and_positive_otherwise():
    x = torch.randn(5, 10)
    assert kd_loss(x, x.clone(), 4.0).abs().item() < 1e-6
    assert kd_loss(x, torch.randn(5, 10), 4.0).item() > 0


def test_kd_computes_in_fp32_from_bf16_and_under_autocast():
    s, t = torch.randn(16, 100), torch.randn(16, 100)
    ref = kd_closed_form(s.bfloat16().float(), t.bfloat16().float(), 3.0)
    out = kd_loss(s.bfloat16(), t.bfloat16(), 3.0)
    assert out.dtype == torch.float32
    assert math.isclose(out.item(), ref.item(), rel_tol=1e-5)
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
def test_hint_mean_equals_mse_and_paper_equals_half_sum_over_batch(shape):
    pred = torch.randn(*shape, requires_grad=True)
    target = torch.randn(*shape)
    mean = hint_loss(pred, target, "mean")
    torch.testing.assert_close(mean, F.mse_loss(pred, target))
    (g_mean,) = torch.autograd.grad(mean, pred)
    torch.testing.assert_close(g_mean, 2 * (pred - target).detach() / pred.numel())
    paper = hint_loss(pred, target, "paper")
    expected = 0.5 * ((pred.detach().double() - target.double()) ** 2).sum() / shape[0]
    assert math.isclose(paper.item(), expected.item(), rel_tol=1e-5)
    (g_paper,) = torch.autograd.grad(paper, pred)
    torch.testing.assert_close(g_paper, (pred - target).detach() / shape[0])


def test_hint_in_fp32_for_bf16_inputs_and_rejects_bad_input():
    p, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    out = hint_loss(p, t)
    assert out.dtype == torch.float32
    assert math.isclose(out.item(), F.mse_loss(p.float(), t.float()).item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="reduction"):
        hint_loss(p, t, "sum")
