"""Tiny shards, a tiny random fitnet teacher and a KD config for the soft-label tests."""

from pathlib import Path

import torch
import yaml

from fitdist.config import ModelConfig
from fitdist.data.shard_writer import write_shards
from fitdist.data.sources import open_source
from fitdist.data.synthetic import write_fashion_mnist
from fitdist.models import build_model

TEACHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [8, 16], "pool_after": [1]}}
STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 8], "pool_after": [1]}}


def make_shards(root: Path, n_train: int = 37, n_test: int = 13, seed: int = 0) -> Path:
    """Fashion-MNIST-like shards of 10 samples (28×28 grey, 10 classes)."""
    src = write_fashion_mnist(root / "src", n_train, n_test)
    write_shards(open_source(f"fashion-mnist:{src}"), root / "shards", 10, progress=False, seed=seed)
    return root / "shards"


def make_teacher(path: Path, seed: int) -> Path:
    """A random fitnet teacher's weights file (exactness does not need a trained one)."""
    torch.manual_seed(seed)
    torch.save(build_model(ModelConfig(**TEACHER), 10, 1).state_dict(), path)
    return path


def write_cfg(path: Path, shards: Path, teacher: Path, labels: Path, **data) -> Path:
    cfg = {
        "name": path.stem,
        "student": STUDENT,
        "teacher": {**TEACHER, "weights": str(teacher)},
        "stages": [{"name": "kd", "steps": 2, "ce": 1.0, "kd": 1.0}],
        "loss": {"temperature": 2.0},
        "data": {"source": "webdataset", "root": str(shards), "augment": "light", "soft_labels": str(labels),
                 "shuffle_buffer": 16, **data},
        "train": {"batch_size": 8, "eval_batch_size": 16, "threads": 1, "log_every": 1},
        "run": {"dir": str(path.parent / path.stem)},
        "wandb": {"mode": "disabled"},
        "seed": 3,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
