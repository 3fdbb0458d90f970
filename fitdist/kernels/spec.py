"""Which regressors the fused hint loss may compute, and the shapes it then needs.

Fusing replaces `regressor(feats)` by our own matmul or conv, so it is only right for modules
whose forward is known to be exactly that. Recognition is by exact type, never by duck typing:
a module that merely has a `proj` attribute, a subclass overriding `forward`, a projection wrapped
by a parametrization (its class changes) or any module with hooks (the fused path would skip
them) all go to the reference path, `hint_loss(regressor(feats), hint)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.modules.module as module_mod
from torch import nn

from fitdist.regressors import Regressor


@dataclass(frozen=True)
class HintSpec:
    """What the fused kernels need to know about a regressor."""

    kind: str  # "pointwise" (1×1 conv or linear: a matmul per position) or "conv" (k×k valid)
    weight: torch.Tensor
    bias: torch.Tensor | None
    relu: bool


# Per-module and global hook tables that `Module.__call__` consults. Backward hooks count too:
# they hang off the module's call, which the fused path never makes.
_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _called_as_is(module: nn.Module) -> bool:
    """True when calling `module` runs its class's forward and nothing else."""
    if "forward" in vars(module):  # an instance-level forward replaces the class's
        return False
    if any(getattr(module, a, None) for a in _HOOK_ATTRS):
        return False
    return not any(getattr(module_mod, g, None) for g in _GLOBAL_HOOKS)


def _projection(proj: nn.Module, relu: bool) -> HintSpec | None:
    """The spec of a plain nn.Linear or valid, unstrided, ungrouped nn.Conv2d; else None."""
    if not _called_as_is(proj):
        return None
    if type(proj) is nn.Linear:
        return HintSpec("pointwise", proj.weight, proj.bias, relu)
    if type(proj) is not nn.Conv2d:
        return None
    plain = (
        tuple(proj.stride) == (1, 1)
        and proj.padding in ((0, 0), "valid")  # no padding: padding_mode then pads nothing
        and tuple(proj.dilation) == (1, 1)
        and proj.groups == 1
    )
    if not plain:
        return None
    kind = "pointwise" if tuple(proj.kernel_size) == (1, 1) else "conv"
    return HintSpec(kind, proj.weight, proj.bias, relu)


def hint_spec(regressor: nn.Module) -> HintSpec | None:
    """The fused form of `regressor`, or None when only the reference can compute it.

    Fused (see `fitdist.kernels.supports_fused_hint` for the rule in words): a
    `fitdist.regressors.Regressor` (exact type) without BatchNorm or resize whose `relu` is a bool
    and whose `proj` is a plain Linear/Conv2d; or a plain Linear/Conv2d by itself (no ReLU).
    """
    if not _called_as_is(regressor):
        return None
    if type(regressor) is Regressor:
        if regressor.bn is not None or regressor.resize_to is not None:
            return None
        if type(regressor.relu) is not bool:  # forward tests its truth; fuse only the two we know
            return None
        return _projection(regressor.proj, regressor.relu)
    return _projection(regressor, False)


def check_hint_shapes(feats: torch.Tensor, spec: HintSpec, hint: torch.Tensor) -> None:
    """Raise ValueError, naming the shapes, when the regressed feats cannot match the hint.

    A linear projection maps the last dimension of feats of any rank (as nn.Linear does); a conv
    projection needs batched `b c h w` maps.
    """
    w = spec.weight
    if w.dim() == 2:
        ok = feats.dim() >= 1 and feats.shape[-1] == w.shape[1]
        out = (*feats.shape[:-1], w.shape[0]) if ok else None
    else:
        kh, kw = w.shape[-2:]
        ok = feats.dim() == 4 and feats.shape[1] == w.shape[1]
        ok = ok and feats.shape[2] >= kh and feats.shape[3] >= kw
        out = (
            (feats.shape[0], w.shape[0], feats.shape[2] - kh + 1, feats.shape[3] - kw + 1)
            if ok
            else None
        )
    if out is None:
        raise ValueError(
            f"student feats {tuple(feats.shape)} do not fit the regressor weight {tuple(w.shape)}"
        )
    if tuple(hint.shape) != out:
        raise ValueError(
            f"hint shapes differ: regressed student feats {out} (from {tuple(feats.shape)}) "
            f"vs teacher hint {tuple(hint.shape)}"
        )
