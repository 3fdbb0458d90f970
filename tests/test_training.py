"""End-to-end runs on real Fashion-MNIST: accuracy, stage semantics, λ schedule, outputs, resume."""

import json

import pytest
import torch
from conftest import STUDENT, TEACHER, run_cli, write_config

from fitdist.config import ModelConfig, load_config
from fitdist.models import build_model
from fitdist.trainer import train


def test_a_short_teacher_run_beats_chance_by_far(trained_teacher):
    summary = json.loads((trained_teacher.parent / "summary.json").read_text())
    assert summary["val/top1"] > 70.0  # chance is 10%
    assert summary["val/n"] == 10000


@pytest.fixture(scope="module")
def fitnets_run(trained_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("fitnets")
    path = write_config(
        root / "fitnets.yaml",
        teacher={**TEACHER, "weights": str(trained_teacher)},
        hints=[{"student": "conv3", "teacher": "conv2"}],
        stages=[{"name": "hint", "steps": 12, "ce": 0, "hint": 1},
                {"name": "kd", "steps": 15, "ce": 1, "kd": [4, 1]}],
        optim={"name": "sgd", "lr": 0.05, "schedule": "cosine", "warmup_steps": 3},
        train={"batch_size": 32, "log_every": 1, "checkpoint_every": 6, "threads": 1},
        run={"dir": str(root / "run"), "keep_checkpoints": 10},
    )
    cfg = load_config(path)
    summary = train(cfg)
    return cfg, summary


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_rows_add_up(rows: list[dict]) -> None:
    """Every row: the logged loss is the weighted sum of the logged terms, for the logged weights."""
    for r in rows:
        if "train/loss" not in r:
            continue
        weights = {"ce": r.get("weight/ce"), "kd": r["lambda"], "hint": r.get("weight/hint")}
        total = sum(weights[t] * r[f"train/{t}"] for t in ("ce", "kd", "hint") if f"train/{t}" in r)
        assert r["train/loss"] == pytest.approx(total, rel=1e-5, abs=1e-7), r


def test_lambda_multiplies_the_logged_kd_term_and_follows_the_linear_schedule(fitnets_run):
    cfg, _ = fitnets_run
    rows = read_rows(cfg.run_dir)
    assert_rows_add_up(rows)
    kd_rows = [r for r in rows if r["stage"] == "kd"]
    assert [r["step"] for r in kd_rows] == list(range(13, 28))
    for i, r in enumerate(kd_rows):  # log_every 1: row i is the stage's step i; λ goes 4 → 1 in 15 steps
        assert r["lambda"] == pytest.approx(4.0 - 3.0 * i / 14)
        assert r["weight/ce"] == 1.0 and "weight/hint" not in r and "train/hint" not in r
        assert r["train/kd"] > 0 and r["train/ce"] > 0
    hint_rows = [r for r in rows if r["stage"] == "hint"]
    assert len(hint_rows) == 12 and all("train/hint" in r and "train/ce" not in r for r in hint_rows)
    assert "val/top1" in rows[-1]


def test_logged_lr_is_the_rate_each_step_used(fitnets_run):
    """lr 0.05, 3 warm-up steps, then cosine to 0, in each stage (the rows are one step each)."""
    import math

    cfg, _ = fitnets_run
    rows = read_rows(cfg.run_dir)
    for stage, steps, first in (("hint", 12, 1), ("kd", 15, 13)):
        for r in (r for r in rows if r["stage"] == stage):
            i = r["step"] - first  # the row's step, counted from 0 within its stage
            want = 0.05 * ((i + 1) / 3 if i < 3 else 0.5 * (1 + math.cos(math.pi * (i - 3) / (steps - 3))))
            assert r["lr"] == pytest.approx(want, rel=1e-6), (stage, i)


@pytest.mark.parametrize("kd_t2", [True, False])
def test_every_row_adds_up_with_a_weight_schedule_inside_a_row(trained_teacher, tmp_path, kd_t2):
    """log_every 4 with λ and the hint weight moving every step, gradient accumulation, and both
    scales of the KD term: the identity holds on every row."""
    path = write_config(
        tmp_path / "sum.yaml", teacher={**TEACHER, "weights": str(trained_teacher)},
        hints=[{"student": "conv3", "teacher": "conv2"}], loss={"temperature": 4.0, "kd_t2": kd_t2},
        stages=[{"name": "warm", "steps": 6, "ce": 1, "hint": [0, 2]},
                {"name": "kd", "steps": 9, "ce": [1, 0.5], "kd": [4, 1], "hint": 0.5}],
        train={"batch_size": 32, "grad_accum": 2, "log_every": 4, "checkpoint_every": 0, "threads": 1},
    )
    cfg = load_config(path)
    train(cfg)
    rows = read_rows(cfg.run_dir)
    assert_rows_add_up(rows)
    warm = [r for r in rows if r["stage"] == "warm" and "train/loss" in r]
    assert warm[0]["weight/hint"] == pytest.approx((0 + 0.4 + 0.8 + 1.2) / 4)  # the row's mean weight
    kd = [r for r in rows if r["stage"] == "kd"]
    assert all(0 < r["train/kd"] for r in kd)


def test_stage_one_trains_only_the_guided_path_and_the_regressor(fitnets_run):
    """Stage 1 (12 steps) changes the student up to its guided layer (conv3) and the regressor and
    leaves every layer above it, weights and BatchNorm buffers, bit-identical; stage 2 then trains
    the whole student and leaves the regressor frozen."""
    cfg, _ = fitnets_run
    ckpt = {s: torch.load(cfg.run_dir / "checkpoints" / f"step-{s:08d}" / "trainer.pt", weights_only=True)["student"]
            for s in (6, 12, 18, 24, 27)}
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.student, 10, 1).state_dict()
    guided = {k for k in fresh if k.split(".")[0] in ("conv1", "conv2", "conv3")}
    for step in (6, 12):
        backbone = {k.removeprefix("backbone."): v for k, v in ckpt[step].items() if k.startswith("backbone.")}
        changed = {k for k, v in backbone.items() if not torch.equal(v, fresh[k])}
        assert changed == guided  # weights and BN statistics of conv1..conv3 only
    regressor = [k for k in ckpt[12] if k.startswith("regressors.0.")]
    assert regressor and any(not torch.equal(ckpt[6][k], ckpt[12][k]) for k in regressor)  # it trains in stage 1
    assert all(torch.equal(ckpt[12][k], ckpt[s][k]) for k in regressor for s in (18, 24, 27))  # frozen in stage 2
    above = [k for k in ckpt[12] if k.startswith(("backbone.conv4", "backbone.conv5", "backbone.fc"))]
    assert all(not torch.equal(ckpt[12][k], ckpt[27][k]) for k in above if k.endswith("weight"))  # stage 2 trains them
    assert not any("teacher" in k for k in ckpt[27])  # the teacher never enters a checkpoint


def test_student_pt_is_a_plain_state_dict_and_eval_reports_it(fitnets_run):
    cfg, summary = fitnets_run
    state = torch.load(cfg.run_dir / "student.pt", weights_only=True)
    model = build_model(ModelConfig(**STUDENT), 10, 1)
    model.load_state_dict(state)  # strict: no regressor or teacher keys
    out = run_cli("eval", cfg.run_dir)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["val/top1"]) and result["n"] == 10000
    assert 0 <= result["top1"] <= result["top5"] <= 100


def test_wandb_offline_run_is_written(fitnets_run):
    cfg, _ = fitnets_run
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    overrides = ["deterministic=true", "train.checkpoint_every=5", "run.keep_checkpoints=10"]
    path = write_config(tmp_path / "r.yaml", stages=[{"name": "a", "steps": 10}, {"name": "b", "steps": 8}])
    cfg = load_config(path, overrides)
    train(cfg)
    full = (cfg.run_dir / "student.pt").read_bytes()
    wandb_id = torch.load(cfg.run_dir / "checkpoints" / "step-00000005" / "trainer.pt", weights_only=True)["wandb_id"]
    # "kill" the run after step 13: drop later checkpoints and the final export
    for ckpt in sorted((cfg.run_dir / "checkpoints").iterdir()):
        if int(ckpt.name.split("-")[1]) > 13:
            __import__("shutil").rmtree(ckpt)
    (cfg.run_dir / "student.pt").unlink()
    summary = train(load_config(path, overrides), resume=True)
    assert summary["steps"] == 18
    assert (cfg.run_dir / "student.pt").read_bytes() == full
    resumed = torch.load(cfg.run_dir / "checkpoints" / "step-00000018" / "trainer.pt", weights_only=True)
    assert resumed["wandb_id"] == wandb_id  # the same W&B run continues


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(tmp_path):
    path = write_config(tmp_path / "nan.yaml", stages=[{"name": "a", "steps": 6}, {"name": "b", "steps": 30}])
    # stage b's learning rate blows the weights up; the checkpoint of stage a must survive intact
    cfg = load_config(path, ["stages.1.optim={lr: 1.0e+30, schedule: constant}", "train.max_skipped_steps=3",
                             "train.checkpoint_every=0"])
    from fitdist.trainer import Diverged

    with pytest.raises(Diverged, match=r"^3 consecutive steps with a non-finite .* by step (8|9|10);"):
        train(cfg)
    ckpts = sorted((cfg.run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000006"]
    state = torch.load(ckpts[0] / "student.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (cfg.run_dir / "student.pt").exists()  # nothing non-finite is exported either


def test_sigterm_finishes_the_step_saves_and_exits_75(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = write_config(tmp_path / "sig.yaml", stages=[{"name": "a", "steps": 100000}],
                        train={"batch_size": 32, "log_every": 1, "threads": 1, "checkpoint_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "fitdist.cli", "train", str(path)],
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert time.time() - sent < 60
    assert "preempted: checkpoint saved at step" in err
    ckpts = list((tmp_path / "sig" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "trainer.pt").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_gradient_accumulation_trains(tmp_path, trained_teacher, precision):
    path = write_config(tmp_path / f"{precision}.yaml", teacher={**TEACHER, "weights": str(trained_teacher)},
                        hints=[{"student": "conv3", "teacher": "conv2"}],
                        stages=[{"name": "joint", "steps": 30, "ce": 1, "kd": 1, "hint": 1}],
                        train={"batch_size": 64, "grad_accum": 2, "precision": precision, "log_every": 10,
                               "threads": 1},
                        optim={"name": "adamw", "lr": 0.003, "schedule": "constant"})
    cfg = load_config(path)
    summary = train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/skipped_steps"] == 0 for r in rows[1:])  # fp16: at most the scaler's first steps
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert summary["val/top1"] > 30.0  # chance is 10%
