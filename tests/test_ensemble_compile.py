"""train.compile with a teacher ensemble: each teacher's forward is compiled on its own, named by its id."""

import math

import pytest
from conftest import write_config
from test_ensemble import two_teachers

from fitdist.config import load_config
from fitdist.dryrun import dry_run


@pytest.mark.slow  # minutes of 2-process DeepSpeed / compilation: `bash launch/test.sh -m slow`
def test_each_teacher_of_an_ensemble_compiles_on_its_own(tmp_path):
    path = write_config(tmp_path / "c.yaml", teachers=two_teachers(tmp_path), train={"compile": True},
                        stages=[{"name": "kd", "steps": 1, "kd": 1}])
    out = dry_run(load_config(path))
    assert out["compile"] == {"student fitdist:fitnet": "compiled", "teacher a (fitdist:fitnet)": "compiled",
                              "teacher b (fitdist:fitnet)": "compiled"}
    assert all(math.isfinite(v) for st in out["stages"] for v in st["terms"].values())
