"""Datasets `fitdist shard` can read: `fashion-mnist[:DIR]`, `cifar10:DIR`, `cifar100:DIR`,
`imagefolder:DIR`.

A `Source` gives, per split (`train`, `test`), a stable order of samples: a stable key, a label
and an item (a uint8 array for the array datasets, a file path for image folders). The order and
keys depend only on the input, so the same input always gives the same shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from fitdist.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder would read
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_FORMS = "fashion-mnist[:DIR], cifar10:DIR, cifar100:DIR or imagefolder:DIR"


@dataclass
class ArraySplit:
    """uint8 images `N×H×W` (grey) or `N×H×W×3` (RGB) with integer labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str:
        return f"{self.name}-{i:06d}"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def item(self, i: int) -> np.ndarray:
        return self.images[i]


@dataclass
class FileSplit:
    """Image files (absolute paths) with labels and keys derived from their relative paths."""

    name: str
    files: list[tuple[str, str, int]]  # (absolute path, key, label)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i][1]

    def label(self, i: int) -> int:
        return self.files[i][2]

    def item(self, i: int) -> str:
        return self.files[i][0]


@dataclass
class Source:
    dataset: str  # fashion-mnist | cifar10 | cifar100 | imagefolder
    spec: str  # what the user typed
    classes: list[str]
    mode: str  # "L" (grey) or "RGB"
    checksum: str  # sha256 of the source files (image folders: of the file list and sizes)
    splits: dict[str, ArraySplit | FileSplit] = field(default_factory=dict)


def open_source(spec: str) -> Source:
    """The `Source` for a command-line `SOURCE` argument; a UserError names what is wrong."""
    kind, _, directory = spec.partition(":")
    if kind == "fashion-mnist":
        return _fashion_mnist(spec, directory or None)
    if kind in ("cifar10", "cifar100", "imagefolder") and not directory:
        raise UserError(f"source {spec!r}: give the directory, as in {kind}:DIR")
    if kind in ("cifar10", "cifar100"):
        return _cifar(spec, kind, Path(directory))
    if kind == "imagefolder":
        return _imagefolder(spec, Path(directory))
    raise UserError(f"unknown source {spec!r}: expected {SOURCE_FORMS}")


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)


def _fashion_mnist(spec: str, directory: str | None) -> Source:
    from fitdist.data import fashion_mnist as fm

    found = fm.locate(directory, download=directory is None)
    splits = fm.load_fashion_mnist(str(found), download=False)
    files = [
        p
        for pair in fm.FILES.values()
        for stem in pair
        for p in (found / stem, found / (stem + ".gz"))
        if p.is_file()
    ]
    return Source(
        dataset="fashion-mnist",
        spec=spec,
        classes=list(fm.CLASSES),
        mode="L",
        checksum=_sha256_files(files),
        splits={
            name: ArraySplit(name, images[:, 0].numpy(), labels.numpy())
            for name, (images, labels) in splits.items()
        },
    )


# ---------------------------------------------------------------- CIFAR (python pickle batches)


class _CifarUnpickler(pickle.Unpickler):
    """Only what the CIFAR batches contain (dicts, lists, bytes, numpy arrays): a crafted pickle
    cannot run code."""

    ALLOWED: ClassVar = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"missing CIFAR batch file {path}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable pickle is one clear line
        raise UserError(f"cannot read CIFAR batch {path}: {e}") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar(spec: str, kind: str, directory: Path) -> Source:
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if (directory / sub).is_dir():
        directory = directory / sub
    if kind == "cifar10":
        train_files = [directory / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = (
            [directory / "test_batch"],
            directory / "batches.meta",
            "labels",
            "label_names",
        )
    else:
        train_files, test_files, meta_file, label_key, names_key = (
            [directory / "train"],
            [directory / "test"],
            directory / "meta",
            "fine_labels",
            "fine_label_names",
        )
    for p in [*train_files, *test_files, meta_file]:
        if not p.is_file():
            raise UserError(f"{spec}: missing {p} (expected the python version of {kind})")
    classes = [
        c.decode() if isinstance(c, bytes) else str(c) for c in _load_batch(meta_file)[names_key]
    ]
    splits = {}
    for name, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for p in files:
            b = _load_batch(p)
            data, lab = np.asarray(b.get("data")), b.get(label_key)
            if data.ndim != 2 or data.shape[1] != 3072 or lab is None or len(lab) != len(data):
                raise UserError(f"{p}: expected 'data' N×3072 and {len(data)} '{label_key}'")
            images.append(data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(lab, dtype=np.int64))
        lab = np.concatenate(labels)
        if lab.min() < 0 or lab.max() >= len(classes):
            raise UserError(f"{spec}: labels outside 0..{len(classes) - 1}")
        splits[name] = ArraySplit(name, np.ascontiguousarray(np.concatenate(images)), lab)
    return Source(
        dataset=kind,
        spec=spec,
        classes=classes,
        mode="RGB",
        checksum=_sha256_files([*train_files, *test_files, meta_file]),
        splits=splits,
    )


# ---------------------------------------------------------------- ImageNet-style folders


def _list_classes(directory: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )


def _imagefolder(spec: str, root: Path) -> Source:
    if not root.is_dir():
        raise UserError(f"{spec}: {root} is not a directory")
    val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise UserError(
            f"{spec}: expected {root}/train and {root}/val, each with one folder per class"
        )
    classes = _list_classes(root / "train")
    if not classes:
        raise UserError(f"{spec}: no class folders in {root / 'train'}")
    index = {c: i for i, c in enumerate(classes)}
    listing = hashlib.sha256()
    splits = {}
    for name, directory in (("train", root / "train"), ("test", val_dir)):
        files, keys = [], {}
        for cls in _list_classes(directory):
            if cls not in index:
                raise UserError(
                    f"{spec}: class folder {directory / cls} has no counterpart in {root / 'train'}"
                )
            for entry in sorted(os.scandir(directory / cls), key=lambda e: e.name):
                if not entry.is_file() or not entry.name.lower().endswith(IMG_EXTENSIONS):
                    continue
                stem = entry.name.rsplit(".", 1)[0].replace(".", "_")  # a dot would split the key
                key = f"{cls.replace('.', '_')}/{stem}"
                if key in keys:
                    raise UserError(
                        f"{spec}: {entry.path} and {keys[key]} map to the same key {key!r}"
                    )
                keys[key] = entry.path
                files.append((entry.path, key, index[cls]))
                listing.update(f"{name}\t{cls}/{entry.name}\t{entry.stat().st_size}\n".encode())
        if not files:
            raise UserError(f"{spec}: no images in {directory}")
        splits[name] = FileSplit(name, files)
    return Source(
        dataset="imagefolder",
        spec=spec,
        classes=classes,
        mode="RGB",
        checksum=listing.hexdigest(),
        splits=splits,
    )
