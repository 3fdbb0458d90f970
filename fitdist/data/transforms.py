"""Per-sample decode and torchvision v2 transforms for shard samples (uint8 `C×H×W` in and out).

The transforms only resize, crop and flip; they keep uint8, so workers send a quarter of the bytes
float32 would take, and the bundle normalises on the device (fitdist.data.normalize, with
`MEAN_STD` below). Every op here acts on uint8 exactly as it did before the normalisation moved.

Augmentations (`data.augment`):
- `imagenet`: RandomResizedCrop + horizontal flip for training; resize to `size/0.875` and
  centre-crop `size` for evaluation (the standard ImageNet recipe).
- `cifar`: 4-pixel zero-pad random crop + flip (the standard CIFAR recipe).
- `light`: 2-pixel reflect-pad random crop + flip (as the in-memory Fashion-MNIST stream).
- `none`: no augmentation.
`auto` picks by dataset: fashion-mnist -> none, cifar10/100 -> cifar, imagefolder -> imagenet.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

AUTO_AUGMENT = {
    "fashion-mnist": "none",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "imagefolder": "imagenet",
}
MEAN_STD = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
}
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # sample fields that hold an encoded image


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded PNG/JPEG/WebP bytes as uint8 `C×H×W`, forced to `channels` (1 grey, 3 RGB).

    Pillow (libjpeg-turbo), as torchvision's ImageFolder loader: the benchmark compares like with
    like, and torchvision.io's decoders are deprecated from torchvision 0.29.
    """
    with Image.open(io.BytesIO(data)) as im:
        array = np.array(im.convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)


def _unchanged(image: torch.Tensor) -> torch.Tensor:
    return image


def build_transform(
    augment: str, train: bool, size: int | None, native: tuple[int, int] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image -> uint8 image of a fixed size (`size`, else the native size)."""
    ops: list = []
    resize_to = size if size and (native is None or tuple(native) != (size, size)) else None
    if augment == "imagenet":
        side = size or 224
        ops += (
            [v2.RandomResizedCrop(side, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(round(side / 0.875), antialias=True), v2.CenterCrop(side)]
        )
    else:
        if resize_to:  # fixed-size sets asked for another size: resize, then crop the centre
            ops += [v2.Resize(resize_to, antialias=True), v2.CenterCrop(resize_to)]
        crop = (resize_to, resize_to) if resize_to else (native[1], native[0]) if native else None
        if train and augment in ("cifar", "light") and crop:
            pad, fill_mode = (4, "constant") if augment == "cifar" else (2, "reflect")
            ops += [
                v2.RandomCrop(crop, padding=pad, padding_mode=fill_mode),
                v2.RandomHorizontalFlip(),
            ]
    return v2.Compose(ops) if ops else _unchanged  # a named function: picklable for workers
