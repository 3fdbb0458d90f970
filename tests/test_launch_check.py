"""Launch-time errors: the launch scripts check a config once, before any rank starts, and inside
a multi-rank run an error every rank hits is printed by rank 0 alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

from fitdist.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "FITDIST_CHECKED")}
    return {**env, "PYTHON": sys.executable, "WANDB_MODE": "offline", **extra}


def _bash(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=_env(**env), timeout=300, check=False)


def _one_line(result, *fragments) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fitdist: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_torchrun_script_bad_key_is_one_line_before_any_rank(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", strategy={"kind": "ddp"})
    result = _bash("launch/torchrun.sh", cfg, "optim.lrr=0.1", NPROC="2")
    _one_line(result, "optim.lrr", "did you mean: optim.lr")
    assert result.stdout == ""
    assert not (tmp_path / "c").exists()  # no rank ran: the run directory was never made


def test_torchrun_script_checks_world_size_rules(tmp_path):
    cfg = write_config(tmp_path / "c.yaml")  # strategy single
    _one_line(_bash("launch/torchrun.sh", cfg, NPROC="2"), "strategy.kind", "2 processes")
    _one_line(_bash("launch/torchrun.sh", cfg, "strategy.kind=ddp", "train.batch_size=33", NPROC="2"),
              "train.batch_size", "33")


def test_check_passes_a_good_config(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", strategy={"kind": "ddp"})
    result = _bash("launch/torchrun.sh", cfg, "optim.lr=0.1", "--resume", NPROC="2", FITDIST_CHECK_ONLY="1")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_slurm_script_checks_once_and_never_starts_srun(tmp_path):
    """slurm.sbatch with stand-ins for scontrol and srun: a bad key ends the job before srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path / 'srun-ran'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    cfg = write_config(tmp_path / "c.yaml", strategy={"kind": "ddp"})
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(ROOT), "NPROC": "2"}
    _one_line(_bash("launch/slurm.sbatch", cfg, "optim.lrr=0.1", **slurm), "optim.lrr")
    assert not (tmp_path / "srun-ran").exists()
    good = _bash("launch/slurm.sbatch", cfg, **slurm)  # a good config reaches srun
    assert good.returncode == 0 and (tmp_path / "srun-ran").exists(), good.stderr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_every_rank_hits_is_printed_by_rank_0(tmp_path, monkeypatch, capsys, rank):
    cfg = write_config(tmp_path / "c.yaml", strategy={"kind": "ddp"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert main(["train", str(cfg), "optim.lrr=0.1"]) == 2
    assert main(["train", str(cfg), "hints.0.student=conv1"]) == 2  # hints list is empty: out of range
    err = capsys.readouterr().err.splitlines()
    assert len(err) == (2 if rank == "0" else 0), err
    # a file missing on one node only is printed by every rank that meets it, and so is a model
    # module that one node's environment may lack
    assert main(["train", str(tmp_path / "elsewhere.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(cfg), "student.name=no_such_module_here:factory"]) == 2
    assert "cannot import no_such_module_here:factory" in capsys.readouterr().err


def test_torchrun_without_the_check_prints_the_error_once(tmp_path):
    """The in-rank path: FITDIST_CHECKED skips the script's check, so both ranks meet the typo."""
    cfg = write_config(tmp_path / "c.yaml", strategy={"kind": "ddp"})
    result = _bash("launch/torchrun.sh", cfg, "optim.lrr=0.1", NPROC="2", FITDIST_CHECKED="1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fitdist: error:")]
    assert len(errors) == 1 and "optim.lrr" in errors[0], result.stderr
