"""KD against a given target distribution (`kd_loss_to_target`, `fused_kd_ce_loss(target_probs=)`)
against its closed form in float64, on fresh random inputs.

The closed form for a target p (N×K, at temperature T) and student logits s:
`KD = T² · Σ (p log p − p log_softmax(s/T)) / N` (0 · log 0 = 0) and
`d KD / d s = T · (softmax(s/T) · Σ_k p_k − p) / N`, written here in float64 on float64 copies of
the very inputs each implementation gets. Targets: a weighted mean of 1, 2 or 5 teachers'
softened probabilities, and a renormalised top-3 with exact zeros. Tolerances follow
`fp_accuracy` (see tests/test_kernels.py). The Triton tests run in a child pytest with
TRITON_INTERPRET=1, as in tests/test_kernels.py.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fp_accuracy import (
    BASE_SEED,
    ELEMENTWISE,
    assert_close,
    log_softmax_magnitude,
    rtol,
    softmax_magnitude,
)

from fitdist import kernels
from fitdist.kernels import fused_kd_ce_loss
from fitdist.losses import kd_loss_to_target

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child")
SHAPES = [(1, 1), (5, 3), (37, 11), (6, 300)]  # 300 classes: several 16-class blocks in Triton's test
T = 3.0


def ensemble_target(n, k, teachers, temperature=T):
    """Σ_i w_i softmax(t_i/T) with random positive weights normalised to sum to 1."""
    w = torch.rand(teachers) + 0.1
    w = w / w.sum()
    logits = torch.randn(teachers, n, k) * 3
    return (w[:, None, None] * (logits / temperature).softmax(-1)).sum(0)


def topk_target(n, k, keep=3):
    """A stored soft label: the top-`keep` of a softmax, renormalised, exact zeros elsewhere."""
    p = (torch.randn(n, k) * 2).softmax(-1)
    top = p.topk(min(keep, k), dim=-1)
    kept = torch.zeros_like(p).scatter_(-1, top.indices, top.values)
    return kept / kept.sum(-1, keepdim=True)


def exact(s, p, temperature):
    """Float64 (kd, grad) and the magnitudes of their terms, for the inputs as given."""
    n, s64, p64 = s.shape[0], s.detach().double(), p.detach().double()
    a = s64 / temperature
    log_q = a.log_softmax(-1)
    kd = temperature**2 * (torch.xlogy(p64, p64) - p64 * log_q).sum() / n
    grad = temperature * (log_q.exp() * p64.sum(-1, keepdim=True) - p64) / n
    kd_mag = temperature**2 * (torch.xlogy(p64, p64).abs() + p64 * log_softmax_magnitude(a)).sum() / n
    grad_mag = temperature * (softmax_magnitude(a) * p64.sum(-1, keepdim=True) + p64) / n
    return kd, grad, kd_mag.item(), grad_mag


def kd_of(impl, s, p, chunk_rows=None, temperature=T):
    if impl == "to_target":
        return kd_loss_to_target(s, p, temperature)
    return fused_kd_ce_loss(s, None, None, temperature, impl=impl, chunk_rows=chunk_rows, target_probs=p).loss


def check(impls, make_target, shapes=SHAPES, lowp=None):
    """Each impl's KD value and gradient against the closed form. `lowp`: bf16 student logits
    under CPU autocast (the math stays fp32; the stored gradient is rounded to bf16 once)."""
    for n, k in shapes:
        p = make_target(n, k)
        s = torch.randn(n, k) * 3
        s = (s if lowp is None else s.to(lowp)).requires_grad_()
        kd, grad, kd_mag, grad_mag = exact(s, p, T)
        for impl, chunk_rows in impls:
            what = f"{impl} rows={chunk_rows} {n}x{k} lowp={lowp}"
            with torch.autocast("cpu", torch.bfloat16, enabled=lowp is not None):
                v = kd_of(impl, s, p, chunk_rows)
            assert v.dtype == torch.float32, what
            assert_close(v, kd, rtol(k + n * k + ELEMENTWISE), kd_mag, what=f"{what} value")
            (g,) = torch.autograd.grad(v, s)
            assert g.dtype == s.dtype, what
            tol = rtol(k + ELEMENTWISE) + (0 if lowp is None else rtol(1, lowp))
            assert_close(g, grad, tol, grad_mag, what=f"{what} grad")


CPU_IMPLS = [("to_target", None), ("reference", None), ("fused", None), ("fused", 2), ("auto", 4)]


@pytest.mark.parametrize("teachers", [1, 2, 5])
def test_ensemble_target_matches_closed_form(teachers, seed):
    check(CPU_IMPLS, lambda n, k: ensemble_target(n, k, teachers))


@pytest.mark.parametrize("teachers", [1, 5])
def test_ensemble_target_bf16_student_under_autocast(teachers, seed):
    # Tolerance: the fp32 one for the value (the bf16 logits are exact in fp32 and float64), plus
    # one bf16 rounding (eps = 2⁻⁷) of the stored gradient.
    check(CPU_IMPLS, lambda n, k: ensemble_target(n, k, teachers), lowp=torch.bfloat16)


def test_topk_target_with_zeros_is_finite_and_matches(seed):
    check(CPU_IMPLS, topk_target, shapes=[(8, 10), (5, 3), (4, 1)])
    p = topk_target(8, 10)
    assert (p == 0).sum() == 8 * 7  # sanity: the zeros are really there
    s = torch.randn(8, 10, requires_grad=True)
    for impl, rows in CPU_IMPLS:
        v = kd_of(impl, s, p, rows)
        (g,) = torch.autograd.grad(v, s)
        assert v.isfinite() and g.isfinite().all(), impl


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_target_is_read_as_fp32(dtype, seed):
    """A bf16/fp16 target is its fp32 value; its rows then miss 1 by ~K·eps, and the gradient is
    still that of the computed value (the Σp factor), which `softmax(s/T) − p` alone would miss."""
    p = ensemble_target(9, 200, 2, temperature=1.0).to(dtype)  # peaked: larger roundings
    off = (p.float().sum(-1) - 1).abs().max()
    # sanity: the case the Σp factor is for; in bf16 the rows miss 1 by more than the gradient's
    # tolerance (measured: ≥ 8× it over 2000 draws), so `softmax(s/T) − p` would fail below
    assert off > (4 * rtol(200 + ELEMENTWISE) if dtype == torch.bfloat16 else 0)
    check(CPU_IMPLS, lambda n, k: p, shapes=[(9, 200)])


def test_one_teacher_equals_the_logits_path(seed):
    s = torch.randn(12, 40, requires_grad=True)
    t, y = torch.randn(12, 40) * 2, torch.randint(0, 40, (12,))
    p = (t / T).softmax(-1)
    for impl in ("reference", "fused"):
        by_logits = fused_kd_ce_loss(s, t, y, T, 0.4, 1.7, impl=impl)
        by_probs = fused_kd_ce_loss(s, None, y, T, 0.4, 1.7, impl=impl, target_probs=p)
        _, _, kd_mag, grad_mag = exact(s, p, T)
        tol = rtol(40 + 480 + ELEMENTWISE)
        assert_close(by_probs.kd, by_logits.kd, 2 * tol, kd_mag, what=f"{impl} kd")
        assert torch.equal(by_probs.ce, by_logits.ce), impl
        g_logits, g_probs = (torch.autograd.grad(o.loss, s)[0] for o in (by_logits, by_probs))
        assert_close(g_probs, g_logits, 2 * rtol(40 + ELEMENTWISE), 1.7 * grad_mag + 0.4 / 12, what=f"{impl} grad")


def test_log_probs_form_equals_probs_form(seed):
    for p in (ensemble_target(7, 13, 3), topk_target(7, 13)):
        log_p = p.log()  # −inf where p = 0
        s = torch.randn(7, 13, requires_grad=True)
        v_p, v_lp = kd_loss_to_target(s, p, T), kd_loss_to_target(s, target_log_probs=log_p, temperature=T)
        _, _, kd_mag, grad_mag = exact(s, p, T)
        assert_close(v_lp, v_p, rtol(13 + 91 + ELEMENTWISE), kd_mag, what="value")
        g_p, g_lp = (torch.autograd.grad(v, s)[0] for v in (v_p, v_lp))
        assert_close(g_lp, g_p, rtol(13 + ELEMENTWISE), grad_mag, what="grad")
    assert log_p.isinf().any()  # sanity: the −inf entries were exercised


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_labels_give_ce_and_the_weighted_loss(impl, seed):
    n, k, ce_w, kd_w = 10, 17, 0.3, 2.5
    s, p, y = torch.randn(n, k, requires_grad=True), ensemble_target(n, k, 2), torch.randint(0, k, (n,))
    out = fused_kd_ce_loss(s, None, y, T, ce_w, kd_w, impl=impl, chunk_rows=3, target_probs=p)
    s64 = s.detach().double()
    ce_exact = -s64.log_softmax(-1).gather(1, y[:, None]).mean()
    kd, grad, kd_mag, grad_mag = exact(s, p, T)
    ce_mag = log_softmax_magnitude(s64).gather(1, y[:, None]).mean().item()
    assert_close(out.ce, ce_exact, rtol(k + n + ELEMENTWISE), ce_mag, what="ce")
    assert_close(out.kd, kd, rtol(k + n * k + ELEMENTWISE), kd_mag, what="kd")
    assert torch.equal(out.loss.detach(), out.ce * ce_w + out.kd * kd_w)
    assert not out.ce.requires_grad and not out.kd.requires_grad
    onehot = F.one_hot(y, k).double()
    g_exact = ce_w * (s64.softmax(-1) - onehot) / n + kd_w * grad
    (g,) = torch.autograd.grad(out.loss, s)
    mag = ce_w * (softmax_magnitude(s64) + onehot) / n + kd_w * grad_mag
    assert_close(g, g_exact, rtol(k + ELEMENTWISE), mag, what="grad")


def test_target_gets_no_gradient_and_is_not_written(seed):
    s, p = torch.randn(6, 9, requires_grad=True), ensemble_target(6, 9, 2).requires_grad_()
    before = p.detach().clone()
    for impl in ("reference", "fused"):
        fused_kd_ce_loss(s, None, None, T, impl=impl, target_probs=p).loss.backward()
    kd_loss_to_target(s, p, T).backward()
    assert p.grad is None and torch.equal(p.detach(), before)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(4, 5),), {"target_probs": torch.rand(4, 5)}, "exactly one of teacher_logits and target_probs .got both"),
        ((None,), {}, "exactly one of teacher_logits and target_probs .got neither"),
        ((None,), {"target_probs": torch.rand(4, 6)}, r"student \(4, 5\) vs target_probs \(4, 6\)"),
        ((None,), {"target_probs": torch.rand(5)}, r"student \(4, 5\) vs target_probs \(5,\)"),
        ((None,), {"target_probs": torch.ones(4, 5, dtype=torch.long)}, "floating point.*int64"),
    ],
)
def test_bad_fused_input_raises(args, kwargs, match):
    s, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    for impl in ("reference", "fused", "auto"):
        with pytest.raises(ValueError, match=match):
            fused_kd_ce_loss(s, *args, y, 2.0, impl=impl, **kwargs)


def test_bad_reference_input_raises():
    s, p = torch.randn(4, 5), torch.rand(4, 5)
    with pytest.raises(ValueError, match="exactly one of target_probs and target_log_probs"):
        kd_loss_to_target(s, p, 2.0, target_log_probs=p.log())
    with pytest.raises(ValueError, match="exactly one"):
        kd_loss_to_target(s, temperature=2.0)
    with pytest.raises(ValueError, match="temperature is required"):
        kd_loss_to_target(s, p)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        kd_loss_to_target(s, p, -1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_kd_ce_loss(s, None, None, 0.0, target_probs=p)
    with pytest.raises(ValueError, match=r"target shape \(4, 6\).*\(4, 5\)"):
        kd_loss_to_target(s, torch.rand(4, 6), 2.0)


# -------------------------------------------------------------------- Triton under the interpreter
@needs_interpreter
@pytest.mark.parametrize("teachers", [1, 2, 5])
def test_triton_interp_ensemble(teachers, seed):
    check([("triton", None)], lambda n, k: ensemble_target(n, k, teachers))


@needs_interpreter
def test_triton_interp_bf16_topk_and_lowp_target(seed, monkeypatch):
    from fitdist.kernels import triton_kd

    monkeypatch.setattr(triton_kd, "MAX_BLOCK", 16)  # several class blocks per row
    check([("triton", None)], lambda n, k: ensemble_target(n, k, 5), lowp=torch.bfloat16)
    check([("triton", None)], topk_target, shapes=[(8, 10), (4, 37)])
    p = ensemble_target(5, 50, 2).bfloat16()
    check([("triton", None)], lambda n, k: p, shapes=[(5, 50)])


@needs_interpreter
def test_triton_interp_labels(seed):
    s, p, y = torch.randn(6, 21, requires_grad=True), ensemble_target(6, 21, 2), torch.randint(0, 21, (6,))
    tri = fused_kd_ce_loss(s, None, y, T, 0.3, 2.5, impl="triton", target_probs=p)
    ref = fused_kd_ce_loss(s, None, y, T, 0.3, 2.5, impl="reference", target_probs=p)
    _, _, kd_mag, grad_mag = exact(s, p, T)
    assert_close(tri.kd, ref.kd, 2 * rtol(21 + 126 + ELEMENTWISE), kd_mag, what="kd")
    assert_close(tri.ce, ref.ce, 2 * rtol(21 + 6 + ELEMENTWISE), 10.0, what="ce")
    g_tri, g_ref = (torch.autograd.grad(o.loss, s)[0] for o in (tri, ref))
    assert_close(g_tri, g_ref, 2 * rtol(21 + ELEMENTWISE), 2.5 * grad_mag + 0.3 / 6, what="grad")


def test_triton_under_interpreter():
    """Run the `triton_interp` tests above in a child with TRITON_INTERPRET=1 set from the start."""
    if INTERPRET:
        pytest.skip("already the interpreter child")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FITDIST_TEST_SEED": str(BASE_SEED)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton_interp", str(Path(__file__))]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == 5 and "skipped" not in summary, summary


# ------------------------------------------------------------- auto with a Triton that does not run
@pytest.mark.skipif(INTERPRET or not kernels.triton_available(), reason="needs Triton, without its CPU interpreter")
def test_auto_falls_back_from_a_triton_probs_kernel_that_fails(monkeypatch, seed):
    """`auto` made to pick Triton on CPU tensors, where a real launch fails: one warning naming the
    probs kernel, then exactly the chunked result."""
    real = kernels.select_impl
    monkeypatch.setattr(kernels, "select_impl", lambda impl, device: "triton" if impl == "auto" else real(impl, device))
    monkeypatch.setattr(kernels, "_TRITON_WORKS", {})
    s, p, y = torch.randn(8, 37, requires_grad=True), ensemble_target(8, 37, 2), torch.randint(0, 37, (8,))
    with pytest.warns(RuntimeWarning, match="Triton kernel kd_ce_probs does not run on cpu"):
        got = fused_kd_ce_loss(s, None, y, 4.0, 0.5, 2.0, target_probs=p)
    expected = fused_kd_ce_loss(s, None, y, 4.0, 0.5, 2.0, impl="fused", target_probs=p)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(torch.autograd.grad(got.loss, s)[0], torch.autograd.grad(expected.loss, s)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel, device and dtypes
        fused_kd_ce_loss(s, None, y, 4.0, 0.5, 2.0, target_probs=p)
    assert not math.isnan(got.kd.item())
