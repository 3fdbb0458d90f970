"""A teacher with its own input statistics (and size) gets, on the device, exactly its own
normalisation of the very pixels the student's batch was made from (Beyer et al. 2022)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import STUDENT, TEACHER
from test_pretrained import MNV3, fill, hub  # noqa: F401 - the fixture is used by name

from fitdist.build import build_teacher
from fitdist.config import Config, HintConfig, ModelConfig, TeacherConfig, TeacherInputConfig
from fitdist.data import DataBundle
from fitdist.data.normalize import DeviceNormalize
from fitdist.distiller import Distiller, Student
from fitdist.errors import UserError
from fitdist.models import build_model
from fitdist.teacher_input import TeacherInput

CPU = torch.device("cpu")


def stats(channels: int, gen: torch.Generator) -> tuple[list[float], list[float]]:
    mean = (torch.rand(channels, generator=gen) * 0.8 + 0.1).tolist()
    std = (torch.rand(channels, generator=gen) * 0.4 + 0.1).tolist()
    return mean, std


def test_pixel_route_is_bitwise_the_teachers_own_normalisation():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    for channels in (1, 3):
        for _ in range(5):
            (sm, ss), (tm, ts) = stats(channels, gen), stats(channels, gen)
            u = torch.randint(0, 256, (4, channels, 17, 23), dtype=torch.uint8, generator=gen)
            u[0, :, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # both ends of the range
            x_student = DeviceNormalize(sm, ss)(u, CPU)
            got = TeacherInput(sm, ss, tm, ts, pixels=True)(x_student)
            assert torch.equal(got, DeviceNormalize(tm, ts)(u, CPU))


def test_float_route_is_the_affine_map_to_float32_rounding():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    (sm, ss), (tm, ts) = stats(3, gen), stats(3, gen)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    want = ((x * torch.tensor(ss).view(-1, 1, 1) + torch.tensor(sm).view(-1, 1, 1)) - torch.tensor(tm).view(-1, 1, 1)) \
        / torch.tensor(ts).view(-1, 1, 1)
    got = TeacherInput(sm, ss, tm, ts, pixels=False)(x.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # a few float32 ulps


def bundle(channels: int, size: int, mean, std, classes: int = 10) -> DataBundle:
    return DataBundle(train_batches=None, val_batches=None, num_classes=classes, in_channels=channels,
                      image_size=(size, size), num_val=0, class_names=[], to_device=DeviceNormalize(mean, std))


def kd_config(tmp_path, teacher_input: TeacherInputConfig) -> Config:
    """A Fashion-MNIST-shaped KD config whose teacher has a weights file of random weights."""
    teacher = TeacherConfig(TEACHER["name"], dict(TEACHER["kwargs"]), input=teacher_input)
    path = tmp_path / "teacher.pt"
    torch.save(build_model(dataclasses.replace(teacher, weights=None), 10, 1).state_dict(), path)
    return Config(teacher=dataclasses.replace(teacher, weights=str(path)), hints=[HintConfig("conv2", "conv2")])


def record_inputs(teacher) -> list[torch.Tensor]:
    seen = []
    teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_the_teacher_in_a_kd_step_sees_its_own_normalisation_and_size(tmp_path):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    (sm, ss), (tm, ts) = stats(1, gen), stats(1, gen)
    data = bundle(1, 28, sm, ss)
    u = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=gen)
    x_student = data.to_device(u, CPU)
    own = DeviceNormalize(tm, ts)(u, CPU)

    teacher = build_teacher(kd_config(tmp_path, TeacherInputConfig(mean=tm, std=ts)), data).place(CPU)
    seen = record_inputs(teacher)
    student = Student(build_model(ModelConfig(**STUDENT), 10, 1), [], [])
    Distiller(student, teacher, 3.0)(x_student, torch.zeros(6, dtype=torch.long), {"ce": 1.0, "kd": 1.0})
    assert torch.equal(seen[-1], own)

    teacher = build_teacher(kd_config(tmp_path, TeacherInputConfig(mean=tm, std=ts, size=40)), data).place(CPU)
    seen = record_inputs(teacher)
    teacher(x_student)
    assert seen[-1].shape == (6, 1, 40, 40)
    assert torch.equal(seen[-1], F.interpolate(own, size=(40, 40), mode="bilinear", align_corners=False))


def test_same_statistics_and_size_leave_the_batch_alone(tmp_path):
    data = bundle(1, 28, [0.2860], [0.3530])
    cfg = kd_config(tmp_path, TeacherInputConfig(mean=[0.2860], std=[0.3530], size=28))
    assert build_teacher(cfg, data).input_map is None
    assert build_teacher(kd_config(tmp_path, TeacherInputConfig()), data).input_map is None


def test_declared_statistics_must_fit_the_data(tmp_path):
    data = bundle(1, 28, [0.5], [0.5])
    with pytest.raises(UserError, match=r"teacher.input.mean: 3 values for 1-channel data"):
        build_teacher(kd_config(tmp_path, TeacherInputConfig(mean=[0.1, 0.2, 0.3])), data)
    with pytest.raises(UserError, match=r"teacher.input.std: \[0.0\] must be positive"):
        build_teacher(kd_config(tmp_path, TeacherInputConfig(std=[0.0])), data)


def test_named_weights_default_to_their_own_statistics(hub):  # noqa: F811
    fill("mobilenet_v3_small", "DEFAULT", seed=6)
    cfg = Config(teacher=TeacherConfig("torchvision:mobilenet_v3_small", weights=MNV3))
    teacher = build_teacher(cfg, bundle(3, 32, [0.5] * 3, [0.5] * 3, classes=1000))
    assert teacher.input_map.t_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert teacher.input_map.t_std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    # declared statistics win over the weights' own; the ImageNet student's own need no re-normalising
    imagenet = bundle(3, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], classes=1000)
    assert build_teacher(cfg, imagenet).input_map is None
    small = build_teacher(cfg, bundle(3, 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], classes=1000)).input_map
    assert not small.renormalise and small.size == 224  # the same statistics, the weights' own crop size
    declared = dataclasses.replace(cfg.teacher, input=TeacherInputConfig(mean=[0.5] * 3, std=[0.5] * 3))
    assert build_teacher(dataclasses.replace(cfg, teacher=declared), imagenet).input_map.t_mean.flatten().tolist() == [0.5] * 3
