"""DeepSpeed behind the `Strategy` interface: ZeRO stages 0-2, bf16/fp16, DeepSpeed checkpoints.

The only module that imports `deepspeed` (and only when `strategy.kind: deepspeed`). fitdist
writes every field that also exists in its own config into the DeepSpeed config: the batch sizes
(`train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`), the
precision (`bf16` / `fp16` `enabled`) and `gradient_clipping`; the user's JSON
(`strategy.deepspeed_config`, e.g. `configs/deepspeed/zero2.json`) supplies the rest (ZeRO stage,
buckets, loss-scaler settings). A JSON value that disagrees with fitdist's is an error, so the
two files can never describe different runs.

The optimizer and learning-rate schedule are fitdist's own (`optim.*`, `fitdist/schedule.py`):
the torch optimizer is handed to DeepSpeed, which partitions its state under ZeRO, and the
LambdaLR schedule acts on the same parameter groups, so the LR schedule equals a DDP run's.

Gradient accumulation: the loop calls `backward` per micro-batch and `step` once per optimizer
step; DeepSpeed wants `engine.step()` after every backward and decides the boundary from its own
micro-step counter, so `backward` calls it off the boundary and checks both counters agree.

Checkpoints: DeepSpeed's `save_checkpoint`/`load_checkpoint` are collective; every rank writes its
optimizer partition into `<run dir>/deepspeed/step-XXXXXXXX/`, and fitdist's own checkpoint
(written by rank 0 afterwards, atomically) names that tag, so a fitdist checkpoint only exists
once the DeepSpeed save it refers to is complete. The engine reads and writes those files through
`fitdist/deepspeed_files.py`: with `weights_only=True` (a file cannot run code), fsynced.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from fitdist import dist
from fitdist.config import OptimConfig, StrategyConfig, TrainConfig
from fitdist.dist import DistEnv
from fitdist.errors import UserError
from fitdist.schedule import build_optimizer, build_scheduler
from fitdist.strategy import Strategy

TAG_PREFIX = "step-"


def load_user_config(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"strategy.deepspeed_config: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"strategy.deepspeed_config: {path} is not valid JSON (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"strategy.deepspeed_config: {path} must hold a JSON object")
    return data


def deepspeed_config(user: dict, train: TrainConfig, precision: str, world: int, max_grad_norm: float | None,
                     where: str = "strategy.deepspeed_config") -> dict:
    """The user's DeepSpeed config with fitdist's batch, precision and clipping fields written in
    (`max_grad_norm=None`: the stage's optimizer is not known yet, clipping is left unchecked)."""
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise UserError(f"{where}: remove {key!r}: fitdist builds the optimizer and LR schedule "
                            f"from optim.* so DeepSpeed and DDP runs train alike")
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserError(f"{where}: zero_optimization.stage {stage} is not supported (use 0, 1 or 2)")
    micro = train.batch_size // (train.grad_accum * world)
    fixed = {
        "train_batch_size": (train.batch_size, "train.batch_size"),
        "train_micro_batch_size_per_gpu": (micro, "train.batch_size / (train.grad_accum × world size)"),
        "gradient_accumulation_steps": (train.grad_accum, "train.grad_accum"),
    }
    if max_grad_norm is not None:
        fixed["gradient_clipping"] = (max_grad_norm, "optim.max_grad_norm")
    cfg = dict(user)
    for key, (value, source) in fixed.items():
        given = user.get(key, "auto")
        if given != "auto" and given != value:
            raise UserError(f"{where}: {key} is {given!r} but fitdist's {source} gives {value!r}; "
                            f"remove it or set it to \"auto\"")
        cfg[key] = value
    for name in ("bf16", "fp16"):
        section = dict(user.get(name, {}))
        want = precision == name
        if section.get("enabled", "auto") not in ("auto", want):
            raise UserError(f"{where}: {name}.enabled is {section['enabled']!r} but train.precision is "
                            f"{precision!r}; remove it or set it to \"auto\"")
        cfg[name] = {**section, "enabled": want}
    cfg.setdefault("zero_allow_untested_optimizer", True)  # fitdist's SGD/RMSprop under ZeRO
    cfg.setdefault("steps_per_print", 2**31 - 1)  # fitdist logs; DeepSpeed's progress lines off
    return cfg


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine over the student + regressors; the teacher stays outside, as under DDP."""

    def __init__(self, cfg: StrategyConfig, env: DistEnv, precision: str, train: TrainConfig | None = None):
        # DeepSpeed scales fp16 losses itself: fitdist's GradScaler stays disabled (state {}).
        super().__init__(cfg, env, "fp32")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # for autocast
        self.precision, self.train = precision, train or TrainConfig()
        self.user = load_user_config(cfg.deepspeed_config)
        deepspeed_config(self.user, self.train, precision, env.world, None)  # fail before any work
        self.engine = None
        self._sync = True
        if env.device.type == "cpu":  # DeepSpeed's CPU accelerator (gloo), unless told otherwise
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _ensure_process_group()

    def prepare(self, module: nn.Module, optim: OptimConfig, lr: float, total_steps: int):
        import deepspeed

        self.end_stage()
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, optim, lr)
        # The schedule acts on the torch optimizer's parameter groups, which DeepSpeed's ZeRO
        # wrappers share (they replace only the "params" entry): the LR DeepSpeed applies is ours.
        scheduler = build_scheduler(optimizer, total_steps, optim)
        config = deepspeed_config(self.user, self.train, self.precision, self.env.world, optim.max_grad_norm)
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, config=config)
        from fitdist.deepspeed_files import install

        install(self.engine)  # code-free loads, durable saves
        self.zero_stage = self.engine.zero_optimization_stage()
        return self.engine, ds_optimizer, scheduler

    def microstep(self, model: nn.Module, sync: bool):
        self._sync = sync
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        engine = self.engine
        if engine.is_gradient_accumulation_boundary() != self._sync:
            raise RuntimeError("DeepSpeed's gradient_accumulation_steps and train.grad_accum disagree")
        engine.backward(loss, scale_wrt_gas=False)  # the loop already divides by grad_accum
        if not self._sync:
            engine.step()  # counts the micro-step; no update off the accumulation boundary

    def step(self, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        engine = self.engine
        norm = None
        if self.zero_stage == 0:  # gradients are whole and all-reduced in p.grad before the step
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        engine.step()  # clips (gradient_clipping), steps, zeroes; skips fp16 overflow steps
        if norm is None:
            got = engine.get_global_grad_norm()
            norm = float(got) if got is not None else math.nan
        return norm, engine.was_step_applied() and math.isfinite(norm)

    # ---------------------------------------------------------------- checkpoints
    def optimizer_state(self, optimizer, run_dir: Path, global_step: int) -> dict:
        """Collective: every rank saves its part; returns what fitdist's checkpoint records."""
        root, tag = Path(run_dir) / "deepspeed", f"{TAG_PREFIX}{global_step:08d}"
        if self.env.is_main:
            _prune(root, run_dir)
        dist.barrier()
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        dist.barrier()
        return {"deepspeed_tag": tag}

    def load_optimizer_state(self, optimizer, state: dict, run_dir: Path) -> None:
        root, tag = Path(run_dir) / "deepspeed", (state.get("optimizer") or {}).get("deepspeed_tag")
        if tag is None:
            raise UserError("--resume: the checkpoint was not written by a DeepSpeed run")
        hint = f"remove {Path(run_dir) / 'checkpoints' / tag} to resume from the previous checkpoint"
        try:  # under ZeRO 0-2 each rank reads its own files, no collective: a failure stays local
            path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
            error = None if path is not None else f"DeepSpeed checkpoint {root / tag} does not load; {hint}"
        except UserError as e:  # a file refused or unreadable (fitdist/deepspeed_files.py)
            error = f"{e}; {hint}"
        except Exception as e:  # noqa: BLE001 - e.g. another world size: every rank must hear of it
            error = f"DeepSpeed checkpoint {root / tag}: {type(e).__name__}: {e}"
        # ... so the ranks agree before training: all stop with the same message, none waits alone
        errors = [error] * self.env.world
        if self.env.world > 1:
            tdist.all_gather_object(errors, error)
        failed = [e for e in errors if e is not None]
        if failed:
            raise UserError(f"--resume: {failed[0]}")

    def end_stage(self) -> None:
        """Detaches the engine (hooks off) and leaves the student in fp32 with the master weights,
        so the next stage's probe and `student.pt` see ordinary fp32 parameters."""
        if self.engine is None:
            return
        from deepspeed.utils import safe_get_full_fp32_param

        module, engine = self.engine.module, self.engine
        master = {}
        if self.precision != "fp32":
            for p in module.parameters():
                full = safe_get_full_fp32_param(p) if p.requires_grad else None
                if full is not None:
                    master[p] = full.detach().clone()
        engine.destroy()
        self.engine = None
        if self.precision != "fp32":
            module.float()
            with torch.no_grad():
                for p, full in master.items():
                    p.copy_(full.view_as(p))


def _prune(root: Path, run_dir: Path) -> None:
    """Drops DeepSpeed tags that no fitdist checkpoint names (pruned ones, or a crashed save)."""
    from fitdist.checkpoint import list_checkpoints

    if not root.is_dir():
        return
    kept = {p.name for p in list_checkpoints(Path(run_dir))}
    for tag in root.iterdir():
        if tag.is_dir() and tag.name.startswith(TAG_PREFIX) and tag.name not in kept:
            shutil.rmtree(tag, ignore_errors=True)


def _ensure_process_group() -> None:
    """One process without torchrun: a 1-process gloo group, so DeepSpeed needs no launcher."""
    if tdist.is_initialized():
        return
    # DeepSpeed asserts LOCAL_RANK is set (torchrun sets all three); values of a 1-process group
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
