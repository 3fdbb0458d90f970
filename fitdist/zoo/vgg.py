"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2014) as used by CRD / RepDistiller.

Follows HobbitLong/RepDistiller `models/vgg.py` (the `*_bn` variants, which its model table uses
for `vgg8`..`vgg19`): five stages of 3×3 conv(bias)-BN-ReLU layers, 2×2 max-pooling after stages
0, 1 and 2 (not after stage 3 on 32×32 inputs: RepDistiller pools there only for 64×64 inputs),
global average pooling, and a single linear classifier (no VGG FC head).

Stage widths per model (`vgg8` is RepDistiller's configuration "S"):

    vgg8   [64] [128] [256] [512] [512]
    vgg11  [64] [128] [256, 256] [512, 512] [512, 512]
    vgg13  [64, 64] [128, 128] [256, 256] [512, 512] [512, 512]
    vgg16  [64, 64] [128, 128] [256, 256, 256] [512, 512, 512] [512, 512, 512]
    vgg19  [64, 64] [128, 128] [256] * 4 [512] * 4 [512] * 4

Differences from RepDistiller, none of which changes a parameter: each stage ends with its ReLU
(RepDistiller applies the last one outside the stage); the pre-ReLU map of a stage is its last
BN, `blockK.<index>`; pooling is adaptive and never depends on the input size; `in_channels` is a
parameter; `forward` returns logits only; no in-place ops.

Module paths for hints, with output shapes for a 3×32×32 input:

    block0   64 × 32 × 32   (post-ReLU)
    pool0    64 × 16 × 16
    block1  128 × 16 × 16
    pool1   128 ×  8 ×  8
    block2  256 ×  8 ×  8
    pool2   256 ×  4 ×  4
    block3  512 ×  4 ×  4
    block4  512 ×  4 ×  4
    avgpool 512 ×  1 ×  1
    classifier  num_classes
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fitdist.zoo._common import reject_unknown

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _stage(cin: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """Five conv-BN-ReLU stages (`block0`..`block4`), three 2×2 max-pools, GAP, linear."""

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.block0 = _stage(in_channels, cfg[0])
        self.pool0 = nn.MaxPool2d(2)
        self.block1 = _stage(cfg[0][-1], cfg[1])
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _stage(cfg[1][-1], cfg[2])
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _stage(cfg[2][-1], cfg[3])
        self.block4 = _stage(cfg[3][-1], cfg[4])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # RepDistiller's VGG init: He-normal (fan_out) convs, zero biases, N(0, 0.01) classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _factory(name: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        reject_unknown(name, kwargs, ())
        return CifarVGG(CONFIGS[name], num_classes=num_classes, in_channels=in_channels)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR {name} with BN, stages {CONFIGS[name]} (RepDistiller `{name}_bn`)."
    return factory


vgg8 = _factory("vgg8")
vgg11 = _factory("vgg11")
vgg13 = _factory("vgg13")
vgg16 = _factory("vgg16")
vgg19 = _factory("vgg19")

MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (vgg8, vgg11, vgg13, vgg16, vgg19)
}
