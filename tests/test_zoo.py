"""The built-in model zoo: parameter counts against published numbers, shapes, hint paths, errors."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from fitdist.errors import UserError
from fitdist.zoo import PAPER_HINT_LAYERS, ZOO, ZooArgumentError
from fitdist.zoo.fitnet import Maxout

torch.set_num_threads(1)

# Extra keywords a name needs to build at all.
REQUIRED_KWARGS = {"wrn": {"depth": 16, "widen_factor": 2}}


def build(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ZOO[name](num_classes, in_channels, **{**REQUIRED_KWARGS.get(name, {}), **kwargs})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hooked_shapes(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """Output shape (without batch) of each module path, from one forward in eval mode."""
    shapes: dict[str, tuple] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda _m, _i, out, p=p: shapes.__setitem__(p, tuple(out.shape[1:]))
        )
        for p in paths
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return shapes


def test_zoo_names():
    assert sorted(ZOO) == sorted(
        ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
        + ["resnet8x4", "resnet32x4", "wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "wrn"]
        + ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]
        + ["fitnet", "fitnet1", "fitnet2", "fitnet3", "fitnet4", "fitnet-teacher-cifar10"]
    )


# Exact counts of our 100-class models (RepDistiller layouts, verified once against its code).
EXACT_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn-16-1": 180_916,
    "wrn-16-2": 703_284,
    "wrn-40-1": 569_780,
    "wrn-40-2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}

# Millions of parameters published in the CRD paper (Tian et al. 2020) for CIFAR-100.
CRD_MILLIONS = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn-40-2": 2.26,
    "wrn-16-2": 0.70,
    "wrn-40-1": 0.57,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "vgg13": 9.46,
    "vgg8": 3.96,
}


@pytest.mark.parametrize("name", sorted(EXACT_100))
def test_param_count_cifar100_exact(name):
    assert n_params(build(name, num_classes=100)) == EXACT_100[name]


@pytest.mark.parametrize("name", sorted(CRD_MILLIONS))
def test_param_count_matches_crd_paper(name):
    published = CRD_MILLIONS[name] * 1e6
    # CRD rounds to 0.01M: allow that rounding plus 1%.
    assert abs(n_params(build(name, num_classes=100)) - published) <= 0.01 * published + 5_000


def test_wrn_generic_equals_named():
    assert n_params(ZOO["wrn"](100, depth=40, widen_factor=2)) == EXACT_100["wrn-40-2"]


# FitNets paper (Romero et al. 2014), CIFAR-10: published params, and the exact weight count
# (biases excluded, as the authors' computeNumberParams.py counts) with 2 maxout pieces.
PAPER_PARAMS = {
    # name: (published, exact weights, relative tolerance on the total vs published)
    "fitnet1": (250_000, 249_576, 0.02),
    "fitnet2": (862_000, 861_928, 0.01),
    "fitnet3": (1_600_000, 1_503_304, 0.07),  # the paper's ~1.6M; its layer table gives 1.50M
    "fitnet4": (2_500_000, 2_544_712, 0.03),
    "fitnet-teacher-cifar10": (9_000_000, 9_044_360, 0.01),
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_count_fitnets_paper(name):
    published, weights, tol = PAPER_PARAMS[name]
    model = build(name)
    assert sum(p.numel() for p in model.parameters() if p.dim() > 1) == weights
    assert abs(n_params(model) - published) <= tol * published


def test_fitnet_relu_variant_halves_conv_weights():
    maxout, relu = build("fitnet4"), build("fitnet4", maxout_pieces=1)
    assert n_params(relu) == 1_276_806
    assert isinstance(relu.hidden[1], nn.ReLU) and relu.hidden[0].out_features == 500
    conv_w = [
        sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d))
        for net in (maxout, relu)
    ]
    assert conv_w[0] == 2 * conv_w[1]


def test_fitnet_hidden_pieces_5_like_released_yaml():
    assert n_params(build("fitnet4", hidden_pieces=5)) == n_params(build("fitnet4")) + 193_500


SHAPE_CASES = [(name, shape) for name in sorted(ZOO) for shape in ((3, 32, 32), (1, 28, 28))]


@pytest.mark.parametrize(("name", "shape"), SHAPE_CASES)
def test_output_shape(name, shape):
    rng = random.Random(f"{name}{shape}")
    num_classes = rng.randint(2, 200)
    kwargs = {"input_size": shape[1]} if name == "fitnet-teacher-cifar10" else {}
    model = build(name, num_classes=num_classes, in_channels=shape[0], **kwargs)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, *shape))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


# Documented hint paths (module docstrings) and their output shapes on 3×32×32 inputs.
HINT_SHAPES = {
    "resnet20": {
        "conv1": (16, 32, 32),
        "bn1": (16, 32, 32),
        "relu": (16, 32, 32),
        "layer1": (16, 32, 32),
        "layer2": (32, 16, 16),
        "layer3": (64, 8, 8),
        "layer1.2.bn2": (16, 32, 32),
        "avgpool": (64, 1, 1),
        "fc": (100,),
    },
    "resnet8x4": {
        "relu": (32, 32, 32),
        "layer1": (64, 32, 32),
        "layer2": (128, 16, 16),
        "layer3": (256, 8, 8),
        "avgpool": (256, 1, 1),
    },
    "resnet32x4": {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8)},
    "resnet110": {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)},
    "wrn-40-2": {
        "conv1": (16, 32, 32),
        "block1": (32, 32, 32),
        "block2": (64, 16, 16),
        "block3": (128, 8, 8),
        "bn": (128, 8, 8),
        "relu": (128, 8, 8),
        "avgpool": (128, 1, 1),
        "fc": (100,),
    },
    "wrn-16-2": {"block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8)},
    "wrn-16-1": {"block1": (16, 32, 32), "block2": (32, 16, 16), "block3": (64, 8, 8)},
    "vgg13": {
        "block0": (64, 32, 32),
        "pool0": (64, 16, 16),
        "block1": (128, 16, 16),
        "pool1": (128, 8, 8),
        "block2": (256, 8, 8),
        "pool2": (256, 4, 4),
        "block3": (512, 4, 4),
        "block4": (512, 4, 4),
        "avgpool": (512, 1, 1),
        "classifier": (100,),
    },
    "vgg8": {"block0": (64, 32, 32), "block1": (128, 16, 16), "block4": (512, 4, 4)},
    "fitnet1": {"conv3": (16, 16, 16), "conv6": (32, 8, 8), "conv9": (64, 8, 8), "pool": (64,)},
    "fitnet2": {"conv6": (80, 8, 8), "conv9": (128, 8, 8), "hidden": (500,), "fc": (100,)},
    "fitnet3": {"conv4": (64, 16, 16), "conv8": (80, 8, 8), "conv11": (128, 8, 8)},
    "fitnet4": {"conv5": (48, 16, 16), "conv11": (80, 8, 8), "conv17": (128, 8, 8)},
    "fitnet-teacher-cifar10": {
        "conv1": (96, 16, 16),
        "conv2": (192, 7, 7),
        "conv3": (192, 5, 5),
        "flatten": (4800,),
        "hidden": (500,),
    },
}


@pytest.mark.parametrize("name", sorted(HINT_SHAPES))
def test_documented_hint_paths_and_shapes(name):
    model = build(name, num_classes=100)
    expected = HINT_SHAPES[name]
    assert hooked_shapes(model, list(expected), torch.randn(2, 3, 32, 32)) == expected


def test_paper_hint_layers_sit_mid_network_with_paper_regressor_kernel():
    assert PAPER_HINT_LAYERS == {
        "fitnet1": "conv6",
        "fitnet2": "conv6",
        "fitnet3": "conv8",
        "fitnet4": "conv11",
        "fitnet-teacher-cifar10": "conv2",
    }
    x = torch.randn(2, 3, 32, 32)
    teacher = build("fitnet-teacher-cifar10")
    (hint,) = hooked_shapes(teacher, [PAPER_HINT_LAYERS["fitnet-teacher-cifar10"]], x).values()
    for student in ("fitnet1", "fitnet2", "fitnet3", "fitnet4"):
        path = PAPER_HINT_LAYERS[student]
        model = build(student)
        (guided,) = hooked_shapes(model, [path], x).values()
        pooled = [
            n
            for n, m in model.named_children()
            if isinstance(m, nn.Sequential) and isinstance(m[-1], nn.MaxPool2d)
        ]
        assert path == pooled[1]  # the middle: the end of the second of three stages
        assert guided[1] - hint[1] + 1 == 2  # N_g - N_h + 1: the paper's conv regressor kernel


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_module_runs_at_most_once(name):
    """A module reused within a forward would fire its hook twice and make its path ambiguous."""
    model = build(name)
    calls: dict[str, int] = {}
    for path, module in model.named_modules():
        module.register_forward_hook(
            lambda *_a, path=path: calls.__setitem__(path, calls.get(path, 0) + 1)
        )
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert calls and max(calls.values()) == 1, {p: c for p, c in calls.items() if c > 1}


def test_hooked_features_not_overwritten_in_place():
    """Features captured by hooks equal what the rest of the network then computes from them."""
    model = build("resnet20").eval()
    feats: dict[str, torch.Tensor] = {}
    for path in ("relu", "layer1.0.bn2", "layer1.0", "layer3"):
        model.get_submodule(path).register_forward_hook(
            lambda _m, _i, out, path=path: feats.__setitem__(path, out)
        )
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    block_out = torch.relu(feats["layer1.0.bn2"] + feats["relu"])
    torch.testing.assert_close(feats["layer1.0"], block_out)
    torch.testing.assert_close(model.fc(feats["layer3"].mean((2, 3))), logits)


def test_maxout_takes_max_of_consecutive_channels():
    x = torch.tensor([1.0, 5.0, -2.0, -3.0, 0.5, 0.25]).view(1, 6, 1, 1)
    assert Maxout(2)(x).flatten().tolist() == [5.0, -2.0, 0.5]
    assert Maxout(3)(x).flatten().tolist() == [5.0, 0.5]


def test_configurable_fitnet_honours_widths_and_pool_after():
    model = build("fitnet", widths=[8, 16, 24, 24], pool_after=[1, 3], batch_norm=True)
    names = [n for n, _ in model.named_children()]
    assert names == ["conv1", "conv2", "conv3", "conv4", "pool", "fc"]
    shapes = hooked_shapes(model, names[:4], torch.randn(2, 3, 32, 32))
    assert shapes == {
        "conv1": (8, 16, 16),
        "conv2": (16, 16, 16),
        "conv3": (24, 8, 8),
        "conv4": (24, 8, 8),
    }
    assert [type(m).__name__ for m in model.conv1] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert [type(m).__name__ for m in model.conv2] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert isinstance(model.pool[0], nn.AdaptiveAvgPool2d)
    assert model.fc.in_features == 24


def test_configurable_fitnet_options():
    model = build(
        "fitnet",
        num_classes=7,
        widths=[4, 6],
        pool_after=[],
        batch_norm=False,
        hidden=32,
        dropout=0.3,
        maxout_pieces=3,
        global_pool="max",
    )
    assert [n for n, _ in model.named_children()] == [
        "conv1",
        "conv2",
        "pool",
        "hidden",
        "dropout",
        "fc",
    ]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.conv1[0].out_channels == 12 and model.conv2[0].in_channels == 4
    assert isinstance(model.pool[0], nn.AdaptiveMaxPool2d)
    assert model.hidden[0].out_features == 96 and model.dropout.p == 0.3
    # conv: 3*12*9+12 + 4*18*9+18; hidden: 6*96+96; fc: 32*7+7
    assert n_params(model) == (336 + 666) + 672 + 231
    assert hooked_shapes(model, ["conv2"], torch.randn(2, 3, 32, 32)) == {"conv2": (6, 32, 32)}


BAD_KWARGS = [
    ("fitnet", {"widths": [8, 8, 8], "pool_after": [4]}, "pool_after"),
    ("fitnet", {"widths": [8, 8, 8], "pool_after": [0]}, "pool_after"),
    ("fitnet", {"widths": [8, 8], "pool_after": [1, 1]}, "pool_after"),
    ("fitnet", {"widths": []}, "widths"),
    ("fitnet", {"widths": [8, -1]}, "widths"),
    ("fitnet", {"hidden": -5}, "hidden"),
    ("fitnet", {"dropout": 1.5}, "dropout"),
    ("fitnet", {"global_pool": "mean"}, "global_pool"),
    ("fitnet", {"maxout_pieces": 0}, "maxout_pieces"),
    ("fitnet", {"widht": [8]}, "did you mean: widths"),
    ("fitnet1", {"widths": [8]}, "widths"),
    ("resnet20", {"depth": 32}, "depth"),
    ("vgg8", {"batch_norm": False}, "batch_norm"),
    ("wrn", {"depth": 17, "widen_factor": 1}, "depth"),
    ("wrn", {"depth": 16, "widen_factor": 0}, "widen_factor"),
    ("wrn-40-2", {"dropout": -0.1}, "dropout"),
    ("fitnet-teacher-cifar10", {"input_size": 4}, "input_size"),
]


@pytest.mark.parametrize(("name", "kwargs", "mentions"), BAD_KWARGS)
def test_bad_kwargs_raise_clear_error(name, kwargs, mentions):
    with pytest.raises(ZooArgumentError, match=mentions) as info:
        ZOO[name](10, 3, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert name.split("-")[0] in str(info.value)


def test_wrn_without_depth_is_an_error():
    with pytest.raises(ZooArgumentError, match="depth"):
        ZOO["wrn"](10, 3)
