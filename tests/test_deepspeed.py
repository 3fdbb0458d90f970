"""DeepSpeed on CPU (`DS_ACCELERATOR=cpu`, gloo, loopback): config fields, ZeRO-2 on two processes
(trains, ranks identical, equals one process, saves, resumes exactly, refuses a file that would run
code) and bf16 on one process."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.serialization import get_unsafe_globals_in_checkpoint

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


def test_other_deepspeed_checkpoint_writers_are_refused():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported here
    from deepspeed.runtime.checkpoint_engine import FastCheckpointEngine

    from fitdist.deepspeed_files import install

    engine = SimpleNamespace(checkpoint_engine=object.__new__(FastCheckpointEngine))  # as from the JSON
    with pytest.raises(UserError, match="FastCheckpointEngine is not supported"):
        install(engine)


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
    result = launch(str(WORKER), str(config), str(out), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def launch(*args: str, monitor: float = 0.1) -> subprocess.CompletedProcess:
    """Two processes under torchrun (`monitor`: seconds between its checks of the workers)."""
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", str(monitor), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def zero2_run(ds_config, tmp_path_factory) -> tuple[Path, dict]:
    """A finished two-process ZeRO-2 run: its directory and the worker's report."""
    root = tmp_path_factory.mktemp("zero2")
    return root / "a", torchrun(ds_config, root / "a.json", f"run.dir={root / 'a'}")


def crashed_after_step_6(run: Path, into: Path) -> Path:
    """A copy of `run` as a crash after step 6 (mid KD stage) would have left it."""
    shutil.copytree(run, into)
    for gone in ("checkpoints/step-00000009", "checkpoints/step-00000010", "student.pt", "summary.json"):
        shutil.rmtree(into / gone, ignore_errors=True) if (into / gone).is_dir() else (into / gone).unlink()
    return into


def test_zero2_two_processes_trains_saves_and_resumes(ds_config, zero2_run, tmp_path):
    a, first = zero2_run
    assert first["world"] == 2 and first["mismatched"] == []  # regressors included
    assert first["summary"]["steps"] == 10 and first["summary"]["val/n"] == 10000
    # each rank saved its own ZeRO-2 optimizer partition; fitdist's checkpoint names the tag
    tag = a / "deepspeed" / "step-00000006"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    trainer = load(a / "checkpoints" / "step-00000006" / "trainer.pt")
    assert trainer["optimizer"] == {"deepspeed_tag": "step-00000006"}
    # DeepSpeed's files hold non-tensor types: exactly ones the weights_only allowlist names
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported here
    from fitdist.deepspeed_files import SAFE_TYPES

    held = set().union(*(get_unsafe_globals_in_checkpoint(f) for f in tag.glob("*.pt")))
    assert held and held <= set(SAFE_TYPES), held

    # same global batch in one process without DeepSpeed: the same student (no BatchNorm)
    single = tmp_path / "single"
    train(load_config(ds_config, ["strategy.kind=single", f"run.dir={single}"]))
    two, one = load(a / "student.pt"), load(single / "student.pt")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)

    # a crash after step 6: resume (weights_only loads) from that checkpoint, end exactly where `a` ended
    b = crashed_after_step_6(a, tmp_path / "b")
    resumed = torchrun(ds_config, tmp_path / "b.json", f"run.dir={b}", "run.resume=auto")
    assert resumed["mismatched"] == [] and resumed["summary"]["steps"] == 10
    for k, v in load(a / "student.pt").items():
        torch.testing.assert_close(load(b / "student.pt")[k], v, rtol=0, atol=1e-7)


class RunsCode:
    """Unpickled with `weights_only=False`, it runs a shell command: one that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_zero2_resume_refuses_a_deepspeed_file_that_would_run_code(ds_config, zero2_run, tmp_path):
    c = crashed_after_step_6(zero2_run[0], tmp_path / "c")
    marker = tmp_path / "code-ran"
    # rank 1's partition alone: rank 0 loads its own files fine and must still stop, not wait for rank 1
    crafted = c / "deepspeed" / "step-00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, crafted)
    control = tmp_path / "control"  # the payload is real: DeepSpeed's own engine would run it
    torch.save(RunsCode(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    # a 5 s monitor: torchrun sees both ranks' own exit, not one stopped by it after the other failed
    result = launch("-m", "fitdist.cli", "train", str(ds_config), f"run.dir={c}", "wandb.mode=disabled",
                    "--resume", monitor=5)
    assert not marker.exists(), "a checkpoint file ran code"
    assert result.returncode != 0
    message = (f"fitdist: error: --resume: DeepSpeed checkpoint file {crafted} does not load: it asks for "
               f"posix.system, which a checkpoint may not hold (loading it could run code); "
               f"remove {c / 'checkpoints' / 'step-00000006'} to resume from the previous checkpoint")
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # both ranks, in one line each
    summary = re.findall(r"^\s*exitcode\s*:\s*(\S+)", result.stderr, re.MULTILINE)  # torchrun's, per rank
    assert summary == ["2", "2"], result.stderr[-3000:]
    assert not (c / "student.pt").exists()


def test_bf16_one_process_exports_fp32_student(ds_config, tmp_path):
    """One process, no launcher (a 1-process group); bf16 master weights come back as fp32."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    summary = train(load_config(ds_config, ["train.precision=bf16", f"run.dir={tmp_path / 'bf16'}"]))
    assert summary["steps"] == 10
    state = load(tmp_path / "bf16" / "student.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
