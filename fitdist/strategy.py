"""How the trainable module is run: one device, DDP or DeepSpeed, behind one small interface.

The training loop calls `prepare` once per stage, then for every micro-step `microstep(...)`
(autocast, and DDP's `no_sync` between gradient-accumulation boundaries), `backward`, and for
every optimizer step `step`; checkpoints go through `optimizer_state` / `load_optimizer_state`
and `end_stage` closes a stage. It never knows which strategy runs. This is the only module that
imports DistributedDataParallel; DeepSpeed lives in `fitdist/strategy_deepspeed.py`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fitdist.config import OptimConfig, StrategyConfig, TrainConfig
from fitdist.dist import DistEnv
from fitdist.max_norm import apply_max_norm
from fitdist.precision import autocast
from fitdist.schedule import build_optimizer, build_scheduler


class Strategy:
    """Single device; `DDPStrategy` overrides what differs."""

    # Whether a trainable parameter that got no gradient is stepped anyway (on a zero gradient).
    # torch's optimizers and DDP skip it; DeepSpeed's ZeRO fills in zeros.
    fills_missing_gradients = False

    def __init__(self, cfg: StrategyConfig, env: DistEnv, precision: str):
        self.cfg, self.env = cfg, env
        self.precision = precision
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")

    def wrap(self, module: nn.Module, find_unused: bool) -> nn.Module:
        return module

    def prepare(self, module: nn.Module, optim: OptimConfig, lr: float, total_steps: int, find_unused: bool = False):
        """`(model to call, optimizer, scheduler)` for one stage over the trainable parameters.
        `find_unused`: some trainable parameters get no gradient in this stage (`trainable: all`)."""
        params = [p for p in module.parameters() if p.requires_grad]
        # fused SGD/AdamW: one kernel per step, and the non-finite skip taken on the device
        optimizer = build_optimizer(params, optim, lr, fused=self.env.device.type in ("cuda", "cpu"))
        return self.wrap(module, find_unused), optimizer, build_scheduler(optimizer, total_steps, optim)

    def microstep(self, model: nn.Module, sync: bool):
        """Context around one micro-batch's forward and backward; `sync` on the last of a step."""
        return contextlib.nullcontext()

    def autocast(self):
        """Context around the student's forward (not its backward)."""
        return autocast(self.env.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips (when `max_grad_norm` > 0), steps unless a gradient is non-finite, and zeroes.
        Returns `(grad norm, stepped)` as device tensors: reading them is the caller's sync.

        The skip is decided on the device where the optimizer can take it there (torch's fused
        SGD/AdamW read `found_inf` and leave parameters, state and step count untouched);
        another optimizer needs the host to decide, one sync per step (see `skips_on_device`)."""
        self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.env.device)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
        finite = torch.isfinite(norm)
        if skips_on_device(optimizer):
            optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
            optimizer.step()
        elif bool(finite):  # the host sync of optimizers without a device-side skip
            optimizer.step()
        self.scaler.update()  # fp16: from the overflow check of `unscale_`; no-op otherwise
        optimizer.zero_grad(set_to_none=True)
        return norm.detach(), finite

    def check_optim(self, optim: OptimConfig) -> None:
        """Refuses (UserError) a stage's optimizer settings this strategy cannot honour; called for
        every stage before the first one runs, so a late stage does not fail hours in."""

    def constrain(self, optimizer: torch.optim.Optimizer, weights: list[torch.Tensor], max_norm: float) -> None:
        """`optim.max_norm` after a step: the weights the optimizer steps are the module's own here."""
        apply_max_norm(weights, max_norm)

    # ---------------------------------------------------------------- stage and checkpoint hooks
    def optimizer_state(self, optimizer: torch.optim.Optimizer, run_dir: Path, global_step: int) -> dict:
        """What the checkpoint records for the optimizer; called on every rank (collective for
        DeepSpeed, whose optimizer state is partitioned and saved by each rank)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict, run_dir: Path) -> None:
        """Restores `optimizer_state`'s result (`state` is the whole trainer checkpoint)."""
        optimizer.load_state_dict(state["optimizer"])

    def end_stage(self) -> None:
        """Called after a stage's last step: release what `prepare` attached to the module."""

    def gathered(self, module: nn.Module):
        """Context yielding `module` with whole weights, to read (evaluation, checkpoints) between
        steps: the module itself here; under DeepSpeed ZeRO-3, which partitions the parameters, a
        plain copy holding them gathered, and a collective (every rank enters it)."""
        return contextlib.nullcontext(module)


class DDPStrategy(Strategy):
    """DistributedDataParallel over the student + regressors; the teacher stays outside."""

    def wrap(self, module: nn.Module, find_unused: bool) -> nn.Module:
        if self.cfg.sync_bn:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # `trainable: auto` freezes what a stage's losses do not reach, so DDP's per-step search
        # for unused parameters is needed only for `trainable: all` stages that leave some unreached.
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def microstep(self, model: nn.Module, sync: bool):
        # Gradients are all-reduced only on the last micro-batch of an optimizer step.
        return contextlib.nullcontext() if sync else model.no_sync()


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` honours a `found_inf` tensor (torch's fused implementations)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def build_strategy(cfg: StrategyConfig, env: DistEnv, precision: str, train: TrainConfig | None = None) -> Strategy:
    """`train` gives DeepSpeed its batch fields (defaults when None, e.g. for a dry run)."""
    if cfg.kind == "deepspeed":
        from fitdist.strategy_deepspeed import DeepSpeedStrategy  # imports deepspeed

        return DeepSpeedStrategy(cfg, env, precision, train)
    # DDP needs a process group: `dist.setup` starts one only for several processes (the dry run
    # starts a 1-process one on purpose); one process alone (NPROC=1) runs the module unwrapped.
    if cfg.kind == "ddp" and torch.distributed.is_initialized():
        return DDPStrategy(cfg, env, precision)
    return Strategy(cfg, env, precision)
