"""Fused distillation losses: the same values and gradients as `fitdist.losses`, in less memory.

- `fused_hint_loss`: FitNets hint loss (Romero et al. 2014) with its regressor applied inside the
  loss, chunk by chunk, so the projected map and the difference are never materialised.
- `fused_kd_ce_loss` / `fused_kd_loss`: cross-entropy and Hinton et al. (2015) KD from one pass
  over the logits; KD against the teacher's logits or against a given target distribution
  (`target_probs`: a teacher ensemble's mean, stored soft labels).

Implementations, chosen by `impl`:
- `"auto"`: Triton kernels for CUDA tensors when `triton` imports, chunked PyTorch elsewhere.
  The first use of a Triton kernel for given dtypes and device runs it forward and backward on
  detached copies: if it fails to compile or launch there, one warning names the reason and the
  chunked path is used from then on. Under `torch.use_deterministic_algorithms(True)` the hint
  loss never takes Triton (its backward sums the weight gradient with atomics);
- `"fused"`: chunked PyTorch (`kernels/hint.py`, `kernels/kd.py`), any device;
- `"triton"`: Triton kernels (`kernels/triton_*.py`): CUDA, or CPU tensors under
  `TRITON_INTERPRET=1` (how the tests run them);
- `"reference"`: `fitdist.losses` on the regressor's output, as the definition of correct.

Callers pass every impl, "reference" included, through these functions: the choice between a
kernel and the reference is made here only (`supports_fused_hint` says which regressors fuse).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fitdist.kernels.hint import as_maps, chunked_hint_loss, compute_dtype, hint_scale
from fitdist.kernels.kd import check_kd_inputs, chunked_kd_ce
from fitdist.kernels.spec import check_hint_shapes, hint_spec
from fitdist.losses import hint_loss, kd_loss, kd_loss_to_target

IMPLS = ("auto", "fused", "triton", "reference")

__all__ = [
    "IMPLS",
    "KDLoss",
    "fused_hint_loss",
    "fused_kd_ce_loss",
    "fused_kd_loss",
    "select_impl",
    "supports_fused_hint",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (it needs no GPU to import)."""
    try:
        import triton  # noqa: F401
    except (ImportError, RuntimeError):  # absent, or a broken install failing at import
        return False
    return True


def select_impl(impl: str, device: torch.device | str) -> str:
    """The implementation `impl` resolves to on `device`: "triton", "fused" or "reference"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    dev = torch.device(device)
    if impl == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "fused"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package, which does not import here")
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' runs on CUDA tensors, or on {dev.type} tensors only under "
                "TRITON_INTERPRET=1 (set before triton is imported)"
            )
    return impl


# (kernel, device, dtypes) -> whether the Triton kernel ran there; the same for the whole process
_TRITON_WORKS: dict[tuple, bool] = {}


def triton_works(kernel: str, run: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> bool:
    """Whether `run(*inputs)` (a Triton loss) runs forward and backward here, tried once per kernel,
    device and dtypes on detached copies (no gradient reaches the real inputs); a failure is
    warned about once, naming the reason. Under `torch.compile` nothing is tried."""
    first = next(t for t in inputs if t is not None)
    key = (kernel, first.device, tuple(None if t is None else t.dtype for t in inputs))
    if key not in _TRITON_WORKS:
        if torch.compiler.is_compiling():
            return True
        copies = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        try:
            with torch.enable_grad():
                loss = run(*copies)
                torch.autograd.grad(loss, [c for c in copies if c is not None and c.requires_grad], allow_unused=True)
            _TRITON_WORKS[key] = True
        except Exception as e:  # noqa: BLE001 - compile and launch errors come in many types
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"fitdist: the Triton kernel {kernel} does not run on {first.device} "
                          f"({type(e).__name__}: {reason}); using the chunked PyTorch path instead",
                          RuntimeWarning, stacklevel=3)
            _TRITON_WORKS[key] = False
    return _TRITON_WORKS[key]


def supports_fused_hint(regressor: nn.Module) -> bool:
    """Whether `fused_hint_loss` fuses this regressor (else it computes the reference).

    It fuses exactly the modules whose forward is known to be a plain projection (optionally
    followed by ReLU), recognised by exact type so that a subclass or look-alike never is:
    - `fitdist.regressors.Regressor` itself (not a subclass) with `bn is None`,
      `resize_to is None`, `relu` a bool, and a `proj` that is a plain projection;
    - a plain projection by itself: an `nn.Linear` (exact type, on the last dimension), or an
      `nn.Conv2d` (exact type) with stride 1, no padding, dilation 1 and groups 1, whose 1×1
      kernel makes it pointwise and whose k×k kernel is the paper's valid convolution.
    Neither module may carry forward, forward-pre or backward hooks, nor may torch's global
    module hooks be set, nor may an instance-level `forward` be assigned: the fused path never
    calls the modules, so it would skip them. Triton covers the 1×1/linear case; a k×k conv uses
    the chunked-PyTorch path on every device.
    """
    return hint_spec(regressor) is not None


def fused_hint_loss(
    student_feat: torch.Tensor,
    regressor: nn.Module,
    teacher_hint: torch.Tensor,
    reduction: str = "mean",
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """`hint_loss(regressor(student_feat), teacher_hint, reduction)` as an fp32 scalar.

    Any module works: those `supports_fused_hint` accepts are fused, the others (and every module
    with `impl="reference"`) run exactly that expression. Gradients reach `student_feat` and the
    regressor's parameters, never the teacher hint. `chunk_rows` (positions, i.e. b·h·w rows, per
    chunk of the PyTorch path; Triton tiles its own) is for tests and tuning.
    """
    which = select_impl(impl, student_feat.device)
    spec = None if which == "reference" else hint_spec(regressor)
    if spec is None:
        return hint_loss(regressor(student_feat), teacher_hint, reduction)
    check_hint_shapes(student_feat, spec, teacher_hint)
    if impl == "auto" and torch.are_deterministic_algorithms_enabled():
        which = "fused"  # the Triton backward's atomics do not fix the summation order
    if which == "triton" and spec.kind == "pointwise":
        from fitdist.kernels.triton_hint import int32_offsets, triton_pointwise_hint

        x3, h3 = as_maps(student_feat, teacher_hint.detach(), spec.weight.dim() == 2)
        if int32_offsets(x3, h3):  # else a sample too large for its offsets: chunked PyTorch
            scale = hint_scale(reduction, teacher_hint)
            dtype = compute_dtype(student_feat, spec.weight)

            def run(x, weight, bias, hint):
                with torch.autocast(student_feat.device.type, enabled=False):
                    return triton_pointwise_hint(x, dataclasses.replace(spec, weight=weight, bias=bias), hint, scale, dtype)

            if impl != "auto" or triton_works("pointwise_hint", run, x3, spec.weight, spec.bias, h3):
                return run(x3, spec.weight, spec.bias, h3)
    return chunked_hint_loss(student_feat, spec, teacher_hint, reduction, chunk_rows)


class KDLoss(NamedTuple):
    """The weighted KD objective and its two terms (fp32 scalars)."""

    loss: torch.Tensor  # ce_weight · ce + kd_weight · kd: the one to differentiate
    ce: torch.Tensor | None  # cross-entropy with the labels (None without labels), detached
    kd: torch.Tensor  # T² · KL(p_t^T ‖ p_s^T) (or KL(target ‖ p_s^T)), batchmean, detached


def fused_kd_ce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
    target_probs: torch.Tensor | None = None,
) -> KDLoss:
    """`ce_weight · F.cross_entropy(s.float(), labels) + kd_weight · kd_loss(s, t, T)`, one pass.

    Returns the weighted loss (differentiable with respect to the student logits only) and the
    two terms, detached, for logging. Without labels the ce term is None and ce_weight unused.
    The weights are plain floats (a schedule's value at this step, e.g. FitNets' annealed λ).

    With `target_probs` (N×K probabilities already at temperature T, any float dtype, read as
    fp32) instead of `teacher_logits` (then None), the KD term is
    `kd_loss_to_target(s, target_probs, T)`. Its rows are assumed to sum to 1 and are not checked
    (that would sync with the device); the gradient is that of the computed value either way.
    """
    if (teacher_logits is None) == (target_probs is None):
        raise ValueError(
            "fused_kd_ce_loss: give exactly one of teacher_logits and target_probs "
            f"(got {'both' if target_probs is not None else 'neither'})"
        )
    probs = target_probs is not None
    target = target_probs if probs else teacher_logits
    check_kd_inputs(student_logits, target, labels, temperature, what="target_probs" if probs else "teacher")
    which = select_impl(impl, student_logits.device)
    if which == "reference":
        if probs:
            kd = kd_loss_to_target(student_logits, target_probs, temperature)
        else:
            kd = kd_loss(student_logits, teacher_logits, temperature)
        if labels is None:
            return KDLoss(kd * kd_weight, None, kd.detach())
        ce = F.cross_entropy(student_logits.float(), labels)
        return KDLoss(ce * ce_weight + kd * kd_weight, ce.detach(), kd.detach())
    args = (student_logits, target, labels, temperature, ce_weight, kd_weight)
    if which == "triton" and impl == "auto":
        from fitdist.kernels.triton_kd import triton_kd_ce

        def run(s, t, y):
            return triton_kd_ce(s, t, y, temperature, ce_weight, kd_weight, probs=probs)[0]

        kernel = "kd_ce_probs" if probs else "kd_ce"
        which = "triton" if triton_works(kernel, run, student_logits, target, labels) else "fused"
    if which == "triton":
        from fitdist.kernels.triton_kd import triton_kd_ce

        loss, ce, kd = triton_kd_ce(*args, probs=probs)
    else:
        loss, ce, kd = chunked_kd_ce(*args, chunk_rows, probs=probs)
    return KDLoss(loss, ce if labels is not None else None, kd)


def fused_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """`kd_loss(student_logits, teacher_logits, temperature)`, fused."""
    return fused_kd_ce_loss(student_logits, teacher_logits, None, temperature, impl=impl).loss
