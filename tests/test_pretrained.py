"""Pretrained torchvision weights by name, offline: the torch hub cache is pre-filled with files
the test generates (random weights under the file name of the enum's URL), and every loaded tensor
must equal the file's. No network is used (HF_HUB_OFFLINE=1 makes any download attempt an error)."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from conftest import run_cli, write_config
from test_cli_errors import assert_one_line_error

from fitdist import pretrained
from fitdist.config import ModelConfig
from fitdist.errors import UserError
from fitdist.models import build_model

MNV3 = "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, downloads forbidden."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def fill(name: str, tag: str, seed: int, noise: bool = True) -> dict:
    """Writes random weights of torchvision model `name` where the cache holds `tag`'s file (its
    initial weights, plus noise unless `noise` is false: no layer then keeps its init values)."""
    entry = pretrained.resolve(name, f"torchvision:{tag}", "test")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(entry.meta["categories"]))
    state = {k: v + torch.randn_like(v) if v.is_floating_point() and noise else v for k, v in model.state_dict().items()}
    path = pretrained.cache_path(entry.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_equal_states(got: dict, want: dict, skip: tuple[str, ...] = ()):
    assert set(got) == set(want)
    for k, v in want.items():
        if not k.startswith(skip):
            assert torch.equal(got[k], v), k


def test_named_weights_load_exactly_from_the_cache(hub):
    assert not hub.exists()
    want = fill("mobilenet_v3_small", "DEFAULT", seed=int(torch.randint(0, 1 << 30, ())))
    assert (hub / Path(pretrained.resolve("mobilenet_v3_small", MNV3, "t").url).name).is_file()
    for spelling in (MNV3, "torchvision:IMAGENET1K_V1", "torchvision:DEFAULT"):
        model = build_model(ModelConfig("torchvision:mobilenet_v3_small", weights=spelling), 1000, 3)
        assert_equal_states(model.state_dict(), want)


def test_teacher_with_another_class_count_is_an_error_student_head_reset_is_not(hub):
    want = fill("mobilenet_v3_small", "DEFAULT", seed=1)
    with pytest.raises(UserError, match=r"teacher.weights: .* predicts 1000 classes but the data has 10$"):
        build_model(ModelConfig("torchvision:mobilenet_v3_small", weights=MNV3), 10, 3, where="teacher")
    with pytest.raises(UserError, match="student.head=reset replaces its classifier"):
        build_model(ModelConfig("torchvision:mobilenet_v3_small", weights=MNV3), 10, 3, where="student")
    with pytest.raises(UserError, match="teacher.head: reset"):
        build_model(ModelConfig("torchvision:mobilenet_v3_small", weights=MNV3, head="reset"), 10, 3, where="teacher")
    model = build_model(ModelConfig("torchvision:mobilenet_v3_small", weights=MNV3, head="reset"), 10, 3)
    got = model.state_dict()
    assert got["classifier.3.weight"].shape == (10, 1024) and got["classifier.3.bias"].shape == (10,)
    assert_equal_states({k: v for k, v in got.items() if not k.startswith("classifier.3.")},
                        {k: v for k, v in want.items() if not k.startswith("classifier.3.")})
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_head_reset_of_a_convolutional_classifier(hub):
    want = fill("squeezenet1_1", "DEFAULT", seed=2)
    model = build_model(ModelConfig("torchvision:squeezenet1_1", weights="torchvision:DEFAULT", head="reset"), 7, 3)
    got = model.state_dict()
    assert got["classifier.1.weight"].shape == (7, 512, 1, 1)
    assert_equal_states({k: v for k, v in got.items() if not k.startswith("classifier.1.")},
                        {k: v for k, v in want.items() if not k.startswith("classifier.1.")})


def test_one_channel_data_sums_the_rgb_stem(hub):
    fill("squeezenet1_1", "DEFAULT", seed=3)
    rgb = build_model(ModelConfig("torchvision:squeezenet1_1", weights="torchvision:DEFAULT"), 1000, 3).eval()
    grey = build_model(ModelConfig("torchvision:squeezenet1_1", weights="torchvision:DEFAULT"), 1000, 1).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # the same convolution, summed in another order: float32 rounding only
        torch.testing.assert_close(grey.features[0](x), rgb.features[0](x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)
        a, b = grey(x), rgb(x.repeat(1, 3, 1, 1))  # random weights: logits of 1e11, compared relatively
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_a_named_teacher_sees_its_weights_crop_size_and_statistics(hub):
    from test_teacher_input import bundle

    from fitdist.build import build_teacher
    from fitdist.config import Config, TeacherConfig

    fill("squeezenet1_1", "DEFAULT", seed=4)  # torchvision's preset: crop 224, ImageNet mean/std
    cfg = Config(teacher=TeacherConfig("torchvision:squeezenet1_1", weights="torchvision:DEFAULT"))
    teacher = build_teacher(cfg, bundle(3, 64, [0.5] * 3, [0.25] * 3, 1000))
    seen = []
    teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    u = torch.randint(0, 256, (2, 3, 64, 64)).float()
    teacher((u / 255 - 0.5) / 0.25)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    want = torch.nn.functional.interpolate((u / 255 - mean) / std, size=(224, 224), mode="bilinear", align_corners=False)
    assert seen[0].shape == (2, 3, 224, 224)
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-5)


def test_bad_names_and_a_missing_file_offline(hub):
    with pytest.raises(UserError, match="ResNet50_Weights are not resnet34's weights; its weights are ResNet34_Weights"):
        build_model(ModelConfig("torchvision:resnet34", weights="torchvision:ResNet50_Weights.DEFAULT"), 1000, 3)
    with pytest.raises(UserError, match="ResNet34_Weights has no 'IMAGENET1K_V3'.*did you mean: IMAGENET1K_V1"):
        build_model(ModelConfig("torchvision:resnet34", weights="torchvision:IMAGENET1K_V3"), 1000, 3)
    with pytest.raises(UserError, match="names torchvision weights but teacher.name is fitdist:fitnet"):
        build_model(ModelConfig("fitdist:fitnet", weights="torchvision:DEFAULT"), 10, 1, where="teacher")
    with pytest.raises(UserError, match="student.head: reset applies to pretrained weights by name"):
        build_model(ModelConfig("torchvision:resnet18", head="reset", weights="student.pt"), 10, 3)
    # export and eval rebuild a student without its weights: head: reset is then moot, not an error
    assert build_model(ModelConfig("torchvision:resnet18", head="reset"), 10, 3).fc.out_features == 10
    entry = pretrained.resolve("resnet34", "torchvision:DEFAULT", "t")
    with pytest.raises(UserError) as err:
        build_model(ModelConfig("torchvision:resnet34", weights="torchvision:DEFAULT"), 1000, 3, where="teacher")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and entry.url in msg and str(hub / "resnet34-b627a593.pth") in msg, msg


def test_cli_exit_2_for_a_teacher_head_mismatch_and_an_empty_cache(hub, tmp_path):
    fill("mobilenet_v3_small", "DEFAULT", seed=4)
    teacher = {"name": "torchvision:mobilenet_v3_small", "weights": MNV3}
    cfg = write_config(tmp_path / "kd.yaml", teacher=teacher, stages=[{"name": "kd", "steps": 2, "kd": 1.0}])
    assert_one_line_error(run_cli("train", cfg), "teacher.weights", "predicts 1000 classes but the data has 10")
    shutil.rmtree(hub)
    assert_one_line_error(run_cli("train", cfg), "teacher.weights", "HF_HUB_OFFLINE", str(hub))
    # the config check accepts the name without its file (the run fetches it); a wrong tag it refuses
    assert_one_line_error(run_cli("train", cfg, "teacher.weights=torchvision:IMAGENET9K"), "no 'IMAGENET9K'")


def test_dry_run_never_downloads(hub, tmp_path):
    from fitdist.config import load_config
    from fitdist.dryrun import dry_run

    cfg = write_config(tmp_path / "s.yaml", student={"name": "torchvision:squeezenet1_1", "weights": "torchvision:DEFAULT",
                                                     "head": "reset"},
                       data={"source": "fashion-mnist", "image_size": 64},
                       optim={"name": "sgd", "lr": 0.001, "schedule": "constant"})
    out = dry_run(load_config(cfg))
    assert out["student"]["weights"].startswith("random (torchvision:DEFAULT not in the cache")
    fill("squeezenet1_1", "DEFAULT", seed=5, noise=False)  # trainable weights: the dry-run steps stay finite
    assert dry_run(load_config(cfg))["student"]["weights"] == "loaded torchvision:DEFAULT"


def _fetch_on_rank(rank: int, store: str, url: str, torch_home: str, log: str):
    """Rank 0 downloads (slowly); rank 1 must not download and must read the file rank 0 wrote."""
    import time

    import torch.distributed as tdist

    os.environ.update(LOCAL_RANK=str(rank), TORCH_HOME=torch_home)
    os.environ.pop("HF_HUB_OFFLINE", None)

    def download(url, dst, hash_prefix=None, progress=True):
        with open(log, "a") as f:
            f.write(f"download by rank {rank}\n")
        time.sleep(1.0)  # rank 1 reaches the cache long before the file is there
        torch.save({"w": torch.arange(5.0)}, dst)

    torch.hub.download_url_to_file = download  # this child process's own copy of torch.hub
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        path = pretrained.fetch(url, "torchvision:TEST", "teacher")
        state = pretrained.read_state_dict(path, "torchvision:TEST", "teacher")
        with open(log, "a") as f:
            f.write(f"rank {rank} read {state['w'].tolist()}\n")
    finally:
        tdist.destroy_process_group()


def test_local_rank_0_downloads_once_while_the_others_wait(tmp_path):
    log = tmp_path / "log.txt"
    url = "https://download.example/models/tiny-0123abcd.pth"
    mp.spawn(_fetch_on_rank, args=(str(tmp_path / "store"), url, str(tmp_path / "torch"), str(log)), nprocs=2)
    lines = sorted(log.read_text().splitlines())
    assert lines == ["download by rank 0", "rank 0 read [0.0, 1.0, 2.0, 3.0, 4.0]", "rank 1 read [0.0, 1.0, 2.0, 3.0, 4.0]"]


def test_a_pretrained_student_with_a_reset_head_trains_and_evaluates_from_student_pt(hub, tmp_path):
    import json

    from fitdist.config import load_config
    from fitdist.trainer import train

    fill("mobilenet_v3_small", "DEFAULT", seed=7, noise=False)
    student = {"name": "torchvision:mobilenet_v3_small", "weights": MNV3, "head": "reset"}
    cfg = load_config(write_config(tmp_path / "s.yaml", student=student, stages=[{"name": "train", "steps": 2}],
                                   optim={"name": "sgd", "lr": 0.001, "schedule": "constant"},
                                   train={"batch_size": 8, "log_every": 1, "eval_batch_size": 1000, "threads": 1}))
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["val/n"] == 10000
    out = run_cli("eval", cfg.run_dir)  # rebuilds the student without its pretrained weights, loads student.pt
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(summary["val/top1"])
