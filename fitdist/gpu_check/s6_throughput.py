"""Section 6, throughput: what one GPU sustains.

- Loader: img/s of fitdist's WebDataset reader (`fitdist.data.build_data`) on the generated shards
  (JPEGs capped at 256 px, RandomResizedCrop 224 + flip, pinned memory on CUDA) with 8 and 16
  workers; in CPU mode 1 and 2 workers on 32 px crops.
- Step: the `configs/imagenet/kd-resnet34-resnet18.yaml` recipe's training step (bf16,
  channels_last, ResNet-34 teacher in bf16) at 224 px, batch 32 and 256: student-only (no teacher,
  CE alone) and KD, in img/s. The steps are fitdist's own (`fitdist.stage.prepare_stage` and
  `train_step`, as `fitdist train` runs them) on a fixed random batch already on the device, so
  data loading is not part of it. On CUDA the timed steps run under
  `torch.cuda.set_sync_debug_mode("error")`: a step that neither logs, evaluates nor checkpoints
  must not copy anything to the host, and a copy fails the check, naming where it happened. CPU
  mode times tiny fitnets on 32 px images at batch 4 and 16, without that mode (no device).
"""

from __future__ import annotations

import itertools
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from fitdist.gpu_check import fixtures
from fitdist.gpu_check.common import CheckFailed, Checks, Context, one_line

RECIPE = "kd-resnet34-resnet18"
# CPU mode: tiny fitnets, and NCHW (bf16 channels_last convolutions are ~10x slower than NCHW on
# this project's CPU; a CPU figure means nothing here, the run only has to work).
TINY = ["student.name=fitdist:fitnet", "student.kwargs={widths: [8, 16, 16], pool_after: [1, 2]}",
        "teacher.name=fitdist:fitnet", "teacher.kwargs={widths: [16, 32, 32], pool_after: [1, 2]}",
        "data.image_size=32", "train.channels_last=false", "teacher.channels_last=false"]


# ---------------------------------------------------------------------------------------- loader
def loader_rate(ctx: Context, shards: Path, workers: int) -> float:
    from fitdist.config import DataConfig
    from fitdist.data import build_data

    s = fixtures.sizes(ctx)
    batch, timed = (64, 30) if ctx.cuda else (8, 20)
    cfg = DataConfig(source="webdataset", root=str(shards), image_size=s["image_size"], augment="imagenet",
                     num_workers=workers, shuffle_buffer=64)
    it = build_data(cfg, batch, batch, seed=0).train_batches(0)
    try:
        next(it)  # workers started, first shards open: not part of the rate
        t0, n = time.perf_counter(), 0
        for _ in range(timed):
            images, _ = next(it)
            n += len(images)
        return n / (time.perf_counter() - t0)
    finally:
        it.close()  # stops the workers before the next measurement


def loader(ctx: Context, checks: Checks) -> str:
    shards = fixtures.shards(ctx)
    rates = {w: loader_rate(ctx, shards, w) for w in ((8, 16) if ctx.cuda else (1, 2))}
    checks.data["loader_img_per_s"] = {str(w): round(r, 1) for w, r in rates.items()}
    size = fixtures.sizes(ctx)["image_size"]
    return ", ".join(f"{w} workers {r:.0f} img/s" for w, r in rates.items()) + f" ({size} px crops)"


# ------------------------------------------------------------------------------------------ step
def recipe_config(ctx: Context, kd: bool):
    from fitdist.config import load_config

    extra = [] if ctx.cuda else TINY
    # no weights file (see make_step)
    student_only = ["teacher.weights=null"] if kd else ["teacher=null", "stages=[{name: student, steps: 450410, ce: 1.0}]"]
    device = ["train.device=cuda"] if ctx.cuda else ["train.device=cpu"]
    return load_config(Path(ctx.repo) / "configs" / "imagenet" / f"{RECIPE}.yaml",
                       [*extra, *student_only, *device, "wandb.mode=disabled"])


def make_step(ctx: Context, kd: bool, batch: int):
    """`step()` running one `train_step` of the recipe's first stage on a fixed batch."""
    from fitdist.build import build_student, place
    from fitdist.config import StageConfig
    from fitdist.dist import DistEnv
    from fitdist.distiller import FrozenTeacher
    from fitdist.models import build_model
    from fitdist.stage import prepare_stage, stage_weights, train_step
    from fitdist.strategy import build_strategy
    from fitdist.window import Window

    cfg = recipe_config(ctx, kd)
    device = torch.device("cuda", 0) if ctx.cuda else torch.device("cpu")
    size = cfg.data.image_size
    data = SimpleNamespace(num_classes=cfg.data.num_classes, in_channels=3, image_size=(size, size))
    torch.manual_seed(0)
    teacher = None
    if kd:  # `build_teacher` without a weights file: random weights cost what trained ones do
        model = build_model(cfg.teacher, data.num_classes, data.in_channels, where="teacher")
        teacher = FrozenTeacher(model, [h.teacher for h in cfg.hints], cfg.teacher.precision,
                                cfg.teacher.channels_last)
    student = build_student(cfg, data, teacher)
    place(cfg, student, teacher, device)
    strategy = build_strategy(cfg.strategy, DistEnv(device=device), cfg.train.precision, cfg.train)
    # the recipe's first stage's loss weights, for as many steps as the recipe trains (the length
    # only sets where the schedules stand; a recipe may give it in epochs, resolved from the data)
    first = cfg.stages[0]
    stage = StageConfig(name=first.name, steps=450410, ce=first.ce, kd=first.kd, hint=first.hint)
    prepared = prepare_stage(cfg, stage, student, teacher, strategy, 1, batch, (3, size, size))
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, data.num_classes, (batch,), device=device)
    batches = itertools.repeat((images, labels))
    window, counter = Window(), itertools.count()
    student.train()

    def step():
        train_step(cfg, prepared, strategy, batches, stage_weights(stage, next(counter)), device, window)

    return step


def where(e: BaseException) -> str:
    """The innermost fitdist frame of a traceback, e.g. `fitdist/strategy.py:83 step`."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/fitdist/" in f.filename
              and "/gpu_check/" not in f.filename]
    if not frames:
        return "outside fitdist"
    f = frames[-1]
    return f"fitdist/{f.filename.split('/fitdist/')[-1]}:{f.lineno} {f.name}"


def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def step_rate(ctx: Context, kd: bool, batch: int) -> dict:
    """img/s of the steady state; on CUDA under the sync-debug mode (then a host sync is recorded)."""
    step = make_step(ctx, kd, batch)
    warmup, timed = (5, 20) if ctx.cuda else (1, 3)
    for _ in range(warmup):  # cuDNN's algorithm search, allocator growth, Triton's compile
        step()
    sync(ctx)
    out = {"variant": "kd" if kd else "student", "batch": batch, "host_sync": None}
    if ctx.cuda:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        except RuntimeError as e:
            out["host_sync"] = f"{where(e)}: {one_line(str(e), 160)}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sync(ctx)
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    sync(ctx)
    out["img_per_s"] = round(batch * timed / (time.perf_counter() - t0), 1)
    return out


def steps(ctx: Context, checks: Checks) -> None:
    results = []
    for batch in ((32, 256) if ctx.cuda else (4, 16)):
        for kd in (False, True):
            name = f"step {'kd' if kd else 'student'} batch {batch}"
            r = checks.run(name, lambda kd=kd, batch=batch: describe(step_rate(ctx, kd, batch), results))
            if r is None:
                continue
            if ctx.cuda:
                if results[-1]["host_sync"]:
                    checks.fail(f"{name} sync-free", f"host sync in a step: {results[-1]['host_sync']}")
                else:
                    checks.ok(f"{name} sync-free", "no host sync under set_sync_debug_mode('error')")
            if ctx.cuda:
                torch.cuda.empty_cache()
    checks.data["steps"] = results
    if not ctx.cuda:
        checks.skip("sync-debug mode", "CUDA only (torch.cuda.set_sync_debug_mode)")


def describe(r: dict, results: list) -> str:
    results.append(r)
    return f"{r['img_per_s']:.0f} img/s"


def run(ctx: Context, checks: Checks) -> None:
    checks.run("loader", loader, ctx, checks)
    try:
        steps(ctx, checks)
    except CheckFailed as e:
        checks.fail("steps", str(e))
