"""In-memory datasets for small sets (Fashion-MNIST): a reproducible, resumable batch stream.

The training order is a pure function of (seed, sample index): epoch `e` is a permutation drawn
from a generator seeded with `(seed, e)`, and global micro-batch `m` covers samples
`[m·B, (m+1)·B)` of that endless sequence, rank `r` taking its `r`-th slice. So a run resumed at
micro-batch `m` sees exactly the samples an uninterrupted run would, and a 2-rank run sees the
same global batches as a 1-rank run.

Batches hold uint8 images, as every source's do: the bundle's `to_device` normalises them on the
device (fitdist.data.normalize). Padding, cropping and flipping only move pixels, so applying them
before normalisation gives the values applying them after did.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


class MemoryDataset:
    """uint8 images `N×C×H×W` and int64 labels; batches stay uint8."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: str, seed: int):
        self.images, self.labels = images, labels
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)

    def _indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices at positions `[start, start+count)` of the endless shuffled sequence."""
        n, out, pos = len(self), [], start
        while pos < start + count:
            epoch, offset = divmod(pos, n)
            order = self._epoch_order(epoch)  # cheap next to a step; keeps the stream stateless
            take = min(n - offset, start + count - pos)
            out.append(order[offset : offset + take])
            pos += take
        return torch.cat(out)

    def train_batches(self, batch: int, rank: int, world: int, start_microbatch: int = 0) -> Iterator[Batch]:
        """Endless per-rank micro-batches of size `batch`, from global micro-batch `start_microbatch`."""
        m = start_microbatch
        while True:
            idx = self._indices(m * batch * world + rank * batch, batch)
            images = self.images[idx]
            if self.augment == "light":
                images = _pad_crop_flip(images, torch.Generator().manual_seed(self.seed * 7919 + m * world + rank))
            yield images, self.labels[idx]
            m += 1

    def val_batches(self, batch: int, rank: int, world: int) -> Iterator[Batch]:
        """Finite batches; rank `r` takes samples `r, r+world, ...`: every sample exactly once overall."""
        idx = torch.arange(rank, len(self), world)
        for chunk in idx.split(batch):
            yield self.images[chunk], self.labels[chunk]


def _pad_crop_flip(images: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random `pad`-pixel translation and horizontal flip, per sample, reproducible from `g`."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    out[flip] = out[flip].flip(-1)
    return out
