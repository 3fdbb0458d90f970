"""FitNets regressors sized from shapes: 1×1, k = N_g − N_h + 1, linear, adaptive, errors."""

import pytest
import torch
from torch import nn

from fitdist.errors import UserError
from fitdist.regressors import build_regressor


@pytest.mark.parametrize(("s", "t", "kernel"), [
    ((16, 8, 8), (32, 8, 8), (1, 1)),
    ((16, 16, 16), (48, 7, 7), (10, 10)),  # k = 16 − 7 + 1
    ((8, 9, 12), (4, 5, 3), (5, 10)),
])
def test_conv_regressor_kernel_follows_fitnets(s, t, kernel):
    r = build_regressor(s, t)
    assert isinstance(r.proj, nn.Conv2d) and r.proj.kernel_size == kernel
    assert r.proj.padding == (0, 0) and r.proj.stride == (1, 1)
    assert r(torch.randn(2, *s)).shape == (2, *t)


def test_linear_regressor_for_flat_features_and_optional_bn_relu():
    r = build_regressor((20,), (50,), bn=True, relu=True)
    assert isinstance(r.proj, nn.Linear) and isinstance(r.bn, nn.BatchNorm1d)
    out = r(torch.randn(4, 20))
    assert out.shape == (4, 50) and (out >= 0).all()


def test_smaller_student_map_is_an_error_unless_adaptive():
    with pytest.raises(UserError, match=r"4×4 is smaller than the teacher hint 8×8.*adaptive"):
        build_regressor((16, 4, 4), (32, 8, 8), where="hints.0")
    r = build_regressor((16, 4, 4), (32, 8, 8), kind="adaptive")
    assert r.proj.kernel_size == (1, 1) and r(torch.randn(2, 16, 4, 4)).shape == (2, 32, 8, 8)


def test_mismatched_ranks_are_an_error():
    with pytest.raises(UserError, match="no regressor maps"):
        build_regressor((16, 4, 4), (32,))
    with pytest.raises(UserError, match="not one of"):
        build_regressor((16,), (32,), kind="mlp")
