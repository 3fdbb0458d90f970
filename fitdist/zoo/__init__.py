"""Built-in model zoo: the CIFAR-scale architectures torchvision lacks.

Every factory is `factory(num_classes=10, in_channels=3, **kwargs) -> nn.Module`; unknown keywords
raise `ZooArgumentError` (a `UserError` and a `ValueError`). Models return logits only; hint
features are taken with forward hooks on the module paths each file's docstring lists. Pooling
before the classifier is global, so 1×28×28 and 3×32×32 inputs both work (the FitNets teacher
needs `input_size=` for non-32 inputs).

    resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 resnet8x4 resnet32x4
        CIFAR ResNets as in CRD/RepDistiller (cifar_resnet.py); hints: layer1..layer3
    wrn-16-1 wrn-16-2 wrn-40-1 wrn-40-2, wrn (depth=, widen_factor=)
        Wide ResNets as in CRD/RepDistiller (wrn.py); hints: block1..block3
    vgg8 vgg11 vgg13 vgg16 vgg19
        CIFAR VGG with BN as in CRD/RepDistiller (vgg.py); hints: block0..block4
    fitnet
        configurable thin deep CNN, layers conv1..convN (fitnet.py)
    fitnet1 fitnet2 fitnet3 fitnet4 fitnet-teacher-cifar10
        the FitNets paper's CIFAR-10 students and maxout teacher (fitnet.py);
        guided/hint layers in PAPER_HINT_LAYERS
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fitdist.zoo import cifar_resnet, fitnet, vgg, wrn
from fitdist.zoo._common import ZooArgumentError
from fitdist.zoo.fitnet import PAPER_HINT_LAYERS

ZOO: dict[str, Callable[..., nn.Module]] = {
    **cifar_resnet.MODELS,
    **wrn.MODELS,
    **vgg.MODELS,
    **fitnet.MODELS,
}

__all__ = ["PAPER_HINT_LAYERS", "ZOO", "ZooArgumentError"]
