"""Reference distillation losses, in fp32: the definition of correct for every fused kernel.

- `kd_loss`: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network".
- `kd_loss_to_target`: the same KL against a given target distribution (a teacher ensemble's
  mean probabilities, stored top-k soft labels) instead of one teacher's logits.
- `hint_loss`: Romero et al. 2014, "FitNets: Hints for Thin Deep Nets", eq. (3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HINT_REDUCTIONS = ("mean", "paper")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T² · KL(softmax(t/T) ‖ softmax(s/T))`, averaged over the batch ("batchmean").

    Computed in fp32 whatever the input dtype. The `T²` factor keeps the gradient magnitude
    independent of the temperature (Hinton et al. 2015, section 2). The teacher side carries no
    gradient: it is a target.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (t * t)


def kd_loss_to_target(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor | None = None,
    temperature: float | None = None,
    *,
    target_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """`T² · KL(p ‖ softmax(s/T))`, batchmean, in fp32, for a target `p` given as N×K probabilities.

    `p` is already at temperature T (e.g. Σ_i w_i softmax(t_i/T) for a weighted ensemble) and its
    rows sum to 1; zeros are allowed (0 · log 0 = 0, as `torch.xlogy`), so a top-k target is fine.
    Give it as `target_probs`, or as `target_log_probs` (keyword; −inf for zero mass): both forms
    give the same value. The target carries no gradient and is read as fp32 whatever its dtype;
    its row sums are not checked (that would need a host sync). With the teacher's logits `t`,
    `kd_loss(s, t, T) == kd_loss_to_target(s, softmax(t/T), T)` up to fp32 rounding.

    The gradient with respect to s is `T · (softmax(s/T) · Σ_k p_k − p) / N`, i.e.
    `T · (softmax(s/T) − p) / N` for rows that sum to 1.
    """
    if (target_probs is None) == (target_log_probs is None):
        raise ValueError("give exactly one of target_probs and target_log_probs")
    if temperature is None:  # a keyword default only so that target_log_probs= can replace p
        raise ValueError("temperature is required")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = target_probs if target_probs is not None else target_log_probs
    if student_logits.dim() != 2 or target.shape != student_logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the N×K student logits "
            f"{tuple(student_logits.shape)}"
        )
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    if target_probs is not None:
        p = target_probs.detach().float()
        neg_entropy = torch.xlogy(p, p)
    else:
        log_p = target_log_probs.detach().float()
        p = log_p.exp()
        neg_entropy = torch.where(p == 0, 0.0, p * log_p)  # 0 · (−inf) would be NaN
    kl = (neg_entropy - p * log_q).sum() / student_logits.shape[0]
    return kl * (t * t)


def hint_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Distance between the regressed student features and the teacher hint, in fp32.

    - `"mean"`: equals `F.mse_loss(pred, target)` (what most re-implementations use).
    - `"paper"`: `½ · Σ(pred − target)² / batch_size`, FitNets eq. (3) averaged over the batch.
    """
    if pred.shape != target.shape:
        raise ValueError(f"hint shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    diff = pred.float() - target.detach().float()
    if reduction == "mean":
        return diff.pow(2).mean()
    if reduction == "paper":
        return 0.5 * diff.pow(2).sum() / pred.shape[0]
    raise ValueError(f"reduction must be one of {HINT_REDUCTIONS}, got {reduction!r}")
