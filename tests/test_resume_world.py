"""Resuming: every rank's own RNG state is in the checkpoint, and a run on another process count
than the checkpoint's is refused with one line (the data each rank reads depends on the count)."""

import os
import subprocess
import sys

import torch
from conftest import write_config


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fitdist.cli", "train", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_checkpoint_holds_each_ranks_rng_and_another_world_size_is_refused(tmp_path):
    config = write_config(tmp_path / "two.yaml", stages=[{"name": "train", "steps": 4}], strategy={"kind": "ddp"},
                          data={"source": "fashion-mnist", "train_subset": 512},
                          train={"batch_size": 16, "log_every": 2, "checkpoint_every": 2, "threads": 1,
                                 "eval_batch_size": 1000})
    done = launch(2, str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "two" / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=True)
    assert state["world"] == 2 and len(state["rng"]) == 2
    assert all({"torch", "python", "numpy"} <= set(r) for r in state["rng"])

    before = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    one = launch(1, str(config), "--resume")
    assert one.returncode == 2, one.stderr[-3000:]
    lines = one.stderr.strip().splitlines()
    assert len(lines) == 1 and "written by 2 process(es) and this run has 1" in lines[0], one.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == before  # nothing lost

    resumed = launch(2, str(config), "run.resume=auto")
    assert resumed.returncode == 0 and "resumed from step 4" in resumed.stderr + resumed.stdout, resumed.stderr[-3000:]
