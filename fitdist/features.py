"""Intermediate features by forward hooks on module paths (torchdistill's approach): no rewrites.

A `FeatureTap` records the outputs of named submodules. With `stop_early`, the forward is cut
right after the last tapped module has run, so FitNets stage 1 only pays for the teacher up to
its hint layer and the student up to its guided layer (Romero et al. 2014, Algorithm 1).
`run` is the model's forward with that cut, and what `train.compile` compiles (fitdist/compile.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fitdist.errors import UserError, did_you_mean


class _StopForward(Exception):
    """Raised by the last hook to end a truncated forward."""


class FeatureTap:
    """Forward hooks on `paths` of `model`; call it instead of the model to get features too.

    Each tapped module contributes the output of its first call in a forward (a module that runs
    twice, a shared block, gives the same feature whether or not the forward is cut). The cut
    needs no knowledge of the model's order: it falls right after the hook that completes the set
    of features, which is exactly where the rest of the forward stops mattering to them.
    """

    def __init__(self, model: nn.Module, paths: list[str], where: str):
        self.model, self.paths, self.where = model, list(paths), where
        unique = list(dict.fromkeys(self.paths))  # two hints may share a teacher layer
        names = [n for n, _ in model.named_modules() if n]
        modules = []
        for path in unique:
            try:
                modules.append(model.get_submodule(path))
            except AttributeError:
                raise UserError(f"{where}: no module {path!r} in the model{did_you_mean(path, names)}") from None
        self._handles = [m.register_forward_hook(self._hook(p)) for m, p in zip(modules, unique)]
        self._feats: dict[str, torch.Tensor] = {}
        self._active = self._stop_early = False
        # called once per forward, with no arguments, when the last feature arrives (the point
        # where a cut forward ends); DeepSpeed ZeRO-3's uncut hint forward snapshots state there
        self.on_complete: Callable[[], None] | None = None
        self.run = self.run_model  # `fitdist.compile` swaps in a compiled version

    def _hook(self, path: str):
        def hook(module, args, output):
            if not self._active or path in self._feats:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise UserError(f"{self.where}: module {path!r} does not return a tensor")
            self._feats[path] = output
            if len(self._feats) == len(self._handles):  # one hook per distinct path
                if self.on_complete is not None:
                    self.on_complete()
                if self._stop_early:
                    raise _StopForward

        return hook

    def __call__(self, x: torch.Tensor, stop_early: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """`(logits, feats)`; logits is None when the forward was cut after the last feature.

        A feature whose module never ran is None (`probe` turns that into an error)."""
        self._feats, self._active = {}, True
        self._stop_early = stop_early
        try:
            logits = self.run(x)
        finally:
            self._active = self._stop_early = False
        feats, self._feats = self._feats, {}
        return logits, [feats.get(p) for p in self.paths]

    def run_model(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's forward; None when the last hook cut it. The `except` is in this frame so
        that a compiled `run` contains it: Dynamo then traces the hook's `raise` as the graph's end."""
        try:
            return self.model(x)
        except _StopForward:
            return None

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A full forward that checks every path runs; `(logits, feats)` as `__call__`."""
        logits, feats = self(x)
        missing = [p for p, f in zip(self.paths, feats) if f is None]
        if missing:
            ran = _executed_modules(self.model, x)
            raise UserError(
                f"{self.where}: module {missing[0]!r} exists but never runs in the forward"
                f"{did_you_mean(missing[0], ran)}"
            )
        return logits, feats

    def remove(self) -> None:
        """Unregisters the hooks (a tap used only to probe shapes)."""
        for handle in self._handles:
            handle.remove()


def _executed_modules(model: nn.Module, x: torch.Tensor) -> list[str]:
    ran: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: ran.append(n)) for n, m in model.named_modules() if n]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return ran
