"""`timm:<name>` models and `weights: timm`, offline: timm's pretrained loader is pointed at files
the test writes (`kwargs.pretrained_cfg_overlay.file`), and the loaded weights must equal them."""

import dataclasses

import pytest
import torch
from conftest import run_cli, write_config
from test_cli_errors import assert_one_line_error
from test_teacher_input import bundle

timm = pytest.importorskip("timm")

from fitdist.build import build_student, build_teacher
from fitdist.config import Config, HintConfig, ModelConfig, TeacherConfig, TeacherInputConfig
from fitdist.distiller import FrozenTeacher
from fitdist.errors import UserError
from fitdist.models import build_model


def weights_file(tmp_path, name: str, suffix: str = ".pth") -> tuple[str, dict]:
    """Random 1000-class weights of timm model `name` (initial weights plus noise), saved."""
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v
             for k, v in timm.create_model(name, num_classes=1000).state_dict().items()}
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return str(path), state


def overlay(path: str) -> dict:
    return {"pretrained_cfg_overlay": {"file": path}}


def test_a_timm_model_gets_the_datas_classes_and_channels_and_hooks():
    model = build_model(ModelConfig("timm:test_resnet"), 10, 1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match=r"student.name: no timm model 'test_resnt' \(did you mean: test_resnet"):
        build_model(ModelConfig("timm:test_resnt"), 10, 1)
    with pytest.raises(UserError, match=r"student.kwargs.num_classes: set by fitdist"):
        build_model(ModelConfig("timm:test_resnet", {"num_classes": 5}), 10, 1)
    cfg = Config(student=ModelConfig("timm:test_resnet"), teacher=TeacherConfig("timm:test_convnext"),
                 hints=[HintConfig("layer2", "stages.1"), HintConfig("layer2", "stage.1")])
    data = bundle(3, 32, [0.5] * 3, [0.5] * 3)
    with pytest.raises(UserError, match=r"stage\.1.*did you mean: .*stages\.1"):
        FrozenTeacher(build_model(cfg.teacher, 10, 3, where="teacher"), [h.teacher for h in cfg.hints])
    teacher = FrozenTeacher(build_model(cfg.teacher, 10, 3, where="teacher"), ["stages.1"])
    student = build_student(dataclasses.replace(cfg, hints=cfg.hints[:1]), data, teacher)
    assert len(student.regressors) == 1


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_load_exactly(tmp_path, suffix):
    path, want = weights_file(tmp_path, "test_resnet", suffix)
    model = build_model(ModelConfig("timm:test_resnet", overlay(path), weights="timm"), 1000, 3, where="teacher")
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_teacher_head_mismatch_is_an_error_student_head_reset_keeps_the_rest(tmp_path):
    path, want = weights_file(tmp_path, "test_resnet")
    cfg = ModelConfig("timm:test_resnet", overlay(path), weights="timm")
    with pytest.raises(UserError, match=r"teacher.weights: test_resnet predicts 1000 classes but the data has 10$"):
        build_model(cfg, 10, 3, where="teacher")
    with pytest.raises(UserError, match="student.head=reset"):
        build_model(cfg, 10, 3)
    got = build_model(dataclasses.replace(cfg, head="reset"), 10, 3).state_dict()
    assert got["fc.weight"].shape == (10, want["fc.weight"].shape[1])
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))


def test_teacher_input_defaults_to_the_pretrained_cfg(tmp_path):
    path, _ = weights_file(tmp_path, "test_convnext")
    teacher_cfg = TeacherConfig("timm:test_convnext", overlay(path), weights="timm")
    teacher = build_teacher(Config(teacher=teacher_cfg), bundle(3, 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1000))
    assert teacher.input_map.t_mean.flatten().tolist() == [0.5] * 3 and teacher.input_map.t_std.flatten().tolist() == [0.5] * 3
    seen = []
    teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    teacher(torch.randn(2, 3, 32, 32))
    assert teacher.input_map.size == 160 and seen == [(2, 3, 160, 160)]  # the pretrained cfg's input_size
    for declared, want in ((96, 96), (32, None)):  # a declared size wins; the data's own means no resize
        cfg = dataclasses.replace(teacher_cfg, input=TeacherInputConfig(size=declared))
        input_map = build_teacher(Config(teacher=cfg), bundle(3, 32, [0.5] * 3, [0.5] * 3, 1000)).input_map
        assert getattr(input_map, "size", None) == want  # None: same statistics and size, no map at all


def test_a_bad_tag_and_an_empty_cache_offline_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = {"name": "timm:test_resnet", "weights": "timm"}
    cfg = write_config(tmp_path / "kd.yaml", teacher=teacher, data={"source": "fashion-mnist", "num_classes": 1000},
                       stages=[{"name": "kd", "steps": 2, "kd": 1.0}])
    assert_one_line_error(run_cli("train", cfg, "teacher.weights=timm:nope"), "timm has no pretrained weights", "r160_in1k")
    assert_one_line_error(run_cli("train", cfg), "teacher.weights: cannot load timm test_resnet",
                          "timm/test_resnet.r160_in1k", str(tmp_path / "hf"))


def _build_on_rank(rank: int, store: str, path: str, log: str):
    """Local rank 0 builds (and would download) first; rank 1 builds only after it."""
    import os
    import time

    import torch.distributed as tdist

    os.environ["LOCAL_RANK"] = str(rank)
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained:
            with open(log, "a") as f:
                f.write(f"start {rank} {time.monotonic()}\n")
            if rank == 0:
                time.sleep(1.0)  # a slow download: rank 1 must not start before it ends
        model = real(name, pretrained=pretrained, **kwargs)
        if pretrained:
            with open(log, "a") as f:
                f.write(f"end {rank} {time.monotonic()}\n")
        return model

    timm.create_model = create  # this child process's own copy of timm
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = build_model(ModelConfig("timm:test_resnet", overlay(path), weights="timm"), 1000, 3, where="teacher")
        with open(log, "a") as f:
            f.write(f"sum {rank} {sum(p.double().sum().item() for p in model.parameters())}\n")
    finally:
        tdist.destroy_process_group()


def test_local_rank_0_builds_pretrained_first_while_the_others_wait(tmp_path):
    import torch.multiprocessing as mp

    path, _ = weights_file(tmp_path, "test_resnet")
    log = tmp_path / "log.txt"
    mp.spawn(_build_on_rank, args=(str(tmp_path / "store"), path, str(log)), nprocs=2)
    events = {tuple(line.split()[:2]): float(line.split()[2]) for line in log.read_text().splitlines()}
    assert events[("start", "1")] > events[("end", "0")]  # rank 1 reads the cache rank 0 filled
    assert events[("sum", "0")] == events[("sum", "1")]
