"""`optim.max_norm`: the max-norm constraint of the maxout and FitNets pylearn2 training code.

After every optimizer step, the L2 norm of each output unit's incoming weights is clipped to C:
for a Conv weight [O, I, kh, kw] the norm over I·kh·kw of each o, for a Linear weight [O, I] that
of each row. pylearn2's `max_kernel_norm` / `max_col_norm` do the same to its conv and maxout
layers. Constrained: the weights of every trainable Conv1d/2d/3d and Linear of the student, its
FitNets regressors included; not biases, not normalisation layers (nor transposed convolutions,
whose output unit is not the first dimension).

The scale `clamp(C / (norm + eps), max=1)` is computed and applied on the device, under
`no_grad`: nothing is read back, and every rank, holding the same weights, applies the same clip.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-7  # pylearn2's guard against a zero norm
CONSTRAINED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def constrained_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights `optim.max_norm` clips in `module`: those of its Conv/Linear layers that train."""
    return [m.weight for m in module.modules() if type(m) in CONSTRAINED and m.weight.requires_grad]


@torch.no_grad()
def apply_max_norm(weights: list[torch.Tensor], max_norm: float) -> None:
    """Scales each output unit (first dimension) of each of `weights` in place so that its L2 norm
    is at most `max_norm`; units already within it are left exactly as they are."""
    for w in weights:
        norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1, dtype=torch.float32)
        scale = torch.clamp(max_norm / (norms + EPS), max=1.0)
        w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
