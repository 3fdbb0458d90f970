"""Two teachers under real DeepSpeed ZeRO-2 (DS_ACCELERATOR=cpu, 2 processes under torchrun, gloo on
loopback): the teachers stay outside the engine, both ranks end identical, student.pt is the student's."""

import pytest
import torch
from conftest import write_config
from test_deepspeed import STUDENT, ZERO2, torchrun
from test_ensemble import two_teachers

from fitdist.config import ModelConfig
from fitdist.models import build_model

pytest.importorskip("deepspeed")


@pytest.mark.slow  # minutes of 2-process DeepSpeed / compilation: `bash launch/test.sh -m slow`
def test_two_teachers_under_deepspeed_zero2_keep_ranks_identical(tmp_path):
    # test_deepspeed's student has no BatchNorm: its ranks' buffers agree too
    path = write_config(
        tmp_path / "ds.yaml", student=STUDENT, teachers=two_teachers(tmp_path), loss={"ensemble": "mean_probs"},
        hints=[{"student": "conv3", "teacher": "conv2", "from": "b"}],
        stages=[{"name": "hint", "steps": 2, "ce": 0, "hint": 1}, {"name": "kd", "steps": 2, "ce": 1, "kd": 1}],
        data={"source": "fashion-mnist", "train_subset": 256},
        train={"batch_size": 16, "log_every": 2, "threads": 1},
        strategy={"kind": "deepspeed", "deepspeed_config": str(ZERO2)},
    )
    two = torchrun(path, tmp_path / "two.json")
    assert two["world"] == 2 and two["keys"] > 0 and two["summary"]["steps"] == 4
    assert two["mismatched"] == []  # every parameter, regressors included, equal on both ranks
    exported = torch.load(tmp_path / "ds" / "student.pt", weights_only=True)
    assert set(exported) == set(build_model(ModelConfig(STUDENT["name"], STUDENT["kwargs"]), 10, 1).state_dict())
