"""Small inputs in the real source formats, for tests and demos: Fashion-MNIST IDX files and CIFAR
python pickles whose images carry their own index (pixel (0,0) = i mod 256, pixel (0,1) =
i div 256), so a reader's output can be traced back to the exact source sample.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def indexed_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """`n` random uint8 images of `shape` (H, W[, C]) with the index written in two pixels."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    idx = np.arange(n)
    images[:, 0, 0, ...] = (idx % 256)[:, None] if len(shape) == 3 else idx % 256
    images[:, 0, 1, ...] = (idx // 256)[:, None] if len(shape) == 3 else idx // 256
    return images


def image_index(image: np.ndarray) -> int:
    """The index `indexed_images` wrote into `image` (H, W[, C] uint8)."""
    px = image.reshape(image.shape[0], image.shape[1], -1)
    return int(px[0, 0, 0]) + 256 * int(px[0, 1, 0])


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(directory: Path, n_train: int, n_test: int, gz: bool = True) -> Path:
    """The four Fashion-MNIST IDX files (28×28 grey, labels i mod 10) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        files = {
            f"{prefix}-images-idx3-ubyte": indexed_images(n, (28, 28), seed),
            f"{prefix}-labels-idx1-ubyte": np.arange(n) % 10,
        }
        for name, array in files.items():
            raw = _idx_bytes(array)
            if gz:
                (directory / (name + ".gz")).write_bytes(gzip.compress(raw, mtime=0))
            else:
                (directory / name).write_bytes(raw)
    return directory


def write_cifar(directory: Path, kind: str, n_train: int, n_test: int) -> Path:
    """CIFAR-10/100 python batches as the official archives unpack them (protocol-2 pickles
    with byte-string keys, `data` N×3072 uint8 in CHW order, labels i mod num_classes)."""
    ten = kind == "cifar10"
    num_classes = 10 if ten else 100
    sub = directory / ("cifar-10-batches-py" if ten else "cifar-100-python")
    sub.mkdir(parents=True, exist_ok=True)

    def batch(n: int, seed: int, offset: int) -> dict:
        images = indexed_images(n, (32, 32, 3), seed)
        labels = [(offset + i) % num_classes for i in range(n)]
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)
        key = b"labels" if ten else b"fine_labels"
        out = {
            b"batch_label": b"synthetic",
            key: labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if not ten:
            out[b"coarse_labels"] = [lab // 5 for lab in labels]
        return out

    def dump(name: str, obj: dict) -> None:
        (sub / name).write_bytes(pickle.dumps(obj, protocol=2))

    names = [f"class{i}".encode() for i in range(num_classes)]
    if ten:
        per = -(-n_train // 5)
        for b in range(5):
            lo, hi = b * per, min(n_train, (b + 1) * per)
            part = batch(n_train, 1, 0)
            dump(
                f"data_batch_{b + 1}",
                {k: (v[lo:hi] if k != b"batch_label" else v) for k, v in part.items()},
            )
        dump("test_batch", batch(n_test, 2, 0))
        dump("batches.meta", {b"label_names": names, b"num_cases_per_batch": per})
    else:
        dump("train", batch(n_train, 1, 0))
        dump("test", batch(n_test, 2, 0))
        dump("meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    return directory
