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

Each transform is a `ViewTransform`: the random view's parameters are drawn apart from applying
them, so stored teacher soft labels (`fitdist label`) can name the exact view they belong to.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

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


NO_VIEW = (0, 0, 0, 0, 0)  # the parameters of a transform that draws nothing


class ViewTransform:
    """A transform split into a deterministic part and a random view: `prepare` (resize / centre
    crop), `draw` (the view's parameters: top, left, height, width, flip) and `replay` (the view
    from given parameters). `__call__` is prepare -> draw -> replay.

    `draw` makes exactly the random calls torchvision v2's RandomResizedCrop / RandomCrop and
    RandomHorizontalFlip make, in the same order, so on the global RNG the ordinary path yields the
    very images the v2 pipeline did (tests/test_soft_labels_views.py). Stored soft labels
    (fitdist.data.label_writer) record the drawn parameters and the reader replays them.
    For `resized_crop` the box is in the image's own pixels, for `pad_crop` in the padded image's.
    """

    def __init__(self, augment: str, train: bool, size: int | None, native: tuple[int, int] | None):
        self.augment, self.train = augment, train
        pre: list = []
        resize_to = size if size and (native is None or tuple(native) != (size, size)) else None
        self.kind, self.out = "none", None
        if augment == "imagenet":
            side = size or 224
            self.out = (side, side)
            if train:
                self.kind, self.scale, self.ratio = "resized_crop", (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
                self.log_ratio = torch.log(torch.tensor(self.ratio))
            else:
                pre += [v2.Resize(round(side / 0.875), antialias=True), v2.CenterCrop(side)]
        else:
            if resize_to:  # fixed-size sets asked for another size: resize, then crop the centre
                pre += [v2.Resize(resize_to, antialias=True), v2.CenterCrop(resize_to)]
            crop = (resize_to, resize_to) if resize_to else (native[1], native[0]) if native else None
            if train and augment in ("cifar", "light") and crop:
                self.kind, self.out = "pad_crop", crop
                self.pad, self.padding_mode = (4, "constant") if augment == "cifar" else (2, "reflect")
        self.pre = v2.Compose(pre) if pre else _unchanged  # a named function: picklable for workers

    def spec(self) -> dict:
        """What a stored view's parameters mean: compared with the labels' manifest on reading."""
        out = {"augment": self.augment, "kind": self.kind, "out": list(self.out) if self.out else None,
               "prepare": repr(self.pre) if self.pre is not _unchanged else None}
        if self.kind == "resized_crop":
            out.update(scale=list(self.scale), ratio=list(self.ratio))
        if self.kind == "pad_crop":
            out.update(pad=self.pad, padding_mode=self.padding_mode)
        return out

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        return self.pre(image)

    def draw(self, image: torch.Tensor, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """The parameters of one random view of the prepared `image` (torch's RNG, or `generator`)."""
        if self.kind == "none":
            return NO_VIEW
        height, width = image.shape[-2:]
        g = generator
        if self.kind == "resized_crop":  # torchvision v2 RandomResizedCrop.make_params, call for call
            area = height * width
            for _ in range(10):
                target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g).item()
                aspect = torch.exp(torch.empty(1).uniform_(self.log_ratio[0], self.log_ratio[1], generator=g)).item()
                w = round(math.sqrt(target_area * aspect))
                h = round(math.sqrt(target_area / aspect))
                if 0 < w <= width and 0 < h <= height:
                    i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
                    j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
                    break
            else:  # fallback: the central crop
                in_ratio = float(width) / float(height)
                if in_ratio < min(self.ratio):
                    w, h = width, round(width / min(self.ratio))
                elif in_ratio > max(self.ratio):
                    h, w = height, round(height * max(self.ratio))
                else:
                    w, h = width, height
                i, j = (height - h) // 2, (width - w) // 2
        else:  # pad_crop: torchvision v2 RandomCrop.make_params with symmetric padding
            (h, w), ph, pw = self.out, height + 2 * self.pad, width + 2 * self.pad
            if ph < h or pw < w:
                raise ValueError(f"crop {self.out} larger than the padded image {(ph, pw)}")
            i = int(torch.randint(0, ph - h + 1, size=(), generator=g)) if ph > h else 0
            j = int(torch.randint(0, pw - w + 1, size=(), generator=g)) if pw > w else 0
        flip = bool(torch.rand(1, generator=g) < 0.5)  # v2 RandomHorizontalFlip: no flip if rand >= p
        return int(i), int(j), int(h), int(w), int(flip)

    def replay(self, image: torch.Tensor, params) -> torch.Tensor:
        """The view of the prepared `image` with the given parameters (uint8 in and out)."""
        if self.kind == "none":
            return image
        top, left, h, w, flip = (int(p) for p in params)
        if self.kind == "resized_crop":
            image = F.resized_crop(image, top, left, h, w, list(self.out), antialias=True)
        else:
            p = self.pad
            image = F.pad(image, [p, p, p, p], fill=0, padding_mode=self.padding_mode)
            image = F.crop(image, top, left, h, w)
        return F.horizontal_flip(image) if flip else image

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.prepare(image)
        return self.replay(image, self.draw(image))


def build_transform(
    augment: str, train: bool, size: int | None, native: tuple[int, int] | None
) -> ViewTransform:
    """uint8 image -> uint8 image of a fixed size (`size`, else the native size)."""
    return ViewTransform(augment, train, size, native)
