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
    when a schedule moves a weight inside the row. `lr` is the rate of the row's last step."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # Σ term, kept on the device: no host sync per step
        self.weighted: dict[str, torch.Tensor] = {}  # Σ weight·term
        self.weights = dict.fromkeys(TERMS, 0.0)  # Σ weight (the same on every rank)
        self.micro, self.images, self.skipped, self.norm, self.lr = 0, 0, 0, 0.0, 0.0
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

    def step(self, grad_norm: float, stepped: bool, lr: float) -> None:
        self.norm, self.lr = grad_norm, lr
        self.skipped += not stepped

    def running(self) -> dict:
        return {f"train/{k}": v.item() / max(self.micro, 1) for k, v in self.sums.items()}

    def flush(self, device: torch.device, world: int) -> dict:
        """The row (every rank calls it: the terms are averaged over ranks), then a new window."""
        keys, weighted = sorted(self.sums), sorted(self.weighted)
        local = [self.sums[k] for k in keys] + [self.weighted[k] for k in weighted]
        totals = torch.stack(local).double() if local else torch.zeros(0, dtype=torch.float64, device=device)
        totals = all_reduce_sum(totals).tolist()
        micro = max(self.micro, 1)
        row = {f"train/{k}": totals[i] / (micro * world) for i, k in enumerate(keys)}
        for i, k in enumerate(weighted, start=len(keys)):
            if self.weights[k] != 0:  # Σ over ranks of Σ w·v, over Σ over ranks of Σ w
                row[f"train/{k}"] = totals[i] / (self.weights[k] * world)
        mean = {t: self.weights[t] / micro for t in TERMS}
        row["lambda"] = mean["kd"]  # always: the FitNets schedule's chart spans every stage
        row.update({f"weight/{t}": mean[t] for t in ("ce", "hint") if t in self.sums})
        row.update({"lr": self.lr, "grad_norm": self.norm, "train/skipped_steps": self.skipped,
                    "perf/img_per_s": self.images * world / max(time.perf_counter() - self.started, 1e-9)})
        self.__init__()
        return row
