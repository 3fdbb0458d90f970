"""Data for training and evaluation, chosen by the `data:` section of the config.

`build_data` returns a `DataBundle`: an endless, resumable per-rank training stream and a finite,
rank-sharded validation pass in which every sample is seen exactly once across ranks. Batches hold
uint8 images; `to_device` moves them to the device and normalises them there (one path for every
source, see fitdist.data.normalize).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fitdist.config import DataConfig
from fitdist.data.normalize import DeviceNormalize, move_images
from fitdist.errors import UserError

# (images, labels), and with `data.soft_labels` training batches add (top-k indices, top-k probabilities)
Batch = tuple[torch.Tensor, ...]


@dataclass
class DataBundle:
    train_batches: Callable[[int], Iterator[Batch]]  # (first global micro-batch index) -> batches
    val_batches: Callable[[], Iterator[Batch]]  # a fresh finite pass over this rank's share
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    num_val: int  # validation samples across all ranks
    class_names: list[str]
    metrics: Callable[[], dict[str, float]] = dict  # loader counters to log, e.g. {"data/skipped": 3}
    num_train: int | None = None  # training samples across all ranks (None: unknown)
    # (batch images, device) -> float images on the device, normalised; the real sources send
    # uint8 and normalise there (DeviceNormalize), synthetic float data is only moved
    to_device: Callable[[torch.Tensor, torch.device], torch.Tensor] = move_images
    soft_labels: dict | None = None  # the manifest of `data.soft_labels` (train batches then carry top-k)


def build_data(cfg: DataConfig, micro_batch: int, eval_batch: int, seed: int, rank: int = 0, world: int = 1) -> DataBundle:
    """The bundle for `cfg`; `micro_batch` and `eval_batch` are per rank."""
    if cfg.soft_labels and cfg.source != "webdataset":
        raise UserError(f"data.soft_labels: stored soft labels need data.source: webdataset, not {cfg.source!r}")
    if cfg.source == "fashion-mnist":
        return _fashion_mnist(cfg, micro_batch, eval_batch, seed, rank, world)
    if cfg.source == "webdataset":
        from fitdist.data.wds import build_webdataset

        return build_webdataset(cfg, micro_batch, eval_batch, seed, rank, world)
    raise UserError(f"data.source: unknown source {cfg.source!r}")


def _fashion_mnist(cfg: DataConfig, micro_batch: int, eval_batch: int, seed: int, rank: int, world: int) -> DataBundle:
    from fitdist.data import fashion_mnist as fm
    from fitdist.data.memory import MemoryDataset

    splits = fm.load_fashion_mnist(cfg.root, cfg.download)
    mean, std = cfg.mean or list(fm.MEAN), cfg.std or list(fm.STD)
    augment = "none" if cfg.augment == "auto" else cfg.augment
    if augment not in ("none", "light"):
        raise UserError(f"data.augment: {augment!r} is not available for in-memory Fashion-MNIST (none, light)")
    images, labels = splits["train"]
    if cfg.train_subset:
        images, labels = images[: cfg.train_subset], labels[: cfg.train_subset]
    train = MemoryDataset(images, labels, augment, seed)
    test = MemoryDataset(*splits["test"], "none", seed)
    num_classes = cfg.num_classes or len(fm.CLASSES)
    return DataBundle(
        train_batches=lambda start: train.train_batches(micro_batch, rank, world, start),
        val_batches=lambda: test.val_batches(eval_batch, rank, world),
        num_classes=num_classes,
        in_channels=1,
        image_size=(28, 28),
        num_val=len(test),
        num_train=len(train),
        class_names=list(fm.CLASSES),
        to_device=DeviceNormalize(mean, std),
    )
