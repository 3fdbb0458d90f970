"""Stages given in epochs: steps = ⌈epochs × training samples / global batch⌉, so scaling the batch
keeps the number of passes over the data."""

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_config

from fitdist.config import load_config
from fitdist.errors import UserError
from fitdist.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("batch", "steps"), [(32, 24), (64, 12), (48, 16)])  # ⌈1.5 × 512 / batch⌉
def test_a_stage_in_epochs_runs_its_passes_at_any_batch(tmp_path, batch, steps):
    path = write_config(tmp_path / f"e{batch}.yaml", stages=[{"name": "train", "epochs": 1.5}],
                        data={"source": "fashion-mnist", "train_subset": 512},
                        train={"batch_size": batch, "log_every": 4, "threads": 1, "eval_batch_size": 1000})
    summary = train(load_config(path))
    assert summary["steps"] == steps
    rows = [json.loads(line) for line in (tmp_path / f"e{batch}" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps


@pytest.mark.parametrize(("stage", "message"), [
    ({"name": "a"}, r"^stages.0 \(a\): give steps or epochs, one of them \(got steps None, epochs None\)"),
    ({"name": "a", "steps": 5, "epochs": 2}, r"^stages.0 \(a\): give steps or epochs, one of them"),
    ({"name": "a", "epochs": 0}, r"^stages.0.epochs: must be > 0, got 0"),
])
def test_steps_and_epochs_are_one_or_the_other(tmp_path, stage, message):
    with pytest.raises(UserError, match=message):
        load_config(write_config(tmp_path / "bad.yaml", stages=[stage]))


def test_an_override_can_turn_steps_into_epochs(tmp_path):
    cfg = load_config(write_config(tmp_path / "o.yaml"), ["stages.0.steps=null", "stages.0.epochs=90"])
    assert (cfg.stages[0].steps, cfg.stages[0].epochs) == (None, 90)


def test_a_dry_run_of_shards_reports_epochs_it_cannot_count(tmp_path):
    done = run_cli("train", ROOT / "configs" / "imagenet" / "kd-resnet34-resnet18.yaml", "--dry-run",
                   "stages.0.steps=null", "stages.0.epochs=90", "data.image_size=32")
    assert done.returncode == 0, done.stderr[-2000:]
    stage = json.loads(done.stdout)["stages"][0]
    assert stage["steps"] is None and stage["epochs"] == 90 and "last" in stage
