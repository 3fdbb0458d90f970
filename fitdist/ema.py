"""Student EMA: an exponential moving average of the student backbone's weights and buffers.

`ema ← d·ema + (1 − d)·student` after every `every`-th optimizer step, kept in fp32 on the
device in a copy of the backbone, so it is evaluated and exported like the student itself
(`student_ema.pt`, a plain state_dict). With `warmup`, the decay ramps as timm's `ModelEmaV3`
does, `d_n = min(decay, (1 + n)/(10 + n))` after `n` updates, so early averages are not dominated
by the random initial weights. Integer buffers (BatchNorm's `num_batches_tracked`) are copied.

The update is device ops only (`torch._foreach_lerp_`, the decay a host float computed from
the host's update count): a step makes no device→host sync and no collective for it. Every rank
holds the same EMA, as it holds the same weights (DDP, DeepSpeed ZeRO 0-2).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class StudentEMA:
    def __init__(self, backbone: nn.Module, decay: float, every: int = 1, warmup: bool = True):
        self.backbone, self.decay, self.every, self.warmup = backbone, decay, every, warmup
        self.module = copy.deepcopy(backbone).float().eval().requires_grad_(False)
        for m in self.module.modules():  # the copy must not fire the student's FeatureTap hooks
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        self.updates = 0

    def _pairs(self) -> tuple[list, list, list, list]:
        """(EMA float tensors, student's), (EMA integer tensors, student's), in state_dict order."""
        ema = list(self.module.parameters()) + list(self.module.buffers())
        live = list(self.backbone.parameters()) + list(self.backbone.buffers())
        floats = [(e, s) for e, s in zip(ema, live) if e.is_floating_point()]
        ints = [(e, s) for e, s in zip(ema, live) if not e.is_floating_point()]
        return [e for e, _ in floats], [s for _, s in floats], [e for e, _ in ints], [s for _, s in ints]

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def maybe_update(self, global_step: int) -> None:
        """The update after optimizer step `global_step` (1-based), on every `every`-th step."""
        if global_step % self.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        ema_f, live_f, ema_i, live_i = self._pairs()
        live_f = [s.detach().float() if s.dtype != torch.float32 else s.detach() for s in live_f]
        torch._foreach_lerp_(ema_f, live_f, 1.0 - self.current_decay())
        if ema_i:
            torch._foreach_copy_(ema_i, [s.detach() for s in live_i])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
