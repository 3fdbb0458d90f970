"""DeepSpeed behind the `Strategy` interface: ZeRO stages 0-3, bf16/fp16, DeepSpeed checkpoints.

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

ZeRO-3 partitions the student's parameters themselves (the teacher stays outside, replicated):
between steps a parameter holds no data on any rank. So whatever reads whole weights goes through
`gathered` (evaluation and fitdist's checkpoints: a plain copy filled by an all-gather) or runs
after `end_stage`, which gathers the fp32 weights and turns the student back into a plain module
(the next stage's probe, `student.pt`). The hint stage's cut forward is not used (`_WholeForward`).
"""

from __future__ import annotations

import contextlib
import copy
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
from fitdist.max_norm import apply_max_norm
from fitdist.schedule import build_optimizer, build_scheduler
from fitdist.strategy import Strategy
from fitdist.versions import check_versions

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
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{where}: zero_optimization.stage {stage} is not supported (use 0, 1, 2 or 3)")
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
    if stage == 3:  # ZeRO-3 would otherwise replace torch.nn.functional.linear for the whole process
        cfg["zero_optimization"] = {"memory_efficient_linear": False, **user["zero_optimization"]}
    cfg.setdefault("zero_allow_untested_optimizer", True)  # fitdist's SGD/RMSprop under ZeRO
    cfg.setdefault("steps_per_print", 2**31 - 1)  # fitdist logs; DeepSpeed's progress lines off
    return cfg


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine over the student + regressors; the teacher stays outside, as under DDP."""

    fills_missing_gradients = True

    def __init__(self, cfg: StrategyConfig, env: DistEnv, precision: str, train: TrainConfig | None = None):
        super().__init__(cfg, env, precision)
        # DeepSpeed scales fp16 losses itself: fitdist's GradScaler stays disabled (state {}).
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=False)
        self.train = train or TrainConfig()
        check_versions(("deepspeed",))  # its internals that fitdist calibrates on change between releases
        self.user = load_user_config(cfg.deepspeed_config)
        deepspeed_config(self.user, self.train, precision, env.world, None)  # fail before any work
        self.engine = None
        self.zero_stage = self.user.get("zero_optimization", {}).get("stage", 0)
        self._sync = True
        if env.device.type == "cpu":  # DeepSpeed's CPU accelerator (gloo), unless told otherwise
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _ensure_process_group()

    def prepare(self, module: nn.Module, optim: OptimConfig, lr: float, total_steps: int, find_unused: bool = False):
        import deepspeed

        self.end_stage()
        if self.env.device.type == "cpu" and self.precision != "fp32" and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            # DeepSpeed casts the module, BatchNorm included, to bf16/fp16, and the CPU's autocast
            # feeds batch_norm fp32: the first forward would fail inside torch (not tried on CUDA)
            raise UserError(f"train.precision: {self.precision} with strategy.kind=deepspeed on the CPU cannot run "
                            "a student with BatchNorm; use train.precision=fp32 there")
        self.check_optim(optim)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, optim, lr)
        # The schedule acts on the torch optimizer's parameter groups, which DeepSpeed's ZeRO
        # wrappers share (they replace only the "params" entry): the LR DeepSpeed applies is ours.
        scheduler = build_scheduler(optimizer, total_steps, optim)
        config = deepspeed_config(self.user, self.train, self.precision, self.env.world, optim.max_grad_norm)
        if self.zero_stage == 3:  # taken while the module is still plain (see `gathered`, `end_stage`)
            self._attributes = {m: set(vars(m)) for m in module.modules()}
            self._replica = _hollow_copy(module)
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, config=config)
        from fitdist.deepspeed_files import install

        install(self.engine)  # code-free loads, durable saves
        self.zero_stage = self.engine.zero_optimization_stage()
        model = _WholeForward(self.engine) if self.zero_stage == 3 else self.engine
        return model, ds_optimizer, scheduler

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

    def step(self, optimizer, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """As `Strategy.step`; DeepSpeed's engine decides the skip itself (its fp16 overflow check
        reads a flag on the host)."""
        engine = self.engine
        norm = None
        if self.zero_stage == 0:  # gradients are whole and all-reduced in p.grad before the step
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        engine.step()  # clips (gradient_clipping), steps, zeroes; skips fp16 overflow steps
        if norm is None:
            got = engine.get_global_grad_norm()
            norm = torch.as_tensor(math.nan if got is None else got, dtype=torch.float32, device=self.env.device)
        applied = torch.tensor(engine.was_step_applied(), device=norm.device)
        return norm, torch.isfinite(norm) & applied

    def check_optim(self, optim: OptimConfig) -> None:
        if optim.max_norm and (self.zero_stage == 3 or self.precision != "fp32"):
            # the clip is applied to the module's whole weights and copied into ZeRO-1/2's fp32 master
            # partitions: ZeRO-3 has no whole weights, and a bf16/fp16 module copy would round the master
            raise dist.every_rank(UserError(
                f"optim.max_norm: not available under DeepSpeed with ZeRO-3 or train.precision bf16/fp16 (got ZeRO "
                f"{self.zero_stage}, {self.precision}); use ZeRO 0-2 with fp32, or strategy.kind=ddp"))

    def constrain(self, optimizer, weights: list[torch.Tensor], max_norm: float) -> None:
        """`optim.max_norm` on the module's weights (whole on every rank under ZeRO 0-2), then, under
        ZeRO-1/2, the same values into this rank's fp32 master partition (an exact copy in fp32, the
        only precision `prepare` allows here): the next step starts from the clipped weights."""
        apply_max_norm(weights, max_norm)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

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
        engine = self.engine

        def attempt(load) -> str | None:
            try:
                return load()
            except UserError as e:  # a file refused or unreadable (fitdist/deepspeed_files.py)
                return f"{e}; {hint}"
            except Exception as e:  # noqa: BLE001 - e.g. another world size: every rank must hear of it
                return f"DeepSpeed checkpoint {root / tag}: {type(e).__name__}: {e}"

        def read_own_files() -> str | None:
            own = sorted((root / tag).glob(f"*zero_pp_rank_{self.env.rank}_mp_rank_*.pt"))
            for f in own:
                engine.checkpoint_engine.load(str(f), map_location="cpu")
            return None if own else f"DeepSpeed checkpoint {root / tag} holds no files of rank {self.env.rank}; {hint}"

        def load() -> str | None:
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
            return None if path is not None else f"DeepSpeed checkpoint {root / tag} does not load; {hint}"

        if self.zero_stage == 3:
            # ZeRO-3's load ends in a collective (parameters kept whole, `stage3_param_persistence_threshold`,
            # are all-gathered again): a rank whose files do not load would leave the others waiting in
            # it. So each rank first reads its own files, and the ranks agree, before DeepSpeed loads.
            self._agree(attempt(read_own_files))
        # under ZeRO 0-2 each rank reads its own files, no collective: a failure stays local, then agreed
        self._agree(attempt(load))

    def _agree(self, error: str | None) -> None:
        """Every rank stops with the first rank's error, or none does: none waits alone."""
        failed = [e for e in dist.gather_objects(error) if e is not None]
        if failed:
            raise UserError(f"--resume: {failed[0]}")

    def gathered(self, module: nn.Module):
        """Under ZeRO-3 (collective): a plain copy of `module` whose tensors are its parameters,
        all-gathered for the context's duration, and its buffers; the module itself otherwise."""
        if self.engine is None or self.zero_stage != 3:
            return contextlib.nullcontext(module)
        return _gathered(module, self._replica)

    def end_stage(self) -> None:
        """Detaches the engine (hooks off) and leaves the student in fp32 with the master weights,
        so the next stage's probe and `student.pt` see ordinary fp32 parameters (under ZeRO-3:
        all-gathered, collectively, into new plain parameters)."""
        if self.engine is None:
            return
        from deepspeed.utils import safe_get_full_fp32_param

        module, engine = self.engine.module, self.engine
        master = {}
        if self.zero_stage == 3:  # collective: every parameter all-gathered, in the same order on all ranks
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters(list(module.parameters()), modifier_rank=None):
                whole = {p: p.detach().clone() for p in module.parameters()}
        if self.precision != "fp32":
            for p in module.parameters():
                full = safe_get_full_fp32_param(p) if p.requires_grad else None  # collective under ZeRO-3
                if full is not None:
                    master[p] = full.detach().clone()
        # the engine's forward hooks on the module outlive `destroy` (and keep the engine alive)
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(engine, name, None)
            if handle is not None:
                handle.remove()
        engine.destroy()
        self.engine = None
        if self.zero_stage == 3:
            _unpartition(module, {**whole, **master}, self._attributes)
            self._attributes, self._replica = {}, None
            module.float()  # buffers, and frozen parameters, were cast with the module under bf16/fp16
        elif self.precision != "fp32":
            module.float()
            with torch.no_grad():
                for p, full in master.items():
                    p.copy_(full.view_as(p))


class _WholeForward:
    """The ZeRO-3 engine, with the student's forward never cut, yet leaving what the cut one leaves.

    FitNets' hint stage cuts the student's forward after its guided layer by raising from that
    layer's forward hook (`fitdist/features.py`). ZeRO-3 gathers a submodule's parameters in its
    pre-forward hook and releases them, and pops its module stack, in its post-forward hook; an
    exception mid-forward would skip the post-forward hooks of the cut module and its ancestors,
    leaving their parameters gathered and DeepSpeed's module stack and prefetch trace out of step.
    So the backbone runs to its logits (unused: the hint loss does not reach them), and what the
    layers after the guided one change is undone when the backbone returns: BatchNorm running
    statistics (its buffers as the guided layer ended) and the RNG state (dropout draws). The
    stage then trains as under the other strategies; the extra forward is its cost. (The teacher,
    outside DeepSpeed, is still cut.)"""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, images: torch.Tensor, teacher_hints=None, need_logits: bool = True):
        student = self.engine.module
        if need_logits or teacher_hints is None or not student.tap.paths:  # a whole forward anyway
            return self.engine(images, teacher_hints, need_logits)
        backbone, cut = student.backbone, {}
        cuda = images.device if images.device.type == "cuda" else None

        def at_cut():  # where the cut forward would have ended: the last guided feature is out
            cut["buffers"] = [b.detach().clone() for b in backbone.buffers()]
            cut["rng"] = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda else None)

        def at_end(module, args, output):
            # through `.data`: no version bump, which the backward of a BatchNorm before the cut
            # (it saved its running statistics; their values, nothing after the cut wrote, stay) would refuse
            for b, saved in zip(backbone.buffers(), cut["buffers"]):
                b.data.copy_(saved)
            torch.set_rng_state(cut["rng"][0])
            if cuda:
                torch.cuda.set_rng_state(cut["rng"][1], cuda)

        student.tap.on_complete = at_cut
        handle = backbone.register_forward_hook(at_end)
        try:
            return self.engine(images, teacher_hints, True)
        finally:
            handle.remove()
            student.tap.on_complete = None


def _hollow_copy(module: nn.Module) -> nn.Module:
    """A copy of a plain `module` whose parameters and buffers hold no data (filled by `_gathered`).

    Its submodules are copies; other objects its modules hold are shared, not copied (the
    student's FeatureTap, whose compiled forward, with `train.compile`, refers to the run's logger):
    the copy is only read and run forward, outside training."""
    internals = set(vars(nn.Module()))
    shared = {id(v): v for m in module.modules() for k, v in vars(m).items()
              if k not in internals and not isinstance(v, (nn.Module, torch.Tensor))}
    replica = copy.deepcopy(module, shared)
    for t in [*replica.parameters(), *replica.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return replica


@contextlib.contextmanager
def _gathered(module: nn.Module, replica: nn.Module):
    """`replica` with `module`'s ZeRO-3 parameters, all-gathered (no copy), and its buffers.

    A forward of `module` itself would run ZeRO-3's hooks, which release each submodule's
    parameters after it runs and all-gather them again for the next batch: a collective per
    batch, which ranks with different numbers of validation batches would not all join."""
    from deepspeed.runtime.zero import GatheredParameters

    params = list(zip(module.named_parameters(), replica.named_parameters()))
    pairs = params + list(zip(module.named_buffers(), replica.named_buffers()))
    if any(a != b for (a, _), (b, _) in pairs):
        raise RuntimeError("the student's ZeRO-3 replica no longer matches the student")
    with GatheredParameters([p for (_, p), _ in params], modifier_rank=None):
        try:
            for (_, source), (_, target) in pairs:
                target.data = source.data
            yield replica
        finally:
            for _, (_, target) in pairs:
                target.data = torch.empty(0, dtype=target.dtype, device=target.device)


def _unpartition(module: nn.Module, values: dict, attributes: dict) -> None:
    """Turns a ZeRO-3 `module`, its engine destroyed, back into a plain one: new parameters
    holding `values` (whole tensors by old parameter), in plain parameter dicts, without the
    attributes DeepSpeed added to its submodules (`attributes`: theirs before the engine)."""
    new: dict = {}
    for m in module.modules():
        plain = {}
        for name, p in m._parameters.items():  # `items()` does not gather (ZeROOrderedDict's `[]` does)
            if p is not None and p not in new:
                new[p] = nn.Parameter(values[p].reshape(p.ds_shape), requires_grad=p.requires_grad)
            plain[name] = None if p is None else new[p]
        for name in set(vars(m)) - attributes.get(m, set()):
            delattr(m, name)  # ds_id, _external_params, _original_parameters, backward hooks' state, ...
        m._parameters = plain


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
