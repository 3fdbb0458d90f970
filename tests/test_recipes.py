"""Every shipped recipe dry-runs (build, probe hints, each stage's first and last step, no data read), and
each family has the shape its comments promise: models, parameter counts, regressor kernels,
hint shapes, stage lists.

ImageNet recipes run at 64 px here (on CPU 224 px is slow); at 64 px every hint pair used is
still of equal size on both sides, so the regressor checks hold as at 224 px.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from fitdist.config import load_config, nonzero_weight
from fitdist.dryrun import dry_run
from fitdist.errors import UserError
from fitdist.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "deepspeed" not in p.parts)
PACKAGED = sorted((ROOT / "fitdist" / "configs").glob("*.yaml"))
# the teachers' named weights would resize their input to their own 224 px: held at 64 too
SMALL = {"imagenet": ["data.image_size=64", "teacher.input.size=64"]}

# student params (exact, from the zoo / torchvision) for the CIFAR-100 and ImageNet students
PARAMS = {
    "resnet8x4": 1_233_540,
    "wrn-16-2": 703_284,
    "resnet20": 278_324,
    "vgg8": 3_965_028,
    "resnet32x4": 7_433_860,
    "wrn-40-2": 2_255_156,
    "resnet110": 1_736_564,
    "vgg13": 9_462_180,
}
# FitNets paper, Table 1 (CIFAR-10): params of FitNet 1-4 and the teacher, to ±10%
PAPER_PARAMS = {
    "fitnet1": 250e3,
    "fitnet2": 862e3,
    "fitnet3": 1.6e6,
    "fitnet4": 2.5e6,
    "fitnet-teacher-cifar10": 9e6,
}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.fixture(scope="module")
def results() -> dict:
    """Dry-run results of every recipe, computed once (a dry run of all of them takes seconds)."""
    out = {}
    for path in RECIPES + PACKAGED:
        family = path.parent.name
        out[rel(path)] = dry_run(load_config(path, SMALL.get(family, [])))
    return out


def test_there_are_recipes():
    names = {rel(p) for p in RECIPES}
    assert len([n for n in names if n.startswith("configs/cifar10/")]) == 5
    assert len([n for n in names if n.startswith("configs/cifar100/")]) == 20
    assert len([n for n in names if n.startswith("configs/imagenet/")]) == 6
    assert len(PACKAGED) == 7


def expected_trainable(cfg, stage, r) -> int:
    """What a stage trains, counted without fitdist's probe: a stage with a ce or kd term (or
    `trainable: all`) trains the whole backbone; a hint-only stage trains the backbone's parameters
    up to and including its guided layer (the zoo and torchvision models register their layers in
    forward order); the regressors train when the hint term is used, or with `trainable: all`."""
    backbone = build_model(cfg.student, r["data"]["num_classes"], r["data"]["in_channels"])
    names = [n for n, _ in backbone.named_parameters()]
    sizes = {n: p.numel() for n, p in backbone.named_parameters()}
    uses = {t for t in ("ce", "kd", "hint") if nonzero_weight(getattr(stage, t))}
    if stage.trainable == "all" or uses & {"ce", "kd"}:
        count = sum(sizes.values())
    else:
        guided = [h.student + "." for h in cfg.hints]
        last = max(i for i, n in enumerate(names) if n.startswith(tuple(guided)))
        count = sum(sizes[n] for n in names[: last + 1])
    if stage.trainable == "all" or "hint" in uses:
        count += r["student"]["regressor_params"]
    return count


@pytest.mark.parametrize("path", [rel(p) for p in RECIPES + PACKAGED])
def test_recipe_dry_runs(results, path):
    r = results[path]
    cfg = load_config(ROOT / path, SMALL.get(Path(path).parent.name, []))
    assert [s["name"] for s in r["stages"]] == [s.name for s in cfg.stages]
    for stage, out in zip(cfg.stages, r["stages"]):
        assert out["trainable_params"] == expected_trainable(cfg, stage, r)
        used = {t for t in ("ce", "kd", "hint") if nonzero_weight(getattr(stage, t))}
        for checked in (out, out.get("last", out)):  # the schedule's first and last step
            assert set(checked["terms"]) == used | {"loss"}
            assert all(math.isfinite(v) and v > 0 for v in checked["terms"].values()), checked
    assert r["student"]["params"] > 0 and (r["student"]["macs"] or 0) > 0
    if cfg.teacher is not None:
        assert r["teacher"]["weights"].startswith(("random", "loaded"))
        assert r["teacher"]["params"] > r["student"]["params"]  # a teacher is the bigger net
    assert len(r["hints"]) == len(cfg.hints)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_cifar10_fitnets_paper(results, n):
    r = results[f"configs/cifar10/fitnet{n}.yaml"]
    assert r["student"]["params"] == pytest.approx(PAPER_PARAMS[f"fitnet{n}"], rel=0.1)
    assert r["teacher"]["params"] == pytest.approx(PAPER_PARAMS["fitnet-teacher-cifar10"], rel=0.1)
    (hint,) = r["hints"]
    # the paper's convolutional regressor: guided map 8x8, hint map 7x7 -> k = 8 - 7 + 1 = 2
    assert hint["teacher_shape"] == [192, 7, 7] and hint["student_shape"][1:] == [8, 8]
    assert hint["kernel"] == [2, 2] and hint["regressor"] == "conv"
    hint_stage, kd_stage = r["stages"]
    assert set(hint_stage["terms"]) == {"hint", "loss"}
    assert (
        hint_stage["trainable_params"] < r["student"]["params"] / 2
    )  # only up to the guided layer
    assert kd_stage["weights"] == {"ce": 1.0, "kd": 4.0, "hint": 0.0}  # λ starts at 4
    last = kd_stage["last"]  # the dry run also ran the stage's last step, where λ has reached 1
    assert last["step"] == kd_stage["steps"] - 1 and last["weights"]["kd"] == 1.0
    assert kd_stage["optim"] == "rmsprop"
    # every FitNet is cheaper to run than the teacher (the paper reports speed-ups of 1.4x-13x)
    assert r["student"]["macs"] < r["teacher"]["macs"]


PAIRS = [
    ("resnet32x4", "resnet8x4", [128, 16, 16]),
    ("wrn-40-2", "wrn-16-2", [64, 16, 16]),
    ("resnet110", "resnet20", [32, 16, 16]),
    ("vgg13", "vgg8", [256, 8, 8]),
]


@pytest.mark.parametrize("teacher,student,shape", PAIRS)
def test_cifar100_pairs(results, teacher, student, shape):
    pair = f"{teacher}-{student}"
    kd = results[f"configs/cifar100/kd-{pair}.yaml"]
    joint = results[f"configs/cifar100/fitnets-joint-{pair}.yaml"]
    two = results[f"configs/cifar100/fitnets-{pair}.yaml"]
    for r in (kd, joint, two):
        assert r["student"]["params"] == PARAMS[student]
        assert r["teacher"]["params"] == PARAMS[teacher]
        assert r["data"]["num_classes"] == 100 and r["data"]["image_size"] == [32, 32]
    assert (
        results[f"configs/cifar100/teacher-{teacher}.yaml"]["student"]["params"] == PARAMS[teacher]
    )
    assert results[f"configs/cifar100/scratch-{student}.yaml"]["teacher"] is None
    assert kd["hints"] == [] and kd["stages"][0]["weights"] == {"ce": 0.1, "kd": 0.9, "hint": 0.0}
    for r in (joint, two):
        (hint,) = r["hints"]
        assert hint["student_shape"] == hint["teacher_shape"] == shape
        assert hint["kernel"] == [1, 1]
    assert len(joint["stages"]) == 1 and joint["stages"][0]["weights"]["hint"] == 100.0
    assert (
        joint["hints"][0]["regressor_params"] > shape[0] ** 2
    )  # conv + BN (RepDistiller's ConvReg)
    assert [s["name"] for s in two["stages"]] == ["hint", "kd"]
    assert two["stages"][0]["trainable_params"] < two["student"]["params"]


def test_imagenet(results):
    r = results["configs/imagenet/fitnets-resnet34-resnet18.yaml"]
    assert r["student"]["params"] == 11_689_512 and r["teacher"]["params"] == 21_797_672
    assert r["strategy"].startswith("ddp")
    (hint,) = r["hints"]
    assert hint["student_shape"][0] == hint["teacher_shape"][0] == 256 and hint["kernel"] == [1, 1]
    m = results["configs/imagenet/fitnets-resnet50-mobilenet_v2.yaml"]
    assert m["student"]["params"] == 3_504_872 and m["teacher"]["params"] == 25_557_032
    (hint,) = m["hints"]
    assert hint["student_shape"][0] == 96 and hint["teacher_shape"][0] == 1024
    assert hint["student_shape"][1:] == hint["teacher_shape"][1:] and hint["kernel"] == [1, 1]
    kd = results["configs/imagenet/kd-resnet34-resnet18.yaml"]
    assert kd["data"]["num_classes"] == 1000 and kd["stages"][0]["weights"]["kd"] == 0.5


def test_imagenet_timm_teacher(results):
    """ConvNeXt-T (timm) -> ResNet-18: the hint path is checked by the dry run; its stages.2 and the
    student's layer3 are both stride 16, so the 1x1 regressor maps 256 to 384 channels at any size."""
    r = results["configs/imagenet/fitnets-convnext_tiny-resnet18.yaml"]
    assert r["teacher"]["params"] == 28_589_128 and r["student"]["params"] == 11_689_512
    assert r["teacher"]["weights"].startswith(("random", "loaded timm:fb_in1k"))  # the dry run downloads nothing
    (hint,) = r["hints"]
    assert hint["student_shape"][0] == 256 and hint["teacher_shape"][0] == 384
    assert hint["student_shape"][1:] == hint["teacher_shape"][1:] and hint["kernel"] == [1, 1]
    kd = results["configs/imagenet/kd-convnext_tiny-resnet18.yaml"]
    assert kd["hints"] == [] and kd["teacher"]["name"] == "timm:convnext_tiny"


def test_imagenet_hints_are_equal_size_at_224():
    """The shipped image size: one ResNet-34 -> ResNet-18 dry run at 224 px (a few seconds)."""
    r = dry_run(load_config(ROOT / "configs/imagenet/fitnets-resnet34-resnet18.yaml"))
    assert r["hints"][0]["student_shape"] == r["hints"][0]["teacher_shape"] == [256, 14, 14]
    assert r["student"]["macs"] == pytest.approx(1.82e9, rel=0.02)  # torchvision: 1.81 GMACs


def test_recipe_without_shape_is_a_user_error(tmp_path):
    cfg = load_config(ROOT / "configs/cifar100/kd-vgg13-vgg8.yaml", ["data.image_size=null"])
    with pytest.raises(UserError, match="data.image_size"):
        dry_run(cfg)


def test_cli_dry_run_prints_json_and_loads_existing_teacher_weights(tmp_path):
    """`fitdist train CONFIG --dry-run`: one JSON object; a teacher file that exists is loaded."""
    cfg = load_config(ROOT / "fitdist/configs/fmnist-fitnets.yaml")
    torch.save(
        build_model(
            cfg.teacher.__class__(name=cfg.teacher.name, kwargs=cfg.teacher.kwargs), 10, 1
        ).state_dict(),
        tmp_path / "teacher.pt",
    )
    proc = run_cli(
        "train",
        ROOT / "fitdist/configs/fmnist-fitnets.yaml",
        f"teacher.weights={tmp_path / 'teacher.pt'}",
        "run.dir=" + str(tmp_path / "run"),
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["teacher"]["weights"] == f"loaded {tmp_path / 'teacher.pt'}"
    assert out["hints"][0]["kernel"] == [1, 1] and len(out["stages"]) == 2
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
