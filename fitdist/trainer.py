"""The training loop: stages → optimizer steps → micro-steps, with log / eval / checkpoint calls.

One loop serves every method: a stage is data (its loss weights, with schedules such as FitNets'
λ 4→1, and which parameters train), so scratch, KD, FitNets two-stage and single-stage FitNets
are configs of the same code path.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fitdist import dist
from fitdist.build import build_student, build_teachers, place, probe_input
from fitdist.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_checkpoint_at,
    rng_state,
    save_checkpoint,
    save_file,
    set_rng_state,
)
from fitdist.compile import compile_models, eager
from fitdist.config import Config, StageConfig, _build, dump_config, to_dict, validate
from fitdist.data import build_data
from fitdist.data.soft_labels import check_run, stored_only
from fitdist.diagnostics import Diagnostics, watched_layers
from fitdist.ema import StudentEMA
from fitdist.errors import UserError
from fitdist.evaluate import evaluate
from fitdist.logger import build_logger
from fitdist.models import count_macs, count_params
from fitdist.preemption import Preempted, PreemptionGuard
from fitdist.stage import PreparedStage, prepare_stage, resolve_steps, stage_weights, train_step
from fitdist.strategy import build_strategy
from fitdist.window import Window

# Keys that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = ("run.", "wandb.", "train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.threads", "train.device", "train.compile", "data.num_workers", "data.root",
                     "data.download", "train.diagnostics")


@dataclass
class Position:
    stage: int = 0  # index of the current stage
    step: int = 0  # optimizer steps done in the current stage
    global_step: int = 0  # optimizer steps done in the whole run
    microbatch: int = 0  # global micro-batches consumed: the data position
    wall_time: float = 0.0  # seconds spent training before this process started


def train(cfg: Config, resume: bool = False) -> dict:
    """Runs every stage of `cfg`; returns the final evaluation (also in `<run dir>/summary.json`)."""
    env = dist.setup(cfg.train.device, cfg.strategy.backend)
    try:
        return _Run(cfg, env, resume).run()
    finally:
        dist.teardown()


class Diverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


class _Run:
    def __init__(self, cfg: Config, env: dist.DistEnv, resume: bool):
        self.cfg, self.env, self.run_dir = cfg, env, cfg.run_dir
        _check_world(cfg, env)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights
        _prepare_run_dir(self.run_dir, env.is_main)

        per_step = cfg.train.batch_size // cfg.train.grad_accum
        if per_step * cfg.train.grad_accum != cfg.train.batch_size or per_step % env.world:
            raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by grad_accum × world size "
                            f"({cfg.train.grad_accum} × {env.world})")
        self.micro_batch = per_step // env.world
        self.data = build_data(cfg.data, self.micro_batch, cfg.train.eval_batch_size, cfg.seed, env.rank, env.world)
        self.stages = resolve_steps(cfg, self.data.num_train)  # stages in epochs, in steps
        if self.data.soft_labels is not None:  # stored labels: their temperature and teacher are the run's
            check_run(cfg, self.data.soft_labels)
        # an Ensemble (of one for `teacher:`); none at all when stored labels serve every stage (no hints)
        self.teacher = None if stored_only(cfg) else build_teachers(cfg, self.data, env.rank)
        torch.manual_seed(cfg.seed)  # the student's initial weights depend on the seed alone
        self.student = build_student(cfg, self.data, self.teacher)
        place(cfg, self.student, self.teacher, env.device)
        watched = watched_layers(self.student.backbone, cfg.train.diagnostics, cfg.hints[0].student if cfg.hints else None)
        self.diagnostics = Diagnostics(self.student.backbone, watched) if watched else None  # armed on log steps only
        self.strategy = build_strategy(cfg.strategy, env, cfg.train.precision, cfg.train)
        for stage in self.stages:  # e.g. optim.max_norm under DeepSpeed ZeRO-3: refused before any stage runs
            self.strategy.check_optim(stage.optim or cfg.optim)
        self.ema = None
        if cfg.train.ema is not None:
            offload = getattr(self.strategy, "user", {}).get("zero_optimization", {}).get("offload_param") or {}
            if getattr(self.strategy, "zero_stage", 0) == 3 and offload.get("device") == "nvme":
                # the partitions live on disk between steps: there is nothing on the device to average
                raise dist.every_rank(UserError("train.ema: not available under DeepSpeed ZeRO-3 with "
                                                "zero_optimization.offload_param.device nvme; use cpu or none"))
            e = cfg.train.ema
            self.ema = StudentEMA(self.student.backbone, e.decay, e.every, e.warmup)

        self.pos, self.saved, self.evaluated = Position(), None, (None, {})
        self.resumed_state = self._resume_state(resume or cfg.run.resume == "auto", strict=resume)
        if env.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.logger = build_logger(env.is_main, self.run_dir, cfg.name, to_dict(cfg), cfg.wandb,
                                   self.resumed_state.get("wandb_id") if self.resumed_state else None)
        if cfg.train.compile:
            compile_models(cfg, self.student, self.teacher, self.logger.print)
        self.started = time.perf_counter()
        self.guard = PreemptionGuard(cfg.run.preempt_signals, cfg.run.preempt_check_every)
        self.shown: dict = {}  # the progress bar's losses: those of the last log row

    # ------------------------------------------------------------------ resume
    def _resume_state(self, wanted: bool, strict: bool) -> dict | None:
        """The checkpoint to continue from, the same on every rank: rank 0 picks the newest that
        loads, every rank loads that one (each picking alone could differ, e.g. when a save was
        cut short on one node's view of the disk), and a run on another process count is refused."""
        if not wanted:
            return None
        env = self.env

        def pick() -> str | None:
            if not strict and not list_checkpoints(self.run_dir):
                return None
            return str(load_checkpoint(self.run_dir)[0])

        chosen = dist.decided_by_rank0(pick)
        if chosen is None:
            return None
        path = Path(chosen)
        state, error = None, None
        try:
            state = load_checkpoint_at(path)
        except UserError as e:
            error = f"rank {env.rank}: {e}"
        errors = [e for e in dist.gather_objects(error) if e]
        if errors:  # every rank stops, rank 0 says why
            raise dist.every_rank(UserError(errors[0]))
        _check_same_config(state["config"], to_dict(self.cfg), path)
        saved_world = state.get("world", 1)
        if saved_world != env.world:
            raise dist.every_rank(UserError(
                f"--resume: checkpoint {path} was written by {saved_world} process(es) and this run has {env.world}; "
                f"the data each rank reads and its random state depend on that count: resume with {saved_world} "
                "(NPROC, nodes), or start a new run directory"))
        self.pos = Position(**state["position"])
        self.student.load_state_dict(state["student"])
        if self.ema is not None:  # train.ema is part of the config a resume must keep: it was saved
            self.ema.load_state_dict(state["ema"])
        self.saved = self.pos.global_step
        return state

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        cfg, log = self.cfg, self.logger
        log.print(f"student {cfg.student.name}: {count_params(self.student.backbone):,} params"
                  + "".join(f"; teacher {t.name}: {count_params(m.model):,} params"
                            for t, m in zip(cfg.teachers, self.teacher.teachers if self.teacher else []))
                  + f"; world size {self.env.world}; device {self.env.device}")
        if self.resumed_state is not None:
            log.print(f"resumed from step {self.pos.global_step} (stage {self.stages[self.pos.stage].name}, "
                      f"step {self.pos.step})")
        try:
            with self.guard:
                for index in range(self.pos.stage, len(self.stages)):
                    if index > self.pos.stage:
                        self.pos.stage, self.pos.step = index, 0
                    self._run_stage(self.stages[index])
            return self._finish()
        finally:
            log.finish()

    def _run_stage(self, stage: StageConfig) -> None:
        cfg, env, pos = self.cfg, self.env, self.pos
        prepared = prepare_stage(cfg, stage, self.student, self.teacher, self.strategy, env.world,
                                 self.micro_batch, (self.data.in_channels, *self.data.image_size))
        for note in prepared.notes:
            self.logger.print(f"stage {stage.name}: {note}")
        if self.resumed_state is not None:  # continue the stage the checkpoint was taken in
            st, self.resumed_state = self.resumed_state, None
            self.strategy.load_optimizer_state(prepared.optimizer, st, self.run_dir)  # collective for DeepSpeed
            prepared.scheduler.load_state_dict(st["scheduler"])
            self.strategy.scaler.load_state_dict(st["scaler"])
            rng = st["rng"]
            set_rng_state(rng[self.env.rank] if isinstance(rng, list) else rng)  # this rank's own generators
        batches = self.data.train_batches(pos.microbatch)
        window = Window()
        self.student.train()
        while pos.step < stage.steps:
            weights = stage_weights(stage, pos.step)
            armed = self.diagnostics is not None and self._logs_at(stage, pos.step + 1, pos.global_step + 1)
            if armed:
                self.diagnostics.arm()  # this step writes a log row: measure its (first) micro-batch
            with eager(cfg.train.compile and armed):  # the hooks are not compiled: that step runs eager
                train_step(cfg, prepared, self.strategy, batches, weights, env.device, window, self.data.to_device,
                           pos.global_step)
            pos.step, pos.global_step = pos.step + 1, pos.global_step + 1
            pos.microbatch += cfg.train.grad_accum
            if self.ema is not None:  # device ops only: no sync, no collective
                self.ema.maybe_update(pos.global_step)
            self._every_step(stage, window, prepared)
            if self.guard.requested(pos.global_step):  # preemption: the step is done, save it and leave
                if self.saved != pos.global_step:
                    self._checkpoint(prepared)
                raise Preempted(pos.global_step)
        if self.saved != pos.global_step:  # end of stage: evaluate and checkpoint once
            self._log_row(stage, window, evaluate_now=True)
            self._checkpoint(prepared)
        if self.ema is not None:
            self.ema.gather()  # every rank, before ZeRO-3's partitions go: whole for the export
        self.strategy.end_stage()

    def _check_finite(self, row: dict) -> None:
        """A non-finite loss or gradient skips the step (on the device); too many in a row stop the
        run. Read at each log row, so the run stops within `train.log_every` steps of the limit."""
        in_a_row = row["train/skipped_in_a_row"]
        if in_a_row >= self.cfg.train.max_skipped_steps:
            raise Diverged(f"{in_a_row} consecutive steps with a non-finite loss or gradient "
                           f"by step {self.pos.global_step}; the last good checkpoint is intact in "
                           f"{self.run_dir / 'checkpoints'}")

    def _every_step(self, stage: StageConfig, window: Window, prepared: PreparedStage) -> None:
        cfg, pos = self.cfg.train, self.pos
        last = pos.step == stage.steps
        if pos.step % 10 == 0 or last:  # the bar shows the last row's losses: reading them costs no sync
            self.logger.progress(stage.name, pos.step, stage.steps, self.shown)
        due_eval = cfg.eval_every and pos.global_step % cfg.eval_every == 0 and not last
        if (pos.global_step % cfg.log_every == 0 or due_eval) and not last:
            self._log_row(stage, window, evaluate_now=bool(due_eval))
        if cfg.checkpoint_every and pos.global_step % cfg.checkpoint_every == 0 and not last:
            self._checkpoint(prepared)

    def _logs_at(self, stage: StageConfig, step: int, global_step: int) -> bool:
        """Whether the step that makes the stage's step count `step` writes a log row (`_every_step`
        logs on log_every / eval_every, `_run_stage` at the stage's end)."""
        cfg = self.cfg.train
        return (step == stage.steps or global_step % cfg.log_every == 0
                or bool(cfg.eval_every and global_step % cfg.eval_every == 0))

    def _log_row(self, stage: StageConfig, window: Window, evaluate_now: bool) -> None:
        diag = self.diagnostics.take() if self.diagnostics is not None else None  # device tensors: read by flush
        row = {"stage": stage.name, **window.flush(self.env.device, self.env.world, diag)}
        self._check_finite(row)
        self.shown = {k: v for k, v in row.items() if k in ("train/loss", "train/ce", "train/kd", "train/hint")}
        if evaluate_now:
            row.update(self._evaluate())
        counters = self.data.metrics()  # the same keys on every rank; summed over ranks
        if counters:
            keys = sorted(counters)
            totals = dist.all_reduce_sum(torch.tensor([float(counters[k]) for k in keys], device=self.env.device))
            row.update(zip(keys, totals.tolist()))
        self.logger.log(row, self.pos.global_step)

    def _evaluate(self) -> dict:
        """Evaluates the backbone, once per global step at most (a stage end is also the run's end)."""
        if self.evaluated[0] != self.pos.global_step:
            with self.strategy.gathered(self.student) as student:  # every rank: ZeRO-3 all-gathers
                metrics = evaluate(student.backbone, self.data.val_batches(), self.env.device, self.cfg.train.precision,
                                   self.data.to_device)
            if self.ema is not None:
                self.ema.gather()  # every rank (same step): ZeRO-3's per-partition updates made whole
                ema = evaluate(self.ema.module, self.data.val_batches(), self.env.device, self.cfg.train.precision,
                               self.data.to_device)
                metrics.update({k.replace("val/", "val_ema/"): v for k, v in ema.items()})
            self.evaluated = (self.pos.global_step, metrics)
        return self.evaluated[1]

    def _checkpoint(self, prepared: PreparedStage) -> None:
        pos, optimizer, scheduler = self.pos, prepared.optimizer, prepared.scheduler
        with self.strategy.gathered(self.student) as student:  # every rank: ZeRO-3 all-gathers
            finite = all(torch.isfinite(p).all() for p in student.parameters())
        if not finite:
            self.logger.print(f"warning: non-finite weights at step {pos.global_step}; checkpoint not written")
            return
        if self.ema is not None:
            self.ema.gather()  # every rank: the checkpoint holds the whole EMA (ZeRO-3)
        optimizer_state = self.strategy.optimizer_state(optimizer, self.run_dir, pos.global_step)  # all ranks
        rngs = dist.gather_objects(rng_state())  # every rank's own generators, in rank order
        with self.strategy.gathered(self.student) as student:
            if self.env.is_main:
                state = {
                    "position": {**asdict(pos), "wall_time": pos.wall_time + time.perf_counter() - self.started},
                    "student": student.state_dict(),
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "scaler": self.strategy.scaler.state_dict(),
                    "rng": rngs,
                    "world": self.env.world,
                    "wandb_id": self.logger.run_id,
                    "config": to_dict(self.cfg),
                    **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                }
                save_checkpoint(self.run_dir, pos.global_step, student.backbone.state_dict(), state,
                                self.cfg.run.keep_checkpoints)
        dist.barrier()
        self.saved = pos.global_step

    def _finish(self) -> dict:
        metrics = self._evaluate()
        wall = self.pos.wall_time + time.perf_counter() - self.started
        backbone = self.student.backbone
        summary = {**metrics, "params": count_params(backbone), "steps": self.pos.global_step,
                   "macs": count_macs(backbone, probe_input(self.data, batch=1).to(self.env.device)),
                   "wall_time_s": wall, "student": self.cfg.student.name}
        if self.env.is_main:
            save_file(self.student.backbone.state_dict(), self.run_dir / "student.pt")
            if self.ema is not None:
                save_file(self.ema.module.state_dict(), self.run_dir / "student_ema.pt")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            self.logger.print(f"final: top1 {metrics['val/top1']:.2f}%  top5 {metrics['val/top5']:.2f}%  "
                              f"({wall:.0f} s) -> {self.run_dir / 'student.pt'}")
        return summary


def _check_world(cfg: Config, env: dist.DistEnv) -> None:
    if env.world > 1 and cfg.strategy.kind == "single":
        raise UserError(f"strategy.kind: 'single' cannot run with {env.world} processes; use strategy.kind=ddp")


def _prepare_run_dir(run_dir: Path, is_main: bool) -> None:
    if not is_main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run.dir: cannot write to {run_dir} ({e.strerror or e})") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
            for i, item in enumerate(v):
                out.update(_flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _as_current_schema(saved: dict) -> dict:
    """A saved config read with this version's schema: keys added since it was written take their
    defaults, so a checkpoint of an older fitdist resumes unless a setting it recorded changed."""
    try:
        return to_dict(validate(_build(Config, copy.deepcopy(saved))))
    except UserError:  # a key since removed or retyped: compared as written (it will differ)
        return saved


def _check_same_config(saved: dict, current: dict, path: Path) -> None:
    a, b = _flatten(_as_current_schema(saved)), _flatten(current)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if differ:
        shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in differ[:4])
        raise UserError(f"--resume: checkpoint {path} was made with a different config: {shown}")
