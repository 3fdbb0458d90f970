"""A node with NVIDIA GPUs that torch cannot use (driver older than the wheel's CUDA) stops with one
line naming the driver and torch's CUDA, instead of training on the CPU over gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this node's GPUs are usable")


def fake_gpu_node(tmp_path: Path) -> dict:
    """PATH with an `nvidia-smi` that reports an old driver, as on a node torch cannot use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 470.82.01\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline"}


def train(config: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitdist.cli", "train", str(config), *overrides], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_gpus_torch_cannot_use_stop_the_run_with_one_line(tmp_path):
    config = write_config(tmp_path / "gpu.yaml", stages=[{"name": "train", "steps": 2}])
    done = train(config, fake_gpu_node(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fitdist: error: train.device: auto"), done.stderr
    assert "470.82.01" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only") in lines[0]
    assert not (tmp_path / "gpu" / "metrics.jsonl").exists()  # nothing trained


def test_train_device_cpu_still_trains_on_such_a_node(tmp_path):
    config = write_config(tmp_path / "cpu.yaml", stages=[{"name": "train", "steps": 2}],
                          data={"source": "fashion-mnist", "train_subset": 256})
    done = train(config, fake_gpu_node(tmp_path), "train.device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cpu" / "student.pt").exists()


def test_cuda_asked_for_without_a_gpu_is_one_line_too(tmp_path):
    config = write_config(tmp_path / "cuda.yaml", stages=[{"name": "train", "steps": 2}])
    done = train(config, {**os.environ, "WANDB_MODE": "offline"}, "train.device=cuda")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "train.device: cuda" in done.stderr
