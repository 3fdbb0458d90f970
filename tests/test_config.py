"""Config loading: YAML + dotted overrides, typed, with one-line errors naming the key."""

import pytest

from fitdist.config import Config, load_config
from fitdist.errors import UserError

BASE = """
name: t
student: {name: "fitdist:fitnet", kwargs: {widths: [4, 8], pool_after: [1]}}
teacher: {name: "fitdist:fitnet", weights: t.pt}
hints: [{student: conv2, teacher: conv2}]
stages:
  - {name: hint, steps: 10, ce: 0, hint: 1}
  - {name: kd, steps: 20, kd: [4, 1]}
"""


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    return path


def test_yaml_and_dotted_overrides(base):
    cfg = load_config(base, ["optim.lr=0.01", "stages.1.steps=500", "stages.1.kd=[3, 0.5]",
                             "student.kwargs.widths=[2, 2]", "train.precision=bf16", "teacher.precision=bf16"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.stages[1].steps == 500 and cfg.stages[1].kd == [3.0, 0.5]
    assert cfg.student.kwargs == {"widths": [2, 2], "pool_after": [1]}
    assert cfg.train.precision == "bf16" and cfg.teacher.precision == "bf16"
    assert cfg.stages[0].hint == 1.0 and cfg.run_dir.as_posix() == "runs/t"


def test_defaults_without_a_file_and_name_from_file_stem(tmp_path):
    assert load_config(None).name == "run"
    p = tmp_path / "my-recipe.yaml"
    p.write_text("student: {name: 'torchvision:resnet18'}\n")
    assert load_config(p).name == "my-recipe"


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(did you mean: optim.lr"),
    ("stages.0.stepz=3", r"unknown config key 'stages.0.stepz' \(did you mean: stages.0.steps"),
    ("optim.lr=fast", r"optim.lr: expected float, got 'fast'"),
    ("train.batch_size=1.5", r"train.batch_size: expected int, got 1.5"),
    ("train.precision=fp64", r"train.precision: 'fp64' is not one of fp32, bf16, fp16"),
    ("stages.5.steps=3", r"stages.5 is out of range"),
    ("stages.0.steps=0", r"stages.0.steps: must be > 0"),
    ("stages.1.kd=[1, 2, 3]", r"stages.1.kd: a schedule is \[start, end\]"),
    ("teacher=null", r"kd/hint weights need a teacher"),
    ("stages=[]", r"stages: the stage list is empty"),
    ("optim.lr", r"not of the form key=value"),
    ("train.deterministic=true", r"unknown config key 'train.deterministic'"),
])
def test_bad_overrides_name_the_key(base, override, message):
    with pytest.raises(UserError, match=message):
        load_config(base, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("optim: {lrate: 1}\n")
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrate'"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(bad)
