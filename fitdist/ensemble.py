"""Teacher ensembles: several frozen teachers, one soft target and the hints a stage needs.

`Ensemble` holds the `FrozenTeacher`s (each placed, compiled and fed its own input like a single
teacher) with weights normalised to sum 1, and for one micro-step returns what the losses read:

- `mean_probs` (Hinton et al. 2015): p̄ = Σ wᵢ·softmax(tᵢ/T), in fp32; KD is T²·KL(p̄ ‖ softmax(s/T)).
- `mean_logits`: t̄ = Σ wᵢ·tᵢ, then the single-teacher path: softmax(t̄/T) is the normalised weighted
  *geometric* mean of the teachers' softened probabilities (what some libraries call an ensemble).
- `sample`: one teacher per micro-step drawn with the weights, one teacher forward per step
  (Blakeney et al. 2022). The draw comes from a host generator seeded by (seed, rank, global step,
  micro-step) alone: no device read, nothing to checkpoint, and a resumed run draws the same
  teachers as an uninterrupted one by construction (that is how the draw is "part of the RNG state").

Hints name their teacher (`hints[i].from`); a stage runs only the teachers it needs: every teacher
(or the sampled one) to its logits for KD, the hint teachers up to their last hint layer otherwise.
With one teacher every mode is the single-teacher path, unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fitdist.distiller import FrozenTeacher

MODES = ("mean_probs", "mean_logits", "sample")


@dataclass
class Targets:
    """What one micro-step's losses read from the teachers."""

    logits: torch.Tensor | None  # KD against softmax(logits/T): one teacher, mean_logits, sample
    probs: torch.Tensor | None  # KD against these probabilities at T (mean_probs with 2+ teachers), fp32
    hints: list[torch.Tensor]  # one per hint pair, in the config's order


class Ensemble:
    """Frozen teachers with normalised weights; `hint_from[j]` is the teacher of hint pair `j`.

    A plain object, not a module: the teachers never enter the student's `state_dict`, a checkpoint
    or a DDP/DeepSpeed wrapper. Teacher `i`'s tap holds the hint layers of the pairs it serves."""

    def __init__(self, teachers: list[FrozenTeacher], weights: list[float] | None = None,
                 ids: list[str] | None = None, hint_from: list[int] | None = None, mode: str = "mean_probs",
                 seed: int = 0, rank: int = 0):
        if not teachers:
            raise ValueError("Ensemble: no teachers")
        if mode not in MODES:
            raise ValueError(f"Ensemble: mode must be one of {MODES}, got {mode!r}")
        weights = [1.0] * len(teachers) if weights is None else list(weights)
        if len(weights) != len(teachers) or not all(w > 0 for w in weights):
            raise ValueError(f"Ensemble: one positive weight per teacher, got {weights}")
        total = sum(weights)
        self.teachers, self.weights = list(teachers), [w / total for w in weights]
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(teachers))]
        n_hints = len(teachers[0].tap.paths) if hint_from is None else len(hint_from)
        self.hint_from = [0] * n_hints if hint_from is None else list(hint_from)
        for i, t in enumerate(self.teachers):  # each tap holds its pairs' layers, in pair order
            mine = [j for j, k in enumerate(self.hint_from) if k == i]
            if len(t.tap.paths) != len(mine):
                raise ValueError(f"Ensemble: teacher {self.ids[i]} taps {len(t.tap.paths)} hint layers, "
                                 f"{len(mine)} hint pairs read it")
        self.mode, self.seed, self.rank = mode, seed, rank

    @classmethod
    def of(cls, teacher: FrozenTeacher | Ensemble | None) -> Ensemble | None:
        """An ensemble of one from a lone teacher (callers that build one `FrozenTeacher`)."""
        return teacher if teacher is None or isinstance(teacher, Ensemble) else cls([teacher])

    def __len__(self) -> int:
        return len(self.teachers)

    def place(self, device: torch.device) -> Ensemble:
        for t in self.teachers:
            t.place(device)
        return self

    def draw(self, step: int, micro: int) -> int:
        """The teacher `sample` uses at micro-step `micro` of global step `step` on this rank:
        from a host generator seeded by those numbers alone (no device read, no saved state)."""
        rng = random.Random(f"fitdist-ensemble:{self.seed}:{self.rank}:{step}:{micro}")  # str seed: sha512, stable
        return rng.choices(range(len(self.teachers)), weights=self.weights)[0]

    def needed(self, kd: bool, hints: bool, step: int = 0, micro: int = 0) -> dict[int, bool]:
        """`{teacher index: run to the logits?}` for a micro-step: the KD teachers (all, or the
        sampled one) to their logits, the hint teachers at least up to their last hint layer."""
        run: dict[int, bool] = {}
        if hints:
            for i in sorted(set(self.hint_from)):
                run[i] = False
        if kd:
            kd_teachers = [self.draw(step, micro)] if self.mode == "sample" and len(self) > 1 else range(len(self))
            for i in kd_teachers:
                run[i] = True
        return run

    def __call__(self, images: torch.Tensor, kd: bool, hints: bool, temperature: float = 1.0, step: int = 0,
                 micro: int = 0) -> Targets:
        """The soft target at `temperature` (with `kd`) and the hint features (with `hints`) of one
        micro-batch; `step`, `micro`: the global step and micro-step (the `sample` draw)."""
        if len(self) == 1:  # the single-teacher path, exactly
            logits, feats = self.teachers[0](images, need_logits=kd)
            return Targets(logits if kd else None, None, feats)
        run = self.needed(kd, hints, step, micro)
        outputs = {i: self.teachers[i](images, need_logits=full) for i, full in run.items()}
        feats = []
        if hints:
            taken = dict.fromkeys(run, 0)
            for i in self.hint_from:  # pair j's feature: the next one of its teacher's tap
                feats.append(outputs[i][1][taken[i]])
                taken[i] += 1
        if not kd:
            return Targets(None, None, feats)
        kd_runs = sorted(i for i, full in run.items() if full)  # teacher order, whatever ran first
        if self.mode == "sample":
            return Targets(outputs[kd_runs[0]][0], None, feats)
        if self.mode == "mean_logits":
            mean = sum(self.weights[i] * outputs[i][0].float() for i in kd_runs)
            return Targets(mean, None, feats)
        return Targets(None, self.mean_probs([outputs[i][0] for i in kd_runs], temperature), feats)

    def mean_probs(self, logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
        """p̄ = Σ wᵢ·softmax(tᵢ/T), in fp32 whatever the teachers' precision."""
        return sum(w * F.softmax(t.float() / temperature, dim=-1) for w, t in zip(self.weights, logits))

    def probe(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A full forward of every teacher that checks its hint layers run: `(logits per teacher,
        hint features in pair order)` (the student's regressors are sized from them)."""
        outs = [t.tap.probe(t.prepare(x)) for t in self.teachers]
        taken, feats = [0] * len(self), []
        for i in self.hint_from:
            feats.append(outs[i][1][taken[i]])
            taken[i] += 1
        return [o[0] for o in outs], feats
