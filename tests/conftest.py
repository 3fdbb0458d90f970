"""Shared fixtures: tiny real-data runs on Fashion-MNIST (the IDX files must be installed)."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from fp_accuracy import BASE_SEED

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TEACHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [16, 32, 32], "pool_after": [1, 2]}}
STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 4, 8, 8, 8], "pool_after": [2, 4]}}


def write_config(path: Path, **sections) -> Path:
    """A small Fashion-MNIST config, `sections` replacing the defaults below."""
    cfg = {
        "name": path.stem,
        "student": STUDENT,
        "stages": [{"name": "train", "steps": 20}],
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant"},
        "data": {"source": "fashion-mnist", "train_subset": 4096},
        "train": {"batch_size": 32, "log_every": 5, "eval_batch_size": 1000, "threads": 1},
        "run": {"dir": str(path.parent / path.stem)},
        "seed": 1,
    }
    cfg.update(sections)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _own_wandb_service_per_process(monkeypatch):
    """An in-process run leaves WANDB_SERVICE set; a CLI or torchrun child that inherited it would
    share that W&B service (a resumed run through it can hang), so each child starts its own."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitdist.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, check=False)


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory) -> Path:
    """A small teacher trained on real Fashion-MNIST; returns its student.pt."""
    from fitdist.config import load_config
    from fitdist.trainer import train

    root = tmp_path_factory.mktemp("teacher")
    cfg = write_config(root / "teacher.yaml", student=TEACHER, stages=[{"name": "train", "steps": 150}],
                       optim={"name": "adamw", "lr": 0.003, "schedule": "cosine"}, data={"source": "fashion-mnist"}, train={"batch_size": 64, "log_every": 50, "threads": 2})
    summary = train(load_config(cfg))
    assert summary["val/top1"] > 70.0, summary
    return root / "teacher" / "student.pt"


@pytest.fixture
def seed(request) -> int:
    """This run's seed for this test: fresh each run unless FITDIST_TEST_SEED fixes it (the
    kernel and loss tests compare with closed forms on fresh random inputs)."""
    s = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(s)
    print(f"reproduce with FITDIST_TEST_SEED={BASE_SEED} (torch.manual_seed({s}) in this test)")
    return s
