"""Forward hooks on module paths: equal to a manual sub-forward, truncation, clear errors."""

import pytest
import torch
from torch import nn

from fitdist.errors import UserError
from fitdist.features import FeatureTap
from fitdist.zoo import ZOO


def manual_resnet_layer2(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))


def test_hooked_features_equal_a_manual_sub_forward():
    torch.manual_seed(0)
    model = ZOO["resnet8"](num_classes=7, in_channels=3).eval()
    x = torch.randn(3, 3, 32, 32)
    tap = FeatureTap(model, ["layer2", "layer1"], where="test")
    logits, (f2, f1) = tap(x)
    with torch.no_grad():
        torch.testing.assert_close(f2, manual_resnet_layer2(model, x), rtol=0, atol=0)
        torch.testing.assert_close(f1, model.layer1(model.relu(model.bn1(model.conv1(x)))), rtol=0, atol=0)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)


def _record_children(model: nn.Module) -> list[str]:
    ran = []
    for name, m in model.named_children():
        m.register_forward_hook(lambda *a, n=name: ran.append(n))
    return ran


def test_truncated_forward_stops_after_the_last_tap_without_any_probe():
    model = ZOO["fitnet"](num_classes=10, in_channels=1, widths=[4, 4, 8, 8], pool_after=[2])
    ran = _record_children(model)
    tap = FeatureTap(model, ["conv2"], where="test")  # a fresh tap, called as a user would
    logits, (feat,) = tap(torch.randn(2, 1, 28, 28), stop_early=True)
    assert logits is None and feat.shape == (2, 4, 14, 14)
    assert ran == ["conv1", "conv2"]  # conv3, conv4, pool and fc never ran
    ran.clear()
    logits, _ = tap(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and "fc" in ran


def test_cut_falls_after_whichever_tap_runs_last_whatever_the_listed_order():
    model = ZOO["fitnet"](num_classes=10, in_channels=1, widths=[4, 4, 8, 8], pool_after=[2])
    ran = _record_children(model)
    x = torch.randn(3, 1, 28, 28)
    _, (f3, f1) = FeatureTap(model, ["conv3", "conv1"], where="test")(x, stop_early=True)
    assert ran == ["conv1", "conv2", "conv3"]
    with torch.no_grad():
        torch.testing.assert_close(f1, model.conv1(x), rtol=0, atol=0)
        torch.testing.assert_close(f3, model.conv3(model.conv2(model.conv1(x))), rtol=0, atol=0)


class SharedBlock(nn.Module):
    """One module run twice in a forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.block(x))))


def test_a_module_run_twice_gives_its_first_output_cut_or_not():
    model, x = SharedBlock(), torch.randn(5, 4)
    tap = FeatureTap(model, ["block"], where="test")
    _, (whole,) = tap(x)
    logits, (cut,) = tap(x, stop_early=True)
    assert logits is None
    torch.testing.assert_close(whole, model.block(x), rtol=0, atol=0)
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)


def test_hooks_are_inert_outside_a_tap_call():
    model = ZOO["fitnet"](num_classes=10, in_channels=1, widths=[4, 4], pool_after=[1])
    tap = FeatureTap(model, ["conv2"], where="test")
    tap(torch.randn(1, 1, 28, 28), stop_early=True)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # no StopForward leaks out
    tap.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_missing_path_names_the_nearest_valid_paths():
    model = ZOO["resnet8"](num_classes=10)
    with pytest.raises(UserError, match=r"no module 'layr2'.*did you mean: layer2"):
        FeatureTap(model, ["layr2"], where="student hint")


class SkipsABranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_path_that_never_runs_is_an_error_listing_modules_that_do():
    tap = FeatureTap(SkipsABranch(), ["unused"], where="teacher hint")
    with pytest.raises(UserError, match=r"'unused' exists but never runs.*did you mean"):
        tap.probe(torch.randn(2, 4))
