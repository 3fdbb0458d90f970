"""DeepSpeed on CPU (`DS_ACCELERATOR=cpu`, gloo, loopback): config fields, ZeRO-2 on two processes
(trains, ranks identical, equals one process, saves, resumes exactly) and bf16 on one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fitdist.config import ModelConfig, TrainConfig, load_config
from fitdist.errors import UserError
from fitdist.models import build_model
from fitdist.strategy_deepspeed import deepspeed_config
from fitdist.trainer import train

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
TEACHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [16, 32, 32], "pool_after": [1, 2]}}
STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 4, 8, 8], "pool_after": [2], "batch_norm": False}}


def test_batch_precision_and_clipping_fields_are_written_from_fitdist_config():
    train_cfg = TrainConfig(batch_size=64, grad_accum=2)
    out = deepspeed_config({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}, train_cfg, "bf16", 4, 1.0)
    assert out["train_batch_size"] == 64 and out["gradient_accumulation_steps"] == 2
    assert out["train_micro_batch_size_per_gpu"] == 8  # 64 / (2 × 4)
    assert out["bf16"]["enabled"] and not out["fp16"]["enabled"] and out["gradient_clipping"] == 1.0
    for bad in ({"train_batch_size": 32}, {"gradient_accumulation_steps": 4}, {"bf16": {"enabled": False}},
                {"optimizer": {"type": "Adam"}}, {"zero_optimization": {"stage": 3}}):
        with pytest.raises(UserError):
            deepspeed_config(bad, train_cfg, "bf16", 4, 1.0)


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    """Two-stage FitNets (hint, then KD with λ 4→1) with a random teacher: the mechanics, not accuracy."""
    root = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(**TEACHER), 10, 1, where="teacher")
    torch.save(teacher.state_dict(), root / "teacher.pt")
    cfg = {
        "name": "ds", "seed": 1, "student": STUDENT, "teacher": {**TEACHER, "weights": str(root / "teacher.pt")},
        "hints": [{"student": "conv3", "teacher": "conv2"}],
        "stages": [{"name": "hint", "steps": 4, "ce": 0, "hint": 1}, {"name": "kd", "steps": 6, "ce": 1, "kd": [4, 1]}],
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "cosine"},
        "data": {"source": "fashion-mnist", "train_subset": 2048},
        "train": {"batch_size": 16, "grad_accum": 2, "log_every": 2, "threads": 1, "eval_batch_size": 1000,
                  "checkpoint_every": 3},
        "run": {"keep_checkpoints": 10},
        "strategy": {"kind": "deepspeed", "deepspeed_config": str(ZERO2)},
    }
    path = root / "ds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, out: Path, *overrides: str) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(config), str(out), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_zero2_two_processes_trains_saves_and_resumes(ds_config, tmp_path):
    a = tmp_path / "a"
    first = torchrun(ds_config, tmp_path / "a.json", f"run.dir={a}")
    assert first["world"] == 2 and first["mismatched"] == []  # regressors included
    assert first["summary"]["steps"] == 10 and first["summary"]["val/n"] == 10000
    # each rank saved its own ZeRO-2 optimizer partition; fitdist's checkpoint names the tag
    tag = a / "deepspeed" / "step-00000006"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    trainer = load(a / "checkpoints" / "step-00000006" / "trainer.pt")
    assert trainer["optimizer"] == {"deepspeed_tag": "step-00000006"}

    # same global batch in one process without DeepSpeed: the same student (no BatchNorm)
    single = tmp_path / "single"
    train(load_config(ds_config, ["strategy.kind=single", f"run.dir={single}"]))
    two, one = load(a / "student.pt"), load(single / "student.pt")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)

    # a crash after step 6 (mid KD stage): resume from that checkpoint and end exactly where `a` ended
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for gone in ("checkpoints/step-00000009", "checkpoints/step-00000010", "student.pt", "summary.json"):
        shutil.rmtree(b / gone, ignore_errors=True) if (b / gone).is_dir() else (b / gone).unlink()
    resumed = torchrun(ds_config, tmp_path / "b.json", f"run.dir={b}", "run.resume=auto")
    assert resumed["mismatched"] == [] and resumed["summary"]["steps"] == 10
    for k, v in load(a / "student.pt").items():
        torch.testing.assert_close(load(b / "student.pt")[k], v, rtol=0, atol=1e-7)


def test_bf16_one_process_exports_fp32_student(ds_config, tmp_path):
    """One process, no launcher (a 1-process group); bf16 master weights come back as fp32."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    summary = train(load_config(ds_config, ["train.precision=bf16", f"run.dir={tmp_path / 'bf16'}"]))
    assert summary["steps"] == 10
    state = load(tmp_path / "bf16" / "student.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
