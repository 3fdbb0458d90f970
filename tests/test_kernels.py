"""Fused losses (fitdist.kernels) against exact float64 values of their definitions.

Every fp32 result (the kernel's and the fp32 reference's in fitdist.losses) is compared with the
loss written out in float64 on float64 copies of the same inputs, within `accuracy.rtol(n)` for the
length n of the reductions involved; bf16 results add their own dtype's roundings. Inputs are
fresh each run: the `seed` fixture draws one from FITDIST_TEST_SEED (or at random) and prints it,
so a failure's report says how to reproduce it.

The Triton kernels run on CPU tensors under Triton's interpreter, which must be switched on before
triton is imported: `test_triton_kernels_under_interpreter` reruns the `triton_interp` tests of
this file in a child pytest with TRITON_INTERPRET=1 and the same seed (they skip in a normal one).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from fp_accuracy import (
    BASE_SEED,
    ELEMENTWISE,
    assert_close,
    kd_magnitude,
    log_softmax_magnitude,
    rtol,
    softmax_magnitude,
)
from torch import nn

from fitdist import kernels
from fitdist.kernels import (
    fused_hint_loss,
    fused_kd_ce_loss,
    fused_kd_loss,
    select_impl,
    supports_fused_hint,
)
from fitdist.kernels.hint import chunks
from fitdist.losses import hint_loss, kd_loss
from fitdist.regressors import Regressor, build_regressor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child")
# bf16 results are rounded to bf16 at most three times on their way (the projection, dz before
# the grad-input matmul, the stored gradient); each rounding is one bf16 eps at most.
LOWP_ROUNDINGS = 3



# ------------------------------------------------------------------------------------ hint: helpers
# (student shape, teacher shape): batch first; odd sizes that divide no chunk size.
HINT_SHAPES = {
    "conv1x1": [((3, 5, 4, 5), (3, 7, 4, 5)), ((2, 16, 9, 7), (2, 3, 9, 7))],
    "linear": [((9, 5), (9, 7)), ((33, 20), (33, 6)), ((3, 11, 20), (3, 11, 6))],
    "convkxk": [((3, 5, 6, 5), (3, 7, 4, 3)), ((2, 4, 7, 7), (2, 6, 5, 5))],
}
# Larger than one Triton block (BLOCK_O, BLOCK_P, BLOCK_C = 32, 64, 32) in input channels (37),
# output channels (45) and positions (70, 75), with several samples, and a multiple of none.
TRITON_BIG_SHAPES = {
    "conv1x1": [((3, 37, 10, 7), (3, 45, 10, 7))],
    "linear": [((70, 37), (70, 45)), ((3, 25, 37), (3, 25, 45))],
}


def make_regressor(kind, s_shape, t_shape, relu, bias, dtype=torch.float32):
    if kind == "linear":
        proj = nn.Linear(s_shape[-1], t_shape[-1], bias=bias)
    else:
        k = (s_shape[2] - t_shape[2] + 1, s_shape[3] - t_shape[3] + 1)
        proj = nn.Conv2d(s_shape[1], t_shape[1], kernel_size=k, bias=bias)
    return Regressor(proj, None, relu, None).to(dtype)


def projection(module: nn.Module) -> nn.Module:
    return module.proj if isinstance(module, Regressor) else module


def fan_in(module: nn.Module) -> int:
    """Length of the dot product behind one output of the projection."""
    w = projection(module).weight
    return w[0].numel()


def fan_out(module: nn.Module) -> int:
    """Length of the dot product behind one element of the input gradient."""
    w = projection(module).weight
    return w.shape[0] * w[0, 0].numel()


def abs_projection(module: nn.Module) -> nn.Module:
    """A float64 copy of the projection with |W| and |b|: applied to |x| it gives Σ|w·x| + |b|,
    the size z's rounding error scales with."""
    proj = copy.deepcopy(projection(module)).double()
    with torch.no_grad():
        for p in proj.parameters():
            p.abs_()
    return proj


def make_hint(reg, x, t_shape, relu, dtype=torch.float32):
    """A random hint; with ReLU, ≥ 0 and 0 wherever the projection z is within rounding of 0.

    At ReLU's kink fp32 and float64 may disagree on the mask (and a bf16 path rounds z before
    adding the bias); where the hint is 0 there, the gradient (relu(z) − t)·[z > 0] = relu(z) is
    continuous across the kink, so the disagreement costs only rounding.
    """
    t = torch.randn(t_shape)
    if relu:
        with torch.no_grad():
            z = copy.deepcopy(projection(reg)).double()(x.detach().double())
            z_terms = abs_projection(reg)(x.detach().double().abs())
        t = t.abs().double()
        margin = rtol(fan_in(reg)) + (rtol(1, dtype) if dtype != torch.float32 else 0.0)
        t[z.abs() <= margin * z_terms] = 0
    return t.to(dtype)


def exact_hint(module, x, t, reduction):
    """The hint loss written out in float64 ("mean": Σd²/numel, "paper": ½·Σd²/B), its gradients
    (feats, then parameters), and the magnitudes their rounding errors scale with.

    Magnitudes: z is known only to within rounding of Σ|w·x| + |b|, so |z − t| ≤ that + |t| =: ρ;
    the loss's is scale·Σρ², the gradients' are the same matmuls on |W|, |x| and 2·scale·ρ.
    """
    m64 = copy.deepcopy(module).double()
    x64 = x.detach().double().requires_grad_()
    sq = (m64(x64) - t.double()) ** 2
    scale = 1.0 / sq.numel() if reduction == "mean" else 0.5 / sq.shape[0]
    loss = scale * sq.sum()
    grads = torch.autograd.grad(loss, [x64, *m64.parameters()])
    abs_proj = abs_projection(module)
    x_abs = x64.detach().abs().requires_grad_()
    z_terms = abs_proj(x_abs)
    rho = z_terms.detach() + t.double().abs()
    dz_bound = (2 * scale * rho).detach()
    mags = torch.autograd.grad((z_terms * dz_bound).sum(), [x_abs, *abs_proj.parameters()])
    return loss, grads, scale * (rho**2).sum().item(), mags


def grads(loss, x, reg):
    return torch.autograd.grad(loss, [x, *reg.parameters()])


def check_hint_exact(module, x, t, reduction, outs, lowp=None):
    """Each `name → loss` in `outs` against the float64 loss, in value and gradients."""
    exact, exact_grads, loss_mag, grad_mags = exact_hint(module, x, t, reduction)
    rows = t.numel() // t.shape[-1 if projection(module).weight.dim() == 2 else 1]
    n_value = fan_in(module) + t.numel() + ELEMENTWISE  # each term's dot product, then their sum
    n_grad = fan_in(module) + fan_out(module) + rows + ELEMENTWISE  # dz's, then Wᵀdz or Σ dz·x
    tol_value, tol_grad = rtol(n_value), rtol(n_grad)
    if lowp is not None:
        tol_value += rtol(LOWP_ROUNDINGS, lowp)
        tol_grad += rtol(LOWP_ROUNDINGS, lowp)
    names = ["feats"] + [n for n, _ in module.named_parameters()]
    for impl, out in outs.items():
        what = f"{impl} {type(module).__name__} {tuple(x.shape)}->{tuple(t.shape)} {reduction}"
        assert out.dtype == torch.float32 and out.dim() == 0
        assert_close(out, exact, tol_value, loss_mag, what=f"{what} loss")
        for name, a, b, mag in zip(names, grads(out, x, module), exact_grads, grad_mags):
            assert a.dtype == (x.dtype if name == "feats" else module.get_parameter(name).dtype)
            assert_close(a, b, tol_grad, mag, what=f"{what} d{name}")


def check_hint(kind, relu, bias, reduction, impl, chunk_rows=None, shapes=HINT_SHAPES):
    """Fused and fp32 reference against float64, for every shape of `kind`, fresh inputs each."""
    for s_shape, t_shape in shapes[kind]:
        reg = make_regressor(kind, s_shape, t_shape, relu, bias)
        x = torch.randn(s_shape, requires_grad=True)
        t = make_hint(reg, x, t_shape, relu)
        outs = {
            "reference": hint_loss(reg(x), t, reduction),
            impl: fused_hint_loss(x, reg, t, reduction, impl=impl, chunk_rows=chunk_rows),
        }
        check_hint_exact(reg, x, t, reduction, outs)


# ------------------------------------------------------------------------------ hint: values, grads
@pytest.mark.parametrize("kind", list(HINT_SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "paper"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_hint_matches_exact(kind, reduction, relu, bias, seed):
    check_hint(kind, relu, bias, reduction, "fused")
    check_hint(kind, relu, bias, reduction, "fused", chunk_rows=7)  # odd chunks
    check_hint(kind, relu, bias, reduction, "fused", chunk_rows=1)


@pytest.mark.parametrize("relu", [False, True])
def test_chunked_hint_splits_every_dimension(relu, seed):
    """Several chunks over samples and over positions (pointwise), and over samples (k×k)."""
    s_shape, t_shape = (3, 37, 10, 7), (3, 45, 10, 7)
    spans = list(chunks(3, 70, 16))
    assert len({s.start for s, _ in spans}) == 3 and len({p.start for _, p in spans}) == 5
    check_hint("conv1x1", relu, True, "paper", "fused", 16, {"conv1x1": [(s_shape, t_shape)]})
    spans = list(chunks(3, 70, 150))  # two samples per chunk, the last one alone
    assert [(s.start, s.stop) for s, _ in spans] == [(0, 2), (2, 3)]
    check_hint("conv1x1", relu, True, "mean", "fused", 150, {"conv1x1": [(s_shape, t_shape)]})
    # k×k: ConvHint takes rows // positions-per-sample samples per chunk: 30 // 12 = 2 of 5
    kxk = {"convkxk": [((5, 6, 6, 5), (5, 9, 4, 3))]}
    check_hint("convkxk", relu, True, "mean", "fused", 30, kxk)


@pytest.mark.parametrize("kind", ["conv1x1", "linear", "convkxk"])
def test_hint_bf16_within_bf16_tolerance(kind, seed):
    s_shape, t_shape = HINT_SHAPES[kind][1]
    reg = make_regressor(kind, s_shape, t_shape, True, True, torch.bfloat16)
    x = torch.randn(s_shape, dtype=torch.bfloat16, requires_grad=True)
    t = make_hint(reg, x, t_shape, True, torch.bfloat16)
    outs = {"reference": hint_loss(reg(x), t), "fused": fused_hint_loss(x, reg, t, chunk_rows=5)}
    check_hint_exact(reg, x, t, "mean", outs, lowp=torch.bfloat16)


def test_hint_under_cpu_autocast_matches_reference(seed):
    reg = make_regressor("conv1x1", (4, 8, 5, 5), (4, 6, 5, 5), False, True)
    x, t = torch.randn(4, 8, 5, 5, requires_grad=True), torch.randn(4, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {"reference": hint_loss(reg(x), t), "fused": fused_hint_loss(x, reg, t)}
    # Exact: the regressor autocast runs, in float64, on the bf16-rounded inputs and weights.
    reg16 = copy.deepcopy(reg).bfloat16()
    x16 = x.detach().bfloat16().requires_grad_()
    exact, exact_grads, loss_mag, grad_mags = exact_hint(reg16, x16, t, "mean")
    tol = rtol(fan_in(reg) + t.numel() + ELEMENTWISE) + rtol(LOWP_ROUNDINGS, torch.bfloat16)
    for name, out in outs.items():
        assert_close(out, exact, tol, loss_mag, what=f"{name} loss")
        for a, b, mag in zip(grads(out, x, reg), exact_grads, grad_mags):  # bf16-rounded grads
            assert_close(a, b, tol, mag, what=f"{name} grads")


@pytest.mark.parametrize("kind", ["conv1x1", "linear", "convkxk"])
def test_hint_float64_under_autocast_stays_float64(kind, seed):
    """Autocast leaves float64 operands alone: so must the fused path (it used bf16)."""
    s_shape, t_shape = HINT_SHAPES[kind][1]
    reg = make_regressor(kind, s_shape, t_shape, False, True, torch.float64)
    x = torch.randn(s_shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(t_shape, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {"reference": hint_loss(reg(x), t), "fused": fused_hint_loss(x, reg, t)}
    check_hint_exact(reg, x, t, "mean", outs)


def test_hint_teacher_gets_no_gradient():
    reg = make_regressor("conv1x1", (2, 3, 4, 4), (2, 5, 4, 4), False, True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    fused_hint_loss(x, reg, t).backward()
    assert t.grad is None and x.grad is not None and reg.proj.weight.grad is not None


@pytest.mark.parametrize(
    "kind,s_shape,t_shape",
    [
        ("conv1x1", (2, 3, 4, 4), (2, 5, 4, 5)),  # spatial mismatch
        ("conv1x1", (2, 3, 4, 4), (3, 5, 4, 4)),  # batch mismatch
        ("linear", (6, 4), (6, 9)),  # features mismatch
        ("convkxk", (2, 3, 6, 6), (2, 5, 3, 3)),  # kernel sized for another map
    ],
)
def test_hint_shape_mismatch_names_the_shapes(kind, s_shape, t_shape):
    good_t = {"conv1x1": (2, 5, 4, 4), "linear": (6, 5), "convkxk": (2, 5, 4, 4)}[kind]
    reg = make_regressor(kind, s_shape, good_t, False, True)
    with pytest.raises(ValueError, match=re.escape(str(tuple(t_shape)))):
        fused_hint_loss(torch.randn(s_shape), reg, torch.randn(t_shape), impl="fused")


def test_hint_feats_not_fitting_regressor_raise():
    reg = make_regressor("conv1x1", (2, 3, 4, 4), (2, 5, 4, 4), False, True)
    with pytest.raises(ValueError, match=re.escape("(2, 4, 4, 4)")):
        fused_hint_loss(torch.randn(2, 4, 4, 4), reg, torch.randn(2, 5, 4, 4))


def test_hint_bad_reduction_raises():
    reg = make_regressor("linear", (4, 3), (4, 2), False, True)
    with pytest.raises(ValueError, match="reduction"):
        fused_hint_loss(torch.randn(4, 3), reg, torch.randn(4, 2), "sum")


# ---------------------------------------------------------------------- hint: which modules fuse
class GeluAfterProj(nn.Module):
    """Has a `proj` conv like a Regressor, but a GELU (not linear, not ReLU) after it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return F.gelu(self.proj(x))


class UnusedReLU(nn.Module):
    """Regressor-shaped attributes (`proj`, `relu`, `bn`, `resize_to`); forward skips the ReLU."""

    def __init__(self):
        super().__init__()
        self.proj, self.relu, self.bn, self.resize_to = nn.Conv2d(8, 6, 1), nn.ReLU(), None, None

    def forward(self, x):
        return self.proj(x)


class TanhRegressor(Regressor):
    """A Regressor subclass whose forward differs."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class ConvSubclass(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def plain_regressor(relu=False):
    return Regressor(nn.Conv2d(8, 6, 1), None, relu, None)


def with_hook(module, kind):
    """`module` with a hook that changes what it computes."""
    target = module.proj if kind.startswith("proj") else module
    if kind.endswith("forward"):
        target.register_forward_hook(lambda m, args, out: out * 2)
    elif kind.endswith("pre"):
        target.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    else:
        target.register_full_backward_hook(lambda m, gin, gout: tuple(g * 3 for g in gin))
    return module


def instance_forward():
    reg = plain_regressor()
    reg.forward = lambda x: reg.proj(x).sin()
    return reg


FOREIGN = {
    "gelu after proj": GeluAfterProj,
    "unused nn.ReLU attribute": UnusedReLU,
    "Regressor subclass": lambda: TanhRegressor(nn.Conv2d(8, 6, 1), None, True, None),
    "relu not a bool": lambda: Regressor(nn.Conv2d(8, 6, 1), None, 1, None),
    "proj a Conv2d subclass": lambda: Regressor(ConvSubclass(8, 6, 1), None, False, None),
    "bare Conv2d subclass": lambda: ConvSubclass(8, 6, 1),
    "padded conv": lambda: nn.Conv2d(8, 6, 3, padding=1),
    "instance forward": instance_forward,
    "forward hook on proj": lambda: with_hook(plain_regressor(), "proj forward"),
    "forward hook": lambda: with_hook(plain_regressor(True), "forward"),
    "forward pre-hook": lambda: with_hook(plain_regressor(), "pre"),
    "forward pre-hook on proj": lambda: with_hook(plain_regressor(), "proj pre"),
    "backward hook": lambda: with_hook(plain_regressor(), "backward"),
    "bn": lambda: build_regressor((8, 5, 5), (6, 5, 5), bn=True),
    "resize": lambda: build_regressor((8, 3, 3), (6, 5, 5), kind="adaptive"),
    "strided": lambda: Regressor(nn.Conv2d(8, 6, 1, stride=2), None, False, None),
}


def assert_is_reference(module, x, t, reduction, impl="fused"):
    """fused_hint_loss is bit for bit the module's own forward through losses.hint_loss."""
    x.grad = None
    out = fused_hint_loss(x, module, t, reduction, impl=impl)
    ref = hint_loss(module(x), t, reduction)
    assert torch.equal(out, ref), (out.item(), ref.item())
    for a, b in zip(grads(out, x, module), grads(ref, x, module)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(FOREIGN))
@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_foreign_module_gets_the_reference(name, reduction, seed):
    module = FOREIGN[name]()
    assert not supports_fused_hint(module)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    t = torch.randn(module(x).shape)
    assert_is_reference(module, x, t, reduction)


def test_global_module_hook_disables_fusion(seed):
    reg = plain_regressor()
    x, t = torch.randn(4, 8, 5, 5, requires_grad=True), torch.randn(4, 6, 5, 5)
    assert supports_fused_hint(reg)
    for register in (
        torch.nn.modules.module.register_module_forward_hook,
        torch.nn.modules.module.register_module_forward_pre_hook,
    ):
        hook = (lambda m, a, o: o * 2) if "pre" not in register.__name__ else (lambda m, a: a)
        handle = register(hook)
        try:
            assert not supports_fused_hint(reg)
            assert_is_reference(reg, x, t, "mean")
        finally:
            handle.remove()
    assert supports_fused_hint(reg)


BARE = {
    "conv 1x1": (lambda: nn.Conv2d(8, 6, 1), (4, 8, 5, 5)),
    "conv 1x1 no bias": (lambda: nn.Conv2d(8, 6, 1, bias=False), (4, 8, 5, 5)),
    "conv 3x2 valid": (lambda: nn.Conv2d(8, 6, (3, 2)), (4, 8, 7, 6)),
    "conv 3x3 padding='valid'": (lambda: nn.Conv2d(8, 6, 3, padding="valid"), (3, 8, 6, 6)),
    "linear": (lambda: nn.Linear(8, 6), (9, 8)),
    "linear on 3-d feats": (lambda: nn.Linear(8, 6), (3, 5, 8)),
}


@pytest.mark.parametrize("name", list(BARE))
@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_bare_projection_fuses(name, reduction, seed, monkeypatch):
    make, s_shape = BARE[name]
    module = make()
    assert supports_fused_hint(module)
    x = torch.randn(s_shape, requires_grad=True)
    t = torch.randn(module(x).shape)
    ref = hint_loss(module(x), t, reduction)

    def no_reference(*_):
        raise AssertionError("the fused path fell back to the reference")

    monkeypatch.setattr(kernels, "hint_loss", no_reference)
    outs = {"reference": ref, "fused": fused_hint_loss(x, module, t, reduction, chunk_rows=7)}
    check_hint_exact(module, x, t, reduction, outs)


def test_supports_fused_hint_for_built_regressors():
    assert supports_fused_hint(build_regressor((8, 5, 5), (6, 5, 5), relu=True))
    assert supports_fused_hint(build_regressor((8, 7, 7), (6, 5, 5)))  # k×k valid conv
    assert supports_fused_hint(build_regressor((8,), (6,)))
    assert supports_fused_hint(build_regressor((8, 3, 3), (6, 3, 3), kind="adaptive"))


def test_reference_impl_is_the_reference(seed):
    """impl="reference" is exactly the reference expression, for fusable modules too."""
    reg = make_regressor("conv1x1", (2, 3, 4, 4), (2, 5, 4, 4), True, True)
    x, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4)
    for reduction in ("mean", "paper"):
        assert_is_reference(reg, x, t, reduction, impl="reference")
    s, tl = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    out = fused_kd_ce_loss(s, tl, y, 3.0, 0.3, 2.5, impl="reference")
    ce, kd = F.cross_entropy(s.float(), y), kd_loss(s, tl, 3.0)
    assert torch.equal(out.loss, 0.3 * ce + 2.5 * kd)
    assert torch.equal(out.ce, ce) and torch.equal(out.kd, kd)
    out = fused_kd_ce_loss(s, tl, None, 3.0, 0.3, 2.5, impl="reference")
    assert out.ce is None and torch.equal(out.loss, 2.5 * kd)


def test_fused_hint_keeps_memory_below_the_projected_map():
    from fitdist.bench.losses import peak_extra_bytes

    torch.manual_seed(5)
    reg = make_regressor("conv1x1", (16, 8, 16, 16), (16, 64, 16, 16), True, True)
    x = torch.randn(16, 8, 16, 16, requires_grad=True)
    t = torch.randn(16, 64, 16, 16)
    map_bytes = t.numel() * 4  # 1 MiB: the regressor output the reference materialises

    def run(fn):
        def step():
            fn().backward()
            x.grad = None
            reg.zero_grad(set_to_none=True)

        return peak_extra_bytes(step, x.device)

    ref = run(lambda: hint_loss(reg(x), t))
    fused = run(lambda: fused_hint_loss(x, reg, t, chunk_rows=256))
    assert ref >= 2 * map_bytes  # sanity: the measurement sees the reference's temporaries
    assert fused <= 0.5 * map_bytes, f"fused peak {fused} B vs projected map {map_bytes} B"


# --------------------------------------------------------------------------------------------- KD
KD_SHAPES = [(1, 1), (5, 3), (37, 11), (64, 1000), (3, 5000)]
KD_WEIGHTS = [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.3, 2.5)]


class ExactKD(NamedTuple):
    """Float64 closed forms of loss, ce, kd and d loss/d s, or the magnitudes (same sums over
    absolute values) that their rounding errors scale with."""

    loss: torch.Tensor | float
    ce: torch.Tensor | float
    kd: torch.Tensor | float
    grad: torch.Tensor


def exact_kd(s, t, y, temperature, ce_w, kd_w) -> tuple[ExactKD, ExactKD]:
    """CE = −mean log softmax(s)[y], KD = T²·Σ p_t (log p_t − log p_s)/N, in float64.

    The gradient is the closed form ce_w·(softmax(s) − onehot(y))/N + kd_w·T·(p_s − p_t)/N.
    """
    n, T = s.shape[0], temperature
    s64 = s.detach().double()

    def log_softmax(v):
        m = v.max(1, keepdim=True).values
        return v - m - (v - m).exp().sum(1, keepdim=True).log()

    log_ps, log_pt, log_p = log_softmax(s64 / T), log_softmax(t.double() / T), log_softmax(s64)
    p_s, p_t, p = log_ps.exp(), log_pt.exp(), log_p.exp()
    onehot = F.one_hot(y, s.shape[1]).double()
    kd = T * T * (p_t * (log_pt - log_ps)).sum() / n
    ce = -(log_p * onehot).sum() / n
    grad = (ce_w * (p - onehot) + kd_w * T * (p_s - p_t)) / n
    kd_mag = kd_magnitude(s64, t, T).sum().item() / n
    ce_mag = log_softmax_magnitude(s64).mul(onehot).sum().item() / n  # |s_y| + |lse|
    p_t_mag = softmax_magnitude(t.double() / T)
    grad_mag = ce_w * (softmax_magnitude(s64) + onehot)
    grad_mag = (grad_mag + kd_w * T * (softmax_magnitude(s64 / T) + p_t_mag)) / n
    exact = ExactKD(ce_w * ce + kd_w * kd, ce, kd, grad)
    return exact, ExactKD(ce_w * ce_mag + kd_w * kd_mag, ce_mag, kd_mag, grad_mag)


def check_kd(impl, temperature, chunk_rows=None, shapes=KD_SHAPES):
    """Fused and fp32 reference against the float64 closed forms, in value and gradient."""
    for n, k in shapes:
        for ce_w, kd_w in KD_WEIGHTS:
            s = (torch.randn(n, k) * 3).requires_grad_()
            t = torch.randn(n, k) * 3
            y = torch.randint(0, k, (n,))
            exact, mags = exact_kd(s, t, y, temperature, ce_w, kd_w)
            # Row log-sum-exps (length k), then sums over rows (n) or all elements (n·k).
            tols = [rtol(k + m + ELEMENTWISE) for m in (n * k, n, n * k)]
            ce_ref, kd_ref = F.cross_entropy(s.float(), y), kd_loss(s, t, temperature)
            out = fused_kd_ce_loss(
                s, t, y, temperature, ce_w, kd_w, impl=impl, chunk_rows=chunk_rows
            )
            assert out.ce.dtype == out.kd.dtype == torch.float32
            assert not out.ce.requires_grad and not out.kd.requires_grad
            candidates = {
                "reference": (ce_ref * ce_w + kd_ref * kd_w, ce_ref, kd_ref),
                impl: (out.loss, out.ce, out.kd),
            }
            for name, values in candidates.items():
                what = f"{name} {n}x{k} T={temperature} w={ce_w, kd_w}"
                for term, v, e, tol, mag in zip(["loss", "ce", "kd"], values, exact, tols, mags):
                    assert_close(v, e, tol, mag, what=f"{what} {term}")
                if ce_w == 0 and kd_w == 0:
                    continue
                (g,) = torch.autograd.grad(values[0], s)
                tol = rtol(k + ELEMENTWISE)  # a softmax over k classes
                assert_close(g, exact.grad, tol, mags.grad, what=f"{what} grad")


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("chunk_rows", [None, 4, 7])
def test_kd_ce_matches_exact(temperature, chunk_rows, seed):
    check_kd("fused", temperature, chunk_rows)


def test_kd_without_labels_and_backward_scaling(seed):
    s, t = torch.randn(10, 7, requires_grad=True), torch.randn(10, 7)
    out = fused_kd_ce_loss(s, t, None, 2.0, impl="fused")
    assert out.ce is None
    no_labels = torch.zeros(10, dtype=torch.long)  # unused: the ce weight is 0
    exact, mags = exact_kd(s, t, no_labels, 2.0, 0.0, 1.0)
    assert_close(fused_kd_loss(s, t, 2.0), exact.kd, rtol(7 + 70 + ELEMENTWISE), mags.kd)
    (g,) = torch.autograd.grad(out.loss * 3.5, s)
    assert_close(g, exact.grad * 3.5, rtol(7 + ELEMENTWISE), mags.grad * 3.5, what="grad × 3.5")
    t.requires_grad_()
    fused_kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None


def test_kd_no_grad_forward(seed):
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    with torch.no_grad():
        out = fused_kd_ce_loss(s, t, y, 3.0)
    exact, mags = exact_kd(s, t, y, 3.0, 1.0, 1.0)
    assert_close(out.kd, exact.kd, rtol(5 + 30 + ELEMENTWISE), mags.kd, what="kd")
    assert_close(out.ce, exact.ce, rtol(5 + 6 + ELEMENTWISE), mags.ce, what="ce")


def check_kd_bf16(impl, labels):
    s = (torch.randn(33, 100) * 3).bfloat16().requires_grad_()
    t = (torch.randn(33, 100) * 3).bfloat16()
    y = torch.randint(0, 100, (33,)) if labels else None
    out = fused_kd_ce_loss(s, t, y, 4.0, 0.5, 2.0, impl=impl, chunk_rows=5)
    ref = kd_loss(s, t, 4.0) * 2.0
    if labels:
        ref = ref + F.cross_entropy(s.float(), y) * 0.5
    y0 = y if labels else torch.zeros(33, dtype=torch.long)
    exact, mags = exact_kd(s, t, y0, 4.0, 0.5 if labels else 0.0, 2.0)
    # The bf16 values are exact in float64 and the math runs in fp32: fp32 tolerance for the
    # value; the gradient is rounded to bf16 once.
    for name, v in [("reference", ref), (impl, out.loss)]:
        assert_close(v, exact.loss, rtol(100 + 3300 + ELEMENTWISE), mags.loss, what=f"{name} loss")
        (g,) = torch.autograd.grad(v, s)
        assert g.dtype == torch.bfloat16
        tol = rtol(100 + ELEMENTWISE) + rtol(1, torch.bfloat16)
        assert_close(g, exact.grad, tol, mags.grad, what=f"{name} grad")


def test_kd_bf16_within_bf16_tolerance(seed):
    check_kd_bf16("fused", labels=True)


@pytest.mark.parametrize(
    "s_shape,t_shape,y_shape,match",
    [
        ((4, 5), (4, 6), (4,), r"\(4, 5\).*\(4, 6\)"),
        ((4, 5), (3, 5), (4,), r"\(4, 5\).*\(3, 5\)"),
        ((4, 5), (4, 5), (3,), r"\(3,\).*\(4, 5\)"),
        ((20,), (20,), (1,), r"\(20,\)"),
    ],
)
def test_kd_shape_mismatch_names_the_shapes(s_shape, t_shape, y_shape, match):
    y = torch.zeros(y_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        fused_kd_ce_loss(torch.randn(s_shape), torch.randn(t_shape), y, 2.0)


def test_kd_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        fused_kd_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0)


def test_kd_label_out_of_range_is_never_a_finite_loss():
    """An ignore_index-style label (-100) or K: an error (chunked) or NaN (Triton), not a value."""
    s, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    for bad in (-100, 5):
        y = torch.tensor([0, bad, 2, 3])
        with pytest.raises((RuntimeError, IndexError)):
            fused_kd_ce_loss(s, t, y, 2.0, impl="fused")


# ------------------------------------------------------------------------------------ dispatch
def test_select_impl():
    assert select_impl("auto", "cpu") == "fused"
    assert select_impl("fused", "cpu") == "fused"
    assert select_impl("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="impl"):
        select_impl("cuda-magic", "cpu")
    if not INTERPRET:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            select_impl("triton", "cpu")


# -------------------------------------------------------------------- Triton under the interpreter
@needs_interpreter
@pytest.mark.parametrize("kind", ["conv1x1", "linear"])
@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_triton_interp_hint(kind, reduction, seed):
    assert select_impl("triton", "cpu") == "triton"
    for relu in (False, True):
        for bias in (False, True):
            check_hint(kind, relu, bias, reduction, "triton")


@needs_interpreter
@pytest.mark.parametrize("kind", ["conv1x1", "linear"])
@pytest.mark.parametrize("relu", [False, True])
def test_triton_interp_hint_beyond_one_block(kind, relu, seed):
    check_hint(kind, relu, True, "paper", "triton", shapes=TRITON_BIG_SHAPES)


@needs_interpreter
def test_triton_interp_hint_many_small_blocks(seed, monkeypatch):
    """Blocks of 16 (tl.dot's minimum): 3 input-channel, 3 output-channel, 5 position blocks."""
    from fitdist.kernels import triton_hint

    for name in ("BLOCK_O", "BLOCK_P", "BLOCK_C"):
        monkeypatch.setattr(triton_hint, name, 16)
    check_hint("conv1x1", True, True, "mean", "triton", shapes=TRITON_BIG_SHAPES)


@needs_interpreter
def test_triton_interp_hint_bf16(seed):
    reg = make_regressor("conv1x1", (3, 37, 5, 14), (3, 45, 5, 14), True, True, torch.bfloat16)
    x = torch.randn(3, 37, 5, 14, dtype=torch.bfloat16, requires_grad=True)
    t = make_hint(reg, x, (3, 45, 5, 14), True, torch.bfloat16)
    outs = {"reference": hint_loss(reg(x), t), "triton": fused_hint_loss(x, reg, t, impl="triton")}
    check_hint_exact(reg, x, t, "mean", outs, lowp=torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_triton_interp_kd(temperature, seed):
    # (3, 5000): two class blocks of MAX_BLOCK = 4096, the second one masked.
    check_kd("triton", temperature, shapes=[(1, 1), (5, 3), (7, 37), (3, 5000)])


@needs_interpreter
def test_triton_interp_kd_many_small_blocks(seed, monkeypatch):
    from fitdist.kernels import triton_kd

    monkeypatch.setattr(triton_kd, "MAX_BLOCK", 16)
    check_kd("triton", 3.0, shapes=[(9, 37), (4, 50)])


@needs_interpreter
def test_triton_interp_kd_bf16_and_no_labels(seed):
    check_kd_bf16("triton", labels=False)
    check_kd_bf16("triton", labels=True)


def test_triton_hint_offsets_must_fit_int32():
    """A sample whose element offsets pass 2³¹ goes to the chunked path, not a wrapped index."""
    pytest.importorskip("triton")
    from fitdist.kernels.triton_hint import int32_offsets

    assert int32_offsets(torch.empty(4, 2**10, 2**20, device="meta"))
    assert not int32_offsets(torch.empty(1, 2**11, 2**20, device="meta"))
    flat = torch.empty(2**21, 2**10, device="meta")  # a linear regressor: one "sample"
    assert not int32_offsets(flat.t().unsqueeze(0))
    assert int32_offsets(torch.empty(2**12, 2**10, device="meta").t().unsqueeze(0))


@needs_interpreter
def test_triton_interp_kd_label_out_of_range_gives_nan(seed):
    s, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    for bad in (-100, 5):
        y = torch.tensor([0, bad, 2, 3])
        out = fused_kd_ce_loss(s, t, y, 2.0, impl="triton")
        assert math.isnan(out.ce.item()) and math.isnan(out.loss.item())
        (g,) = torch.autograd.grad(out.loss, s)
        assert g[1].isnan().all() and g[[0, 2, 3]].isfinite().all()


def test_triton_kernels_under_interpreter():
    """Run the `triton_interp` tests above in a child with TRITON_INTERPRET=1 set from the start."""
    if INTERPRET:
        pytest.skip("already the interpreter child")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FITDIST_TEST_SEED": str(BASE_SEED)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton_interp"]
    proc = subprocess.run(
        [*cmd, str(Path(__file__))],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15 and "skipped" not in summary, summary


# ------------------------------------------------------------------------------------ benchmark
def test_bench_losses_smoke(capsys):
    from fitdist.bench.losses import main

    assert main(["--small", "--json", "--reps", "2", "--warmup", "1", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in report["results"]] == ["hint small", "kd small", "kd target_probs small"]
    assert all(r["ref_ms"] > 0 and r["fused_peak_mib"] >= 0 for r in report["results"])


def test_fused_hint_weight_gradient_keeps_the_weight_layout(seed):
    """A channels_last student has a channels_last 1×1 regressor weight; its gradient must have
    the same strides (DDP's gradient buckets copy a gradient of another layout every step)."""
    regressor = build_regressor((16, 5, 5), (24, 5, 5)).to(memory_format=torch.channels_last)
    weight = regressor.proj.weight
    assert weight.stride() != torch.empty(weight.shape).stride()
    feats = torch.randn(3, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    kernels.fused_hint_loss(feats, regressor, torch.randn(3, 24, 5, 5), impl="fused").backward()
    assert weight.grad.stride() == weight.stride()
