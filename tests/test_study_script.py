"""`launch/fmnist_study.sh`: its depth-study students really sit at one MAC budget with a 7x7
guided layer, and a bad DEPTHS value is refused before anything trains."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fitdist.config import load_config
from fitdist.dryrun import dry_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "fmnist_study.sh"
BUDGET = 11_290_240  # MACs per image of the main study's student (fitdist/configs/fmnist-*.yaml)


def depth_overrides(k: int, function: str = "depth_student") -> list[str]:
    """The overrides the script's `function` gives the student of argument `k` (depth_student: 3k
    layers; regime_student: k layers)."""
    define = subprocess.run(["sed", "-n", f"/^{function}()/,/^}}/p", str(SCRIPT)],
                            capture_output=True, text=True, check=True).stdout
    out = subprocess.run(["bash", "-c", f"{define}\n{function} {k}"], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_depth_students_share_the_mac_budget(k, tmp_path):
    overrides = depth_overrides(k)
    cfg = load_config(ROOT / "fitdist" / "configs" / "fmnist-fitnets.yaml",
                      [*overrides, f"run.dir={tmp_path}", "teacher.weights=none.pt"])
    report = dry_run(cfg)
    assert len(cfg.student.kwargs["widths"]) == 3 * k
    assert abs(report["student"]["macs"] / BUDGET - 1) < 0.07  # 10.8-11.9 M
    (hint,) = report["hints"]
    assert hint["student_shape"][1:] == hint["teacher_shape"][1:] == [7, 7]


@pytest.mark.parametrize("depth", [11, 15, 19, 23])
def test_regime_students_share_the_mac_budget(depth, tmp_path):
    """The no-BatchNorm regime's students: `depth` conv layers, 10.1-11.4 M MACs, a 7x7 guided layer."""
    overrides = depth_overrides(depth, "regime_student")
    cfg = load_config(ROOT / "fitdist" / "configs" / "fmnist-fitnets.yaml",
                      [*overrides, "student.kwargs.batch_norm=false", f"run.dir={tmp_path}", "teacher.weights=none.pt"])
    report = dry_run(cfg)
    assert len(cfg.student.kwargs["widths"]) == depth
    assert abs(report["student"]["macs"] / BUDGET - 1) < 0.11
    (hint,) = report["hints"]
    assert hint["student_shape"][1:] == hint["teacher_shape"][1:] == [7, 7]


def test_bad_depth_exits_2_before_training(tmp_path):
    venv = Path(sys.executable).parent.parent  # holds bin/fitdist: the script installs nothing
    env = {**os.environ, "DEPTHS": "9 10", "OUT": str(tmp_path / "out"), "VENV": str(venv)}
    result = subprocess.run(["bash", str(SCRIPT), "depth"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "DEPTHS: 10 is not one of 3 6 9 12 15"
    assert not (tmp_path / "out").exists()
