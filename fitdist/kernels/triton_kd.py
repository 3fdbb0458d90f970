"""Triton kernels for the fused cross-entropy + KD loss: the math of `kernels/kd.py`, one program
per logit row.

Forward streams a row twice in blocks of classes: first an online log-sum-exp (running max and
rescaled sum) of s, s/T and t/T, then the per-row KL term. It writes per-row ce and kl and the three
log-sum-exps; the batch sums happen in fp32 with torch. Backward streams the row once more and
writes `g_ce (softmax(s) − onehot(y)) / N + g_kd T (p_s^T − p_t^T) / N`. Every value is fp32 in
registers whatever the logits' dtype. Imported only when Triton is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # classes per block: a 1000-class row is one block


@triton.jit
def _lse_update(m, acc, x):
    """Online log-sum-exp step (Milakov & Gimelshein 2018): rescale the old sum to the new max."""
    m_new = tl.maximum(m, tl.max(x, 0))
    return m_new, acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)


@triton.jit
def _kd_fwd(
    s_ptr, t_ptr, y_ptr, ce_ptr, kl_ptr, lse1_ptr, lses_ptr, lset_ptr,
    K, stride_s, stride_t, inv_t,
    HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    m1, a1 = zero - float("inf"), zero
    ms, as_ = zero - float("inf"), zero
    mt, at = zero - float("inf"), zero
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_LABELS:
            m1, a1 = _lse_update(m1, a1, s)
        ms, as_ = _lse_update(ms, as_, s * inv_t)
        mt, at = _lse_update(mt, at, t * inv_t)
    lse_s = ms + tl.log(as_)
    lse_t = mt + tl.log(at)
    kl = zero
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        log_pt = t * inv_t - lse_t
        log_ps = s * inv_t - lse_s
        kl += tl.sum(tl.where(mask, tl.exp(log_pt) * (log_pt - log_ps), 0.0), 0)
    tl.store(kl_ptr + row, kl)
    tl.store(lses_ptr + row, lse_s)
    tl.store(lset_ptr + row, lse_t)
    if HAS_LABELS:
        lse1 = m1 + tl.log(a1)
        y = tl.load(y_ptr + row)
        tl.store(ce_ptr + row, lse1 - tl.load(s_row + y).to(tl.float32))
        tl.store(lse1_ptr + row, lse1)


@triton.jit
def _kd_bwd(
    s_ptr, t_ptr, y_ptr, g_ptr, lse1_ptr, lses_ptr, lset_ptr, coef_ptr,
    K, stride_s, stride_t, stride_g, inv_t,
    HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c_ce = tl.load(coef_ptr)  # g_ce / N, read on device: no host synchronisation
    c_kd = tl.load(coef_ptr + 1)  # g_kd · T / N
    lse_s = tl.load(lses_ptr + row)
    lse_t = tl.load(lset_ptr + row)
    if HAS_CE:
        lse1 = tl.load(lse1_ptr + row)
        y = tl.load(y_ptr + row)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        s = tl.load(s_ptr + row * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.zeros([BLOCK], tl.float32)
        if HAS_KD:
            t = tl.load(t_ptr + row * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            g += c_kd * (tl.exp(s * inv_t - lse_s) - tl.exp(t * inv_t - lse_t))
        if HAS_CE:
            g += c_ce * (tl.exp(s - lse1) - tl.where(offs == y, 1.0, 0.0))
        tl.store(g_ptr + row * stride_g + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


class TritonKDCE(torch.autograd.Function):
    """(ce, kd) like `kd.ChunkedKDCE`, with the row loops in Triton."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature):
        ctx.set_materialize_grads(False)
        student, teacher = student.contiguous(), teacher.contiguous()
        n, k = student.shape
        t = float(temperature)
        f32 = dict(dtype=torch.float32, device=student.device)
        has_labels = labels is not None
        ce_rows = torch.empty(n, **f32) if has_labels else None
        lse1 = torch.empty(n, **f32) if has_labels else None
        kl_rows, lse_s, lse_t = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
        dummy = lse_s  # never read when HAS_LABELS is off
        block = min(MAX_BLOCK, triton.next_power_of_2(k))
        _kd_fwd[(n,)](
            student, teacher, labels if has_labels else dummy,
            ce_rows if has_labels else dummy, kl_rows, lse1 if has_labels else dummy, lse_s, lse_t,
            k, student.stride(0), teacher.stride(0), 1.0 / t,
            HAS_LABELS=has_labels, BLOCK=block,
        )  # fmt: skip
        ce = ce_rows.sum() / n if has_labels else torch.zeros((), **f32)
        ctx.save_for_backward(student, teacher, labels, lse1, lse_s, lse_t)
        ctx.temperature, ctx.block = t, block
        return ce, kl_rows.sum() * (t * t / n)

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        student, teacher, labels, lse1, lse_s, lse_t = ctx.saved_tensors
        has_ce = g_ce is not None and labels is not None
        if not ctx.needs_input_grad[0] or (g_kd is None and not has_ce):
            return None, None, None, None
        n, k = student.shape
        t = ctx.temperature
        zero = torch.zeros((), dtype=torch.float32, device=student.device)
        coef = torch.stack([
            g_ce.float() / n if has_ce else zero,
            g_kd.float() * (t / n) if g_kd is not None else zero,
        ])  # fmt: skip
        grad = torch.empty_like(student)
        _kd_bwd[(n,)](
            student, teacher, labels if has_ce else lse_s, grad,
            lse1 if has_ce else lse_s, lse_s, lse_t, coef,
            k, student.stride(0), teacher.stride(0), grad.stride(0), 1.0 / t,
            HAS_CE=has_ce, HAS_KD=g_kd is not None, BLOCK=ctx.block,
        )  # fmt: skip
        return grad, None, None, None


def triton_kd_ce(student, teacher, labels, temperature):
    """(ce, kd) with the Triton kernels; inputs must already be checked."""
    return TritonKDCE.apply(student, teacher.detach(), labels, float(temperature))
