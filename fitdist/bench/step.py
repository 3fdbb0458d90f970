"""`fitdist bench step`: the cost of distillation per optimizer step, against a student-only step.

Real objects throughout: `build_model` models, a `FrozenTeacher`, a `Student` whose regressor is
sized by `build_student`'s probe, the `Distiller`, `set_trainable` (stage 1 freezes what the hint
does not reach) and an optimizer from `Strategy.prepare`. One timed step is what the trainer does
per optimizer step: forward, backward, clip-norm + SGD step, zero_grad, scheduler step (fp32, one
micro-step, the same random batch every time: data loading is not part of it).

Variants, timed round-robin in one process (the order rotates every round) so that load on a
shared machine hits all of them alike; the figure is the median over `--steps` rounds after
`--warmup` rounds:

- `student`: student-only step (CE on labels, no teacher);
- `kd`: FitNets stage 2 as in the paper (CE + KD; full teacher forward);
- `hint_kd`: CE + KD + hint (full teacher forward, student with its regressor);
- `stage1`: FitNets stage 1, hint loss only, both forwards cut after the hint layers;
- `stage1_full`: the same loss and trainable parameters, both networks run to their logits
  (the taps called with `stop_early=False`: the cost truncation saves);
- `kd_2t`, `kd_3t`: the `kd` step with an ensemble of 2 and 3 teachers of the teacher's
  architecture (`loss.ensemble: mean_probs`, fitdist/ensemble.py), each with weights of its own.
  Their FLOP model: `(3·F_student + n·F_teacher) / (3·F_student)` (the `ensemble` rows).
- `kd_stored`: the `kd` step from stored soft labels (`data.soft_labels`, `fitdist label`): the
  teacher's top-10 at T of this batch, fp16, made dense on the device every step (FKD's
  renormalisation); no teacher runs (target: ≤ 1.05× `student`, as the median over rounds of
  the ratio within each round; online KD costs ≈ r_FLOP).

FLOPs are forward FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and
convolutions, 2 per multiply-add; BatchNorm, ReLU, pooling and losses are not counted).
`r_FLOP = (3·F_student + F_teacher) / (3·F_student)` takes a training step as ~3 forwards.

Memory, two measurements:
- allocator: bytes held by live tensors at the peak of one step = tensors resident before it
  (parameters, buffers, optimizer state; the teacher's for distillation) + the peak of PyTorch's
  CPU allocator during the step (profiler allocation events, as in `fitdist bench losses`). It
  does not see BLAS/oneDNN scratch space that bypasses PyTorch's allocator.
- process: peak RSS (`VmHWM`) of a fresh subprocess per variant (build, three steps): all of
  the process's memory, allocator caching and fragmentation included; the student-only process
  never builds a teacher.
The teacher's activation working set is the allocator peak of one teacher forward alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from fitdist.bench.losses import peak_extra_bytes
from fitdist.build import build_student, probe_input
from fitdist.config import (
    Config,
    HintConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    StageConfig,
    StrategyConfig,
    TeacherConfig,
)
from fitdist.dist import DistEnv
from fitdist.distiller import Distiller, FrozenTeacher
from fitdist.ensemble import Ensemble
from fitdist.kernels import fused_hint_loss
from fitdist.models import build_model
from fitdist.stage import set_trainable
from fitdist.strategy import build_strategy

VARIANTS = ("student", "kd", "hint_kd", "stage1", "stage1_full", "kd_2t", "kd_3t", "kd_stored")
STORED_TOPK = 10  # kd_stored: probabilities stored per view (the recommended k, docs/DATA.md)
ENSEMBLES = {"kd": 1, "kd_2t": 2, "kd_3t": 3}  # KD variants by their number of teachers
WEIGHTS = {
    "student": {"ce": 1.0},
    "kd": {"ce": 1.0, "kd": 1.0},
    "hint_kd": {"ce": 1.0, "kd": 1.0, "hint": 1.0},
    "stage1": {"hint": 1.0},
    "stage1_full": {"hint": 1.0},
    "kd_2t": {"ce": 1.0, "kd": 1.0},
    "kd_3t": {"ce": 1.0, "kd": 1.0},
    "kd_stored": {"ce": 1.0, "kd": 1.0},
}
MiB = 2**20


def setup_config(small: bool, classes: int) -> tuple[Config, SimpleNamespace, int]:
    """`(config, data shape stand-in, batch)` for the full benchmark or the tiny smoke version."""
    if small:  # tiny fitnets whose FLOPs are easy to count by hand (tests/test_bench_step.py)
        student = ModelConfig("fitdist:fitnet", {"widths": [4, 8, 8], "pool_after": [1]})
        teacher = TeacherConfig("fitdist:fitnet", {"widths": [8, 16, 16], "pool_after": [1]})
        hint, size, batch, classes = HintConfig("conv2", "conv2"), 8, 4, 10
    else:  # the setting: resnet34 -> resnet18 at 64x64, hint at the end of layer2 (128x8x8)
        student, teacher = (
            ModelConfig("torchvision:resnet18"),
            TeacherConfig("torchvision:resnet34"),
        )
        hint, size, batch = HintConfig("layer2", "layer2"), 64, 32
    cfg = Config(student=student, teacher=teacher, hints=[hint], loss=LossConfig(temperature=4.0))
    data = SimpleNamespace(num_classes=classes, in_channels=3, image_size=(size, size))
    return cfg, data, batch


def make_teacher(cfg: Config, data, seed: int = 1, hints: bool = True) -> FrozenTeacher:
    """`build_teacher` without its weights file: random weights cost the same to run."""
    torch.manual_seed(seed)
    model = build_model(cfg.teacher, data.num_classes, data.in_channels, where="teacher")
    paths = [h.teacher for h in cfg.hints] if hints else []
    teacher = FrozenTeacher(model, paths, cfg.teacher.precision, cfg.teacher.channels_last)
    return teacher.place(torch.device("cpu"))  # as a run places it: layout and precision cast once


def make_ensemble(cfg: Config, data, first: FrozenTeacher, n: int) -> Ensemble:
    """`first` and n − 1 more teachers of its architecture (weights of their own), mean_probs."""
    return Ensemble([first, *(make_teacher(cfg, data, seed=1 + i, hints=False) for i in range(1, n))],
                    hint_from=[0] * len(cfg.hints))


@dataclass
class Variant:
    name: str
    step: Callable[[], torch.Tensor]
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    first_loss: float = float("nan")
    times_ms: list[float] = field(default_factory=list)


def make_variant(
    name: str, cfg: Config, data, teacher: FrozenTeacher | None, batch: int
) -> Variant:
    """One student (same seed for all) and the trainer's step for variant `name`."""
    torch.manual_seed(0)
    student = build_student(cfg, data, teacher)  # probes both taps, sizes the regressor
    weights = WEIGHTS[name]
    stage = StageConfig(name=name, steps=10**6, **weights)
    set_trainable(cfg, stage, student, teacher, probe_input(data).float())
    strategy = build_strategy(StrategyConfig(), DistEnv(), "fp32")
    optim = OptimConfig(schedule="constant")
    model, optimizer, scheduler = strategy.prepare(student, optim, optim.lr, stage.steps)
    stored = name == "kd_stored"
    distiller = Distiller(
        model, teacher if name not in ("student", "kd_stored") else None, cfg.loss.temperature,
        cfg.loss.impl, soft=stored,
    )
    g = torch.Generator().manual_seed(2)
    images = torch.randn(batch, data.in_channels, *data.image_size, generator=g)
    labels = torch.randint(0, data.num_classes, (batch,), generator=g)
    if stored:  # what the reader hands over: the teacher's top-k at T of these images, fp16
        with torch.no_grad():
            p = torch.softmax(teacher(images)[0].float() / cfg.loss.temperature, -1)
        values, idx = p.topk(min(STORED_TOPK, data.num_classes), -1)
        soft = (idx, values.half())

    def full_hint(images, labels, weights):
        # Stage 1 without truncation: the same hint loss, both taps run to the logits.
        with torch.no_grad():
            _, t_feats = teacher.tap(images, stop_early=False)
        _, feats = student.tap(images, stop_early=False)
        terms = [
            fused_hint_loss(f, r, t, student.hint_reduction, impl=student.loss_impl)
            for f, r, t in zip(feats, student.regressors, t_feats)
        ]
        hint = torch.stack(terms).sum()
        return {"loss": weights["hint"] * hint, "hint": hint}

    def from_stored(images, labels, weights):
        return distiller(images, labels, weights, soft=soft)

    loss_fn = full_hint if name == "stage1_full" else from_stored if stored else distiller
    v = Variant(name, None, student, optimizer)

    def step():  # the trainer's optimizer step with one micro-step (trainer._run_stage)
        student.train()
        with strategy.microstep(model, sync=True):
            with strategy.autocast():
                terms = loss_fn(images, labels, weights)
            strategy.backward(terms["loss"])
        strategy.step(optimizer, optim.max_grad_norm)
        scheduler.step()
        return terms["loss"].detach()

    v.step = step
    return v


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages of the tensors in modules' state and optimizers' state."""
    seen, total = set(), 0
    for obj in objs:
        if isinstance(obj, torch.optim.Optimizer):
            tensors = [t for s in obj.state.values() for t in s.values() if torch.is_tensor(t)]
        else:
            tensors = list(obj.state_dict(keep_vars=True).values())
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def flops(variants: dict[str, Variant], teacher: FrozenTeacher, data, batch: int) -> dict[str, int]:
    """Forward FLOPs per batch: whole networks, networks up to the hint layers, the regressor."""
    x = torch.randn(batch, data.in_channels, *data.image_size)
    student = variants["hint_kd"].student
    student.eval()  # no BN statistics updates from counting
    try:
        feats = student.tap(x, stop_early=True)[1]
        out = {
            "student": count_flops(lambda: student.backbone(x)),
            "teacher": count_flops(lambda: teacher(x)),
            "student_to_hint": count_flops(lambda: student.tap(x, stop_early=True)),
            "teacher_to_hint": count_flops(lambda: teacher(x, need_logits=False)),
            "regressor": count_flops(lambda: [r(f) for r, f in zip(student.regressors, feats)]),
        }
    finally:
        student.train()
    return out


def time_variants(variants: list[Variant], steps: int, warmup: int) -> None:
    """Round-robin: each round runs every variant once, starting one further along each time."""
    for r in range(warmup + steps):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            t0 = time.perf_counter()
            loss = v.step()
            dt = (time.perf_counter() - t0) * 1e3
            if r == 0:
                v.first_loss = float(loss)  # same weights and batch: stage1 and stage1_full agree
            if r >= warmup:
                v.times_ms.append(dt)


def memory(
    variants: dict[str, Variant], teacher: FrozenTeacher, data, batch: int
) -> dict[str, float]:
    """Allocator-level peak of one step (see the module docstring), in MiB."""
    cpu = torch.device("cpu")
    out = {}
    for name in ("student", "hint_kd", "stage1"):
        v = variants[name]
        resident = tensor_bytes(v.student, v.optimizer) + (
            tensor_bytes(teacher) if name != "student" else 0
        )
        out[f"{name}_peak"] = (resident + peak_extra_bytes(v.step, cpu)) / MiB
    x = torch.randn(batch, data.in_channels, *data.image_size)
    out["teacher_weights"] = tensor_bytes(teacher) / MiB
    out["teacher_working_set"] = peak_extra_bytes(lambda: teacher(x), cpu) / MiB
    out["teacher_extra"] = out["hint_kd_peak"] - out["student_peak"]
    out["bound"] = 1.1 * (out["teacher_weights"] + out["teacher_working_set"])
    return out


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Not `ru_maxrss`: a child started by fork + exec
    inherits the parent's high-water mark there (Linux), which would hide the child's own."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_probe(args) -> int:
    """Subprocess entry: build one variant alone, run a few steps, print peak RSS (KiB)."""
    torch.set_num_threads(args.threads)
    cfg, data, batch = setup_config(args.small, args.classes)
    base = peak_rss_kib()  # after imports: the same in both processes
    teacher = make_teacher(cfg, data) if args.rss_probe != "student" else None
    v = make_variant(args.rss_probe, cfg, data, teacher, batch)
    for _ in range(3):
        v.step()
    print(json.dumps({"peak_kib": peak_rss_kib(), "after_imports_kib": base}))
    return 0


def rss(args) -> dict[str, float]:
    """Peak RSS of a fresh process per variant: student-only (no teacher built) and hint_kd."""
    out = {}
    for name in ("student", "hint_kd"):
        cmd = [sys.executable, "-m", "fitdist.bench.step", "--rss-probe", name]
        cmd += ["--threads", str(args.threads), "--classes", str(args.classes)]
        cmd += ["--small"] if args.small else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        out[f"{name}_peak_rss"] = got["peak_kib"] / 1024
        out[f"{name}_after_imports"] = got["after_imports_kib"] / 1024
    out["teacher_extra"] = out["hint_kd_peak_rss"] - out["student_peak_rss"]
    return out


def run(args) -> dict:
    cfg, data, batch = setup_config(args.small, args.classes)
    load_before = os.getloadavg()
    teacher = make_teacher(cfg, data)
    teachers = {name: make_ensemble(cfg, data, teacher, n) if n > 1 else teacher for name, n in ENSEMBLES.items()}
    variants = {n: make_variant(n, cfg, data, teachers.get(n, teacher), batch) for n in VARIANTS}
    fl = flops(variants, teacher, data, batch)
    time_variants(list(variants.values()), args.steps, args.warmup)
    med = {n: statistics.median(v.times_ms) for n, v in variants.items()}
    load_after = os.getloadavg()
    mem = memory(variants, teacher, data, batch) if not args.no_memory else {}
    proc = rss(args) if not args.no_memory else {}

    r_kd = med["hint_kd"] / med["student"]
    stored_ratio = statistics.median(
        a / b for a, b in zip(variants["kd_stored"].times_ms, variants["student"].times_ms)
    )
    r_flop = (3 * fl["student"] + fl["teacher"]) / (3 * fl["student"])
    s2, t2, r = fl["student_to_hint"], fl["teacher_to_hint"], fl["regressor"]
    # Stage 1 ≈ 3 forwards of what trains (student to its guided layer + regressor) + the
    # teacher's forward; without truncation the frozen rest of both networks runs forward only.
    stage1_flop = (3 * (s2 + r) + t2) / (fl["student"] + 2 * s2 + 3 * r + fl["teacher"])
    ratios = {
        "r_KD": r_kd,
        "r_FLOP": r_flop,
        "r_KD_over_r_FLOP": r_kd / r_flop,
        "r_KD_target_met": r_kd <= 1.1 * r_flop,
        "kd_only_over_student": med["kd"] / med["student"],
        # paired: the ratio within each round (both steps timed moments apart), then the median
        "kd_stored_over_student": stored_ratio,
        "kd_stored_target_met": stored_ratio <= 1.05,
        "stage1_trunc_over_full": med["stage1"] / med["stage1_full"],
        "stage1_trunc_over_full_FLOP": stage1_flop,
    }
    if mem:
        ratios["teacher_memory_target_met"] = mem["teacher_extra"] <= mem["bound"]
    meta = {
        "student": cfg.student.name,
        "teacher": cfg.teacher.name,
        "hint": f"{cfg.hints[0].student}<-{cfg.hints[0].teacher}",
        "classes": data.num_classes,
        "image_size": data.image_size[0],
        "batch": batch,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "nproc": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    ensemble = {  # the KD step with 1, 2, 3 teachers against the student-only step, and the FLOP model's
        str(k): {"variant": name, "median_ms": round(med[name], 3), "over_student": round(med[name] / med["student"], 3),
                 "r_FLOP": round((3 * fl["student"] + k * fl["teacher"]) / (3 * fl["student"]), 4)}
        for name, k in ENSEMBLES.items()
    }
    results = {
        n: {
            "median_ms": round(med[n], 3),
            "over_student": round(med[n] / med["student"], 3),
            "first_loss": round(v.first_loss, 6),
        }
        for n, v in variants.items()
    }

    def rnd(d: dict) -> dict:
        return {k: round(x, 4) if isinstance(x, float) else x for k, x in d.items()}

    return {
        "meta": meta,
        "flops": fl,
        "steps": results,
        "ensemble": ensemble,
        "ratios": rnd(ratios),
        "memory_mib": rnd(mem),
        "rss_mib": rnd(proc),
    }


def print_table(res: dict) -> None:
    m, fl, ra, mem, rs = (res[k] for k in ("meta", "flops", "ratios", "memory_mib", "rss_mib"))
    side = m["image_size"]
    print(
        f"{m['teacher']} -> {m['student']}, hint {m['hint']}, {side}x{side}, batch {m['batch']}, "
        f"{m['classes']} classes, fp32 CPU, {m['threads']} thread(s), median of {m['steps']} "
        f"after {m['warmup']} warm-up; load {m['loadavg_before'][0]} -> {m['loadavg_after'][0]}"
    )
    print(f"{'variant':14} {'median ms':>10} {'x student':>10} {'first loss':>11}")
    for n, s in res["steps"].items():
        print(f"{n:14} {s['median_ms']:10.1f} {s['over_student']:10.3f} {s['first_loss']:11.4f}")
    print("KD with n teachers (mean_probs): " + ", ".join(
        f"{k}: {e['over_student']:.3f}x student (FLOP model {e['r_FLOP']:.3f})" for k, e in res["ensemble"].items()))
    print("forward GFLOP per batch: " + ", ".join(f"{k} {v / 1e9:.4g}" for k, v in fl.items()))
    verdict = {True: "met", False: "MISSED"}
    print(
        f"r_KD {ra['r_KD']:.3f}  r_FLOP {ra['r_FLOP']:.3f}  r_KD/r_FLOP "
        f"{ra['r_KD_over_r_FLOP']:.3f} (target <= 1.1: {verdict[ra['r_KD_target_met']]})"
    )
    print(
        f"KD from stored soft labels: {ra['kd_stored_over_student']:.3f}x student (target <= 1.05: "
        f"{verdict[ra['kd_stored_target_met']]}); online KD {ra['kd_only_over_student']:.3f}x"
    )
    print(
        f"stage 1 truncated / full: {ra['stage1_trunc_over_full']:.3f} "
        f"(FLOP estimate {ra['stage1_trunc_over_full_FLOP']:.3f})"
    )
    if mem:
        print(
            f"allocator peak MiB: student step {mem['student_peak']:.1f}, "
            f"hint_kd step {mem['hint_kd_peak']:.1f}, stage1 step {mem['stage1_peak']:.1f}"
        )
        print(
            f"teacher extra {mem['teacher_extra']:.1f} MiB vs bound {mem['bound']:.1f} = 1.1 x "
            f"(weights {mem['teacher_weights']:.1f} + working set "
            f"{mem['teacher_working_set']:.1f}): {verdict[ra['teacher_memory_target_met']]}"
        )
        print(
            f"process peak RSS MiB: student {rs['student_peak_rss']:.1f}, "
            f"hint_kd {rs['hint_kd_peak_rss']:.1f}, teacher extra {rs['teacher_extra']:.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fitdist bench step", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument(
        "--classes", type=int, default=1000, help="classes of both models (default 1000)"
    )
    p.add_argument("--small", action="store_true", help="tiny fitnets on 8x8 inputs (a smoke test)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--rss-probe", choices=VARIANTS, help=argparse.SUPPRESS)  # subprocess entry
    args = p.parse_args(argv)
    if args.rss_probe:
        return rss_probe(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # pinned: every variant runs with the same threads
    try:
        res = run(args)
    finally:
        torch.set_num_threads(threads)  # leave a calling process (e.g. a test) as it was
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
