"""Fashion-MNIST from the standard IDX files (Xiao et al. 2017), found locally or downloaded.

Search order: the user-given directory (`data.root`) if set, else the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`), else torchvision's downloader
into `~/.cache/fitdist/fashion-mnist`. Files may be gzipped or not.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from fitdist.errors import UserError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("FITDIST_CACHE", Path.home() / ".cache" / "fitdist")) / "fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = (0.2860,), (0.3530,)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format) as a uint8 array; `.gz` is decompressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, file has {len(raw) - start} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _complete(directory: Path) -> bool:
    return all(_find(directory, f) for pair in FILES.values() for f in pair)


def locate(root: str | None, download: bool) -> Path:
    """The directory holding all four IDX files, downloading them as a last resort."""
    if root is not None:
        if _complete(Path(root)):
            return Path(root)
        if not download:
            raise UserError(f"data.root: no Fashion-MNIST IDX files in {root}")
    elif _complete(SYSTEM_DIR):
        return SYSTEM_DIR
    elif _complete(CACHE_DIR):
        return CACHE_DIR
    target = Path(root) if root is not None else CACHE_DIR
    if not download:
        raise UserError(f"Fashion-MNIST not found in {SYSTEM_DIR} or {CACHE_DIR}, and data.download is false")
    return _download(target)


def _download(target: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - any network/IO failure becomes one clear line
        raise UserError(
            f"Fashion-MNIST not found locally and the download into {target} failed ({type(e).__name__}); "
            f"install the Debian package dataset-fashion-mnist or set data.root"
        ) from None
    return target / "FashionMNIST" / "raw"


def load_fashion_mnist(root: str | None = None, download: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{"train": (images, labels), "test": ...}`: images uint8 `N×1×28×28`, labels int64 `N`."""
    directory = locate(root, download)
    out = {}
    for split, (img_name, lbl_name) in FILES.items():
        images = read_idx(_find(directory, img_name))
        labels = read_idx(_find(directory, lbl_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
        out[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return out
