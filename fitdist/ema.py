"""Student EMA: an exponential moving average of the student backbone's weights and buffers.

`ema ← d·ema + (1 − d)·student` after every `every`-th optimizer step, kept in fp32 on the
device in a copy of the backbone, so it is evaluated and exported like the student itself
(`student_ema.pt`, a plain state_dict). With `warmup`, the decay ramps as timm's `ModelEmaV3`
does, `d_n = min(decay, (1 + n)/(10 + n))` after `n` updates, so early averages are not dominated
by the random initial weights. Integer buffers (BatchNorm's `num_batches_tracked`) are copied.

The update is device ops only (`torch._foreach_lerp_`, the decay a host float computed from
the host's update count): a step makes no device→host sync and no collective for it. Every rank
holds the same EMA, as it holds the same weights (DDP, DeepSpeed ZeRO 0-2; DeepSpeed leaves each
rank its own BatchNorm running statistics, and so their averages).

DeepSpeed ZeRO-3 partitions the student's parameters: rank r of a partition group of W holds
elements [r·P, (r+1)·P) of each flattened parameter (`param.ds_tensor`, P = ⌈numel / W⌉, the last
partition zero-padded). Each rank still keeps a whole fp32 EMA copy (memory: one fp32 backbone per
rank, as under ZeRO 0-2), built from the plain backbone before DeepSpeed partitions it, but a step
updates only the slice its own partitions cover (device ops on views, no collective); buffers are
not partitioned and are updated whole. `gather` (collective) then makes the EMA whole on every
rank with one all-gather of the slices: the trainer calls it before evaluation, checkpoints and
the stage's end (so `student_ema.pt` is whole); it copies the very fp32 numbers each rank
computed, so the whole EMA is exactly that of ZeRO 0-2 given the same weights.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as tdist
from torch import nn


class StudentEMA:
    def __init__(self, backbone: nn.Module, decay: float, every: int = 1, warmup: bool = True):
        self.backbone, self.decay, self.every, self.warmup = backbone, decay, every, warmup
        self.module = copy.deepcopy(backbone).float().eval().requires_grad_(False)
        for m in self.module.modules():  # the copy must not fire the student's FeatureTap hooks
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        self.updates = 0
        # ZeRO-3: (EMA tensor, partition size P) of each partitioned parameter updated since the last
        # gather, and their partition group; identical on every rank (same updates, same layout)
        self._partitioned: list[tuple[torch.Tensor, int]] = []
        self._group = None

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
        targets, sources, partitioned = [], [], []
        for e, s in zip(ema_f, live_f):
            part = getattr(s, "ds_tensor", None)  # a ZeRO-3 parameter: this rank's flat partition
            if part is None:
                targets.append(e)
                sources.append(s.detach())
                continue
            size, start = self._layout(e, s, part)
            n = min(size, e.numel() - start)  # the last partition's padding has no EMA element
            if n > 0:
                if not e.is_contiguous():  # e.g. a channels_last student: the slices index the flat order
                    e.data = e.data.contiguous()
                targets.append(e.view(-1).narrow(0, start, n))
                sources.append(part.detach().narrow(0, 0, n))
            partitioned.append((e, size))
        sources = [s.to(e.device, torch.float32, non_blocking=True) for e, s in zip(targets, sources)]
        torch._foreach_lerp_(targets, sources, 1.0 - self.current_decay())
        if ema_i:
            torch._foreach_copy_(ema_i, [s.detach() for s in live_i])
        if partitioned:
            self._partitioned = partitioned
        self.updates += 1

    def _layout(self, e: torch.Tensor, s: torch.Tensor, part: torch.Tensor) -> tuple[int, int]:
        """(P, first element of this rank's partition) of ZeRO-3 parameter `s` (EMA tensor `e`)."""
        group = s.ds_process_group
        if self._group is not None and group is not self._group:
            raise RuntimeError("train.ema under ZeRO-3: the student's parameters are partitioned over different groups")
        self._group = group
        size, world = getattr(part, "ds_numel", part.numel()), tdist.get_world_size(group)
        if size * world < e.numel() or part.numel() < size:  # swapped out (NVMe), or another layout
            raise RuntimeError(f"train.ema under ZeRO-3: unexpected partition of {tuple(e.shape)}: "
                               f"{part.numel()} of {size} elements held, {world} ranks")
        return size, size * tdist.get_rank(group)

    @torch.no_grad()
    def gather(self) -> None:
        """Makes the EMA whole on every rank after ZeRO-3 updates: one all-gather of each rank's
        slices, in its partition group. A collective when there were such updates (the same on every
        rank); nothing otherwise."""
        if not self._partitioned:
            return
        group, pieces = self._group, self._partitioned
        world, rank = tdist.get_world_size(group), tdist.get_rank(group)
        send = torch.zeros(sum(size for _, size in pieces), dtype=torch.float32, device=pieces[0][0].device)
        offset = 0
        for e, size in pieces:
            own = e.view(-1)[rank * size:(rank + 1) * size]
            send[offset:offset + own.numel()].copy_(own)
            offset += size
        received = [torch.empty_like(send) for _ in range(world)]
        tdist.all_gather(received, send, group=group)
        offset = 0
        for e, size in pieces:  # rank r's partition into elements [r·P, (r+1)·P), its padding dropped
            flat = e.view(-1)
            for r, part in enumerate(received):
                n = min(size, e.numel() - r * size)
                if n > 0:
                    flat[r * size:r * size + n].copy_(part[offset:offset + n])
            offset += size
        self._partitioned = []

    def state_dict(self) -> dict:
        if self._partitioned:
            raise RuntimeError("StudentEMA.state_dict: the ZeRO-3 EMA is not whole; call gather() on every rank first")
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self._partitioned = []  # the saved EMA is whole: every rank loads all of it
