"""Preemption through `launch/torchrun.sh`, two ranks: SIGTERM to torchrun reaches both workers,
which agree within `run.preempt_check_every` steps, save one checkpoint inside torchrun's
shutdown grace and exit 75; `--resume` then continues from that step. Also: the launch exports
node-local compile caches."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import write_config

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_to_torchrun_saves_an_agreed_step_and_resume_continues(tmp_path):
    every = 4
    config = write_config(tmp_path / "pre.yaml", stages=[{"name": "train", "steps": 150}], strategy={"kind": "ddp"},
                          data={"source": "fashion-mnist", "train_subset": 1024},
                          run={"dir": str(tmp_path / "pre"), "preempt_check_every": every},
                          train={"batch_size": 16, "log_every": 5, "checkpoint_every": 0, "threads": 1,
                                 "eval_batch_size": 1000})
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(NPROC="2", PYTHON=sys.executable, WANDB_MODE="offline", SHUTDOWN_TIMEOUT="90",
               CACHE_ROOT=str(tmp_path / "cache"))
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the script exec'd torchrun: this is torchrun's pid
    _, err = proc.communicate(timeout=120)
    saved = [int(s) for s in re.findall(r"preempted: checkpoint saved at step (\d+)", err)]
    assert saved and len(set(saved)) == 1 and saved[0] % every == 0, err[-3000:]  # one agreed step
    assert [p.name for p in (tmp_path / "pre" / "checkpoints").iterdir()] == [f"step-{saved[0]:08d}"]

    resumed = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(config), "--resume"], env=env, check=False,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved[0]}" in resumed.stderr + resumed.stdout


def test_compile_caches_default_to_node_local_disk(tmp_path):
    record = tmp_path / "env.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nenv > {record}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    config = write_config(tmp_path / "c.yaml")
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    for extra, root in [({"SLURM_TMPDIR": str(tmp_path / "slurm")}, tmp_path / "slurm"),
                        ({"CACHE_ROOT": str(tmp_path / "mine")}, tmp_path / "mine")]:
        env = {**base, **extra, "NPROC": "1", "PYTHON": str(wrapper), "FITDIST_CHECK_ONLY": "1", "USER": "u"}
        done = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(config)], env=env, check=False,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        seen = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
        prefix = root if "CACHE_ROOT" in extra else root / "fitdist-u"
        assert (seen["TRITON_CACHE_DIR"], seen["TORCHINDUCTOR_CACHE_DIR"]) == (f"{prefix}/triton", f"{prefix}/inductor")


def test_a_signal_while_a_peer_is_gone_is_not_taken_for_a_preemption():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).with_name("peers_lost_worker.py"))],
                          capture_output=True, text=True, timeout=120, check=False)
    assert "PEERS_LOST signalled while another rank was gone" in done.stdout, done.stdout + done.stderr[-3000:]
