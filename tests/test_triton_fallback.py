"""`loss.impl: auto` on a device where a Triton kernel does not run: one warning naming the reason,
then the chunked path with its exact values; and no Triton hint backward (atomics) when
deterministic algorithms are on.

`auto` picks Triton on CUDA only; here it is made to pick it on the CPU, where launching a real
Triton kernel on CPU tensors fails (without TRITON_INTERPRET), a genuine launch failure."""

import os
import warnings

import pytest
import torch

from fitdist import kernels
from fitdist.regressors import build_regressor

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not kernels.triton_available(),
                                reason="needs Triton, without its CPU interpreter")


@pytest.fixture
def auto_picks_triton(monkeypatch):
    real = kernels.select_impl
    monkeypatch.setattr(kernels, "select_impl", lambda impl, device: "triton" if impl == "auto" else real(impl, device))
    monkeypatch.setattr(kernels, "_TRITON_WORKS", {})  # a fresh process's first use
    before = torch.are_deterministic_algorithms_enabled()  # an in-process run may have left it on
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before)


def hint_case():
    feat = torch.randn(4, 6, 5, 5, requires_grad=True)
    regressor = build_regressor((6, 5, 5), (10, 5, 5), "auto", False, False)  # a 1×1 conv
    hint = torch.randn(4, 10, 5, 5)
    return feat, regressor, hint


def values_and_grads(feat, regressor, hint, impl):
    loss = kernels.fused_hint_loss(feat, regressor, hint, impl=impl)
    grads = torch.autograd.grad(loss, [feat, *regressor.parameters()])
    return loss.detach(), grads


def test_a_triton_hint_kernel_that_fails_warns_once_then_the_chunked_path_runs(auto_picks_triton, seed):
    feat, regressor, hint = hint_case()
    with pytest.warns(RuntimeWarning, match=r"Triton kernel pointwise_hint does not run on cpu \(\w+"):
        got = values_and_grads(feat, regressor, hint, "auto")
    expected = values_and_grads(feat, regressor, hint, "fused")
    assert torch.equal(got[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
    assert all(p.grad is None for p in regressor.parameters())  # the trial left no gradient behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call says nothing
        values_and_grads(feat, regressor, hint, "auto")


def test_a_triton_kd_kernel_that_fails_warns_once_then_the_chunked_path_runs(auto_picks_triton, seed):
    s, t, y = torch.randn(8, 37, requires_grad=True), torch.randn(8, 37), torch.randint(0, 37, (8,))
    with pytest.warns(RuntimeWarning, match="Triton kernel kd_ce does not run on cpu"):
        got = kernels.fused_kd_ce_loss(s, t, y, 4.0, 0.5, 2.0)
    expected = kernels.fused_kd_ce_loss(s, t, y, 4.0, 0.5, 2.0, impl="fused")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(torch.autograd.grad(got.loss, s)[0], torch.autograd.grad(expected.loss, s)[0])


def test_an_explicit_triton_impl_is_not_silently_replaced(auto_picks_triton):
    feat, regressor, hint = hint_case()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.fused_hint_loss(feat, regressor, hint, impl="triton")


def test_deterministic_mode_keeps_the_hint_loss_off_the_triton_atomics(auto_picks_triton, seed):
    feat, regressor, hint = hint_case()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Triton is not even tried
            got = values_and_grads(feat, regressor, hint, "auto")
    finally:
        torch.use_deterministic_algorithms(False)
    expected = values_and_grads(feat, regressor, hint, "fused")
    assert torch.equal(got[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))


def test_a_config_asking_for_triton_hints_and_determinism_is_refused(tmp_path):
    from conftest import TEACHER, write_config

    from fitdist.config import load_config
    from fitdist.errors import UserError

    path = write_config(tmp_path / "c.yaml", teacher={**TEACHER, "weights": "t.pt"},
                        hints=[{"student": "conv3", "teacher": "conv2"}],
                        stages=[{"name": "hint", "steps": 2, "ce": 0, "hint": 1}])
    load_config(path, ["loss.impl=triton"])  # either alone is fine
    load_config(path, ["deterministic=true"])
    with pytest.raises(UserError, match=r"^loss.impl: 'triton' sums the hint gradients with atomics"):
        load_config(path, ["loss.impl=triton", "deterministic=true"])
