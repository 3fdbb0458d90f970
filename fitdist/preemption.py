"""Graceful preemption: on SIGTERM/SIGUSR1 (what SLURM sends before it preempts a job) the current
step finishes, a checkpoint is saved and the process exits with `PREEMPTED_EXIT` (75, EX_TEMPFAIL),
which `launch/slurm.sbatch` turns into a requeue. Under DDP the request is agreed across ranks so
every rank stops after the same step."""

from __future__ import annotations

import signal

import torch

from fitdist.dist import all_reduce_sum
from fitdist.errors import UserError

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Raised after the checkpoint of a preempted run is saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint saved at step {step}; resume with --resume")
        self.step = step


class PreemptionGuard:
    """Context manager: while active, the configured signals set a flag instead of killing."""

    def __init__(self, names: list[str]):
        self.signals = []
        for name in names:
            if not hasattr(signal, name):
                raise UserError(f"run.preempt_signals: unknown signal {name!r}")
            self.signals.append(getattr(signal, name))
        self._flag = False
        self._previous: dict = {}

    def __enter__(self) -> PreemptionGuard:  # noqa: PYI034
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave default handling in place
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a signal (one tiny all-reduce)."""
        flag = torch.tensor([float(self._flag)], device=device)
        return bool(all_reduce_sum(flag).item() > 0)
