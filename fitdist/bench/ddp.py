"""`fitdist bench ddp`: DDP scaling on one machine, 2 processes × 1 thread versus 1 process × 1 thread.

The same distillation step the trainer runs (a `Student` with its regressor sized by
`build_student`'s probe, a `FrozenTeacher`, the `Distiller`, `Strategy.prepare` / `microstep` /
`backward` / `step`), on random in-memory batches so that data loading is not part of it: FitNets
stage 2 (CE + KD) with the quickstart's Fashion-MNIST pair (teacher 981K parameters, thin 9-layer
student 91K) by default, `--preset cifar` for resnet32x4 → resnet8x4 on 32×32 inputs.

Weak scaling: every process takes `--batch` images per step, so the 2-process run trains a global
batch twice as large, all-reducing the student's gradients over gloo after each backward.
`efficiency = img/s(2 proc) / (2 × img/s(1 proc))`, where img/s counts the images of all ranks.
Both runs are launched with torchrun (one process: the single-device strategy, no process group)
and alternate `--reps` times; each run's figure is its median step time over `--steps` steps after
`--warmup`, and each side's best run is reported (load from other jobs only ever slows a run).
A third run, the same two DDP processes inside `no_sync` (no gradient all-reduce), separates what
communication costs from what sharing the machine's cores and memory bandwidth costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

PRESETS = {
    "fmnist": {  # the quickstart pair (fitdist/configs/fmnist-fitnets.yaml)
        "student": ("fitdist:fitnet", {"widths": [16, 16, 16, 32, 32, 32, 48, 48, 64], "pool_after": [3, 6]}),
        "teacher": ("fitdist:fitnet", {"widths": [32, 64, 128, 256, 256], "pool_after": [1, 2, 3]}),
        "hint": ("conv6", "conv2"), "channels": 1, "size": 28, "classes": 10},
    "cifar": {
        "student": ("fitdist:resnet8x4", {}), "teacher": ("fitdist:resnet32x4", {}),
        "hint": ("layer2", "layer2"), "channels": 3, "size": 32, "classes": 100},
    "small": {  # a smoke test
        "student": ("fitdist:fitnet", {"widths": [4, 8], "pool_after": [1]}),
        "teacher": ("fitdist:fitnet", {"widths": [8, 16], "pool_after": [1]}),
        "hint": ("conv2", "conv2"), "channels": 1, "size": 8, "classes": 10},
}


def worker(args) -> None:
    """One rank under torchrun: time the trainer's optimizer step; rank 0 writes the figures."""
    from fitdist import dist
    from fitdist.build import build_student, probe_input
    from fitdist.config import (
        Config,
        HintConfig,
        ModelConfig,
        OptimConfig,
        StageConfig,
        StrategyConfig,
        TeacherConfig,
    )
    from fitdist.distiller import Distiller, FrozenTeacher
    from fitdist.models import build_model
    from fitdist.stage import set_trainable
    from fitdist.strategy import build_strategy

    torch.set_num_threads(args.threads)
    env = dist.setup("cpu", "gloo")
    p = PRESETS[args.preset]
    cfg = Config(student=ModelConfig(*p["student"]), teacher=TeacherConfig(*p["teacher"]),
                 hints=[HintConfig(*p["hint"])], strategy=StrategyConfig(kind="ddp" if env.world > 1 else "single"))
    data = SimpleNamespace(num_classes=p["classes"], in_channels=p["channels"], image_size=(p["size"], p["size"]))
    torch.manual_seed(1)  # random teacher weights cost the same to run as trained ones
    teacher = FrozenTeacher(build_model(cfg.teacher, data.num_classes, data.in_channels, where="teacher"),
                            [h.teacher for h in cfg.hints])
    torch.manual_seed(0)
    student = build_student(cfg, data, teacher)
    stage = StageConfig(name="kd", steps=10**6, ce=1.0, kd=1.0)  # FitNets stage 2
    set_trainable(cfg, stage, student, teacher, probe_input(data))
    strategy = build_strategy(cfg.strategy, env, "fp32")
    model, optimizer, scheduler = strategy.prepare(student, OptimConfig(schedule="constant"), 0.01, stage.steps)
    distiller = Distiller(model, teacher, cfg.loss.temperature, cfg.loss.impl)
    g = torch.Generator().manual_seed(100 + env.rank)  # every rank its own samples
    images = torch.randn(args.batch, data.in_channels, *data.image_size, generator=g)
    labels = torch.randint(0, data.num_classes, (args.batch,), generator=g)
    weights = {"ce": 1.0, "kd": 1.0}
    student.train()
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()  # every rank starts the step together: the slowest rank sets the pace
        start = time.perf_counter()
        with strategy.microstep(model, sync=not args.no_sync), strategy.autocast():
            loss = distiller(images, labels, weights)["loss"]
        strategy.backward(loss)
        strategy.step(optimizer, 0.0)
        scheduler.step()
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if env.world > 1:  # a step lasts as long as its slowest rank
            torch.distributed.all_reduce(took, op=torch.distributed.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(took.item())
    if env.is_main:
        median = statistics.median(times)
        Path(args.out).write_text(json.dumps({
            "world": env.world, "step_s": median, "img_per_s": env.world * args.batch / median,
            "student_params": sum(p.numel() for p in student.backbone.parameters()),
        }))
    # No rank tears down while another is still in a collective, and the process leaves without
    # interpreter finalisation: a worker sometimes aborted there ("terminate called without an
    # active exception", no Python frame left) after a clean destroy_process_group.
    del distiller, model, optimizer, scheduler
    dist.barrier()
    dist.teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(nproc: int, args, out: Path, no_sync: bool = False) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "fitdist.bench.ddp", "--worker", "--out", str(out), "--preset", args.preset,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--no-sync"] if no_sync else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench ddp: {nproc}-process run failed:\n{result.stderr[-6000:]}")
    return json.loads(out.read_text())


def run(args) -> dict:
    kinds = {"1": (1, False), "2": (2, False), "2-no-sync": (2, True)}
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(kinds)[rep % 3:] + list(kinds)[:rep % 3]  # rotate which goes first
            for k in order:
                runs[k].append(launch(kinds[k][0], args, Path(tmp) / f"{k}-{rep}.json", kinds[k][1]))
    best = {k: max(r, key=lambda x: x["img_per_s"])["img_per_s"] for k, r in runs.items()}
    return {
        "preset": args.preset, "batch_per_process": args.batch, "threads_per_process": args.threads,
        "img_per_s_1proc": best["1"], "img_per_s_2proc": best["2"],
        "efficiency": best["2"] / (2 * best["1"]),
        # the same two processes without the gradient all-reduce: what sharing the machine alone costs
        "img_per_s_2proc_no_sync": best["2-no-sync"],
        "efficiency_no_sync": best["2-no-sync"] / (2 * best["1"]),
        "all_img_per_s": {str(n): [round(x["img_per_s"], 1) for x in r] for n, r in runs.items()},
        "student_params": runs["1"][0]["student_params"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_avg_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fitdist bench ddp", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="fmnist", help="model pair (default fmnist)")
    p.add_argument("--batch", type=int, default=64, help="images per process per step (default 64)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--reps", type=int, default=3, help="runs of each size, alternating (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a torchrun rank
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--no-sync", action="store_true", help=argparse.SUPPRESS)  # DDP without all-reduce
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"preset {res['preset']}, {res['batch_per_process']} images/process/step, "
              f"{res['threads_per_process']} thread/process ({res['machine']})")
        print(f"  1 process : {res['img_per_s_1proc']:8.1f} img/s   runs {res['all_img_per_s']['1']}")
        print(f"  2 process : {res['img_per_s_2proc']:8.1f} img/s   runs {res['all_img_per_s']['2']}")
        print(f"  2 process, no all-reduce: {res['img_per_s_2proc_no_sync']:8.1f} img/s   "
              f"runs {res['all_img_per_s']['2-no-sync']}")
        print(f"  efficiency: {res['efficiency']:.3f} (target >= 0.85); without the all-reduce "
              f"{res['efficiency_no_sync']:.3f}; load average {res['load_avg_1min']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
