"""Bad input through the real CLI: exit status 2, one line naming the problem, no traceback."""

import pytest
import torch
from conftest import STUDENT, TEACHER, run_cli, write_config

from fitdist.config import ModelConfig
from fitdist.models import build_model


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("fitdist: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def teacher_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(build_model(ModelConfig(**TEACHER), 10, 1).state_dict(), path)
    return path


def kd_config(tmp_path, teacher_weights, **extra):
    return write_config(tmp_path / "kd.yaml", teacher={**TEACHER, "weights": str(teacher_weights)},
                        hints=[{"student": "conv3", "teacher": "conv2"}],
                        stages=[{"name": "hint", "steps": 2, "ce": 0, "hint": 1}], **extra)


def test_unknown_key_and_wrong_type(tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    assert_one_line_error(run_cli("train", cfg, "optim.lrr=0.1"), "optim.lrr", "did you mean: optim.lr")
    assert_one_line_error(run_cli("train", cfg, "train.batch_size=big"), "train.batch_size", "expected int")
    assert_one_line_error(run_cli("train", tmp_path / "missing.yaml"), "config file not found", "missing.yaml")
    assert_one_line_error(run_cli("train", cfg, "stages.0.steps=0"), "stages.0.steps")


def test_missing_hint_paths_name_the_nearest(tmp_path, teacher_weights):
    cfg = kd_config(tmp_path, teacher_weights)
    assert_one_line_error(run_cli("train", cfg, "hints.0.student=conv33"), "student hint", "'conv33'", "conv3")
    assert_one_line_error(run_cli("train", cfg, "hints.0.teacher=cnv2"), "teacher hint", "'cnv2'", "conv2")


def test_teacher_weights_missing_or_misfit(tmp_path, teacher_weights):
    cfg = kd_config(tmp_path, teacher_weights)
    assert_one_line_error(run_cli("train", cfg, f"teacher.weights={tmp_path / 'nope.pt'}"),
                          "teacher.weights", "nope.pt")
    other = tmp_path / "other.pt"
    torch.save(build_model(ModelConfig(**STUDENT), 10, 1).state_dict(), other)
    assert_one_line_error(run_cli("train", cfg, f"teacher.weights={other}"), "teacher.weights", "does not fit")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("train", cfg, f"teacher.weights={garbage}"), "not a loadable state_dict")


def test_teacher_weights_for_another_class_count(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "t7.pt"
    torch.save(build_model(ModelConfig(**TEACHER), 7, 1).state_dict(), path)
    cfg = write_config(tmp_path / "kd.yaml", teacher={**TEACHER, "weights": str(path), "kwargs": {**TEACHER["kwargs"]}},
                       stages=[{"name": "kd", "steps": 2, "kd": 1.0}])
    # the 7-class weights do not fit a 10-class teacher: reported before any training
    assert_one_line_error(run_cli("train", cfg), "teacher.weights", "does not fit")


def test_unmappable_hint_shapes(tmp_path, teacher_weights):
    cfg = kd_config(tmp_path, teacher_weights)
    # student conv1 is 4×28×28... conv5 is 8×7×7, the teacher's conv1 is 16×14×14: a smaller map
    assert_one_line_error(run_cli("train", cfg, "hints.0.student=conv5", "hints.0.teacher=conv1"),
                          "hints.0", "smaller than the teacher hint")


def test_bad_run_dir_resume_and_eval_paths(tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_cli("train", cfg, f"run.dir={blocker / 'sub'}"), "run.dir", "cannot write")
    assert_one_line_error(run_cli("train", cfg, "--resume"), "no checkpoint in")
    assert_one_line_error(run_cli("eval", tmp_path / "nowhere"), "no such file", "nowhere")
    assert_one_line_error(run_cli("eval", tmp_path), "neither student.pt nor checkpoints")
    assert_one_line_error(run_cli("bench", "nonsense"), "bench")
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")
