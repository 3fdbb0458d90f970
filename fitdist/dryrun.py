"""`fitdist train CONFIG --dry-run`: check a config end to end without reading any data.

Builds the student and teacher on a synthetic `DataBundle` of the config's shape, probes the hint
shapes and sizes the regressors exactly as a real run does (`build_student`), then runs each
stage's first and last optimizer step on random images through the training step itself
(`fitdist.stage`: trainable set, learning rate, strategy, distiller, micro-steps). A recipe whose
keys, model names, hint paths, regressor shapes or stage weights are wrong fails here in seconds,
not on the cluster.

The teacher's weights file normally does not exist yet (it is the output of the teacher's own
run): the teacher then keeps random weights, and the output says so. A `ddp` strategy is checked
in a one-process gloo group, so the real DDP wrapper (unused-parameter check included) runs too.
With `train.compile`, each stage compiles as in a real run and `compile` reports per model
"compiled" or why it would run eager.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as tdist

from fitdist import dist, pretrained
from fitdist.build import build_student, ensemble_of, hint_paths, place, teacher_input, teacher_spec
from fitdist.compile import compile_models, compiled
from fitdist.config import Config, StageConfig, hint_teacher, teacher_ids, teacher_key, teacher_list
from fitdist.data import DataBundle
from fitdist.distiller import FrozenTeacher, Student
from fitdist.ensemble import Ensemble
from fitdist.errors import UserError
from fitdist.models import build_model, count_macs, count_params
from fitdist.stage import prepare_stage, resolve_steps, stage_terms, stage_weights, train_step
from fitdist.strategy import build_strategy
from fitdist.window import Window

DRY_BATCH = 4  # images per dry-run step: >1 so BatchNorm in train mode has statistics
NATIVE = {"fashion-mnist": (10, 28, 60000)}  # sources whose class count, image size and size are known


def synthetic_data(cfg: Config) -> DataBundle:
    """A bundle of the config's shape whose batches are random: no file is ever opened."""
    d = cfg.data
    classes, size, samples = NATIVE.get(d.source, (None, None, None))
    classes, size = d.num_classes or classes, d.image_size or size
    for key, value in (("data.num_classes", classes), ("data.image_size", size)):
        if value is None:  # shards would tell a real run, but a recipe must not depend on that
            raise UserError(
                f"{key}: must be set for data.source {d.source!r} (a dry run reads no data)"
            )
    channels = 1 if d.source == "fashion-mnist" else 3

    def batches(start: int = 0):
        gen = torch.Generator().manual_seed(cfg.seed + start)
        while True:
            yield (
                torch.randn(DRY_BATCH, channels, size, size, generator=gen),
                torch.randint(0, classes, (DRY_BATCH,), generator=gen),
            )

    return DataBundle(
        train_batches=batches,
        val_batches=lambda: iter(()),
        num_classes=classes,
        in_channels=channels,
        image_size=(size, size),
        num_val=0,
        class_names=[str(i) for i in range(classes)],
        num_train=min(samples, d.train_subset or samples) if samples else None,
    )


def dry_teacher(cfg: Config, data: DataBundle, index: int = 0) -> tuple[FrozenTeacher | None, str | None]:
    """Teacher `index`, frozen, with its weights if the file exists and random weights otherwise."""
    if not teacher_list(cfg):
        return None, None
    spec, key = teacher_spec(cfg, index), teacher_key(cfg, index)
    weights = spec.weights
    found = weights_found(spec, key)
    model_cfg = spec if found else dataclasses.replace(spec, weights=None)
    model = build_model(model_cfg, data.num_classes, data.in_channels, where=key)
    note = (
        f"loaded {weights}" if found else f"random ({key}.weights {weights or 'unset'} not found)"
    )
    if not found and calibrate_batchnorm(model, data):
        note += "; BatchNorm statistics from random batches"
    return FrozenTeacher(model, hint_paths(cfg, index), spec.precision, spec.channels_last,
                         teacher_input(cfg, data, index)), note


def dry_teachers(cfg: Config, data: DataBundle) -> tuple[Ensemble | None, list[str]]:
    """Every teacher as the run's `Ensemble`, and each one's weights note."""
    built = [dry_teacher(cfg, data, i) for i in range(len(teacher_list(cfg)))]
    if not built:
        return None, []
    return ensemble_of(cfg, [t for t, _ in built]), [note for _, note in built]


def teacher_stages(cfg: Config, index: int) -> list[str]:
    """The names of the stages that run teacher `index`: every KD stage (all teachers, or the
    sampled one), and the hint stages whose hints it serves."""
    serves = any(hint_teacher(cfg, j) == index for j in range(len(cfg.hints)))
    return [st.name for st in cfg.stages if "kd" in stage_terms(st) or ("hint" in stage_terms(st) and serves)]


def weights_found(model_cfg, where: str) -> bool:
    """A local weights file that exists, or named weights already in the cache: the dry run never
    downloads (a name that does not resolve is still an error)."""
    weights = model_cfg.weights
    if pretrained.is_named(weights):
        entry = pretrained.resolve(model_cfg.name.partition(":")[2], weights, where)
        return pretrained.cache_path(entry.url).is_file()
    if pretrained.named_kind(weights) == "timm":
        from fitdist.timm_models import weights_cached

        return weights_cached(model_cfg.name.partition(":")[2], weights, model_cfg.kwargs, where)
    return bool(weights) and Path(weights).is_file()


def dry_student(cfg: Config) -> tuple[Config, str | None]:
    """`cfg` with the student's named weights dropped when they are not in the cache yet."""
    weights = cfg.student.weights
    if pretrained.named_kind(weights) is None or weights_found(cfg.student, "student"):
        return cfg, (f"loaded {weights}" if weights else None)
    student = dataclasses.replace(cfg.student, weights=None, head="keep")
    return dataclasses.replace(cfg, student=student), f"random ({weights} not in the cache yet)"


def calibrate_batchnorm(model: torch.nn.Module, data: DataBundle, batches: int = 2) -> bool:
    """Running BN statistics from random batches: an untrained teacher in eval mode would
    otherwise use mean 0 / var 1 and, in a deep ResNet, produce activations of 1e10 and more,
    which makes the dry run's loss terms meaningless (though finite)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    batch_iter = data.train_batches(10_000)  # a stream the training steps never use
    with torch.no_grad():
        for _ in range(batches):
            model(next(batch_iter)[0])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True


def describe_hints(
    cfg: Config, student: Student, teacher: Ensemble | None, x: torch.Tensor
) -> list[dict]:
    """Per hint pair: the probed shapes and the regressor `build_student` chose for them."""
    if teacher is None or not cfg.hints:
        return []
    student.eval()
    with torch.no_grad():
        _, s_feats = student.tap(x)
        _, t_feats = teacher.probe(x)
    student.train()
    out = []
    for h, sf, tf, reg in zip(cfg.hints, s_feats, t_feats, student.regressors):
        proj = reg.proj
        kind = "linear" if isinstance(proj, torch.nn.Linear) else "conv"
        entry = {
            "student": h.student,
            "teacher": h.teacher,
            "student_shape": list(sf.shape[1:]),
            "teacher_shape": list(tf.shape[1:]),
            "regressor": kind,
            "regressor_params": count_params(reg),
        }
        if kind == "conv":
            entry["kernel"] = list(proj.kernel_size)
            entry["resize"] = list(reg.resize_to) if reg.resize_to else None
        out.append(entry)
    return out


@contextlib.contextmanager
def _process_group(kind: str):
    """A one-process gloo group for `ddp`, unless torchrun already made one."""
    made = kind == "ddp" and not tdist.is_initialized()
    if made:
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if made:
            tdist.destroy_process_group()


def dry_run(cfg: Config) -> dict:
    """Builds everything, probes hints, runs each stage's end steps; returns a JSON-able summary."""
    env = dist.DistEnv(device=dist.pick_device(cfg.train.device, 0))
    torch.manual_seed(cfg.seed)
    data = synthetic_data(cfg)
    teacher, teacher_notes = dry_teachers(cfg, data)
    torch.manual_seed(cfg.seed)
    student_cfg, student_note = dry_student(cfg)
    student = build_student(student_cfg, data, teacher)
    probe = torch.randn(1, data.in_channels, *data.image_size)
    result = {
        "name": cfg.name,
        "device": str(env.device),
        "data": {
            "source": cfg.data.source,
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": list(data.image_size),
            "synthetic": True,
        },
        "student": {
            "name": cfg.student.name,
            "params": count_params(student.backbone),
            "regressor_params": count_params(student.regressors),
            "macs": count_macs(student.backbone, probe),
            **({"weights": student_note} if student_note else {}),
        },
        "teacher": None,
        "hints": describe_hints(cfg, student, teacher, probe.repeat(2, 1, 1, 1)),
    }
    if teacher is not None:  # each teacher, its cost and the stages that run it; `teacher`: the first
        result["teachers"] = [{
            "id": tid,
            "name": teacher_spec(cfg, i).name,
            "weight": w,
            "params": count_params(t.model),
            "macs": count_macs(t.model, t.prepare(probe)),
            "weights": note,
            "stages": teacher_stages(cfg, i),
        } for i, (tid, t, w, note) in enumerate(zip(teacher_ids(cfg), teacher.teachers, teacher.weights, teacher_notes))]
        result["teacher"] = {k: result["teachers"][0][k] for k in ("name", "params", "macs", "weights")}
        if len(teacher) > 1:
            result["ensemble"] = cfg.loss.ensemble
    place(cfg, student, teacher, env.device)
    if cfg.train.compile:
        compile_models(cfg, student, teacher, warn=lambda text: None)  # reported below instead
    with _process_group(cfg.strategy.kind):
        result["strategy"] = cfg.strategy.kind + (
            " (1-process gloo group)" if cfg.strategy.kind == "ddp" else ""
        )
        result["stages"] = [
            _stage_steps(cfg, i, stage, student, teacher, data, env) for i, stage in enumerate(_dry_stages(cfg, data))
        ]
    if cfg.train.compile:
        result["compile"] = compiled(student, teacher)
    return result


def _dry_stages(cfg: Config, data: DataBundle) -> list[StageConfig]:
    """The stages in steps; where the data's size is unknown without reading it (shards), a stage
    in epochs runs as two steps, its schedule's two ends, and reports `steps: null`."""
    if data.num_train is not None or all(st.epochs is None for st in cfg.stages):
        return resolve_steps(cfg, data.num_train)
    return [st if st.epochs is None else dataclasses.replace(st, steps=2, epochs=None) for st in cfg.stages]


def _stage_steps(cfg: Config, index: int, stage: StageConfig, student: Student, teacher, data: DataBundle,
                 env) -> dict:
    """`stage` (number `index`) on random data through the training step itself (`fitdist.stage`):
    its first step and, for a stage of several steps, its last, so a weight schedule's both ends
    run (`hint: [0, 1]` computes a term of weight 0 at one end)."""
    strategy = build_strategy(cfg.strategy, env, cfg.train.precision, cfg.train)
    prepared = prepare_stage(cfg, stage, student, teacher, strategy, env.world, DRY_BATCH,
                             (data.in_channels, *data.image_size))
    batches = data.train_batches(index)
    student.train()
    checked = []
    for step in sorted({0, stage.steps - 1}):
        window, weights = Window(), stage_weights(stage, step)
        train_step(cfg, prepared, strategy, batches, weights, env.device, window)
        row = window.flush(env.device, env.world)
        terms = {k.removeprefix("train/"): v for k, v in row.items()
                 if k.startswith("train/") and not k.startswith("train/skipped")}
        if row["train/skipped_steps"] or not all(math.isfinite(v) for v in terms.values()):
            raise UserError(f"stages.{index} ({stage.name}): the dry-run step {step} is not finite: {terms}")
        checked.append({"step": step, "weights": weights, "terms": terms, "grad_norm": row["grad_norm"]})
    strategy.end_stage()  # as after a stage: DeepSpeed's engine detached, ZeRO-3's parameters whole again
    first, given = checked[0], cfg.stages[index]
    return {
        "name": stage.name,
        "steps": stage.steps if given.epochs is None or data.num_train else None,
        **({"epochs": given.epochs} if given.epochs is not None else {}),
        "optim": prepared.optim.name,
        "lr": prepared.lr,
        "weights": first["weights"],
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "terms": first["terms"],
        "grad_norm": first["grad_norm"],
        **({"last": checked[-1]} if len(checked) > 1 else {}),
    }
