"""Step-based schedules: loss weights annealed within a stage (FitNets' λ 4→1) and learning rates."""

from __future__ import annotations

import math

import torch

from fitdist.config import OptimConfig, Weight
from fitdist.errors import UserError


def weight_at(weight: Weight, step: int, total: int) -> float:
    """A constant weight, or `[start, end]` linearly from the first step (start) to the last (end)."""
    if not isinstance(weight, list):
        return float(weight)
    start, end = weight
    progress = step / (total - 1) if total > 1 else 1.0
    return float(start + (end - start) * progress)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at `step` of a stage of `total` steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # multistep: milestones below 1 are fractions of the stage, others are step counts
    marks = [m * total if m < 1 else m for m in cfg.milestones]
    return cfg.gamma ** sum(step >= m for m in marks)


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: torch's fused kernels where the optimizer has them (SGD, AdamW; not RMSprop)."""
    if not params:
        raise UserError("optim: no trainable parameters in this stage (does any loss reach the student?)")
    fused = fused or None  # None, not False: torch then picks its own default (foreach)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=fused)
    return torch.optim.RMSprop(params, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
