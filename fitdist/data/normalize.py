"""Images to the device: uint8 batches cross from the loader workers, normalisation runs there.

Workers send uint8 `B×C×H×W` batches: a quarter of the bytes of float32 through shared memory,
pinned memory and the host-to-device copy (an eval batch of 512 ImageNet images is ~77 MB
instead of ~308 MB). `DeviceNormalize` then applies, on the device, exactly the operations
torchvision's `ToDtype(float32, scale=True)` + `Normalize(mean, std)` apply on the CPU:
`x.float() * (1/255)`, `- mean`, `/ std`, each rounded to float32 in the same order, so the values
are the ones the CPU path gave (bitwise on CPU; elementwise IEEE float32 ops on a GPU round alike).

No host synchronisation: the copy is `non_blocking` and the ops are queued on the device; only the
first call per device copies mean and std there (a few floats, once).
"""

from __future__ import annotations

import torch


def move_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images already in float (synthetic and probe data): only moved."""
    return images.to(device, non_blocking=True)


class DeviceNormalize:
    """`(uint8 images, device) -> float32 images`, `(x / 255 - mean) / std` per channel."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        if images.dtype != torch.uint8:  # a dtype is host metadata: checking it never syncs
            raise TypeError(f"DeviceNormalize expects uint8 images, got {images.dtype}")
        x = images.to(device, non_blocking=True)
        stats = self._on.get(x.device)
        if stats is None:
            stats = self._on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = stats
        # the order and constants of torchvision's to_dtype_image and normalize_image
        return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
