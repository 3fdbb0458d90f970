"""Per-layer activation diagnostics of the student (`train.diagnostics`), measured on log steps only.

For each watched layer, on the first micro-batch of a step that writes a log row:

- `diag/<path>/rms`: the root mean square of the layer's output, sqrt(mean(out²)) over every
  element of the micro-batch;
- `diag/<path>/dead`: the fraction of its units (channels, dim 1) whose output is <= 0 at every
  position of every sample of that micro-batch: dead ReLU units. A layer whose activation is a
  `Maxout` reports RMS alone: a maxout unit is a max of linear pieces, it has no "off" region
  whose gradient is zero everywhere, so the ReLU notion has no analogue there.

Which layers (`train.diagnostics: true`): with hints, the first hint's guided layer
(`hints[0].student`) and the next up to 3 modules after it at the same nesting level (its
siblings, in registration order, which is forward order for the zoo's sequential models) that
contain a convolution: for `fitdist:fitnet` and a guided `conv6`, conv6..conv9. Without hints:
every direct child of the backbone that is or holds a convolution (for `fitdist:fitnet`, all
`convN`). A list of module paths names the layers instead.

Cost: the hooks stay registered but return at once unless armed; the trainer arms them for the
step whose log row is next, so quiet steps compute nothing. With `train.compile` the hooks are
left out of the compiled graphs and that one step runs eager (no second graph to compile). The values stay on the device and
travel with the log row's one transfer (`Window.flush`). Under DDP each rank measures its own
micro-batch and rank 0's row is what is written (the logger writes on rank 0 alone): no collective.
A forward cut after the guided layer (FitNets stage 1) never runs the layers above it; those keys
are then absent from the row.
"""

from __future__ import annotations

import torch
from torch import nn

from fitdist.errors import UserError, did_you_mean

ABOVE = 3  # layers watched above the guided layer


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _is_maxout(module: nn.Module) -> bool:
    from fitdist.zoo.fitnet import Maxout

    return any(isinstance(m, Maxout) for m in module.modules())


def watched_layers(model: nn.Module, setting: bool | list[str], guided: str | None) -> list[str]:
    """The module paths `train.diagnostics` = `setting` watches in `model` (module doc); [] when off."""
    if setting is False:
        return []
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(setting, list):
        if not setting:
            raise UserError("train.diagnostics: an empty list of layers (use false to turn diagnostics off)")
        for path in setting:
            if path not in names:
                raise UserError(f"train.diagnostics: no module {path!r} in the student{did_you_mean(path, names)}")
        return list(dict.fromkeys(setting))
    if guided is None:
        return [n for n, m in model.named_children() if _has_conv(m)]
    if guided not in names:
        raise UserError(f"hints.0.student: no module {guided!r} in the student{did_you_mean(guided, names)}")
    parent_path, _, leaf = guided.rpartition(".")
    siblings = list(model.get_submodule(parent_path).named_children()) if parent_path else list(model.named_children())
    after = [n for n, m in siblings[[n for n, _ in siblings].index(leaf) + 1:] if _has_conv(m)][:ABOVE]
    return [guided] + [f"{parent_path}.{n}" if parent_path else n for n in after]


class Diagnostics:
    """Forward hooks on `paths` of `model` that, once armed, record each layer's first output's
    RMS and dead fraction as device tensors (no host read); `take` returns them and disarms."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.paths = list(paths)
        self._armed = False
        self._stats: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            module = model.get_submodule(path)
            # prepend: a FeatureTap hook on the guided layer may end a cut forward (stage 1) by raising
            self._handles.append(module.register_forward_hook(self._hook(path, not _is_maxout(module)), prepend=True))

    def _hook(self, path: str, dead: bool):
        def hook(module, args, output):
            # never traced into a compiled graph (train.compile): the trainer runs an armed step eager
            if torch.compiler.is_compiling() or not self._armed or f"diag/{path}/rms" in self._stats:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                return
            with torch.no_grad():
                out = output.detach().float()
                self._stats[f"diag/{path}/rms"] = out.square().mean().sqrt()
                if dead:  # a unit is dead when its largest output over the batch and positions is <= 0
                    others = [d for d in range(out.dim()) if d != 1]
                    self._stats[f"diag/{path}/dead"] = (out.amax(dim=others) <= 0).float().mean()

        return hook

    def arm(self) -> None:
        """Measure the next forward (the first call of each watched layer)."""
        self._stats, self._armed = {}, True

    def take(self) -> dict[str, torch.Tensor]:
        """What the armed forward recorded (device tensors, nothing read back); disarms."""
        stats, self._stats, self._armed = self._stats, {}, False
        return stats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
