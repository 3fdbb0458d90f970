"""Builds the parts of a run from its config: data, student with regressors, frozen teacher."""

from __future__ import annotations

import torch

from fitdist import pretrained
from fitdist.config import Config
from fitdist.data import DataBundle
from fitdist.distiller import FrozenTeacher, Student
from fitdist.errors import UserError
from fitdist.features import FeatureTap
from fitdist.models import build_model
from fitdist.regressors import build_regressor
from fitdist.teacher_input import TeacherInput


def probe_input(data: DataBundle, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, data.in_channels, *data.image_size)


def build_teacher(cfg: Config, data: DataBundle) -> FrozenTeacher | None:
    if cfg.teacher is None:
        return None
    if not cfg.teacher.weights:
        raise UserError("teacher.weights: a teacher needs trained weights: a file (a run's student.pt) "
                        "or torchvision pretrained weights by name (torchvision:DEFAULT)")
    model = build_model(cfg.teacher, data.num_classes, data.in_channels, where="teacher")
    return FrozenTeacher(model, [h.teacher for h in cfg.hints], cfg.teacher.precision, cfg.teacher.channels_last,
                         teacher_input(cfg, data))


def teacher_input(cfg: Config, data: DataBundle) -> TeacherInput | None:
    """The teacher's re-normalisation / resize of the student's batch; None when it sees that batch as is.

    The student's statistics are those the data bundle normalises with (its `to_device`); a float
    source (synthetic data) has none and is taken as standard-normalised, mapped affinely."""
    t = cfg.teacher.input
    s_mean, s_std = getattr(data.to_device, "mean", None), getattr(data.to_device, "std", None)
    pixels = s_mean is not None
    s_mean = s_mean.flatten().tolist() if pixels else [0.0] * data.in_channels
    s_std = s_std.flatten().tolist() if pixels else [1.0] * data.in_channels
    default = pretrained.input_stats(cfg.teacher, data.in_channels)  # the named weights' own, if any
    mean = t.mean or (default[0] if default else s_mean)
    std = t.std or (default[1] if default else s_std)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != data.in_channels:
            raise UserError(f"teacher.input.{key}: {len(values)} values for {data.in_channels}-channel data")
    if any(v <= 0 for v in std):
        raise UserError(f"teacher.input.std: {std} must be positive")
    if t.size is not None and t.size < 1:
        raise UserError(f"teacher.input.size: {t.size} is not a size in pixels")
    size = None if t.size is None or (t.size, t.size) == tuple(data.image_size) else t.size
    mapping = TeacherInput(s_mean, s_std, mean, std, size, pixels)
    return None if mapping.identity else mapping


def build_student(cfg: Config, data: DataBundle, teacher: FrozenTeacher | None) -> Student:
    """The student backbone and one regressor per hint pair, sized by a probe forward."""
    backbone = build_model(cfg.student, data.num_classes, data.in_channels, where="student")
    paths = [h.student for h in cfg.hints]
    if teacher is None:
        return Student(backbone, [], [], cfg.loss.hint_reduction, cfg.loss.impl)
    x = probe_input(data)
    probe = FeatureTap(backbone, paths, where="student hint")
    backbone.eval()
    try:
        with torch.no_grad():
            t_logits, t_feats = teacher.tap.probe(teacher.prepare(x))
            _, s_feats = probe.probe(x)
    finally:
        probe.remove()
        backbone.train()
    if t_logits.shape[-1] != data.num_classes:
        raise UserError(
            f"teacher.name: the teacher predicts {t_logits.shape[-1]} classes but the data has {data.num_classes}"
        )
    regressors = [
        build_regressor(sf.shape[1:], tf.shape[1:], h.regressor, h.bn, h.relu, where=f"hints.{i}")
        for i, (h, sf, tf) in enumerate(zip(cfg.hints, s_feats, t_feats))
    ]
    return Student(backbone, paths, regressors, cfg.loss.hint_reduction, cfg.loss.impl)


def place(cfg: Config, student: Student, teacher: FrozenTeacher | None, device: torch.device) -> None:
    """Moves both models to `device`, the student in its configured memory format, the teacher in
    its own, its weights cast once to its precision."""
    student.to(device)
    # DeepSpeed flattens the trainable weights into contiguous buffers (it views each one as bytes,
    # which a channels_last weight refuses): there the images alone are channels_last, and each
    # convolution follows its input's layout
    if cfg.train.channels_last and cfg.strategy.kind != "deepspeed":
        student.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.place(device)
