"""Reference distillation losses, in fp32: the definition of correct for every fused kernel.

- `kd_loss`: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network".
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
