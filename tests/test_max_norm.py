"""optim.max_norm: each output unit's incoming-weight norm clipped to C after every step, against the
closed form, in one process, under 2-process DDP (torchrun, gloo) and DeepSpeed ZeRO-2 (CPU),
both equal to the one-process run."""

import pytest
import torch
from conftest import run_cli, write_config
from test_ddp import torchrun as ddp_torchrun

from fitdist import dist as fdist
from fitdist.config import load_config
from fitdist.distiller import Student
from fitdist.max_norm import EPS, apply_max_norm, constrained_weights
from fitdist.regressors import build_regressor
from fitdist.trainer import _Run
from fitdist.zoo import ZOO

C = 0.6
NO_BN_STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 4, 8, 8], "pool_after": [2], "batch_norm": False,
                                                      "hidden": 12}}
TEACHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [8, 16, 16], "pool_after": [1, 2]}}


def unit_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).double().norm(dim=1)


@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (5, 11), (6, 2, 5)])
def test_clip_matches_the_closed_form_per_unit(seed, shape):
    o = shape[0]  # units of random directions and norms, about half below C and half above
    target = torch.where(torch.rand(o) < 0.5, C * (0.1 + 0.8 * torch.rand(o)), C * (1.1 + 2 * torch.rand(o)))
    target[0], target[1] = C * 0.5, C * 2
    w = torch.randn(shape)
    w = w * (target / unit_norms(w).float()).view(-1, *([1] * (len(shape) - 1)))
    before = w.clone()
    apply_max_norm([w], C)
    for o in range(shape[0]):
        norm = float(before[o].double().norm())
        if norm <= C:
            assert torch.equal(w[o], before[o])  # within the bound: untouched, bit for bit
        else:
            torch.testing.assert_close(w[o], before[o] * (C / (norm + EPS)), rtol=1e-6, atol=1e-7)
            assert float(w[o].double().norm()) == pytest.approx(C, rel=1e-5)


def test_constrained_weights_are_conv_and_linear_weights_that_train():
    backbone = ZOO["fitnet"](widths=[4, 8], pool_after=[1], hidden=6)  # with BatchNorm
    student = Student(backbone, ["conv2"], [build_regressor((8, 4, 4), (16, 4, 4), "conv", False, False, "hints.0")])
    got = {id(p) for p in constrained_weights(student)}
    names = {n for n, p in student.named_parameters() if id(p) in got}
    # no bias, no BatchNorm weight (conv1.1, conv2.1)
    assert names == {"backbone.conv1.0.weight", "backbone.conv2.0.weight", "backbone.hidden.0.weight",
                     "backbone.fc.weight", "regressors.0.proj.weight"}
    backbone.conv2.requires_grad_(False)  # frozen (FitNets stage 1 above the guided layer): left alone
    assert "backbone.conv2.0.weight" not in {n for n, p in student.named_parameters()
                                             if id(p) in {id(q) for q in constrained_weights(student)}}


@pytest.fixture(scope="module")
def hint_config(tmp_path_factory):
    """Hint stage then KD, with a random teacher: the regressor is constrained too."""
    root = tmp_path_factory.mktemp("maxnorm")
    torch.manual_seed(0)
    torch.save(ZOO["fitnet"](10, 1, **TEACHER["kwargs"]).state_dict(), root / "teacher.pt")
    return write_config(
        root / "mn.yaml", student=NO_BN_STUDENT, teacher={**TEACHER, "weights": str(root / "teacher.pt")},
        hints=[{"student": "conv3", "teacher": "conv2"}],
        stages=[{"name": "hint", "steps": 3, "ce": 0, "hint": 1}, {"name": "kd", "steps": 3, "ce": 1, "kd": 1}],
        optim={"name": "sgd", "lr": 0.2, "schedule": "constant", "max_norm": C},
        data={"source": "fashion-mnist", "train_subset": 512},
        train={"batch_size": 16, "log_every": 3, "threads": 1, "eval_batch_size": 1000, "checkpoint_every": 0},
    )


def one_process(cfg_path, run_dir, *overrides):
    cfg = load_config(cfg_path, [f"run.dir={run_dir}", *overrides])
    env = fdist.setup(cfg.train.device, cfg.strategy.backend)
    try:
        run = _Run(cfg, env, resume=False)
        run.run()
    finally:
        fdist.teardown()
    return run.student


@pytest.fixture(scope="module")
def one_run(hint_config, tmp_path_factory):
    """The student (backbone + regressor) after a one-process run."""
    return one_process(hint_config, tmp_path_factory.mktemp("one") / "run")


def test_a_run_keeps_every_unit_within_the_bound_and_ddp_equals_one_process(hint_config, one_run, tmp_path):
    student = one_run
    weights = constrained_weights(student.requires_grad_(True))
    assert any("regressors" in n for n, p in student.named_parameters() if any(p is w for w in weights))
    norms = torch.cat([unit_norms(w) for w in weights])
    assert norms.max() <= C * (1 + 1e-5)
    assert (norms > C * (1 - 1e-4)).sum() >= 4  # the bound binds on this run (lr 0.2): it was applied

    two = ddp_torchrun(hint_config, tmp_path / "two.json", "strategy.kind=ddp", f"run.dir={tmp_path / 'two'}")
    assert two["world"] == 2 and two["mismatched"] == []  # every rank applied the same clip
    a = torch.load(tmp_path / "two" / "student.pt", weights_only=True)
    for k, v in student.backbone.state_dict().items():
        torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-5)


def test_deepspeed_zero2_equals_one_process_and_zero3_is_refused(hint_config, one_run, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from test_deepspeed import ZERO2, ZERO3
    from test_deepspeed import torchrun as ds_torchrun

    ds = ds_torchrun(hint_config, tmp_path / "ds.json", "strategy.kind=deepspeed",
                     f"strategy.deepspeed_config={ZERO2}", f"run.dir={tmp_path / 'ds'}")
    assert ds["mismatched"] == []
    a = torch.load(tmp_path / "ds" / "student.pt", weights_only=True)
    b = one_run.backbone.state_dict()
    for k in b:  # the fp32 master partitions carried the clip: the trajectories agree (fails without it)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for k, v in a.items():
        if k.endswith("weight") and v.dim() >= 2:
            assert unit_norms(v).max() <= C * (1 + 1e-5)

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # set for the second stage only: refused before the first one runs
    done = run_cli("train", hint_config, "strategy.kind=deepspeed", f"strategy.deepspeed_config={ZERO3}",
                   f"run.dir={tmp_path / 'z3'}", "optim.max_norm=0", f"stages.1.optim={{max_norm: {C}}}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "optim.max_norm" in lines[-1] and "ZeRO-3" in lines[-1], done.stderr[-2000:]
    assert not (tmp_path / "z3" / "metrics.jsonl").exists()  # no step was taken


def test_bad_and_per_stage_values(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", stages=[{"name": "a", "steps": 2}, {"name": "b", "steps": 2}])
    for override, key in (("optim.max_norm=-1", "optim.max_norm"), ("stages.1.optim={max_norm: -0.5}",
                                                                     "stages.1.optim.max_norm")):
        done = run_cli("check", cfg, override)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and key in lines[0] and "-" in lines[0], done.stderr
    loaded = load_config(cfg, ["optim.max_norm=1.5", "stages.1.optim={max_norm: null}"])
    assert loaded.optim.max_norm == 1.5 and loaded.stages[0].optim is None
    assert loaded.stages[1].optim.max_norm is None and loaded.stages[1].optim.lr == loaded.optim.lr
    assert load_config(None).optim.max_norm == 0.0
