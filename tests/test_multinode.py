"""A simulated two-node run: two `launch/torchrun.sh` launches (`--nnodes 2`, one process each) on
this machine meet at a c10d rendezvous on 127.0.0.1 and finish a short two-stage FitNets run, with
the learning rate scaled linearly by the world size."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from fitdist.config import ModelConfig
from fitdist.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TEACHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [16, 32, 32], "pool_after": [1, 2]}}
STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 4, 8, 8], "pool_after": [2], "batch_norm": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_at_a_c10d_rendezvous_and_finish_two_stages(tmp_path):
    torch.manual_seed(0)
    torch.save(build_model(ModelConfig(**TEACHER), 10, 1, where="teacher").state_dict(), tmp_path / "teacher.pt")
    config = tmp_path / "two-node.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 1, "student": STUDENT, "teacher": {**TEACHER, "weights": str(tmp_path / "teacher.pt")},
        "hints": [{"student": "conv3", "teacher": "conv2"}],
        "stages": [{"name": "hint", "steps": 4, "ce": 0, "hint": 1}, {"name": "kd", "steps": 4, "ce": 1, "kd": [4, 1]}],
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant", "scale_lr": "linear"},
        "data": {"source": "fashion-mnist", "train_subset": 2048},
        "train": {"batch_size": 16, "log_every": 2, "threads": 1, "eval_batch_size": 1000},
        "run": {"dir": str(tmp_path / "run")}, "strategy": {"kind": "ddp"},
    }))
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "NNODES": "2", "NPROC": "1", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
           "RDZV_ID": "fitdist-test", "LOCAL_ADDR": "127.0.0.1", "PYTHON": sys.executable,
           "WANDB_MODE": "offline", "MASTER_ADDR": "", "NODE_RANK": ""}
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), str(config)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    joined = "\n".join(outputs)
    assert "world size 2" in joined  # one process on each "node", one group
    assert "stage kd: lr 0.1 (optim.scale_lr=linear: 0.05 × world size 2)" in joined  # printed at start
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["val/n"] == 10000
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"hint", "kd"} and {r["lr"] for r in rows} == {0.1}
    student = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in student.values())
