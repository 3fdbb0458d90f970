"""`fitdist check CONFIG [key=value ...]`: validate a config in seconds, before any rank starts.

The launch scripts (launch/torchrun.sh, launch/slurm.sbatch) run this once, in one process, so a
typo costs one line and exit status 2 instead of one traceback per rank per node. It reads no
data and loads no weights:

- keys, types and cross-field rules (`load_config`);
- what depends on the world size: `strategy.kind: single` with several processes, a global batch
  that grad_accum × world does not divide (the same messages the trainer gives);
- model names and kwargs of `fitdist:` and `torchvision:` models, and every hint path, by building
  the models on the meta device (no memory, no weights); custom `pkg.module:factory` models are
  only imported, since their constructors may do things a meta tensor cannot;
- with `files=True` (the launch scripts, never inside ranks): that `teacher.weights` and
  `strategy.deepspeed_config` exist on this machine.

`deterministic_checks` is the subset every rank of a run computes identically (no file system):
the CLI runs it inside each rank too and, when it fails, only rank 0 prints the line.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from fitdist import pretrained
from fitdist.config import Config, hint_teacher, teacher_key, teacher_list
from fitdist.errors import UserError

PLACEHOLDER_CLASSES = 10  # class count for meta builds when the data would tell (shards' manifest)


def world_checks(cfg: Config, world: int) -> None:
    """The config against the number of processes (the trainer raises the same errors)."""
    if world > 1 and cfg.strategy.kind == "single":
        raise UserError(f"strategy.kind: 'single' cannot run with {world} processes; use strategy.kind=ddp")
    per_step = cfg.train.batch_size // cfg.train.grad_accum
    if per_step * cfg.train.grad_accum != cfg.train.batch_size or per_step % world:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by grad_accum × world size "
                        f"({cfg.train.grad_accum} × {world})")


def model_checks(cfg: Config) -> None:
    """Model names, kwargs and hint paths, from models built on the meta device."""
    classes = cfg.data.num_classes or PLACEHOLDER_CLASSES
    channels = 1 if cfg.data.source == "fashion-mnist" else 3
    models = [("student", cfg.student, [h.student for h in cfg.hints])]
    for i, spec in enumerate(teacher_list(cfg)):  # each teacher with the hint layers it serves
        paths = [h.teacher for j, h in enumerate(cfg.hints) if hint_teacher(cfg, j) == i]
        models.append((teacher_key(cfg, i), spec, paths))
    for where, model_cfg, paths in models:
        model = _meta_model(where, model_cfg, classes, channels)
        if model is None:
            continue
        from fitdist.features import FeatureTap

        FeatureTap(model, paths, where=f"{where} hint").remove()  # the trainer's own message


def _meta_model(where: str, model_cfg, classes: int, channels: int) -> torch.nn.Module | None:
    from fitdist.evaluate_run import architecture
    from fitdist.models import build_model

    kind, sep, name = model_cfg.name.partition(":")
    if sep and name and kind not in ("fitdist", "torchvision", "timm"):
        try:  # a user factory: importable is all we can say without running its constructor
            getattr(importlib.import_module(kind), name)
        except (ImportError, AttributeError) as e:
            error = UserError(f"{where}.name: cannot import {kind}:{name} ({e})")
            error.local = True  # an environment can differ between nodes: every rank says so itself
            raise error from None
        return None
    try:
        with torch.device("meta"):
            return build_model(architecture(model_cfg), classes, channels, where=where)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a model that cannot live on meta: the real run will tell
        return None


def file_checks(cfg: Config) -> None:
    """Files the run needs at its start, checked on this machine (not inside ranks: a node-local
    path can exist on one node and not another, and each rank must then say so itself)."""
    for i, spec in enumerate(teacher_list(cfg)):
        key = teacher_key(cfg, i)  # `teacher`, or `teachers.N` in an ensemble
        if not spec.weights:
            raise UserError(f"{key}.weights: a teacher needs trained weights: a file (a run's student.pt) "
                            "or torchvision pretrained weights by name (torchvision:DEFAULT)")
        named = pretrained.named_kind(spec.weights)
        if named is not None:  # the name must resolve; the file may yet be fetched
            kind, _, name = spec.name.partition(":")
            if kind != named:
                raise UserError(f"{key}.weights: {spec.weights} names {named} weights but "
                                f"{key}.name is {spec.name}")
            if named == "timm":
                from fitdist.timm_models import pretrained_cfg

                pretrained_cfg(name, spec.weights, key)
            else:
                pretrained.resolve(name, spec.weights, key)
        elif not Path(spec.weights).is_file():
            raise UserError(f"{key}.weights: file not found: {spec.weights}")
    ds = cfg.strategy.deepspeed_config
    if cfg.strategy.kind == "deepspeed" and ds and not Path(ds).is_file():
        raise UserError(f"strategy.deepspeed_config: file not found: {ds}")
    if cfg.data.soft_labels:  # stored soft labels: there, and of this run's temperature and teacher
        from fitdist.data.soft_labels import check_run, read_labels_manifest

        if cfg.data.source != "webdataset":
            raise UserError(f"data.soft_labels: stored soft labels need data.source: webdataset, not {cfg.data.source!r}")
        manifest, where = read_labels_manifest(cfg.data.soft_labels)
        check_run(cfg, {**manifest, "__path__": where})


def deterministic_checks(cfg: Config, world: int) -> None:
    """The checks every rank computes identically from the same arguments."""
    world_checks(cfg, world)
    model_checks(cfg)


def check(cfg: Config, world: int = 1, files: bool = True) -> str:
    """Raises the first `UserError` found; returns a one-line description of a good config."""
    deterministic_checks(cfg, world)
    if files:
        file_checks(cfg)
    stages = ", ".join(f"{s.name} {s.steps} steps" if s.epochs is None else f"{s.name} {s.epochs:g} epochs"
                       for s in cfg.stages)
    return f"config OK: {cfg.name} (stages: {stages}; world size {world}; strategy {cfg.strategy.kind})"


def parse_world(nproc: str | None, nnodes: str | None) -> int | None:
    """World size from torchrun's --nproc-per-node / --nnodes values; None when elastic (min:max)."""
    try:
        return int(nproc or 1) * int(nnodes or 1)
    except ValueError:
        return None
