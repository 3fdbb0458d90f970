"""Two teachers in real processes: under DDP (torchrun, 2 processes, gloo on loopback) both ranks end
identical, and a quiet ensemble step reads nothing back from the device (test_step_syncs' counter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_config
from test_ensemble import two_teachers
from test_step_syncs import STEPS, quiet_config, quiet_steps
from test_step_syncs import run as counted_run

WORKER = Path(__file__).with_name("ddp_worker.py")
NO_BN_STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 4, 8, 8], "pool_after": [2], "batch_norm": False}}


@pytest.mark.parametrize("mode", ["mean_probs", "sample"])
def test_two_teachers_under_two_process_ddp_keep_ranks_identical(tmp_path, mode):
    path = write_config(
        tmp_path / "ddp.yaml", student=NO_BN_STUDENT, teachers=two_teachers(tmp_path),
        hints=[{"student": "conv3", "teacher": "conv2", "from": "b"}], loss={"ensemble": mode},
        stages=[{"name": "hint", "steps": 2, "ce": 0, "hint": 1}, {"name": "kd", "steps": 3, "ce": 1, "kd": 1}],
        data={"source": "fashion-mnist", "train_subset": 256},
        train={"batch_size": 16, "grad_accum": 2, "log_every": 2, "threads": 1},
    )
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(path), str(out), "strategy.kind=ddp"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world"] == 2 and two["keys"] > 0 and two["summary"]["steps"] == 5
    assert two["mismatched"] == []  # every parameter, regressors included, equal on both ranks
    exported = torch.load(tmp_path / "ddp" / "student.pt", weights_only=True)
    assert not any("teacher" in k for k in exported) and all(torch.isfinite(v).all() for v in exported.values())


@pytest.mark.parametrize("mode", ["mean_probs", "sample"])
def test_a_quiet_ensemble_step_makes_no_host_sync(tmp_path, mode):
    teachers = two_teachers(tmp_path, b={"precision": "bf16"})
    config = quiet_config(tmp_path / "quiet.yaml", {"grad_accum": 2}, teachers=teachers, loss={"ensemble": mode},
                          hints=[{"student": "conv3", "teacher": "conv2", "from": "b"}],
                          stages=[{"name": "hint", "steps": 3, "ce": 0, "hint": 1},
                                  {"name": "kd", "steps": STEPS - 3, "ce": 1, "kd": 1, "hint": 0.5}])
    events = counted_run(tmp_path, config, nproc=1)[0]
    quiet = quiet_steps(events, STEPS)
    del quiet[3]  # the hint stage's end logs, evaluates and checkpoints
    assert quiet == {s: [] for s in range(1, STEPS) if s != 3}
