"""CIFAR-style ResNets (He et al. 2016, section 4.2) as used by CRD / RepDistiller.

Same layout and widths as HobbitLong/RepDistiller `models/resnet.py`, so parameter counts and
published CIFAR-100 numbers carry over: a 3×3 stem, three stages of `n = (depth − 2) / 6`
BasicBlocks, global average pooling, one linear layer. Shortcuts that change shape are 1×1
conv + BN (option B), as in RepDistiller. `resnet8x4` / `resnet32x4` use widths ×4 in the stem
and ×4, ×4, ×4 in the stages ([32, 64, 128, 256] instead of [16, 16, 32, 64]).

Differences from RepDistiller, none of which changes a parameter: `in_channels` is a parameter;
pooling is adaptive (any input size works, e.g. 1×28×28 Fashion-MNIST); `forward` returns logits
only (features are taken with forward hooks); no in-place ops, so a hooked output is never
overwritten later in the forward pass.

Module paths for hints, with output shapes for a 3×32×32 input (`w` = [16, 16, 32, 64], or
[32, 64, 128, 256] for the x4 models):

    conv1, bn1, relu   w0 × 32 × 32   (stem; `relu` is the post-activation stem output)
    layer1             w1 × 32 × 32   (post-ReLU output of the last block of the stage)
    layer2             w2 × 16 × 16
    layer3             w3 ×  8 ×  8
    avgpool            w3 ×  1 ×  1
    fc                 num_classes
    layerK.i           block i of stage K (its `bn2` is the pre-residual, pre-ReLU map)

Every module runs at most once per forward pass, so a forward hook on any path fires once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fitdist.zoo._common import ZooArgumentError, init_weights, reject_unknown

THIN_WIDTHS = (16, 16, 32, 64)
WIDE_WIDTHS = (32, 64, 128, 256)  # the "x4" models


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut; ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        # Separate ReLU modules: a module called twice per forward would fire its hooks twice.
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)  # not `out += ...`: bn2's hooked output must stay intact


class CifarResNet(nn.Module):
    """ResNet-`depth` for small images; `depth = 6n + 2`, `widths` = (stem, stage1..3)."""

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = THIN_WIDTHS,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ZooArgumentError(f"cifar resnet: depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride)]
        layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _factory(name: str, depth: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        reject_unknown(name, kwargs, ())
        return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, widths {list(widths)} (RepDistiller `{name}`)."
    return factory


resnet8 = _factory("resnet8", 8, THIN_WIDTHS)
resnet14 = _factory("resnet14", 14, THIN_WIDTHS)
resnet20 = _factory("resnet20", 20, THIN_WIDTHS)
resnet32 = _factory("resnet32", 32, THIN_WIDTHS)
resnet44 = _factory("resnet44", 44, THIN_WIDTHS)
resnet56 = _factory("resnet56", 56, THIN_WIDTHS)
resnet110 = _factory("resnet110", 110, THIN_WIDTHS)
resnet8x4 = _factory("resnet8x4", 8, WIDE_WIDTHS)
resnet32x4 = _factory("resnet32x4", 32, WIDE_WIDTHS)

MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (
        resnet8,
        resnet14,
        resnet20,
        resnet32,
        resnet44,
        resnet56,
        resnet110,
        resnet8x4,
        resnet32x4,
    )
}
