"""Teacher ensembles end to end (real Fashion-MNIST runs): resume exactness with `sample`, nothing of
a teacher in a checkpoint, and one teacher in any form training bit-identically to `teacher:`."""

import shutil

import torch
from conftest import STUDENT, write_config
from test_ensemble import SMALL, teacher_file, two_teachers

from fitdist.config import ModelConfig, load_config
from fitdist.ensemble import Ensemble
from fitdist.models import build_model
from fitdist.trainer import train


def test_sample_mode_resumes_exactly_and_no_teacher_is_in_a_checkpoint(tmp_path, monkeypatch):
    path = write_config(tmp_path / "r.yaml", teachers=two_teachers(tmp_path),
                        hints=[{"student": "conv3", "teacher": "conv2", "from": "b"}],
                        stages=[{"name": "hint", "steps": 4, "ce": 0, "hint": 1},
                                {"name": "kd", "steps": 6, "ce": 1, "kd": 1}],
                        loss={"ensemble": "sample"}, data={"source": "fashion-mnist", "train_subset": 512},
                        train={"batch_size": 16, "grad_accum": 2, "log_every": 5, "eval_batch_size": 1000,
                               "threads": 1})
    overrides = ["deterministic=true", "train.checkpoint_every=3", "run.keep_checkpoints=10"]
    cfg = load_config(path, overrides)
    train(cfg)
    full = (cfg.run_dir / "student.pt").read_bytes()
    for ckpt in sorted((cfg.run_dir / "checkpoints").iterdir()):  # "kill" it after step 6 (inside stage kd)
        if int(ckpt.name.split("-")[1]) > 6:
            shutil.rmtree(ckpt)
    (cfg.run_dir / "student.pt").unlink()
    assert train(load_config(path, overrides), resume=True)["steps"] == 10
    assert (cfg.run_dir / "student.pt").read_bytes() == full
    # a run that draws other teachers ends elsewhere: the draw matters, and resume reproduced it
    draw = Ensemble.draw
    monkeypatch.setattr(Ensemble, "draw", lambda self, step, micro: draw(self, step + 1, micro))
    other = train(load_config(path, [*overrides, f"run.dir={tmp_path / 'other'}"]))
    monkeypatch.undo()
    assert other["steps"] == 10 and (tmp_path / "other" / "student.pt").read_bytes() != full
    student_keys = set(build_model(ModelConfig(STUDENT["name"], STUDENT["kwargs"]), 10, 1).state_dict())
    assert set(torch.load(cfg.run_dir / "student.pt", weights_only=True)) == student_keys
    state = torch.load(cfg.run_dir / "checkpoints" / "step-00000010" / "trainer.pt", weights_only=True)
    keys = set(state["student"])
    assert {k for k in keys if not k.startswith("regressors.")} == {f"backbone.{k}" for k in student_keys}
    assert "teacher" not in str(sorted(k for k in state if k != "config"))


def test_one_teacher_as_teacher_or_teachers_and_twin_teachers_train_bit_identically(tmp_path):
    """`teacher: X` is `teachers: [X]`; and two copies of X give X's target exactly under mean_logits
    (½t + ½t = t in floating point: halving and doubling are exact) and sample (either draw is X): the same student.pt, byte for byte."""
    x = {**SMALL, "weights": teacher_file(tmp_path, SMALL, 1)}
    common = {"hints": [{"student": "conv3", "teacher": "conv2"}],
              "stages": [{"name": "hint", "steps": 2, "ce": 0, "hint": 1}, {"name": "kd", "steps": 3, "ce": 1, "kd": 1}],
              "data": {"source": "fashion-mnist", "train_subset": 256}}
    variants = {"teacher": {"teacher": x}, "teachers": {"teachers": [x]},
                "mean_logits": {"teachers": [{**x, "id": "x1"}, {**x, "id": "x2"}],
                                "loss": {"ensemble": "mean_logits"}},
                "sample": {"teachers": [{**x, "id": "x1"}, {**x, "id": "x2"}], "loss": {"ensemble": "sample"}}}
    exported = {}
    for name, sections in variants.items():
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", **common, **sections), ["deterministic=true"])
        train(cfg)
        exported[name] = (cfg.run_dir / "student.pt").read_bytes()
    assert len(set(exported.values())) == 1
