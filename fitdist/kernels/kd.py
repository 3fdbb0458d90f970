"""Fused cross-entropy + KD loss (Hinton et al. 2015) in chunked PyTorch.

One pass over row chunks of the logits computes, in fp32, the log-softmax of the student logits
at T=1 (cross-entropy) and at T and the teacher's at T, and reduces them to
`CE = −mean(log p_s[y])` and `KD = T² · Σ p_t^T (log p_t^T − log p_s^T) / N` (batchmean).
A chunk stays in cache across its few passes, where the reference streams whole N×K tensors
through memory a dozen times.

With a given target distribution p (N×K probabilities at temperature T, `target_probs`) in place
of the teacher's logits, `KD = T² · Σ (xlogy(p, p) − p log p_s^T) / N`: the negative entropy of p
(constant in s, 0 · log 0 = 0) plus the cross term. Its gradient is `T (p_s^T Σ_k p_k − p) / N`,
the exact gradient of that value even for rows that do not sum to exactly 1 (a bf16 target's).

The loss is `ce_weight · CE + kd_weight · KD`, a scalar, so its gradient is known in the forward
pass, where the softmaxes are at hand: `ce_weight (softmax(s) − onehot(y)) / N +
kd_weight · T (p_s^T − p_t^T) / N`. When a gradient is wanted it is written there, and that one
N×K tensor (in the logits' dtype) is all backward needs: it only scales it by the incoming
gradient. Recomputing it in backward would cost three more softmaxes for no memory saved, since
the logits themselves would have to be kept instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit elements per chunk: 2^16 fp32 values = 256 KiB per temporary (a few fit in L2).
CHUNK_ELEMENTS = 1 << 16


def check_kd_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    *,
    what: str = "teacher",
) -> None:
    """Raise ValueError, naming the shapes, for inputs the reference would reject or misread.

    `what` names the second tensor in messages ("teacher" logits or "target_probs"). Only shapes,
    dtypes and the temperature are checked: the values (a target's rows summing to 1) are not,
    as that would read them back from the device (a sync).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"logit shapes differ or are not N×K: student {tuple(student.shape)} "
            f"vs {what} {tuple(teacher.shape)}"
        )
    if what == "target_probs" and not teacher.is_floating_point():
        raise ValueError(f"target_probs must be floating point probabilities, got {teacher.dtype}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0]):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match student logits {tuple(student.shape)}"
        )


def default_rows(classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, classes))


class ChunkedKDCE(torch.autograd.Function):
    """(loss, ce, kd) for N×K logits; ce is 0 without labels; ce and kd carry no gradient."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, ce_weight, kd_weight, rows, probs=False):
        n = student.shape[0]
        t = float(temperature)
        ce = torch.zeros((), dtype=torch.float32, device=student.device)
        kl = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        for r0 in range(0, n, rows):
            rs = slice(r0, min(r0 + rows, n))
            s = student[rs].float()
            # Division, not a multiply by 1/T: the same rounding as the reference.
            log_ps = F.log_softmax(s / t, dim=1)
            if probs:  # the target itself, read as fp32 chunk by chunk (never written to)
                p_t = teacher[rs].float()
                # Σ (xlogy(p, p) − p log p_s) element by element, as kd_loss_to_target does.
                kl += torch.xlogy(p_t, p_t).sub_(log_ps * p_t).sum()
                if grad is not None:  # T (p_s Σp − p) / N: the gradient of exactly that value
                    g = log_ps.exp_().mul_(p_t.sum(1, keepdim=True)).sub_(p_t).mul_(kd_weight * t / n)
            else:
                log_pt = F.log_softmax(teacher[rs].float() / t, dim=1)
                p_t = log_pt.exp()
                # Σ p_t (log p_t − log p_s) element by element, as kl_div computes it.
                kl += torch.dot(p_t.view(-1), log_pt.sub_(log_ps).view(-1))
                if grad is not None:  # T (p_s − p_t) / N: the T² of the loss over the 1/T of s/T
                    g = log_ps.exp_().sub_(p_t).mul_(kd_weight * t / n)
            if labels is not None:
                log_p = F.log_softmax(s, dim=1)
                ce -= log_p.gather(1, labels[rs, None]).sum()
                if grad is not None and ce_weight != 0:  # (softmax(s) − onehot(y)) / N
                    p = log_p.exp_()
                    p.scatter_add_(1, labels[rs, None], torch.full_like(p[:, :1], -1.0))
                    g.add_(p.mul_(ce_weight / n))
            if grad is not None:
                grad[rs] = g
        ce, kd = ce / n, kl * (t * t / n)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd)  # logged apart; the gradient is the weighted loss's
        return ce * ce_weight + kd * kd_weight, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _g_ce, _g_kd):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def chunked_kd_ce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    rows: int | None = None,
    *,
    probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd) in chunked PyTorch; inputs must already be checked. With `probs`, `teacher`
    is the target distribution at temperature T (any float dtype) instead of logits."""
    rows = rows or default_rows(student.shape[1])
    args = (float(temperature), float(ce_weight), float(kd_weight), rows, bool(probs))
    return ChunkedKDCE.apply(student, teacher.detach(), labels, *args)
