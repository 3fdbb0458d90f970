"""Builds the parts of a run from its config: data, student with regressors, frozen teacher(s)."""

from __future__ import annotations

import torch

from fitdist import pretrained
from fitdist.config import (
    Config,
    TeacherConfig,
    hint_teacher,
    teacher_ids,
    teacher_key,
    teacher_list,
)
from fitdist.data import DataBundle
from fitdist.distiller import FrozenTeacher, Student
from fitdist.ensemble import Ensemble
from fitdist.errors import UserError
from fitdist.features import FeatureTap
from fitdist.models import build_model
from fitdist.regressors import build_regressor
from fitdist.teacher_input import TeacherInput


def probe_input(data: DataBundle, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, data.in_channels, *data.image_size)


def teacher_spec(cfg: Config, index: int = 0) -> TeacherConfig:
    """Teacher `index`'s config (`teacher` for the first: the same object once validated)."""
    return cfg.teacher if index == 0 and cfg.teacher is not None else teacher_list(cfg)[index]


def hint_paths(cfg: Config, index: int) -> list[str]:
    """The hint layers teacher `index` serves, in the order of the hint pairs that read them."""
    return [h.teacher for j, h in enumerate(cfg.hints) if hint_teacher(cfg, j) == index]


def build_teacher(cfg: Config, data: DataBundle, index: int = 0) -> FrozenTeacher | None:
    """Teacher `index` of `cfg`, frozen, with its trained weights and its own input; None without teachers."""
    if not teacher_list(cfg) and cfg.teacher is None:
        return None
    spec, key = teacher_spec(cfg, index), teacher_key(cfg, index)
    if not spec.weights:
        raise UserError(f"{key}.weights: a teacher needs trained weights: a file (a run's student.pt) "
                        "or torchvision pretrained weights by name (torchvision:DEFAULT)")
    model = build_model(spec, data.num_classes, data.in_channels, where=key)
    return FrozenTeacher(model, hint_paths(cfg, index), spec.precision, spec.channels_last,
                         teacher_input(cfg, data, index))


def build_teachers(cfg: Config, data: DataBundle, rank: int = 0) -> Ensemble | None:
    """Every teacher of `cfg` as an `Ensemble` (`loss.ensemble`, the weights normalised); None without one."""
    specs = teacher_list(cfg) or ([cfg.teacher] if cfg.teacher is not None else [])
    if not specs:
        return None
    return ensemble_of(cfg, [build_teacher(cfg, data, i) for i in range(len(specs))], rank)


def ensemble_of(cfg: Config, teachers: list[FrozenTeacher], rank: int = 0) -> Ensemble:
    """`teachers` (built in `cfg`'s order) as `cfg`'s ensemble; `rank` seeds this rank's `sample` draws."""
    weights = [teacher_spec(cfg, i).weight for i in range(len(teachers))]
    return Ensemble(teachers, weights, teacher_ids(cfg), [hint_teacher(cfg, j) for j in range(len(cfg.hints))],
                    cfg.loss.ensemble, cfg.seed, rank)


def teacher_input(cfg: Config, data: DataBundle, index: int = 0) -> TeacherInput | None:
    """Teacher `index`'s re-normalisation / resize of the student's batch; None when it sees that batch as is.

    The student's statistics are those the data bundle normalises with (its `to_device`); a float
    source (synthetic data) has none and is taken as standard-normalised, mapped affinely."""
    spec, key = teacher_spec(cfg, index), teacher_key(cfg, index)
    t = spec.input
    s_mean, s_std = getattr(data.to_device, "mean", None), getattr(data.to_device, "std", None)
    pixels = s_mean is not None
    s_mean = s_mean.flatten().tolist() if pixels else [0.0] * data.in_channels
    s_std = s_std.flatten().tolist() if pixels else [1.0] * data.in_channels
    own_mean, own_std, own_size = pretrained.input_spec(spec, data.in_channels) or (None, None, None)
    mean, std = t.mean or own_mean or s_mean, t.std or own_std or s_std  # declared, else the named weights' own
    t_size = t.size if t.size is not None else own_size
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != data.in_channels:
            raise UserError(f"{key}.input.{name}: {len(values)} values for {data.in_channels}-channel data")
    if any(v <= 0 for v in std):
        raise UserError(f"{key}.input.std: {std} must be positive")
    if t_size is not None and t_size < 1:
        raise UserError(f"{key}.input.size: {t_size} is not a size in pixels")
    size = None if t_size is None or (t_size, t_size) == tuple(data.image_size) else t_size
    mapping = TeacherInput(s_mean, s_std, mean, std, size, pixels)
    return None if mapping.identity else mapping


def build_student(cfg: Config, data: DataBundle, teacher: FrozenTeacher | Ensemble | None) -> Student:
    """The student backbone and one regressor per hint pair, sized by a probe forward of every teacher."""
    teacher = Ensemble.of(teacher)
    backbone = build_model(cfg.student, data.num_classes, data.in_channels, where="student")
    paths = [h.student for h in cfg.hints]
    if teacher is None:
        return Student(backbone, [], [], cfg.loss.hint_reduction, cfg.loss.impl)
    x = probe_input(data)
    probe = FeatureTap(backbone, paths, where="student hint")
    backbone.eval()
    try:
        with torch.no_grad():
            all_logits, t_feats = teacher.probe(x)
            _, s_feats = probe.probe(x)
    finally:
        probe.remove()
        backbone.train()
    for i, t_logits in enumerate(all_logits):
        if t_logits.shape[-1] == data.num_classes:
            continue
        if len(all_logits) == 1:
            raise UserError(f"teacher.name: the teacher predicts {t_logits.shape[-1]} classes but the data has "
                            f"{data.num_classes}")
        raise UserError(f"teachers.{i} ({teacher.ids[i]}): predicts {t_logits.shape[-1]} classes but the data has "
                        f"{data.num_classes}")
    regressors = [
        build_regressor(sf.shape[1:], tf.shape[1:], h.regressor, h.bn, h.relu, where=f"hints.{i}")
        for i, (h, sf, tf) in enumerate(zip(cfg.hints, s_feats, t_feats))
    ]
    return Student(backbone, paths, regressors, cfg.loss.hint_reduction, cfg.loss.impl)


def place(cfg: Config, student: Student, teacher: FrozenTeacher | Ensemble | None, device: torch.device) -> None:
    """Moves the models to `device`, the student in its configured memory format, each teacher in
    its own, its weights cast once to its precision."""
    student.to(device)
    # DeepSpeed flattens the trainable weights into contiguous buffers (it views each one as bytes,
    # which a channels_last weight refuses): there the images alone are channels_last, and each
    # convolution follows its input's layout
    if cfg.train.channels_last and cfg.strategy.kind != "deepspeed":
        student.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.place(device)
