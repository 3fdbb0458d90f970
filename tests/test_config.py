"""Config loading: YAML + dotted overrides, typed, with one-line errors naming the key."""

import pytest
import yaml

from fitdist.config import Config, dump_config, load_config, to_dict
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


def test_exponents_without_a_dot_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-6 as the string '1e-6'
    path = tmp_path / "c.yaml"
    path.write_text("optim: {eps: 1e-6, lr: 5E-2}\n")
    assert load_config(path).optim.eps == 1e-6 and load_config(path).optim.lr == 0.05
    assert load_config(None, ["optim.eps=1e-8", "optim.min_lr=-1e+0"]).optim.min_lr == -1.0
    with pytest.raises(UserError, match=r"optim.eps: expected float, got '1e-6x'"):
        load_config(None, ["optim.eps=1e-6x"])


# ---------------------------------------------------------------- per-stage optim: a partial override

OPTIM = """
optim: {name: sgd, lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 1.0e-4, schedule: multistep,
        milestones: [0.5], gamma: 0.2, warmup_steps: 7}
"""


def stage_optim(cfg: Config, i: int = 1) -> dict:
    return to_dict(cfg.stages[i].optim or cfg.optim)


def test_stage_optim_in_yaml_overrides_only_its_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("kd: [4, 1]}", "kd: [4, 1], optim: {lr: 0.003}}") + OPTIM)
    cfg = load_config(path)
    assert stage_optim(cfg) == {**to_dict(cfg.optim), "lr": 0.003}
    assert cfg.stages[1].optim.nesterov and cfg.stages[1].optim.warmup_steps == 7
    assert cfg.stages[0].optim is None  # a stage without its own block uses the top-level one
    # a top-level key overridden on the command line reaches the stage; the stage's own key stays
    cfg = load_config(path, ["optim.momentum=0.8", "optim.lr=0.1"])
    assert cfg.stages[1].optim.momentum == 0.8 and cfg.stages[1].optim.lr == 0.003


def test_stage_optim_from_the_command_line_inherits_the_rest(base, tmp_path):
    cfg = load_config(base, ["optim.nesterov=true", "optim.warmup_steps=5", "stages.1.optim.lr=0.003"])
    assert stage_optim(cfg) == {**to_dict(cfg.optim), "lr": 0.003}
    assert cfg.stages[1].optim.nesterov and cfg.stages[1].optim.warmup_steps == 5
    # the order of overrides does not matter: the stage block is merged once, at the end
    cfg = load_config(base, ["stages.1.optim.lr=0.003", "optim.momentum=0.8", "optim.schedule=constant"])
    assert cfg.stages[1].optim.momentum == 0.8 and cfg.stages[1].optim.schedule == "constant"
    # mixed: the stage block in YAML, one of its keys and a top-level key on the command line
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("kd: [4, 1]}", "kd: [4, 1], optim: {lr: 0.003, gamma: 0.5}}") + OPTIM)
    cfg = load_config(path, ["stages.1.optim.weight_decay=0.0", "optim.gamma=0.3", "optim.momentum=0.7"])
    assert stage_optim(cfg) == {**to_dict(cfg.optim), "lr": 0.003, "gamma": 0.5, "weight_decay": 0.0}
    assert cfg.optim.gamma == 0.3 and cfg.stages[1].optim.momentum == 0.7


def test_resolved_config_shows_each_stage_merged_and_loads_back_equal(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("kd: [4, 1]}", "kd: [4, 1], optim: {lr: 0.003}}") + OPTIM)
    cfg = load_config(path, ["optim.momentum=0.8"])
    dumped = tmp_path / "config.yaml"
    dump_config(cfg, dumped)
    written = yaml.safe_load(dumped.read_text())["stages"][1]["optim"]
    assert written["momentum"] == 0.8 and written["nesterov"] is True and written["lr"] == 0.003
    assert load_config(dumped) == cfg


def test_unknown_key_in_a_stage_optim_names_it(base, tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'stages.1.optim.lrr' \(did you mean: stages.1.optim.lr"):
        load_config(base, ["stages.1.optim.lrr=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("kd: [4, 1]}", "kd: [4, 1], optim: {nesterof: true}}"))
    with pytest.raises(UserError, match=r"unknown config key 'stages.1.optim.nesterof'"):
        load_config(path)
    # an unknown top-level key is reported where it was written, not in the stage it merges into
    path.write_text(BASE.replace("kd: [4, 1]}", "kd: [4, 1], optim: {lr: 0.1}}") + "optim: {lrate: 1}\n")
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrate'"):
        load_config(path)


# ---------------------------------------------------------------- Literal choices come from the code


def test_literal_choices_are_the_constants_of_the_code_that_reads_them(monkeypatch):
    import typing

    import fitdist.config
    from fitdist.config import HintConfig, LossConfig
    from fitdist.kernels import IMPLS
    from fitdist.losses import HINT_REDUCTIONS
    from fitdist.regressors import REGRESSOR_KINDS

    hints = typing.get_type_hints(HintConfig) | typing.get_type_hints(LossConfig)
    assert typing.get_args(hints["regressor"]) == REGRESSOR_KINDS
    assert typing.get_args(hints["hint_reduction"]) == HINT_REDUCTIONS
    assert typing.get_args(hints["impl"]) == IMPLS
    with pytest.raises(UserError, match=r"loss.impl: 'cuda' is not one of auto, fused, triton, reference"):
        load_config(None, ["loss.impl=cuda"])
    with pytest.raises(UserError, match=r"hints.0.regressor: 'mlp' is not one of auto, conv, adaptive, linear"):
        load_config(None, ["hints=[{student: a, teacher: b, regressor: mlp}]"])
    # the annotations name the constants (not copies of them): a new choice there is a valid key here
    monkeypatch.setattr(fitdist.config, "REGRESSOR_KINDS", (*REGRESSOR_KINDS, "mlp"))
    monkeypatch.setattr(fitdist.config, "HINT_REDUCTIONS", (*HINT_REDUCTIONS, "sum"))
    monkeypatch.setattr(fitdist.config, "IMPLS", (*IMPLS, "cuda"))
    cfg = load_config(None, ["hints=[{student: a, teacher: b, regressor: mlp}]", "loss.impl=cuda",
                             "loss.hint_reduction=sum"])
    assert (cfg.hints[0].regressor, cfg.loss.impl, cfg.loss.hint_reduction) == ("mlp", "cuda", "sum")
