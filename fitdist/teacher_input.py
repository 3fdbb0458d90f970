"""Each teacher sees the input it was trained on: its own normalisation and, if declared, its size.

The data pipeline normalises one batch for the student; a teacher trained with other statistics
gets that same batch re-normalised on the device, so teacher and student always see the same view
(the same crop, the same flip: Beyer et al. 2022, "a good teacher is patient and consistent").

Exact route: every real source sends uint8 pixels `u`, normalised on the device as
`x_s = (u·(1/255) − mean_s) / std_s` (fitdist.data.normalize). From `x_s` the pixels come back
exactly: `(x_s·std_s + mean_s)·255` is within ~1e-3 of the integer `u` (float32 rounding of a few
ops on values below 256), so rounding it gives `u`, and the teacher's input is then computed with
the very ops `DeviceNormalize` uses: bit for bit the teacher's own normalisation of the same pixels.
Float sources (the dry run's synthetic images) are not pixels: they get the affine map
`x_s·(std_s/std_t) + (mean_s − mean_t)/std_t`, equal up to float32 rounding.

With a declared `size` other than the batch's, the re-normalised batch is resized on the device
(bilinear, antialiased when shrinking, as torchvision's `Resize` on tensors).
All device ops, no host synchronisation: shapes are host metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TeacherInput(nn.Module):
    """Student-normalised images -> the teacher's input (re-normalised, resized)."""

    def __init__(self, student_mean: Sequence[float], student_std: Sequence[float], teacher_mean: Sequence[float],
                 teacher_std: Sequence[float], size: int | None = None, pixels: bool = True):
        super().__init__()
        view = lambda v: torch.tensor(list(v), dtype=torch.float32).view(-1, 1, 1)
        for name, v in (("s_mean", student_mean), ("s_std", student_std), ("t_mean", teacher_mean), ("t_std", teacher_std)):
            self.register_buffer(name, view(v), persistent=False)
        # compared as the float32 values the ops use (a DeviceNormalize's 0.485 is float32's 0.485)
        self.renormalise = not (torch.equal(self.s_mean, self.t_mean) and torch.equal(self.s_std, self.t_std))
        self.size, self.pixels = size, pixels

    @property
    def identity(self) -> bool:
        return not self.renormalise and self.size is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            if self.pixels:  # back to the exact uint8 values, then DeviceNormalize's ops and order
                u = (x * self.s_std + self.s_mean).mul_(255).round_()
                x = u.mul_(1.0 / 255).sub_(self.t_mean).div_(self.t_std)
            else:
                x = (x * (self.s_std / self.t_std)).add_((self.s_mean - self.t_mean) / self.t_std)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def extra_repr(self) -> str:
        return f"mean={self.t_mean.flatten().tolist()}, std={self.t_std.flatten().tolist()}, size={self.size}"
