"""fitdist:fitnet's `init` and `unit` keywords against closed forms: drawn weights' bounds and
spread, parameter counts, and the `convN` hint paths naming post-activation outputs."""

import math

import pytest
import torch
from conftest import run_cli, write_config
from torch import nn

from fitdist.features import FeatureTap
from fitdist.zoo import ZOO, ZooArgumentError


def random_fitnet_kwargs() -> dict:
    n = int(torch.randint(3, 6, ()))
    return {"widths": [int(w) for w in torch.randint(8, 40, (n,))], "pool_after": [1, n - 1],
            "hidden": int(torch.randint(16, 64, ())), "batch_norm": bool(torch.rand(()) < 0.5)}


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def check_uniform(w: torch.Tensor, bound: float) -> None:
    """U(±bound): inside the bound, reaching near both ends, with the uniform's std bound/√3."""
    n = w.numel()
    assert w.abs().max() <= bound
    # the chance a U(±b) sample of n stays below (1 - q)·b at one end is (1 - q/2)^n ≈ e^(-qn/2): q = 40/n
    # gives e^-20 per end (e^-6, at q = 12/n, failed about one run in thirty over a model's ~14 ends)
    q = min(1.0, 40 / n)
    assert w.max() >= bound * (1 - q) and w.min() <= -bound * (1 - q)
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=3 / math.sqrt(n) + 0.01)  # ~6.7 sd of the estimate


def test_glorot_uniform_matches_the_closed_form_bound(seed):
    kwargs = random_fitnet_kwargs()
    model = ZOO["fitnet"](10, 3, init="glorot_uniform", **kwargs)
    for m in layers(model):
        w = m.weight.detach()
        receptive = w[0, 0].numel()  # kh·kw for a conv, 1 for a linear
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        check_uniform(w, math.sqrt(6 / (fan_in + fan_out)))
        if m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_uniform_a_draws_within_and_across_plus_minus_a(seed):
    a = float(torch.empty(()).uniform_(0.001, 0.2))
    for name, kwargs in (("fitnet", random_fitnet_kwargs()), ("fitnet1", {})):
        model = ZOO[name](10, 3, init=f"uniform:{a}", **kwargs)
        for m in layers(model):
            check_uniform(m.weight.detach(), a)
            if m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_kaiming_stays_the_default_draw_for_draw(seed):
    kwargs = random_fitnet_kwargs()
    torch.manual_seed(seed)
    default = ZOO["fitnet"](10, 3, **kwargs).state_dict()
    torch.manual_seed(seed)
    named = ZOO["fitnet"](10, 3, init="kaiming", **kwargs).state_dict()
    assert all(torch.equal(default[k], named[k]) for k in default)
    conv = ZOO["fitnet"](10, 3, widths=[64, 64], pool_after=[1]).conv2[0].weight.detach()
    fan_out = conv.shape[0] * 9
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


def fitnet_params(widths, cin, classes, pieces, bn, hidden, hidden_pieces) -> int:
    """Closed form: 3×3 convs of width·pieces maps (+ bias without BN, + BN's 2 per map), hidden, fc."""
    total = 0
    for w in widths:
        maps = w * pieces
        total += cin * 9 * maps + (2 * maps if bn else maps)
        cin = w
    if hidden:
        total += (cin + 1) * hidden * hidden_pieces
        cin = hidden
    return total + (cin + 1) * classes


@pytest.mark.parametrize("k", [2, 3, 5])
def test_unit_maxout_k_parameter_count_and_agreement_with_maxout_pieces(seed, k):
    kwargs = random_fitnet_kwargs()
    model = ZOO["fitnet"](7, 3, unit=f"maxout:{k}", **kwargs)
    assert sum(p.numel() for p in model.parameters()) == fitnet_params(
        kwargs["widths"], 3, 7, k, kwargs["batch_norm"], kwargs["hidden"], k)
    relu = ZOO["fitnet"](7, 3, unit="relu", **kwargs)
    assert sum(p.numel() for p in relu.parameters()) == fitnet_params(
        kwargs["widths"], 3, 7, 1, kwargs["batch_norm"], kwargs["hidden"], 1)
    torch.manual_seed(seed)
    a = ZOO["fitnet"](7, 3, unit=f"maxout:{k}", **kwargs).state_dict()
    torch.manual_seed(seed)
    b = ZOO["fitnet"](7, 3, maxout_pieces=k, **kwargs).state_dict()
    torch.manual_seed(seed)
    c = ZOO["fitnet"](7, 3, maxout_pieces=k, unit=f"maxout:{k}", **kwargs).state_dict()  # agreeing: fine
    assert all(torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]) for key in a)
    # the paper students: unit replaces their maxout default, and counts as maxout_pieces did
    assert sum(p.numel() for p in ZOO["fitnet2"](unit="relu").parameters()) == sum(
        p.numel() for p in ZOO["fitnet2"](maxout_pieces=1).parameters())
    assert sum(p.numel() for p in ZOO["fitnet2"](unit="maxout:2").parameters()) == sum(
        p.numel() for p in ZOO["fitnet2"]().parameters())


def test_conv_hint_paths_name_the_post_maxout_output(seed):
    model = ZOO["fitnet"](10, 3, widths=[6, 8, 10], pool_after=[2], unit="maxout:3", batch_norm=False).eval()
    x = torch.randn(2, 3, 12, 12)
    tap = FeatureTap(model, ["conv2", "conv3"], where="student hint")
    _, (f2, f3) = tap(x)
    h1 = model.conv1(x)
    pre2 = nn.functional.conv2d(h1, model.conv2[0].weight, model.conv2[0].bias, padding=1)  # 24 maps
    by_hand = nn.functional.max_pool2d(pre2.reshape(2, 8, 3, 12, 12).amax(dim=2), 2)  # max over each 3, pool
    torch.testing.assert_close(f2, by_hand)
    pre3 = nn.functional.conv2d(f2, model.conv3[0].weight, model.conv3[0].bias, padding=1)
    torch.testing.assert_close(f3, pre3.reshape(2, 10, 3, 6, 6).amax(dim=2))
    assert f2.shape == (2, 8, 6, 6) and f3.shape == (2, 10, 6, 6)


@pytest.mark.parametrize("kwargs, named", [
    ({"unit": "maxout:0"}, "maxout:0"), ({"unit": "maxout:1"}, "maxout:1"), ({"unit": "tanh"}, "tanh"),
    ({"unit": "maxout:2", "maxout_pieces": 3}, "disagree"), ({"init": "xavier"}, "xavier"),
    ({"init": "uniform:-0.1"}, "uniform:-0.1"), ({"init": "uniform"}, "'uniform'"), ({"init": "uniform:x"}, "uniform:x"),
])
def test_bad_values_are_errors_naming_the_keyword(kwargs, named):
    with pytest.raises(ZooArgumentError) as info:
        ZOO["fitnet"](**kwargs)
    message = str(info.value)
    assert "\n" not in message and named in message and next(iter(kwargs)) in message


def test_bad_init_from_the_command_line_is_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    done = run_cli("train", cfg, "student.kwargs.init=uniform:0", "--dry-run")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "init" in lines[0] and "uniform:0" in lines[0], done.stderr
