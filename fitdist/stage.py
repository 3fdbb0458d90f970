"""One stage's machinery, shared by training and the dry run, so that a dry run is the training step.

- `probe_backward`: one forward and backward of a stage's loss that leaves weights, buffers and
  RNG as they were; `set_trainable` reads which parameters it reached, `compile.check_stage`
  builds the compiled graphs with it.
- `set_trainable`: FitNets stage 1 trains only the student up to its guided layer and the
  regressors (Romero et al. 2014, Algorithm 1): `trainable: auto` freezes what the losses do not reach.
- `prepare_stage` / `train_step`: a stage's optimizer, scheduler and distiller; one optimizer step
  of micro-steps, exactly as `fitdist train` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fitdist.config import Config, OptimConfig, StageConfig
from fitdist.data.normalize import move_images
from fitdist.distiller import TERMS, Distiller, FrozenTeacher, Student, used_terms
from fitdist.errors import UserError
from fitdist.max_norm import constrained_weights
from fitdist.schedule import weight_at
from fitdist.strategy import Strategy
from fitdist.window import Window


def stage_terms(stage: StageConfig) -> frozenset[str]:
    """The terms `stage` computes on every step: those whose weight is ever non-zero."""
    return used_terms({t: getattr(stage, t) for t in TERMS})


def resolve_steps(cfg: Config, num_train: int | None) -> list[StageConfig]:
    """`cfg.stages` with every stage given in epochs turned into steps over `num_train` samples at
    the global batch `train.batch_size` (rounded up: the last pass is complete)."""
    out = []
    for i, stage in enumerate(cfg.stages):
        if stage.epochs is not None:
            if not num_train:
                raise UserError(f"stages.{i}.epochs: the data does not say how many training samples it "
                                "has; give steps")
            stage = dataclasses.replace(stage, steps=max(1, math.ceil(stage.epochs * num_train / cfg.train.batch_size)))
        out.append(stage)
    return out


def stage_weights(stage: StageConfig, step: int) -> dict[str, float]:
    """The loss weights in force at `step` of `stage` (FitNets' λ annealed linearly)."""
    return {t: weight_at(getattr(stage, t), step, stage.steps) for t in TERMS}


def probe_backward(cfg: Config, stage: StageConfig, student: Student, teacher: FrozenTeacher | None,
                   x: torch.Tensor, impl: str, autocast: Callable, backward: Callable | None = None) -> list[bool]:
    """Runs `stage`'s loss forward (under `autocast`) and backward on `x` with every used term
    weighted 1; returns, per student parameter, whether a gradient reached it. Weights, buffers
    (BatchNorm statistics) and RNG state are left as they were, and no gradient stays behind.
    `backward(loss)` replaces `loss.backward()` (compile's check wraps it)."""
    buffers = {k: v.clone() for k, v in student.state_dict().items()}
    terms = stage_terms(stage)
    weights = dict.fromkeys(terms, 1.0)
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        student.train()
        with autocast():
            stored = bool(cfg.data.soft_labels) and "kd" in terms  # as training: kd reads the stored labels
            soft = _probe_soft(student, x) if stored else None  # their stand-in
            distiller = Distiller(student, teacher, cfg.loss.temperature, impl, cfg.loss.kd_t2, terms, stored)
            loss = distiller(x, labels, weights, soft=soft)["loss"]
        if loss.requires_grad:
            (backward or torch.Tensor.backward)(loss)
    reached = [p.grad is not None for p in student.parameters()]
    for p in student.parameters():
        p.grad = None
    student.load_state_dict(buffers)
    return reached


def _probe_soft(student: Student, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform top-1 target (index 0, probability 1/C) in place of the stored soft labels a KD
    stage reads (`data.soft_labels`): the probe only needs what the loss reaches, not the teacher."""
    with torch.no_grad():
        classes = student(x)[0].shape[-1]
    return (torch.zeros(len(x), 1, dtype=torch.long, device=x.device),
            torch.full((len(x), 1), 1.0 / classes, device=x.device))


def set_trainable(cfg: Config, stage: StageConfig, student: Student, teacher: FrozenTeacher | None,
                  x: torch.Tensor) -> list[nn.Parameter]:
    """Sets `requires_grad` for `stage` and returns the trainable parameters its losses do not
    reach: `trainable: auto` freezes them (none returned), `all` keeps them trainable."""
    from fitdist.compile import eager  # compile imports this module

    for p in student.parameters():
        p.requires_grad_(True)
    # eager even with train.compile: this probe's batch shape and trainable set are not training's
    with eager(cfg.train.compile):
        reached = probe_backward(cfg, stage, student, teacher, x, "reference", contextlib.nullcontext)
    unreached = [p for p, r in zip(student.parameters(), reached) if not r]
    if stage.trainable == "all":
        return unreached
    for p in unreached:
        p.requires_grad_(False)
    return []


def scaled_lr(optim: OptimConfig, world: int) -> float:
    """The stage's learning rate: `optim.lr`, times the world size with `scale_lr: linear`."""
    return optim.lr * (world if optim.scale_lr == "linear" else 1)


@dataclass
class PreparedStage:
    """What one stage's steps run with."""

    model: nn.Module  # the student, wrapped by the strategy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    distiller: Distiller
    optim: OptimConfig  # the stage's merged optimizer block
    lr: float  # base learning rate after world-size scaling
    notes: list[str]  # lines for the run's log
    constrained: list[nn.Parameter] = dataclasses.field(default_factory=list)  # optim.max_norm clips these


def prepare_stage(cfg: Config, stage: StageConfig, student: Student, teacher: FrozenTeacher | None,
                  strategy: Strategy, world: int, micro_batch: int, image_shape: tuple[int, ...]) -> PreparedStage:
    """Trainable set, compiled graphs (with `train.compile`), optimizer, scheduler and distiller
    for `stage`; the probes run on random images of `image_shape` (C×H×W)."""
    device = next(student.parameters()).device
    x = probe_images(2, image_shape, device)
    notes = []
    unreached = set_trainable(cfg, stage, student, teacher, x)
    if unreached and strategy.fills_missing_gradients:
        # a zero gradient would still move them (weight decay, momentum): freeze them, so they
        # stay as they are, as under the other strategies
        for p in unreached:
            p.requires_grad_(False)
        notes.append(f"trainable: all, but {len(unreached)} parameter tensors get no gradient from this stage's "
                     "losses; frozen, since DeepSpeed would step them on a zero gradient")
        unreached = []
    elif unreached:
        notes.append(f"trainable: all, and {len(unreached)} parameter tensors get no gradient from this "
                     "stage's losses (they stay as they are; DDP looks for unused parameters every step)")
    if cfg.train.compile:
        from fitdist.compile import check_stage

        images = to_layout(probe_images(micro_batch, image_shape, device), cfg)  # training's exact shape
        note = check_stage(cfg, stage, student, teacher, images, strategy.autocast)
        if note:
            notes.append(note)
    optim = stage.optim or cfg.optim
    lr = scaled_lr(optim, world)
    notes.append(f"lr {lr:g}" + (f" (optim.scale_lr=linear: {optim.lr:g} × world size {world})"
                                  if optim.scale_lr == "linear" else " (optim.scale_lr=none)"))
    constrained = constrained_weights(student) if optim.max_norm else []  # trainable Conv/Linear weights
    model, optimizer, scheduler = strategy.prepare(student, optim, lr, stage.steps, find_unused=bool(unreached))
    distiller = Distiller(model, teacher, cfg.loss.temperature, cfg.loss.impl, cfg.loss.kd_t2, stage_terms(stage),
                          soft=bool(cfg.data.soft_labels))
    return PreparedStage(model, optimizer, scheduler, distiller, optim, lr, notes, constrained)


def probe_images(n: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random images from a generator of their own: probing draws nothing from the run's RNG."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(n)).to(device)


def to_layout(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Images in the student's memory format (`train.channels_last`)."""
    return images.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else images


def train_step(cfg: Config, prepared: PreparedStage, strategy: Strategy, batches: Iterator,
               weights: dict[str, float], device: torch.device, window: Window,
               to_device: Callable = move_images, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `train.grad_accum` micro-batches, each micro-batch's loss terms
    added to `window`; `step` is the run's global step (which teacher `loss.ensemble: sample`
    draws). Returns `(grad norm, stepped)` from `strategy.step`, device tensors: the step itself
    reads nothing back to the host."""
    accum = cfg.train.grad_accum
    for micro in range(accum):
        images, labels, *soft = next(batches)  # with data.soft_labels: + stored top-k (indices, probabilities)
        images = to_layout(to_device(images, device), cfg)  # the bundle's: uint8 -> normalised float
        labels = labels.to(device, non_blocking=True)
        soft = tuple(t.to(device, non_blocking=True) for t in soft) or None
        with strategy.microstep(prepared.model, sync=micro == accum - 1):
            with strategy.autocast():
                terms = prepared.distiller(images, labels, weights, step, micro, soft=soft)
            strategy.backward(terms["loss"] / accum)
        window.add(terms, weights, len(labels))
    lr = prepared.scheduler.get_last_lr()[0]  # the rate this step uses; the scheduler moves after it
    grad_norm, stepped = strategy.step(prepared.optimizer, prepared.optim.max_grad_norm)
    if prepared.constrained:  # optim.max_norm: on the device, every rank alike
        strategy.constrain(prepared.optimizer, prepared.constrained, prepared.optim.max_norm)
    window.step(grad_norm, stepped, lr)
    prepared.scheduler.step()
    return grad_norm, stepped
