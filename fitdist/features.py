"""Intermediate features by forward hooks on module paths (torchdistill's approach): no rewrites.

A `FeatureTap` records the outputs of named submodules. With `stop_early`, the forward is cut
right after the last tapped module has run, so FitNets stage 1 only pays for the teacher up to
its hint layer and the student up to its guided layer (Romero et al. 2014, Algorithm 1).
`run` is the model's forward with that cut, and what `train.compile` compiles (fitdist/compile.py).
"""

from __future__ import annotations

import torch
from torch import nn

from fitdist.errors import UserError, did_you_mean


class _StopForward(Exception):
    """Raised by the last hook to end a truncated forward."""


class FeatureTap:
    """Forward hooks on `paths` of `model`; call it instead of the model to get features too."""

    def __init__(self, model: nn.Module, paths: list[str], where: str):
        self.model, self.paths, self.where = model, list(paths), where
        names = [n for n, _ in model.named_modules() if n]
        for path in self.paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise UserError(f"{where}: no module {path!r} in the model{did_you_mean(path, names)}") from None
            module.register_forward_hook(self._hook(path))
        self._feats: dict[str, torch.Tensor] = {}
        self._active = False
        self._stop_after: str | None = None
        self.last_path: str | None = None  # the tapped module that runs last (set by `probe`)
        self.run = self.run_model  # `fitdist.compile` swaps in a compiled version

    def _hook(self, path: str):
        def hook(module, args, output):
            if not self._active:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise UserError(f"{self.where}: module {path!r} does not return a tensor")
            self._feats[path] = output
            if path == self._stop_after:
                raise _StopForward

        return hook

    def __call__(self, x: torch.Tensor, stop_early: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """`(logits, feats)`; logits is None when the forward was cut after the last tap."""
        self._feats, self._active = {}, True
        self._stop_after = self.last_path if stop_early and self.paths else None
        try:
            logits = self.run(x)
        finally:
            self._active = False
        feats, self._feats = self._feats, {}
        return logits, [feats.get(p) for p in self.paths]  # None: never ran (probe reports it)

    def run_model(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's forward; None when the last hook cut it. The `except` is in this frame so
        that a compiled `run` contains it: Dynamo then traces the hook's `raise` as the graph's end."""
        try:
            return self.model(x)
        except _StopForward:
            return None

    def probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A full forward that checks every path runs and learns which one runs last."""
        order: list[str] = []
        handles = [
            self.model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: order.append(p))
            for p in self.paths
        ]
        try:
            logits, feats = self(x)
            missing = [p for p in self.paths if p not in order]
            if missing:
                ran = _executed_modules(self.model, x)
                raise UserError(
                    f"{self.where}: module {missing[0]!r} exists but never runs in the forward"
                    f"{did_you_mean(missing[0], ran)}"
                )
        finally:
            for h in handles:
                h.remove()
        self.last_path = order[-1] if order else None
        return logits, feats


def _executed_modules(model: nn.Module, x: torch.Tensor) -> list[str]:
    ran: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: ran.append(n)) for n, m in model.named_modules() if n]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return ran
