"""Fused cross-entropy + KD loss (Hinton et al. 2015) in chunked PyTorch.

One pass over row chunks of the logits computes, in fp32, the log-sum-exp of the student logits
at T=1 (cross-entropy) and at T, the teacher's at T, and from them
`CE = mean(lse₁(s) − s[y])` and `KD = T² · Σ p_t^T (log p_t^T − log p_s^T) / N` (batchmean).
Only the inputs and the three per-row log-sum-exps are saved; backward rebuilds the softmaxes
chunk by chunk: `∂CE/∂s = (softmax(s) − onehot(y)) / N`, `∂KD/∂s = T (p_s^T − p_t^T) / N`.
"""

from __future__ import annotations

import torch

# Logit elements per chunk: 2^16 fp32 values = 256 KiB per temporary (a few fit in L2).
CHUNK_ELEMENTS = 1 << 16


def check_kd_inputs(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> None:
    """Raise ValueError, naming the shapes, for inputs the reference would reject or misread."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"logit shapes differ or are not N×K: student {tuple(student.shape)} "
            f"vs teacher {tuple(teacher.shape)}"
        )
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0]):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match student logits {tuple(student.shape)}"
        )


def default_rows(classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, classes))


class ChunkedKDCE(torch.autograd.Function):
    """(ce, kd) for N×K logits; ce is 0 without labels. Gradient flows to the student only."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, rows):
        ctx.set_materialize_grads(False)  # an unused output (e.g. ce) then costs no backward work
        n = student.shape[0]
        t = float(temperature)
        dev = student.device
        lse1 = torch.empty(n, dtype=torch.float32, device=dev) if labels is not None else None
        lse_s = torch.empty(n, dtype=torch.float32, device=dev)
        lse_t = torch.empty(n, dtype=torch.float32, device=dev)
        ce = torch.zeros((), dtype=torch.float32, device=dev)
        kl = torch.zeros((), dtype=torch.float32, device=dev)
        for r0 in range(0, n, rows):
            rs = slice(r0, min(r0 + rows, n))
            s = student[rs].float()
            if labels is not None:
                lse1[rs] = torch.logsumexp(s, dim=1)
                ce += lse1[rs].sum() - s.gather(1, labels[rs, None]).sum()
            a = s / t  # division, not a multiply by 1/T: the same rounding as the reference
            b = teacher[rs].float() / t
            lse_s[rs] = torch.logsumexp(a, dim=1)
            lse_t[rs] = torch.logsumexp(b, dim=1)
            log_pt = b.sub_(lse_t[rs, None])
            log_ps = a.sub_(lse_s[rs, None])
            # Σ p_t (log p_t − log p_s), element by element as kl_div does (no Σp_t = 1 shortcut,
            # which would cancel badly when student and teacher agree).
            kl += torch.dot(log_pt.exp().view(-1), (log_pt - log_ps).view(-1))
        ctx.save_for_backward(student, teacher, labels, lse1, lse_s, lse_t)
        ctx.temperature, ctx.rows = t, rows
        return ce / n, kl * (t * t / n)

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        student, teacher, labels, lse1, lse_s, lse_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_kd is None and (g_ce is None or labels is None)):
            return None, None, None, None, None
        n, t, rows = student.shape[0], ctx.temperature, ctx.rows
        grad = torch.empty_like(student)
        for r0 in range(0, n, rows):
            rs = slice(r0, min(r0 + rows, n))
            s = student[rs].float()
            g = torch.zeros_like(s)
            if g_kd is not None:
                p_s = (s / t).sub_(lse_s[rs, None]).exp_()
                p_t = (teacher[rs].float() / t).sub_(lse_t[rs, None]).exp_()
                g += p_s.sub_(p_t).mul_(g_kd.float() * (t / n))
            if g_ce is not None and labels is not None:
                p = (s - lse1[rs, None]).exp_()  # s may alias the saved fp32 input
                p.scatter_add_(1, labels[rs, None], torch.full_like(p[:, :1], -1.0))
                g += p.mul_(g_ce.float() / n)
            grad[rs] = g
        return grad, None, None, None, None


def chunked_kd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kd) in chunked PyTorch; inputs must already be checked."""
    rows = rows or default_rows(student.shape[1])
    return ChunkedKDCE.apply(student, teacher.detach(), labels, float(temperature), rows)
