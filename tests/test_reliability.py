"""Faults that must never cost a run: kills at any step, crashes and full disks during a save,
corrupt checkpoints, and resuming with a different config."""

import errno
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_config

from fitdist import checkpoint
from fitdist.config import load_config
from fitdist.errors import UserError
from fitdist.trainer import train

STAGES = [{"name": "a", "steps": 6}, {"name": "b", "steps": 6}]
EXACT = ["deterministic=true", "train.checkpoint_every=2", "run.keep_checkpoints=3", "train.log_every=1"]
KILLER = Path(__file__).with_name("kill_during_save.py")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    path = write_config(root / "exact.yaml", stages=STAGES, data={"source": "fashion-mnist", "train_subset": 200,
                                                                   "augment": "light"})
    cfg = load_config(path, EXACT)
    train(cfg)
    return path, (cfg.run_dir / "student.pt").read_bytes()


def kill_after(path, run_dir, rows: int) -> None:
    """Starts a training run and SIGKILLs it once `rows` metric rows exist (step `rows`)."""
    proc = subprocess.Popen([sys.executable, "-m", "fitdist.cli", "train", str(path), *EXACT],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= rows:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)


@pytest.mark.parametrize("kill_at", [1, 5, 6, 9])  # inside stage a, stage end, inside stage b
def test_sigkill_at_any_step_then_resume_is_bitwise_identical(uninterrupted, tmp_path, kill_at):
    source, expected = uninterrupted
    path = tmp_path / "exact.yaml"
    path.write_text(source.read_text().replace(str(source.parent / "exact"), str(tmp_path / "exact")))
    kill_after(path, tmp_path / "exact", kill_at)
    assert not (tmp_path / "exact" / "student.pt").exists(), "the run finished before it was killed"
    result = run_cli("train", path, *EXACT, "--resume")
    if "no checkpoint in" in result.stderr:  # killed before the first save: a fresh start is the resume
        result = run_cli("train", path, *EXACT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exact" / "student.pt").read_bytes() == expected


# (where the process dies, the save it dies in, what `checkpoints/` holds then, the step resumed from);
# checkpoints every 2 steps, 3 kept: the save of step 8 is the first that prunes (step 2)
INSIDE_A_SAVE = [
    ("mid-file", 4, [".tmp-step-00000004", "step-00000002"], 2),
    ("before-rename", 8, [".tmp-step-00000008", "step-00000002", "step-00000004", "step-00000006"], 6),
    ("before-prune", 8, ["step-00000002", "step-00000004", "step-00000006", "step-00000008"], 8),
]


@pytest.mark.parametrize(("point", "step", "left", "resumed_at"), INSIDE_A_SAVE, ids=[c[0] for c in INSIDE_A_SAVE])
def test_sigkill_inside_a_save_then_resume_is_bitwise_identical(uninterrupted, tmp_path, point, step, left,
                                                                 resumed_at):
    """A real SIGKILL of a `fitdist train` process in the middle of writing a checkpoint."""
    source, expected = uninterrupted
    path = tmp_path / "exact.yaml"
    path.write_text(source.read_text().replace(str(source.parent / "exact"), str(tmp_path / "exact")))
    killed = subprocess.run([sys.executable, str(KILLER), point, str(step), "train", str(path), *EXACT],
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = tmp_path / "exact" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == left
    if point == "mid-file":  # the kill left a partial file behind, never under a checkpoint's name
        assert (root / left[0] / ".trainer.pt.tmp").stat().st_size > 0
        assert not (root / left[0] / "trainer.pt").exists()

    result = run_cli("train", path, *EXACT, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {resumed_at} " in result.stderr
    assert (tmp_path / "exact" / "student.pt").read_bytes() == expected
    # the crashed save's remains are gone and the kept checkpoints are the uninterrupted run's
    kept = sorted(p.name for p in (source.parent / "exact" / "checkpoints").iterdir())
    assert sorted(p.name for p in root.iterdir()) == kept


def test_a_crash_or_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = write_config(tmp_path / "c.yaml", stages=[{"name": "a", "steps": 4}])
    cfg = load_config(path, ["train.checkpoint_every=2"])
    real_save = checkpoint.save_file
    calls = []

    def full_disk_on_second_checkpoint(obj, target):
        calls.append(target)
        if len(calls) > 2:  # the first checkpoint (student.pt + trainer.pt) goes through
            target.with_name(f".{target.name}.tmp").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, target)

    monkeypatch.setattr(checkpoint, "save_file", full_disk_on_second_checkpoint)
    with pytest.raises(UserError, match=r"cannot save checkpoint .*step-00000004: No space left on device"):
        train(cfg)
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert [p.name for p in checkpoint.list_checkpoints(cfg.run_dir)] == ["step-00000002"]
    assert not any(p.name.startswith(".tmp") for p in (cfg.run_dir / "checkpoints").iterdir())
    _, state = checkpoint.load_checkpoint(cfg.run_dir)
    assert state["position"]["global_step"] == 2


CHECKPOINT_EVERY_2 = ["deterministic=true", "train.checkpoint_every=2", "run.keep_checkpoints=5"]


def finished_run(tmp_path, steps: int):
    """A deterministic run of `steps` steps with a checkpoint every 2: (config path, config, student.pt bytes)."""
    path = write_config(tmp_path / "c.yaml", stages=[{"name": "a", "steps": steps}])
    cfg = load_config(path, CHECKPOINT_EVERY_2)
    train(cfg)
    return path, cfg, (cfg.run_dir / "student.pt").read_bytes()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    path, cfg, expected = finished_run(tmp_path, 6)
    overrides = CHECKPOINT_EVERY_2
    latest = cfg.run_dir / "checkpoints" / "step-00000006" / "trainer.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="step-00000006 does not load"):
        found, _ = checkpoint.load_checkpoint(cfg.run_dir)
    assert found.name == "step-00000004"
    (cfg.run_dir / "student.pt").unlink()
    with pytest.warns(UserWarning, match="trying the previous one"):
        train(load_config(path, overrides), resume=True)
    assert (cfg.run_dir / "student.pt").read_bytes() == expected


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    path = write_config(tmp_path / "c.yaml", stages=[{"name": "a", "steps": 2}])
    assert run_cli("train", path).returncode == 0
    result = run_cli("train", path, "optim.lr=0.5", "--resume")
    assert result.returncode == 2
    assert "different config: optim.lr (0.05 -> 0.5)" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_of_an_older_version_resumes(tmp_path):
    """A saved config without the keys added since (they take their defaults) is the same config."""
    path, cfg, expected = finished_run(tmp_path, 4)
    overrides = CHECKPOINT_EVERY_2
    shutil.rmtree(cfg.run_dir / "checkpoints" / "step-00000004")
    (cfg.run_dir / "student.pt").unlink()
    trainer_pt = cfg.run_dir / "checkpoints" / "step-00000002" / "trainer.pt"
    state = torch.load(trainer_pt, weights_only=True)
    for section, key in (("optim", "max_norm"), ("loss", "ensemble"), ("train", "diagnostics"), (None, "teachers")):
        del (state["config"][section] if section else state["config"])[key]
    torch.save(state, trainer_pt)
    train(load_config(path, overrides), resume=True)
    assert (cfg.run_dir / "student.pt").read_bytes() == expected
    shutil.rmtree(cfg.run_dir / "checkpoints" / "step-00000004")
    state["config"]["optim"]["lr"] = 0.5  # a recorded setting that differs is still refused
    torch.save(state, trainer_pt)
    with pytest.raises(UserError, match=r"different config: optim.lr \(0.5 -> 0.05\)"):
        train(load_config(path, overrides), resume=True)


def test_checkpoints_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = write_config(tmp_path / "c.yaml", stages=[{"name": "a", "steps": 2}])
    cfg = load_config(path)
    train(cfg)
    ckpt = checkpoint.list_checkpoints(cfg.run_dir)[-1]
    torch.save({"position": Evil()}, ckpt / "trainer.pt")
    with pytest.raises(UserError, match="no checkpoint in .* loads"), pytest.warns(UserWarning):
        checkpoint.load_checkpoint(cfg.run_dir)
