"""Graceful preemption: on SIGTERM/SIGUSR1 (what SLURM sends before it preempts a job) the current
step finishes, a checkpoint is saved and the process exits with `PREEMPTED_EXIT` (75, EX_TEMPFAIL),
which `launch/slurm.sbatch` turns into a requeue.

One process reads its own flag after every step. Several agree on it every `every` steps (so a
signal is honoured within that many steps, on every rank after the same step) through a CPU
all-reduce on a gloo group: the accelerator never waits for it, and the steps in between make no
collective at all. A signal that arrives while a peer is gone is not a preemption: it is torchrun
tearing the worker group down (an elastic restart after a failure), and the agreement fails; the
process then leaves at once, saving nothing, instead of holding the restart up."""

from __future__ import annotations

import signal

import torch

from fitdist import dist
from fitdist.errors import UserError

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Raised after the checkpoint of a preempted run is saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint saved at step {step}; resume with --resume")
        self.step = step


class PeersLost(RuntimeError):
    """A signal came while another rank was gone: torchrun is stopping the group, not a preemption."""


class PreemptionGuard:
    """Context manager: while active, the configured signals set a flag instead of killing."""

    def __init__(self, names: list[str], every: int = 10):
        self.signals = []
        for name in names:
            if not hasattr(signal, name):
                raise UserError(f"run.preempt_signals: unknown signal {name!r}")
            self.signals.append(getattr(signal, name))
        self._flag = False
        self._previous: dict = {}
        self.every = every
        self._group = dist.cpu_group()  # collective: every rank builds its guard at the same point

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

    def requested(self, step: int) -> bool:
        """After optimizer step `step`: True on every rank together once any rank has received a
        signal, at the first multiple of `every` steps (every step for one process)."""
        if self._group is None:
            return self._flag
        if step % self.every:
            return False
        flag = torch.tensor([float(self._flag)])
        try:
            torch.distributed.all_reduce(flag, group=self._group)
        except RuntimeError as e:  # a peer's connection closed
            if self._flag:
                raise PeersLost(f"signalled while another rank was gone ({type(e).__name__}); not a "
                                "preemption: no checkpoint saved") from None
            raise
        return flag.item() > 0
