"""Step-based schedules: λ annealing and learning-rate factors against their formulas."""

import math

import pytest
import torch
import yaml

from fitdist.config import OptimConfig, load_config
from fitdist.schedule import build_optimizer, build_scheduler, lr_factor, weight_at


def test_weight_anneals_linearly_from_first_to_last_step():
    assert weight_at(2.5, 7, 10) == 2.5
    values = [weight_at([4.0, 1.0], s, 7) for s in range(7)]
    assert values[0] == 4.0 and values[-1] == 1.0
    assert values == pytest.approx([4.0 - 0.5 * s for s in range(7)])
    assert weight_at([4.0, 1.0], 0, 1) == 1.0  # a one-step stage takes the end value


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=0.1, warmup_steps=4, schedule="cosine", min_lr=0.01)
    assert [lr_factor(s, 20, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in range(4, 20):
        p = (s - 4) / 16
        assert lr_factor(s, 20, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def test_multistep_by_fraction_and_by_step():
    frac = OptimConfig(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, 100, frac) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    steps = OptimConfig(schedule="multistep", milestones=[30, 60], gamma=0.5)
    assert [lr_factor(s, 100, steps) for s in (29, 30, 60)] == pytest.approx([1, 0.5, 0.25])


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_optimizers_and_scheduler_step_the_lr(name):
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(name=name, lr=0.2, schedule="multistep", milestones=[2], gamma=0.5)
    opt = build_optimizer([p], cfg, cfg.lr)
    sched = build_scheduler(opt, 4, cfg)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.1])


# what each optimizer reads from the config: OptimConfig field -> torch param_group key
HYPERPARAMS = {
    "sgd": {"momentum": "momentum", "nesterov": "nesterov", "weight_decay": "weight_decay"},
    "adamw": {"betas": "betas", "eps": "eps", "weight_decay": "weight_decay"},
    "rmsprop": {"alpha": "alpha", "eps": "eps", "momentum": "momentum", "weight_decay": "weight_decay"},
}
# values unlike every default, so a field that is dropped on the way cannot pass unnoticed
CUSTOM = {"momentum": 0.7, "nesterov": True, "weight_decay": 0.0123, "betas": [0.8, 0.95], "eps": 1e-6,
          "alpha": 0.5}


def check_param_group(opt: torch.optim.Optimizer, name: str, lr: float) -> None:
    assert type(opt).__name__.lower() == name
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(lr)
    for field, key in HYPERPARAMS[name].items():
        value = tuple(CUSTOM[field]) if field == "betas" else CUSTOM[field]
        assert group[key] == pytest.approx(value), field


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_optimizer_hyperparameters_reach_the_param_groups(name):
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(name=name, lr=0.2, **CUSTOM)
    check_param_group(build_optimizer([p], cfg, 0.3), name, 0.3)


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_a_stage_optim_override_keeps_the_top_level_hyperparameters(tmp_path, name):
    # the top-level block sets everything; stage 1 changes only its lr, in the YAML or on the command line
    stages = [{"steps": 5}, {"steps": 5, "optim": {"lr": 0.003}}]
    in_yaml, on_cli = tmp_path / "yaml.yaml", tmp_path / "cli.yaml"
    in_yaml.write_text(yaml.safe_dump({"optim": {"name": name, "lr": 0.2, **CUSTOM}, "stages": stages}))
    on_cli.write_text(yaml.safe_dump({"optim": {"name": name, "lr": 0.2, **CUSTOM}, "stages": stages[:1] * 2}))
    p = torch.nn.Parameter(torch.zeros(3))
    for cfg in (load_config(in_yaml), load_config(on_cli, ["stages.1.optim.lr=0.003"])):
        optim = cfg.stages[1].optim or cfg.optim
        assert optim.lr == 0.003
        check_param_group(build_optimizer([p], optim, optim.lr), name, 0.003)
