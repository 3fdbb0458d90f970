"""`train.compile`: the student's and the teacher's forward through `torch.compile`, hints kept.

What is compiled is each model's `FeatureTap.run` (fitdist/features.py), not the module, because
- the hooks that capture hint features were registered before, so Dynamo traces them into the
  graph and the features are graph outputs, as the regressors and hint losses need;
- FitNets stage 1's truncated forward compiles too: the hook's `raise` and the `except` catching it
  are in the same compiled frame, so the graph simply ends at the guided (hint) layer and the
  layers after it never run, their BatchNorm statistics untouched as in eager. (Compiling the
  module instead puts the `except` outside the graph; Dynamo then gives up on the whole forward
  and silently runs it eager. Running the full forward instead would update those statistics.);
- no module is wrapped: state_dict keys, checkpoints and `student.pt` are those of an eager run
  (no `_orig_mod.` prefix), and evaluation, MAC counts and build-time probes stay eager.

`fullgraph=True` turns a graph break into an error instead of a silent split. A model's first
compile error (a graph break, a compiler failure, the recompile limit) switches that model to
eager for the rest of the run with one warning line naming it and the reason: a run never fails
for compiling. `check_stage` provokes those errors before a stage's first step, with one probe
forward and backward under the stage's exact conditions (micro-batch shape, autocast, trainable
parameters: the graphs are specialised on all three), so training then reuses its graphs.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import torch

from fitdist.config import Config, StageConfig, teacher_ids, teacher_list
from fitdist.distiller import FrozenTeacher, Student
from fitdist.stage import probe_backward


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc  # imported on first use: only compiled runs pay for it

    # all raised while tracing or compiling, before any of the call's work has run
    return exc.TorchDynamoException, exc.FailOnRecompileLimitHit


class CompiledRun:
    """`fn` compiled whole; eager from its first compile error on, after one warning line."""

    def __init__(self, fn: Callable, name: str, mode: str, warn: Callable[[str], None]):
        self.fn, self.name, self.warn = fn, name, warn
        self.compiled: Callable | None = torch.compile(fn, fullgraph=True, mode=mode)
        self.failure: str | None = None  # why it runs eager

    def __call__(self, x: torch.Tensor):
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except _compile_errors() as e:
                self.fall_back(e)
        return self.fn(x)

    def fall_back(self, error: BaseException) -> None:
        if self.compiled is None:
            return
        self.compiled, self.failure = None, describe(error)
        self.warn(f"warning: train.compile: {self.name} runs eager from now on: {self.failure}")


def describe(error: BaseException) -> str:
    """One line: the error's first line and the innermost user-code line Dynamo names."""
    if type(error).__name__ == "FailOnRecompileLimitHit" and error.__cause__ is not None:
        error = error.__cause__  # "hard failure due to fullgraph=True"; the cause says why
    text = str(error).strip()
    first = text.splitlines()[0].strip() if text else ""
    _, marker, user = text.rpartition("from user code:")
    where = re.findall(r'File "([^"]+)", line (\d+)', user) if marker else []
    at = f" ({where[-1][0]}:{where[-1][1]})" if where else ""
    return f"{type(error).__name__}: {first[:200]}{at}"


def compile_models(cfg: Config, student: Student, teacher: FrozenTeacher | None,
                   warn: Callable[[str], None]) -> None:
    """Compiles the student's backbone forward and the teacher's forward, at their first call."""
    mode = cfg.train.compile_mode
    student.tap.run = CompiledRun(student.tap.run_model, f"student {cfg.student.name}", mode, warn)
    teachers, ids = _teachers(teacher), teacher_ids(cfg)
    for t, spec, tid in zip(teachers, teacher_list(cfg), ids):  # each teacher's forward, compiled on its own
        name = f"teacher {spec.name}" if len(teachers) == 1 else f"teacher {tid} ({spec.name})"
        t.tap.run = CompiledRun(t.tap.run_model, name, mode, warn)


def _teachers(teacher) -> list[FrozenTeacher]:
    """The frozen teachers of a lone teacher, an `Ensemble` or None."""
    return [] if teacher is None else list(getattr(teacher, "teachers", [teacher]))


def compiled(student: Student, teacher: FrozenTeacher | None) -> dict[str, str]:
    """`{model: "compiled" | "eager: <reason>"}` for the models `compile_models` compiled."""
    runs = [m.tap.run for m in (student, *_teachers(teacher)) if isinstance(m.tap.run, CompiledRun)]
    return {r.name: "compiled" if r.compiled is not None else f"eager: {r.failure}" for r in runs}


def check_stage(cfg: Config, stage: StageConfig, student: Student, teacher: FrozenTeacher | None,
                x: torch.Tensor, autocast: Callable) -> str:
    """Compiles what `stage` runs by one probe forward and backward on `x` (a training
    micro-batch's shape) under `autocast` (the strategy's), after `set_trainable`; weights,
    buffers and RNG are left untouched. Returns a one-line note of what compiled."""
    started = time.perf_counter()
    run = student.tap.run

    def backward(loss: torch.Tensor) -> None:  # the compiled backward is built here, at its first call
        try:
            loss.backward()
        except Exception as e:  # if it was not the compiler, the first eager step raises it again
            if not isinstance(run, CompiledRun) or run.compiled is None:
                raise
            run.fall_back(e)

    probe_backward(cfg, stage, student, teacher, x, cfg.loss.impl, autocast, backward)
    names = [name for name, status in compiled(student, teacher).items() if status == "compiled"]
    return f"compiled {' and '.join(names)} ({time.perf_counter() - started:.0f} s)" if names else ""


def eager(enabled: bool = True):
    """Context for probes that must not compile: other shapes or trainable parameters than the
    training steps' would cost compilations of their own."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if enabled and set_stance else contextlib.nullcontext()
