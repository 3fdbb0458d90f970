"""`train.compile`: a compiled FitNets run matches an eager one in both stages (hint loss and the
stage-1 cut included) and writes the same checkpoint keys; a model with a graph break falls back
to eager with one warning line and still trains."""

import contextlib
import io
import json

import pytest
import torch
from conftest import STUDENT, TEACHER, write_config

from fitdist.config import ModelConfig, load_config
from fitdist.dryrun import dry_run
from fitdist.errors import UserError
from fitdist.models import build_model
from fitdist.trainer import train
from fitdist.zoo import ZOO

HINT_STEPS, KD_STEPS = 4, 4


def breaking_fitnet(num_classes: int = 10, in_channels: int = 1) -> torch.nn.Module:
    """The test student, with a graph break in its forward (imported as `test_compile:...`)."""

    class Breaking(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ZOO["fitnet"](num_classes=num_classes, in_channels=in_channels, **STUDENT["kwargs"])

        def forward(self, x):
            torch._dynamo.graph_break()
            return self.net(x)

    return Breaking()


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    """A randomly initialised teacher: enough to compare eager and compiled runs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_model(ModelConfig(**TEACHER), 10, 1).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(teacher_weights, tmp_path_factory):
    """The same two-stage FitNets run, eager and compiled: `{compile: (run dir, stderr, graphs)}`."""
    from torch._dynamo.utils import counters

    out = {}
    for compile in (False, True):
        root = tmp_path_factory.mktemp("compiled" if compile else "eager")
        path = write_config(
            root / "fitnets.yaml",
            teacher={**TEACHER, "weights": str(teacher_weights)},
            hints=[{"student": "conv3", "teacher": "conv2"}],
            stages=[{"name": "hint", "steps": HINT_STEPS, "ce": 0, "hint": 1},
                    {"name": "kd", "steps": KD_STEPS, "ce": 1, "kd": [4, 1]}],
            train={"batch_size": 32, "log_every": 1, "checkpoint_every": 0, "threads": 1, "compile": compile},
            run={"dir": str(root / "run"), "keep_checkpoints": 5},
        )
        cfg = load_config(path)
        err = io.StringIO()
        counters.clear()
        with contextlib.redirect_stderr(err):
            train(cfg)
        out[compile] = cfg.run_dir, err.getvalue(), counters["stats"]["unique_graphs"]
    return out


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_both_models_compile_in_both_stages_and_training_reuses_the_graphs(runs):
    _, err, graphs = runs[True]
    for stage in ("hint", "kd"):
        assert f"stage {stage}: compiled student fitdist:fitnet and teacher fitdist:fitnet (" in err, err
    assert "runs eager" not in err, err
    # student and teacher, cut (hint) and whole (kd): compiled by each stage's check, then reused
    assert graphs == 4
    assert runs[False][2] == 0


def test_compiled_loss_terms_match_eager_in_both_stages(runs):
    eager, compiled = _rows(runs[False][0]), _rows(runs[True][0])
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, HINT_STEPS + KD_STEPS + 1))
    for e, c in zip(eager, compiled):
        terms = ("train/loss", "train/hint") if e["stage"] == "hint" else ("train/loss", "train/ce", "train/kd")
        assert {t for t in e if t.startswith("train/")} == {t for t in c if t.startswith("train/")}
        for t in terms:
            assert c[t] == pytest.approx(e[t], rel=1e-4, abs=1e-6), (e["step"], t)
    assert compiled[-1]["val/top1"] == pytest.approx(eager[-1]["val/top1"], abs=0.05)


def _close(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # the same keys in the same order: no `_orig_mod.` anywhere
    for k, v in a.items():
        assert v.dtype == b[k].dtype and v.shape == b[k].shape, k
        if v.is_floating_point():
            torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(v, b[k]), k


def test_compiled_weights_and_checkpoint_keys_match_eager(runs):
    eager, compiled = runs[False][0], runs[True][0]
    for step in (HINT_STEPS, HINT_STEPS + KD_STEPS):  # end of stage 1, end of stage 2
        ckpt = f"checkpoints/step-{step:08d}"
        a, b = (torch.load(d / ckpt / "trainer.pt", weights_only=True) for d in (eager, compiled))
        _close(a["student"], b["student"])
        assert list(a["optimizer"]["state"]) == list(b["optimizer"]["state"])
        _close(*(torch.load(d / ckpt / "student.pt", weights_only=True) for d in (eager, compiled)))
    _close(*(torch.load(d / "student.pt", weights_only=True) for d in (eager, compiled)))


def test_compiled_stage_one_stops_at_the_guided_layer(runs):
    """The compiled truncated forward never runs conv4.. (their BatchNorm statistics included)."""
    compiled = runs[True][0]
    state = torch.load(compiled / "checkpoints" / f"step-{HINT_STEPS:08d}" / "student.pt", weights_only=True)
    torch.manual_seed(1)  # the configs' seed: the student's initial weights
    fresh = build_model(ModelConfig(**STUDENT), 10, 1).state_dict()
    changed = {k.split(".")[0] for k in fresh if not torch.equal(state[k], fresh[k])}
    assert changed == {"conv1", "conv2", "conv3"}


def test_a_graph_break_falls_back_to_eager_with_one_warning_and_trains(tmp_path, capsys):
    path = write_config(tmp_path / "gb.yaml", student={"name": "test_compile:breaking_fitnet"},
                        stages=[{"name": "a", "steps": 3}, {"name": "b", "steps": 3}],
                        train={"batch_size": 32, "log_every": 1, "threads": 1, "compile": True})
    summary = train(load_config(path))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "train.compile" in line]
    assert len(warnings) == 1, err  # one line, at the first stage's check, not one per stage
    assert warnings[0].startswith("warning: train.compile: student test_compile:breaking_fitnet runs eager")
    assert "graph_break()" in warnings[0] and "test_compile.py:" in warnings[0]
    assert summary["steps"] == 6
    rows = _rows(tmp_path / "gb")
    assert all(r["train/skipped_steps"] == 0 and r["train/loss"] < 10 for r in rows)
    state = torch.load(tmp_path / "gb" / "student.pt", weights_only=True)
    assert all(k.startswith("net.") for k in state)  # a plain state_dict of the model


def test_dry_run_reports_what_would_run_eager(tmp_path):
    path = write_config(tmp_path / "dry.yaml", student={"name": "test_compile:breaking_fitnet"},
                        train={"batch_size": 32, "compile": True})
    result = dry_run(load_config(path))
    (name, status), = result["compile"].items()
    assert name == "student test_compile:breaking_fitnet"
    assert status.startswith("eager: Unsupported: Call to `torch._dynamo.graph_break()`")


def test_compile_mode_is_validated(tmp_path):
    path = write_config(tmp_path / "m.yaml")
    assert load_config(path, ["train.compile=true", "train.compile_mode=max-autotune"]).train.compile
    with pytest.raises(UserError, match="train.compile_mode: 'fast' is not one of default, reduce-overhead"):
        load_config(path, ["train.compile_mode=fast"])
