"""Fused losses (fitdist.kernels) against the reference definitions in fitdist.losses.

fp32: loss relative error ≤ 1e-6, gradients allclose(rtol=1e-5, atol=1e-6); bf16: bf16 tolerance.
The Triton kernels run on CPU tensors under Triton's interpreter, which must be switched on before
triton is imported: `test_triton_kernels_under_interpreter` reruns the `triton_interp` tests of
this file in a child pytest with TRITON_INTERPRET=1 (they skip in a normal process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fitdist.kernels import (
    fused_hint_loss,
    fused_kd_ce_loss,
    fused_kd_loss,
    select_impl,
    supports_fused_hint,
)
from fitdist.losses import hint_loss, kd_loss
from fitdist.regressors import Regressor, build_regressor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child")

# (student shape, teacher shape): batch first; odd sizes that divide no chunk size.
HINT_SHAPES = {
    "conv1x1": [((3, 5, 4, 5), (3, 7, 4, 5)), ((2, 16, 9, 7), (2, 3, 9, 7))],
    "linear": [((9, 5), (9, 7)), ((33, 20), (33, 6))],
    "convkxk": [((3, 5, 6, 5), (3, 7, 4, 3)), ((2, 4, 7, 7), (2, 6, 5, 5))],
}


def make_regressor(kind, s_shape, t_shape, relu, bias, dtype=torch.float32):
    if kind == "linear":
        proj = nn.Linear(s_shape[1], t_shape[1], bias=bias)
    else:
        k = (s_shape[2] - t_shape[2] + 1, s_shape[3] - t_shape[3] + 1)
        proj = nn.Conv2d(s_shape[1], t_shape[1], kernel_size=k, bias=bias)
    return Regressor(proj, None, relu, None).to(dtype)


def grads(loss, x, reg):
    return torch.autograd.grad(loss, [x, *reg.parameters()])


def check_hint(kind, relu, bias, reduction, impl, seed, chunk_rows=None):
    """Fused versus reference for every shape of `kind`, fresh inputs each, fp32 tolerances."""
    torch.manual_seed(seed)
    for s_shape, t_shape in HINT_SHAPES[kind]:
        reg = make_regressor(kind, s_shape, t_shape, relu, bias)
        x = torch.randn(s_shape, requires_grad=True)
        t = torch.randn(t_shape).abs() if relu else torch.randn(t_shape)
        ref = hint_loss(reg(x), t, reduction)
        out = fused_hint_loss(x, reg, t, reduction, impl=impl, chunk_rows=chunk_rows)
        assert out.dtype == torch.float32 and out.dim() == 0
        rel = abs(out.item() - ref.item()) / abs(ref.item())
        assert rel <= 1e-6, f"{kind} {s_shape}: loss {out.item()} vs {ref.item()} (rel {rel:.2e})"
        for name, a, b in zip(["feats", "weight", "bias"], grads(out, x, reg), grads(ref, x, reg)):
            assert a.shape == b.shape and a.dtype == b.dtype
            err = (a - b).abs().max().item()
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (
                f"{kind} {s_shape} d{name}: {err:.2e}"
            )


@pytest.mark.parametrize("kind", list(HINT_SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "paper"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_hint_matches_reference(kind, reduction, relu, bias):
    seed = sum(map(ord, f"{kind}{reduction}{relu}{bias}"))  # stable across processes
    check_hint(kind, relu, bias, reduction, "fused", seed)
    check_hint(kind, relu, bias, reduction, "fused", seed + 1, chunk_rows=7)  # odd chunks
    check_hint(kind, relu, bias, reduction, "fused", seed + 2, chunk_rows=1)


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", ["conv1x1", "linear", "convkxk"])
def test_hint_bf16_within_bf16_tolerance(kind):
    torch.manual_seed(3)
    s_shape, t_shape = HINT_SHAPES[kind][1]
    reg = make_regressor(kind, s_shape, t_shape, True, True, torch.bfloat16)
    x = torch.randn(s_shape, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(t_shape, dtype=torch.bfloat16)
    ref = hint_loss(reg(x), t)
    out = fused_hint_loss(x, reg, t, chunk_rows=5)
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) <= 2e-2 * abs(ref.item())
    for a, b in zip(grads(out, x, reg), grads(ref, x, reg)):
        assert a.dtype == torch.bfloat16 and rel_norm(a, b) <= 2e-2


def test_hint_under_cpu_autocast_matches_reference():
    torch.manual_seed(4)
    reg = make_regressor("conv1x1", (4, 8, 5, 5), (4, 6, 5, 5), False, True)
    x, t = torch.randn(4, 8, 5, 5, requires_grad=True), torch.randn(4, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = hint_loss(reg(x), t)
        out = fused_hint_loss(x, reg, t)
    assert abs(out.item() - ref.item()) <= 2e-2 * abs(ref.item())
    for a, b in zip(grads(out, x, reg), grads(ref, x, reg)):
        assert rel_norm(a, b) <= 2e-2


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


def test_supports_fused_hint_and_fallback():
    assert supports_fused_hint(build_regressor((8, 5, 5), (6, 5, 5), relu=True))
    assert supports_fused_hint(build_regressor((8, 7, 7), (6, 5, 5)))  # k×k valid conv
    assert supports_fused_hint(build_regressor((8,), (6,)))
    with_bn = build_regressor((8, 5, 5), (6, 5, 5), bn=True)
    resized = build_regressor((8, 3, 3), (6, 5, 5), kind="adaptive")
    strided = Regressor(nn.Conv2d(8, 6, 1, stride=2), None, False, None)
    assert not any(supports_fused_hint(r) for r in (with_bn, resized, strided))
    x, t = torch.randn(4, 8, 5, 5), torch.randn(4, 6, 5, 5)
    with_bn.train()
    assert torch.equal(fused_hint_loss(x, with_bn, t), hint_loss(with_bn(x), t))


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


def check_kd(impl, seed, temperature, chunk_rows=None, shapes=KD_SHAPES):
    torch.manual_seed(seed)
    for n, k in shapes:
        for ce_w, kd_w in KD_WEIGHTS:
            s = (torch.randn(n, k) * 3).requires_grad_()
            t = torch.randn(n, k) * 3
            y = torch.randint(0, k, (n,))
            ce_ref, kd_ref = F.cross_entropy(s.float(), y), kd_loss(s, t, temperature)
            out = fused_kd_ce_loss(
                s, t, y, temperature, ce_w, kd_w, impl=impl, chunk_rows=chunk_rows
            )
            for name, a, b in [("ce", out.ce, ce_ref), ("kd", out.kd, kd_ref)]:
                assert a.dtype == torch.float32 and not a.requires_grad
                tol = 1e-6 * abs(b.item()) + (1e-7 if k == 1 else 0.0)  # K=1: kd and ce are 0
                assert abs(a.item() - b.item()) <= tol, f"{name} {n}x{k}: {a.item()} vs {b.item()}"
            ref_loss = ce_ref * ce_w + kd_ref * kd_w
            assert abs(out.loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()) + 1e-7
            if ce_w == 0 and kd_w == 0:
                continue
            (ga,), (gb,) = torch.autograd.grad(out.loss, s), torch.autograd.grad(ref_loss, s)
            err = (ga - gb).abs().max().item()
            assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6), (
                f"{n}x{k} w={ce_w, kd_w}: {err:.2e}"
            )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("chunk_rows", [None, 4, 7])
def test_kd_ce_matches_reference(temperature, chunk_rows):
    check_kd("fused", int(temperature * 10) + (chunk_rows or 0), temperature, chunk_rows)


def test_kd_without_labels_and_backward_scaling():
    torch.manual_seed(6)
    s, t = torch.randn(10, 7, requires_grad=True), torch.randn(10, 7)
    out = fused_kd_ce_loss(s, t, None, 2.0, impl="fused")
    assert out.ce is None
    ref = kd_loss(s, t, 2.0)
    assert abs(fused_kd_loss(s, t, 2.0).item() - ref.item()) <= 1e-6 * ref.item()
    (ga,), (gb,) = torch.autograd.grad(out.loss * 3.5, s), torch.autograd.grad(ref * 3.5, s)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6)
    t.requires_grad_()
    fused_kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None


def test_kd_no_grad_forward():
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    with torch.no_grad():
        out = fused_kd_ce_loss(s, t, y, 3.0)
    assert abs(out.kd.item() - kd_loss(s, t, 3.0).item()) <= 1e-6 * kd_loss(s, t, 3.0).item()


def test_kd_bf16_within_bf16_tolerance():
    torch.manual_seed(7)
    s = (torch.randn(33, 100) * 3).bfloat16().requires_grad_()
    t = (torch.randn(33, 100) * 3).bfloat16()
    y = torch.randint(0, 100, (33,))
    out = fused_kd_ce_loss(s, t, y, 4.0, 0.5, 2.0, chunk_rows=5)
    ref = F.cross_entropy(s.float(), y) * 0.5 + kd_loss(s, t, 4.0) * 2.0
    # Both compute in fp32 from the same bf16 values: only the summation order differs.
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * ref.item()
    (ga,), (gb,) = torch.autograd.grad(out.loss, s), torch.autograd.grad(ref, s)
    assert ga.dtype == torch.bfloat16 and rel_norm(ga, gb) <= 1e-2


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


def test_reference_impl_is_the_reference():
    reg = make_regressor("conv1x1", (2, 3, 4, 4), (2, 5, 4, 4), True, True)
    x, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert torch.equal(fused_hint_loss(x, reg, t, impl="reference"), hint_loss(reg(x), t))


# -------------------------------------------------------------------- Triton under the interpreter
@needs_interpreter
@pytest.mark.parametrize("kind", ["conv1x1", "linear"])
@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_triton_interp_hint(kind, reduction):
    assert select_impl("triton", "cpu") == "triton"
    for relu in (False, True):
        for bias in (False, True):
            check_hint(kind, relu, bias, reduction, "triton", seed=int(relu) * 2 + int(bias))


@needs_interpreter
def test_triton_interp_hint_bf16():
    torch.manual_seed(8)
    reg = make_regressor("conv1x1", (3, 20, 5, 5), (3, 9, 5, 5), True, True, torch.bfloat16)
    x = torch.randn(3, 20, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(3, 9, 5, 5, dtype=torch.bfloat16)
    ref, out = hint_loss(reg(x), t), fused_hint_loss(x, reg, t, impl="triton")
    assert abs(out.item() - ref.item()) <= 2e-2 * abs(ref.item())
    for a, b in zip(grads(out, x, reg), grads(ref, x, reg)):
        assert a.dtype == torch.bfloat16 and rel_norm(a, b) <= 2e-2


@needs_interpreter
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_triton_interp_kd(temperature):
    check_kd("triton", 11, temperature, shapes=[(1, 1), (5, 3), (7, 37), (3, 5000)])


@needs_interpreter
def test_triton_interp_kd_bf16_and_no_labels():
    torch.manual_seed(9)
    s = (torch.randn(9, 50) * 3).bfloat16().requires_grad_()
    t = (torch.randn(9, 50) * 3).bfloat16()
    out = fused_kd_ce_loss(s, t, None, 4.0, impl="triton")
    ref = kd_loss(s, t, 4.0)
    assert out.ce is None and abs(out.loss.item() - ref.item()) <= 1e-5 * ref.item()
    (ga,), (gb,) = torch.autograd.grad(out.loss, s), torch.autograd.grad(ref, s)
    assert ga.dtype == torch.bfloat16 and rel_norm(ga, gb) <= 1e-2


def test_triton_kernels_under_interpreter():
    """Run the `triton_interp` tests above in a child with TRITON_INTERPRET=1 set from the start."""
    if INTERPRET:
        pytest.skip("already the interpreter child")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
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
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 8 and "skipped" not in summary, summary


# ------------------------------------------------------------------------------------ benchmark
def test_bench_losses_smoke(capsys):
    from fitdist.bench.losses import main

    assert main(["--small", "--json", "--reps", "2", "--warmup", "1", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in report["results"]] == ["hint small", "kd small"]
    assert all(r["ref_ms"] > 0 and r["fused_peak_mib"] >= 0 for r in report["results"])
