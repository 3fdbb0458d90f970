"""Exact top-1/top-5 over a rank-sharded validation pass: counts are summed, never averaged."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fitdist.data.normalize import move_images
from fitdist.dist import all_reduce_sum
from fitdist.precision import autocast


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, precision: str = "fp32",
             to_device: Callable = move_images) -> dict[str, float]:
    """`{"val/top1", "val/top5", "val/loss", "val/n"}` of `model` over every rank's share;
    `to_device` is the data bundle's (uint8 batches normalised on the device)."""
    was_training = model.training
    model.eval()
    # correct@1, correct@5, summed loss, count: one tensor so one all-reduce
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in batches:
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        totals += torch.stack([
            hits[:, 0].sum(), hits.any(dim=1).sum(),
            F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(len(labels), device=device),
        ]).to(torch.float64)
    all_reduce_sum(totals)
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    return {"val/top1": 100 * totals[0].item() / n, "val/top5": 100 * totals[1].item() / n,
            "val/loss": totals[2].item() / n, "val/n": int(totals[3].item())}
