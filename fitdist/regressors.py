"""FitNets regressors (Romero et al. 2014, section 2.2), sized from probed feature shapes.

A regressor maps the student's guided-layer output to the shape of the teacher's hint:
- conv maps of equal spatial size: a 1×1 convolution;
- a larger student map (N_g > N_h): the paper's valid convolution with kernel `k = N_g − N_h + 1`;
- a smaller student map: an error, unless `kind="adaptive"` (1×1 conv, then bilinear resize);
- flat features (`B × D`): a linear layer.
Optional BatchNorm and ReLU follow (the paper matches the teacher hint layer's non-linearity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitdist.errors import UserError

REGRESSOR_KINDS = ("auto", "conv", "adaptive", "linear")


class Regressor(nn.Module):
    """`r(v_g; W_r) = relu?(bn?(proj(v_g)))`, optionally resized to the hint's spatial size."""

    def __init__(self, proj: nn.Module, bn: nn.Module | None, relu: bool, resize_to: tuple[int, int] | None):
        super().__init__()
        self.proj = proj
        self.bn = bn
        self.relu = relu
        self.resize_to = resize_to

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.proj(feats)
        if self.resize_to is not None:
            out = F.interpolate(out, size=self.resize_to, mode="bilinear", align_corners=False)
        if self.bn is not None:
            out = self.bn(out)
        return F.relu(out) if self.relu else out


def build_regressor(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    kind: str = "auto",
    bn: bool = False,
    relu: bool = False,
    where: str = "hint",
) -> Regressor:
    """A regressor from per-sample shapes (`C×H×W` or `D`, batch dimension excluded)."""
    if kind not in REGRESSOR_KINDS:
        raise UserError(f"{where}.regressor: {kind!r} is not one of {', '.join(REGRESSOR_KINDS)}")
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == 1 and len(t) == 1:
        return Regressor(nn.Linear(s[0], t[0]), nn.BatchNorm1d(t[0]) if bn else None, relu, None)
    if len(s) != 3 or len(t) != 3 or kind == "linear":
        raise UserError(
            f"{where}: no regressor maps student features {s} to teacher features {t} "
            f"(kind={kind!r}; conv maps need C×H×W on both sides, linear needs D on both)"
        )
    (cs, hs, ws), (ct, ht, wt) = s, t
    norm = nn.BatchNorm2d(ct) if bn else None
    if kind == "adaptive":
        resize = None if (hs, ws) == (ht, wt) else (ht, wt)
        return Regressor(nn.Conv2d(cs, ct, kernel_size=1), norm, relu, resize)
    if hs < ht or ws < wt:
        raise UserError(
            f"{where}: student map {hs}×{ws} is smaller than the teacher hint {ht}×{wt}; a valid "
            "convolution cannot enlarge it (pick an earlier guided layer, or set regressor: adaptive)"
        )
    kernel = (hs - ht + 1, ws - wt + 1)  # FitNets: k = N_g − N_h + 1 (1×1 when sizes match)
    return Regressor(nn.Conv2d(cs, ct, kernel_size=kernel), norm, relu, None)
