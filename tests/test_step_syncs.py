"""A training step that does not log, evaluate or checkpoint reads nothing back from the device.

The real trainer runs a few steps while every way Python code can read a tensor on the host
(`item`, `bool`, `float`, `int`, `tolist`, ...) and every collective call is recorded with the
step it happened in. Only the last step (it logs, evaluates and checkpoints) may hold any; with
several processes, the preemption check adds one CPU collective every `run.preempt_check_every`
steps. On CUDA, `launch/gpu_check.sh` runs steps under `torch.cuda.set_sync_debug_mode("error")`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TEACHER, write_config

STEPS = 8

# Imported (as a sitecustomize) by every process of a run: records reads and collectives per step.
COUNTER = '''
import json, os, atexit
import torch, torch.distributed as tdist
import fitdist.trainer as trainer

EVENTS, STEP = [], [0]
_real_step = trainer.train_step

def _counting_step(*a, **k):
    STEP[0] += 1
    return _real_step(*a, **k)

trainer.train_step = _counting_step

def _wrap(owner, name, kind):
    real = getattr(owner, name)
    def wrapper(*a, **k):
        EVENTS.append([STEP[0], kind, name])
        return real(*a, **k)
    setattr(owner, name, wrapper)

for _name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
    _wrap(torch.Tensor, _name, "read")
for _name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
              "reduce_scatter_tensor", "barrier", "all_gather_object", "broadcast_object_list"):
    _wrap(tdist, _name, "collective")

@atexit.register
def _dump():
    if not STEP[0]:  # torchrun's agent process: it trains nothing
        return
    out = os.environ["FITDIST_TEST_EVENTS"] + "." + os.environ.get("RANK", "0")
    with open(out, "w") as f:
        json.dump(EVENTS, f)
'''


def run(tmp_path: Path, config: Path, nproc: int) -> dict[int, list]:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(COUNTER)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(inject), env.get("PYTHONPATH")])),
               FITDIST_TEST_EVENTS=str(tmp_path / "events"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "fitdist.cli", "train", str(config)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fitdist.cli", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: yaml.safe_load((tmp_path / f"events.{r}").read_text()) for r in range(nproc)}


def quiet_steps(events: list, steps: int) -> dict[int, list]:
    """The events of each step that neither logs, evaluates nor checkpoints (all but the last)."""
    return {s: [e[1:] for e in events if e[0] == s] for s in range(1, steps)}


def quiet_config(path: Path, train: dict | None = None, **sections) -> Path:
    """A Fashion-MNIST run of STEPS steps that logs, evaluates and checkpoints at its end only."""
    quiet = {"batch_size": 16, "log_every": 1000, "eval_every": 0, "checkpoint_every": 0, "threads": 1,
             "eval_batch_size": 1000}
    sections.setdefault("stages", [{"name": "train", "steps": STEPS}])
    return write_config(path, data={"source": "fashion-mnist", "train_subset": 512}, train={**quiet, **(train or {})},
                        **sections)


def preemption_checks_only(every: int) -> dict[int, list]:
    """What quiet_steps must show under DDP: the agreement on preemption (a CPU all-reduce of the
    flag) every `every` steps, nothing else."""
    return {s: [["collective", "all_reduce"], ["read", "item"]] if s % every == 0 else [] for s in range(1, STEPS)}


@pytest.mark.parametrize("variant", ["sgd-fp32", "adamw-bf16-accum", "sgd-fp16"])
def test_a_quiet_step_makes_no_host_sync(tmp_path, variant):
    optim, precision = {"sgd-fp32": ("sgd", "fp32"), "adamw-bf16-accum": ("adamw", "bf16"),
                        "sgd-fp16": ("sgd", "fp16")}[variant]
    config = quiet_config(tmp_path / "quiet.yaml", {"precision": precision, "grad_accum": 2 if "accum" in variant else 1},
                          optim={"name": optim, "lr": 0.01, "schedule": "cosine", "max_grad_norm": 1.0,
                                 "max_norm": 0.5})  # the max-norm clip too: on the device
    events = run(tmp_path, config, nproc=1)[0]
    assert quiet_steps(events, STEPS) == {s: [] for s in range(1, STEPS)}
    assert any(e[0] == STEPS for e in events)  # the last step logs: the counter does see reads


def test_a_quiet_kd_step_with_a_bf16_teacher_makes_no_host_sync(tmp_path, trained_teacher):
    config = quiet_config(tmp_path / "kd.yaml", teacher={**TEACHER, "weights": str(trained_teacher), "precision": "bf16"},
                          stages=[{"name": "kd", "steps": STEPS, "kd": 1.0}])
    events = run(tmp_path, config, nproc=1)[0]
    assert quiet_steps(events, STEPS) == {s: [] for s in range(1, STEPS)}


def test_ddp_ranks_agree_on_preemption_every_k_steps_and_otherwise_stay_silent(tmp_path):
    every = 3
    config = quiet_config(tmp_path / "ddp.yaml", strategy={"kind": "ddp"},
                          run={"dir": str(tmp_path / "ddp"), "preempt_check_every": every})
    for events in run(tmp_path, config, nproc=2).values():
        assert quiet_steps(events, STEPS) == preemption_checks_only(every)


def test_diagnostics_measure_log_steps_only_and_quiet_steps_stay_silent(tmp_path):
    """train.diagnostics arms its hooks for the step that logs (step 4 here, and the last): the
    other steps read nothing back, and the measured values travel with the row's one transfer."""
    config = quiet_config(tmp_path / "diag.yaml", {"diagnostics": True, "log_every": 4})
    events = run(tmp_path, config, nproc=1)[0]
    assert {s: e for s, e in quiet_steps(events, STEPS).items() if s != 4} == {s: [] for s in range(1, STEPS) if s != 4}
    assert [e[1:] for e in events if e[0] == 4] == [["read", "tolist"]]  # the row's single read
    rows = [yaml.safe_load(line) for line in (tmp_path / "diag" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "diag/conv1/rms" in r] == [4, STEPS]
