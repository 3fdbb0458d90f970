"""Normalisation moved from the loader workers to the device gives today's values.

Before: workers ran torchvision's `ToDtype(float32, scale=True)` + `Normalize(mean, std)` after
the crops (WebDataset), or `(x.float() / 255 - mean) / std` (in-memory Fashion-MNIST), and sent
float32. Now they send uint8 and `DataBundle.to_device` normalises. Tolerance: the WebDataset
values are bit-for-bit equal (the same ops in the same order); the Fashion-MNIST ones differ by at
most one float32 rounding of the 0–1 value scaled by 1/std: 2⁻²³ / 0.3530 = 3.4e-7 absolute (a
division by 255 became a multiplication by 1/255, as torchvision does it; measured: 2.4e-7).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from fitdist.config import DataConfig
from fitdist.data import build_data
from fitdist.data.normalize import DeviceNormalize
from fitdist.data.transforms import MEAN_STD, build_transform

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dataset,augment,train,size,native",
    [
        ("imagefolder", "imagenet", True, 32, None),
        ("imagefolder", "imagenet", False, 32, None),
        ("cifar10", "cifar", True, None, (32, 32)),
        ("cifar100", "none", False, 24, (32, 32)),
        ("fashion-mnist", "none", False, None, (28, 28)),
    ],
)
def test_webdataset_images_equal_the_former_cpu_path_bit_for_bit(
    device, dataset, augment, train, size, native
):
    channels = 1 if dataset == "fashion-mnist" else 3
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (channels, 40 + i, 36), generator=g, dtype=torch.uint8)
              for i in range(6)]
    if native:
        images = [torch.randint(0, 256, (channels, native[1], native[0]), generator=g,
                                dtype=torch.uint8) for _ in range(6)]
    mean, std = MEAN_STD[dataset]
    transform = build_transform(augment, train, size, native)
    torch.manual_seed(0)
    cropped = [transform(im) for im in images]  # the workers' part, unchanged: uint8 in and out
    assert all(c.dtype == torch.uint8 for c in cropped)
    # the former tail of the same pipeline, on the CPU, per sample
    before = torch.stack([
        v2.Normalize(list(mean), list(std))(v2.ToDtype(torch.float32, scale=True)(c))
        for c in cropped
    ])
    after = DeviceNormalize(mean, std)(torch.stack(cropped), torch.device(device))
    assert after.dtype == torch.float32 and after.device.type == device
    assert torch.equal(after.cpu(), before)


@pytest.mark.parametrize("device", DEVICES)
def test_fashion_mnist_in_memory_within_one_rounding_of_the_former_values(tmp_path, device):
    from fitdist.data.synthetic import write_fashion_mnist

    write_fashion_mnist(tmp_path, 20, 10)
    b = build_data(DataConfig(root=str(tmp_path), augment="light"), 8, 10, 0)
    (x, _), (v, _) = next(b.train_batches(0)), next(b.val_batches())
    assert x.dtype == v.dtype == torch.uint8  # one path: every source sends uint8
    all_values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    for images in (x, v, all_values):
        before = (images.float() / 255.0 - 0.2860) / 0.3530  # MemoryDataset._normalise, before
        after = b.to_device(images, torch.device(device)).cpu()
        assert (after - before).abs().max() <= 2**-23 / 0.3530


def test_float_input_is_refused():
    with pytest.raises(TypeError, match="uint8"):
        DeviceNormalize((0.5,), (0.5,))(torch.zeros(1, 1, 2, 2), torch.device("cpu"))
