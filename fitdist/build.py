"""Builds the parts of a run from its config: data, student with regressors, frozen teacher."""

from __future__ import annotations

import torch

from fitdist.config import Config
from fitdist.data import DataBundle
from fitdist.distiller import FrozenTeacher, Student
from fitdist.errors import UserError
from fitdist.features import FeatureTap
from fitdist.models import build_model
from fitdist.regressors import build_regressor


def probe_input(data: DataBundle, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, data.in_channels, *data.image_size)


def build_teacher(cfg: Config, data: DataBundle) -> FrozenTeacher | None:
    if cfg.teacher is None:
        return None
    if not cfg.teacher.weights:
        raise UserError("teacher.weights: a teacher needs a trained weights file (a run's student.pt)")
    model = build_model(cfg.teacher, data.num_classes, data.in_channels, where="teacher")
    return FrozenTeacher(model, [h.teacher for h in cfg.hints], cfg.teacher.precision, cfg.teacher.channels_last)


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
            t_logits, t_feats = teacher.tap.probe(x)
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
