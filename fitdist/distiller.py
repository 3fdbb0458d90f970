"""The three roles of a distillation run (Romero et al. 2014; Hinton et al. 2015).

- `FrozenTeacher`: pinned to eval, no parameter requires grad, runs under `no_grad`.
- `Student`: the backbone plus its FitNets regressors in one `nn.Module`, so DDP and DeepSpeed
  synchronise the regressors' gradients too; its `state_dict` is what training checkpoints hold,
  while `student.pt` is the backbone alone.
- `Distiller`: a plain class (not a module, so the teacher never leaks into a `state_dict`) that
  returns the named loss terms of one micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitdist import losses
from fitdist.features import FeatureTap

TERMS = ("ce", "kd", "hint")


class FrozenTeacher(nn.Module):
    """A trained model used as a fixed target: always eval, never trained."""

    def __init__(self, model: nn.Module, hint_paths: list[str], precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.tap = FeatureTap(model, hint_paths, where="teacher hint")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.channels_last = channels_last
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # BN statistics and dropout of the teacher never change

    @torch.no_grad()  # not inference_mode: the outputs feed losses that are differentiated
    def forward(self, images: torch.Tensor, need_logits: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.tap(images, stop_early=not need_logits)


class Student(nn.Module):
    """Backbone + regressors; `forward` also returns the hint losses so DDP sees every parameter."""

    def __init__(self, backbone: nn.Module, guided_paths: list[str], regressors: list[nn.Module], hint_reduction: str = "mean", loss_impl: str = "auto"):
        super().__init__()
        self.backbone = backbone
        self.regressors = nn.ModuleList(regressors)
        self.tap = FeatureTap(backbone, guided_paths, where="student hint")
        self.hint_reduction, self.loss_impl = hint_reduction, loss_impl

    def forward(self, images: torch.Tensor, teacher_hints: list[torch.Tensor] | None = None, need_logits: bool = True):
        """`(logits or None, [hint loss per pair])`; the forward stops at the guided layer without logits."""
        if teacher_hints is None:
            return self.tap.run(images), []  # the plain forward (compiled with train.compile)
        logits, feats = self.tap(images, stop_early=not need_logits)
        hint_losses = [
            hint_term(f, r, t, self.hint_reduction, self.loss_impl)
            for f, r, t in zip(feats, self.regressors, teacher_hints)
        ]
        return logits, hint_losses


def hint_term(feats: torch.Tensor, regressor: nn.Module, hint: torch.Tensor, reduction: str, impl: str) -> torch.Tensor:
    """`hint_loss(regressor(feats), hint)`, fused with the regressor where a kernel applies."""
    if impl != "reference":
        from fitdist import kernels

        if kernels.supports_fused_hint(regressor):
            return kernels.fused_hint_loss(feats, regressor, hint, reduction=reduction, impl=impl)
    return losses.hint_loss(regressor(feats), hint, reduction)


class Distiller:
    """Loss terms of one micro-batch: `{"loss", "ce", "kd", "hint"}` (terms with weight 0 omitted)."""

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | None, temperature: float, loss_impl: str = "auto",
                 kd_t2: bool = True):
        self.student, self.teacher = student, teacher
        self.temperature, self.loss_impl = temperature, loss_impl
        # the logged `kd` term is always kd_loss (with T²); without kd_t2 its weight is divided by T²
        self.kd_scale = 1.0 if kd_t2 else 1.0 / temperature**2

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]) -> dict[str, torch.Tensor]:
        use = {t: weights.get(t, 0.0) != 0 for t in TERMS}
        need_logits = use["ce"] or use["kd"]
        t_logits, t_hints = None, None
        if self.teacher is not None and (use["kd"] or use["hint"]):
            t_logits, t_hints = self.teacher(images, need_logits=use["kd"])
        s_logits, hint_losses = self.student(images, t_hints if use["hint"] else None, need_logits)
        terms: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=images.device)
        if need_logits:
            scaled = {**weights, "kd": weights.get("kd", 0.0) * self.kd_scale}
            loss, terms = self._logit_loss(s_logits, t_logits, labels, scaled, use)
        if use["hint"]:
            terms["hint"] = torch.stack(hint_losses).sum()
            loss = loss + weights["hint"] * terms["hint"]
        terms["loss"] = loss
        return terms

    def _logit_loss(self, s_logits, t_logits, labels, weights, use) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`ce_weight·ce + λ·kd` and its terms; with KD, one fused pass over the logits."""
        if use["kd"] and self.loss_impl != "reference":
            from fitdist import kernels

            out = kernels.fused_kd_ce_loss(s_logits, t_logits, labels if use["ce"] else None, self.temperature,
                                           weights["ce"], weights["kd"], impl=self.loss_impl)
            return out.loss, {"kd": out.kd, **({"ce": out.ce} if use["ce"] else {})}
        terms = {}
        if use["ce"]:
            terms["ce"] = F.cross_entropy(s_logits.float(), labels)
        if use["kd"]:
            terms["kd"] = losses.kd_loss(s_logits, t_logits, self.temperature)
        return sum(weights[t] * v for t, v in terms.items()), terms
