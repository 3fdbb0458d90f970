"""The three roles of a distillation run (Romero et al. 2014; Hinton et al. 2015).

- `FrozenTeacher`: pinned to eval, no parameter requires grad, runs under `no_grad`.
- `Student`: the backbone plus its FitNets regressors in one `nn.Module`, so DDP and DeepSpeed
  synchronise the regressors' gradients too; its `state_dict` is what training checkpoints hold,
  while `student.pt` is the backbone alone.
- `Distiller`: a plain class (not a module, so the teacher never leaks into a `state_dict`) that
  returns the named loss terms of one micro-batch. Its teachers are an `Ensemble`
  (fitdist/ensemble.py; a lone teacher is an ensemble of one, the single-teacher path unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fitdist import kernels
from fitdist.config import Weight, nonzero_weight
from fitdist.features import FeatureTap
from fitdist.precision import DTYPES, autocast

if TYPE_CHECKING:
    from fitdist.ensemble import Ensemble, Targets

TERMS = ("ce", "kd", "hint")
# layers whose forward autocast runs in bf16/fp16, weight and bias cast, on CPU and CUDA alike
AUTOCAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d)


class FrozenTeacher(nn.Module):
    """A trained model used as a fixed target: always eval, never trained."""

    def __init__(self, model: nn.Module, hint_paths: list[str], precision: str = "fp32", channels_last: bool = False,
                 input_map: nn.Module | None = None):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.tap = FeatureTap(model, hint_paths, where="teacher hint")
        self.precision, self.channels_last = precision, channels_last
        # the student's batch re-normalised / resized for this teacher (fitdist/teacher_input.py)
        self.input_map = input_map
        super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's own input from the student's: what every call of the teacher sees."""
        return images if self.input_map is None else self.input_map(images)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # BN statistics and dropout of the teacher never change

    def place(self, device: torch.device) -> FrozenTeacher:
        """Moves the teacher to `device` in the form every call would otherwise re-make: weights in
        `channels_last`, and under bf16/fp16 the weights of the layers autocast runs in that dtype
        cast once. Autocast's per-call cast then finds them cast, so the outputs are the ones of
        casting on every call, bit for bit. Only layers of exactly these types are cast: a subclass
        may use its weight in an op that autocast keeps in fp32."""
        self.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        dtype = DTYPES[self.precision]
        if dtype is not None:
            for module in self.model.modules():
                if type(module) in AUTOCAST_LAYERS:
                    module.to(dtype)
        return self

    @torch.no_grad()  # not inference_mode: the outputs feed losses that are differentiated
    def forward(self, images: torch.Tensor, need_logits: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        images = self.prepare(images)  # in float32, before autocast: statistics are not rounded to bf16
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, self.precision):
            return self.tap(images, stop_early=not need_logits)


class Student(nn.Module):
    """Backbone + regressors; `forward` also returns the hint losses so DDP sees every parameter."""

    def __init__(self, backbone: nn.Module, guided_paths: list[str], regressors: list[nn.Module],
                 hint_reduction: str = "mean", loss_impl: str = "auto"):
        super().__init__()
        if len(regressors) != len(guided_paths):
            raise ValueError(f"Student: {len(guided_paths)} guided layers {guided_paths} but "
                             f"{len(regressors)} regressors: one regressor per hint pair")
        self.backbone = backbone
        self.regressors = nn.ModuleList(regressors)
        self.tap = FeatureTap(backbone, guided_paths, where="student hint")
        self.hint_reduction, self.loss_impl = hint_reduction, loss_impl

    def forward(self, images: torch.Tensor, teacher_hints: list[torch.Tensor] | None = None, need_logits: bool = True):
        """`(logits or None, [hint loss per pair])`; the forward stops at the guided layer without logits."""
        if teacher_hints is None:
            return self.tap.run(images), []  # the plain forward (compiled with train.compile)
        if len(teacher_hints) != len(self.regressors):
            raise ValueError(f"Student: {len(teacher_hints)} teacher hints for {len(self.regressors)} "
                             "hint pairs: one teacher hint per guided layer")
        logits, feats = self.tap(images, stop_early=not need_logits)
        hint_losses = [
            kernels.fused_hint_loss(f, r, t, self.hint_reduction, impl=self.loss_impl)
            for f, r, t in zip(feats, self.regressors, teacher_hints)
        ]
        return logits, hint_losses


def used_terms(weights: dict[str, Weight]) -> frozenset[str]:
    """The terms to compute: those whose weight (a constant or a schedule) is ever non-zero."""
    return frozenset(t for t in TERMS if nonzero_weight(weights.get(t, 0.0)))


class Distiller:
    """Loss terms of one micro-batch: `{"loss", "ce", "kd", "hint"}` (terms not computed omitted).

    `terms` fixes which terms are computed, whatever their weight at a given step: a stage whose
    weight passes through 0 (`hint: [0, 1]`) still runs the same graph on every step, so DDP sees
    the same parameters receive gradients each time. Without it, the terms with a non-zero weight
    in each call are computed. `kd` is the term λ multiplies: `T²·KL(p_t^T ‖ p_s^T)`, or with
    `kd_t2=False` the KL alone (FitNets' scale), so `loss = Σ weight·term` for the logged terms.
    `soft=True` (`data.soft_labels`): the KD target comes with the batch (`soft` of `__call__`:
    stored top-k, fitdist.data.soft_labels), so kd needs no teacher; hints still do.
    """

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | Ensemble | None, temperature: float,
                 loss_impl: str = "auto", kd_t2: bool = True, terms: Iterable[str] | None = None,
                 soft: bool = False):
        from fitdist.ensemble import Ensemble  # it imports FrozenTeacher from here

        self.student, self.teacher = student, Ensemble.of(teacher)  # a lone teacher: an ensemble of one
        self.temperature, self.loss_impl = temperature, loss_impl
        self.kd_scale = 1.0 if kd_t2 else 1.0 / temperature**2  # kd_loss carries T²; without kd_t2, undo it
        self.terms = None if terms is None else frozenset(terms)
        if self.terms is not None and not self.terms <= set(TERMS):
            raise ValueError(f"Distiller: terms must be among {TERMS}, got {sorted(self.terms)}")
        if teacher is None and self.terms and self.terms & ({"hint"} if soft else {"kd", "hint"}):
            raise ValueError("Distiller: the kd and hint terms need a teacher")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, weights: dict[str, float],
                 step: int = 0, micro: int = 0, soft: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        """`step`, `micro`: the global step and micro-step (which teacher `loss.ensemble: sample` draws);
        `soft`: the batch's stored top-k (indices, probabilities at T), the KD target instead of a teacher's."""
        use = self.terms if self.terms is not None else used_terms(weights)
        w = {t: float(weights.get(t, 0.0)) for t in TERMS}
        need_logits = "ce" in use or "kd" in use
        target = None
        stored = soft is not None and "kd" in use
        if "hint" in use or ("kd" in use and not stored):
            target = self.teacher(images, "kd" in use and not stored, "hint" in use, self.temperature, step, micro)
        s_logits, hint_losses = self.student(images, target.hints if "hint" in use else None, need_logits)
        terms: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=images.device)
        if stored:  # the stored top-k made dense on the device: no teacher forward for the kd term
            from fitdist.data.soft_labels import dense_target
            from fitdist.ensemble import Targets

            probs = dense_target(*soft, s_logits.shape[-1])
            target = Targets(None, probs, target.hints if target is not None else [])
        if "kd" in use:  # one fused pass over the logits for ce and kd (fitdist/kernels)
            out = kd_ce(s_logits, target, labels if "ce" in use else None, self.temperature,
                        w["ce"], w["kd"] * self.kd_scale, self.loss_impl)
            loss, terms["kd"] = out.loss, out.kd * self.kd_scale
            if out.ce is not None:
                terms["ce"] = out.ce
        elif "ce" in use:
            ce = F.cross_entropy(s_logits.float(), labels)
            loss, terms["ce"] = w["ce"] * ce, ce.detach()
        if "hint" in use:
            hint = torch.stack(hint_losses).sum()
            loss = loss + w["hint"] * hint
            terms["hint"] = hint.detach()
        terms["loss"] = loss
        return terms


def kd_ce(s_logits: torch.Tensor, target: Targets, labels: torch.Tensor | None, temperature: float, ce_w: float,
          kd_w: float, impl: str) -> kernels.KDLoss:
    """ce and KD against the teachers' target: their (one or mean) logits, or mean probabilities."""
    if target.probs is None:
        return kernels.fused_kd_ce_loss(s_logits, target.logits, labels, temperature, ce_w, kd_w, impl=impl)
    return kernels.fused_kd_ce_loss(s_logits, None, labels, temperature, ce_w, kd_w, impl=impl,
                                    target_probs=target.probs)
