"""The metrics of one log row: loss terms, loss weights and throughput since the last row."""

from __future__ import annotations

import time

import torch

from fitdist.dist import all_reduce_sum
from fitdist.distiller import TERMS


class Window:
    """Loss terms, weights and throughput over the steps since the last log row, on every rank.

    A row's weights (`lambda` for kd, always; `weight/ce`, `weight/hint` for the terms computed) are
    their means over the row's
    micro-batches, and each term is its mean weighted by its own weight (the plain mean when the
    weight is constant, or 0 throughout), so every row satisfies
    `train/loss = weight/ce·train/ce + lambda·train/kd + weight/hint·train/hint` exactly, even
    when a schedule moves a weight inside the row. `lr` is the rate of the row's last step.

    Everything a step adds stays on the device; `flush` reads it all back in one transfer, so a
    step that does not log makes no host sync. Runs of skipped (non-finite) steps are counted
    across rows: `skipped_in_a_row` is the longest run seen so far that is still going or ended
    inside the row just flushed."""

    def __init__(self, in_a_row: torch.Tensor | float = 0.0):
        self.sums: dict[str, torch.Tensor] = {}  # Σ term
        self.weighted: dict[str, torch.Tensor] = {}  # Σ weight·term
        self.weights = dict.fromkeys(TERMS, 0.0)  # Σ weight (the same on every rank)
        self.micro, self.images, self.lr = 0, 0, 0.0
        self.norm = self.skipped = 0.0  # grad norm of the last step; skipped steps (tensors once stepped)
        self.in_a_row = self.longest = in_a_row  # the current run of skipped steps; the longest
        self.started = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], weights: dict[str, float], images: int) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums.get(k, 0.0) + v
            if k != "loss":
                self.weighted[k] = self.weighted.get(k, 0.0) + weights[k] * v
        for t in TERMS:
            self.weights[t] += weights[t]
        self.micro, self.images = self.micro + 1, self.images + images

    def step(self, grad_norm: torch.Tensor, stepped: torch.Tensor, lr: float) -> None:
        """`grad_norm` and `stepped` are device tensors from `Strategy.step`: nothing is read here."""
        skipped = (~stepped).float()
        self.norm, self.lr = grad_norm.float(), lr
        self.skipped = self.skipped + skipped
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest = torch.clamp(self.in_a_row, min=self.longest)  # min: a float or a tensor, no copy

    def flush(self, device: torch.device, world: int, extra: dict[str, torch.Tensor] | None = None) -> dict:
        """The row (every rank calls it: the terms are averaged over ranks), then a new window.
        `extra`: this rank's own 0-d device tensors (train.diagnostics), read back in the same
        transfer and written to the row as they are (not averaged over ranks)."""
        keys, weighted = sorted(self.sums), sorted(self.weighted)
        local = [self.sums[k] for k in keys] + [self.weighted[k] for k in weighted]
        totals = torch.stack(local).double() if local else torch.zeros(0, dtype=torch.float64, device=device)
        # the step's figures are the same on every rank (gradients are all-reduced): not summed
        extra = extra or {}
        own = sorted(extra)
        same = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                            for v in (self.norm, self.skipped, self.longest, *(extra[k] for k in own))])
        n = len(local)
        values = torch.cat([all_reduce_sum(totals), same]).tolist()  # the one sync
        totals, (norm, skipped, longest), mine = values[:n], values[n:n + 3], values[n + 3:]
        micro = max(self.micro, 1)
        row = {f"train/{k}": totals[i] / (micro * world) for i, k in enumerate(keys)}
        for i, k in enumerate(weighted, start=len(keys)):
            if self.weights[k] != 0:  # Σ over ranks of Σ w·v, over Σ over ranks of Σ w
                row[f"train/{k}"] = totals[i] / (self.weights[k] * world)
        mean = {t: self.weights[t] / micro for t in TERMS}
        row["lambda"] = mean["kd"]  # always: the FitNets schedule's chart spans every stage
        row.update({f"weight/{t}": mean[t] for t in ("ce", "hint") if t in self.sums})
        row.update({"lr": self.lr, "grad_norm": norm, "train/skipped_steps": int(skipped),
                    "train/skipped_in_a_row": int(longest),
                    "perf/img_per_s": self.images * world / max(time.perf_counter() - self.started, 1e-9)})
        row.update(zip(own, mine))
        self.__init__(self.in_a_row)
        return row
