"""Section 3, dry runs: `fitdist train configs/imagenet/<recipe>.yaml --dry-run` as a user runs it,
once with `train.compile=true` (every model must compile, not fall back to eager) and once under
DeepSpeed ZeRO-3 with bf16 (`strategy.kind=deepspeed`, `configs/deepspeed/zero3.json`).

On CUDA: every ImageNet recipe, both ways, on `cuda`, at the recipes' own sizes, four dry runs at
a time (compiling is CPU-bound; the GPU holds a few batches of 4 easily). In CPU mode: one recipe
each way, with the models swapped for tiny fitnets on 16 px images (inductor on CPU takes most of
a minute even then; without BatchNorm, see `fixtures.py`) and the hint moved to their `conv2`.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from fitdist.gpu_check.common import (
    CheckFailed,
    Checks,
    Context,
    fitdist_cmd,
    kill_group,
    last_error_line,
)

RECIPES = ("kd-resnet34-resnet18", "fitnets-resnet34-resnet18", "kd-resnet50-mobilenet_v2",
           "fitnets-resnet50-mobilenet_v2")
TINY = ["student.name=fitdist:fitnet", "student.kwargs={widths: [4, 8], pool_after: [1], batch_norm: false}",
        "teacher.name=fitdist:fitnet", "teacher.kwargs={widths: [8, 8], pool_after: [1], batch_norm: false}",
        # the recipes name torchvision weights, which a fitnet has none of: a file never there (random)
        "teacher.weights=tiny-teacher-not-trained.pt",
        "data.image_size=16", "train.device=cpu", "train.threads=1"]
TINY_HINT = ["hints=[{student: conv2, teacher: conv2, relu: true}]"]


def plan(ctx: Context) -> list[tuple[str, str, list[str]]]:
    """(check name, recipe, overrides) of every dry run."""
    zero3 = Path(ctx.repo) / "configs" / "deepspeed" / "zero3.json"
    compile_ = ["train.compile=true"]
    ds = ["strategy.kind=deepspeed", f"strategy.deepspeed_config={zero3}", "train.precision=bf16"]
    if ctx.cuda:
        return [(f"{r} {kind}", r, [*extra, "train.device=cuda"])
                for kind, extra in (("compile", compile_), ("zero3-bf16", ds)) for r in RECIPES]
    return [("kd-resnet34-resnet18 compile (tiny fitnets)", "kd-resnet34-resnet18", [*compile_, *TINY]),
            ("fitnets-resnet34-resnet18 zero3-bf16 (tiny fitnets)", "fitnets-resnet34-resnet18",
             [*ds, *TINY, *TINY_HINT])]


def verdict(kind: str, output: str) -> str:
    """PASS detail from a dry run's JSON line, or CheckFailed."""
    lines = [ln for ln in output.splitlines() if ln.startswith("{")]
    if not lines:
        raise CheckFailed(f"no JSON result: {last_error_line(output)}")
    res = json.loads(lines[-1])
    stages = ", ".join(f"{s['name']} loss {s['terms']['loss']:.3g}" for s in res["stages"])
    if "compile" in kind:
        eager = {m: why for m, why in res.get("compile", {}).items() if why != "compiled"}
        if eager or not res.get("compile"):
            raise CheckFailed(f"not compiled: {eager or 'no compile report'}")
        return f"{res['device']}, compiled: {', '.join(res['compile'])}; {stages}"
    if not res["strategy"].startswith("deepspeed"):
        raise CheckFailed(f"strategy {res['strategy']!r}, expected deepspeed")
    return f"{res['device']}, {res['strategy']}; {stages}"


def run(ctx: Context, checks: Checks) -> None:
    jobs = plan(ctx)
    parallel = 4 if ctx.cuda else 1  # CPU mode: 2 shared cores, one compile at a time is faster
    ctx.logs.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, recipe, overrides = pending.pop(0)
            log = ctx.logs / f"dryrun-{name.split(' (')[0].replace(' ', '-')}.log"
            config = Path(ctx.repo) / "configs" / "imagenet" / f"{recipe}.yaml"
            cmd = fitdist_cmd(ctx, "train", str(config), "--dry-run", *overrides)
            f = open(log, "w")  # noqa: SIM115  closed when the job ends
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ctx.env(), cwd=ctx.work,
                                    start_new_session=True)
            running.append((name, proc, f, log, time.perf_counter()))
        time.sleep(0.2)
        for job in list(running):
            name, proc, f, log, t0 = job
            if proc.poll() is None and time.perf_counter() - t0 < 600:
                continue
            if proc.poll() is None:
                kill_group(proc)
            f.close()
            running.remove(job)
            done[name] = (proc.returncode, log.read_text(errors="replace"), time.perf_counter() - t0, log)
    for name, _, _ in jobs:
        rc, output, seconds, log = done[name]

        def check(rc=rc, output=output, seconds=seconds, log=log, name=name):
            if rc != 0:
                raise CheckFailed(f"exit {rc}: {last_error_line(output)} (log: {log})")
            return f"{verdict(name, output)} ({seconds:.0f} s)"

        checks.run(name, check)
