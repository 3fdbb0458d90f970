"""`fitdist eval CONFIG --teachers`: each teacher's and the ensemble's test-split accuracy.

The baseline a distilled student is compared against. The ensemble's prediction is `mean_probs`,
p̄ = Σ wᵢ·softmax(tᵢ) at temperature 1 with the config's normalised weights, whatever
`loss.ensemble` trains with. One pass over the data runs every teacher once per batch; the counts
are summed over ranks (exact under torchrun, as `fitdist.evaluate`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fitdist import dist
from fitdist.build import build_teachers
from fitdist.config import load_config, teacher_ids
from fitdist.data import build_data
from fitdist.errors import UserError


def config_path(path: str) -> Path:
    """The config a `--teachers` evaluation reads: a YAML file, or a run directory's config.yaml."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.yaml"
    if not p.is_file() or p.suffix not in (".yaml", ".yml"):
        raise UserError(f"eval --teachers: no YAML config {p} (give a config with teachers, or a run directory)")
    return p


@torch.no_grad()
def count_hits(ensemble, batches, device: torch.device, to_device) -> torch.Tensor:
    """`[[top1, top5] per teacher..., [top1, top5] of the ensemble, [n, 0]]`: counts summed over ranks."""
    members = len(ensemble)
    totals = torch.zeros(members + 2, 2, dtype=torch.float64, device=device)
    for images, labels in batches:
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        logits = [t(images, need_logits=True)[0].float() for t in ensemble.teachers]
        mean = ensemble.mean_probs(logits, 1.0)  # the weighted mean of probabilities, at T = 1
        for i, scores in enumerate([*logits, mean]):
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices.eq(labels[:, None])
            totals[i] += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()]).to(torch.float64)
        totals[-1, 0] += len(labels)
    dist.all_reduce_sum(totals)
    return totals


def evaluate_teachers(path: str, overrides: list[str] = ()) -> dict:
    cfg = load_config(config_path(path), list(overrides))
    if not cfg.teachers:
        raise UserError(f"eval --teachers: {path} has no teacher (set teachers: or teacher:)")
    cfg = dataclasses.replace(cfg, hints=[])  # logits only: no hint layer is tapped
    env = dist.setup(cfg.train.device, cfg.strategy.backend)
    try:
        data = build_data(cfg.data, 1, cfg.train.eval_batch_size, cfg.seed, env.rank, env.world)
        ensemble = build_teachers(cfg, data, env.rank).place(env.device)
        totals = count_hits(ensemble, data.val_batches(), env.device, data.to_device).tolist()
    finally:
        dist.teardown()
    n = max(totals[-1][0], 1.0)

    def acc(row: list[float]) -> dict:
        return {"top1": 100 * row[0] / n, "top5": 100 * row[1] / n}

    return {
        "config": str(config_path(path)),
        "teachers": {tid: {**acc(row), "weight": w}
                     for tid, row, w in zip(teacher_ids(cfg), totals, ensemble.weights)},
        "ensemble": {**acc(totals[len(ensemble)]), "mode": "mean_probs"},
        "n": int(totals[-1][0]),
    }
