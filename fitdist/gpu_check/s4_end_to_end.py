"""Section 4, end to end, as a user would do it: generated ImageNet-layout JPEGs -> `fitdist shard`
-> `fitdist train` on `cuda:0` from the shards (loader workers, pinned memory, channels_last,
bf16, a hint stage then a KD stage, checkpoints every 5 steps), SIGTERM once the first mid-run
checkpoint exists -> the run saves and exits 75 -> `fitdist train --resume` finishes it.

Checked: exit statuses, the checkpoint of the preempted step, the resumed run starting from it
and ending at the last step, `metrics.jsonl` rows with finite losses and a throughput, and
`student.pt` loading with `weights_only=True` into a freshly built student.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fitdist.gpu_check import fixtures
from fitdist.gpu_check.common import (
    CheckFailed,
    Checks,
    Context,
    fitdist_cmd,
    kill_group,
    last_error_line,
    run_logged,
    summary_of,
)

PREEMPTED_EXIT = 75  # fitdist.preemption.PREEMPTED_EXIT, as a user's script would test it


def steps(ctx: Context) -> tuple[int, int]:
    """(hint steps, KD steps): enough that SIGTERM lands long before the end."""
    return (10, 90) if ctx.cuda else (5, 45)


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))


def make_shards(ctx: Context) -> str:
    out = fixtures.shards(ctx)
    m = json.loads((out / "manifest.json").read_text())
    return ", ".join(f"{split} {info['total']} images in {len(info['shards'])} shards"
                     for split, info in m["splits"].items())


def preempt(ctx: Context, config: Path, run_dir: Path, total: int) -> str:
    """Starts the run, SIGTERMs it after its first checkpoint; it must save and exit 75."""
    log = ctx.logs / "e2e-train.log"
    cmd = fitdist_cmd(ctx, "train", str(config))
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ctx.env(), cwd=ctx.work,
                                start_new_session=True)
        t0 = time.perf_counter()
        try:
            while not checkpoints(run_dir):
                if proc.poll() is not None:
                    raise CheckFailed(f"exit {proc.returncode} before its first checkpoint: "
                                      f"{last_error_line(log.read_text(errors='replace'))} (log: {log})")
                if time.perf_counter() - t0 > 400:
                    raise CheckFailed(f"no checkpoint after 400 s (log: {log})")
                time.sleep(0.05)
            first = checkpoints(run_dir)[0]
            proc.send_signal(signal.SIGTERM)  # the main process only, as SLURM's scancel --signal=TERM
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"still running 180 s after SIGTERM (log: {log})") from None
        finally:
            if proc.poll() is None:
                kill_group(proc)
    output = log.read_text(errors="replace")
    if rc != PREEMPTED_EXIT:
        raise CheckFailed(f"exit {rc} after SIGTERM, expected {PREEMPTED_EXIT}: {last_error_line(output)} (log: {log})")
    saved = checkpoints(run_dir)[-1]
    if not first <= saved < total:
        raise CheckFailed(f"last checkpoint at step {saved}, expected one in [{first}, {total})")
    return f"SIGTERM after the step-{first} checkpoint: exit 75 with a checkpoint at step {saved}"


def resume(ctx: Context, config: Path, run_dir: Path, total: int) -> str:
    saved = checkpoints(run_dir)[-1]
    _, output = run_logged(ctx, "e2e-resume", fitdist_cmd(ctx, "train", str(config), "--resume"), timeout=600,
                           cwd=ctx.work)
    if f"resumed from step {saved}" not in output:
        raise CheckFailed(f"the log does not say 'resumed from step {saved}' (log: {ctx.logs / 'e2e-resume.log'})")
    summary = summary_of(run_dir)
    if summary["steps"] != total:
        raise CheckFailed(f"summary.json: {summary['steps']} steps, expected {total}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"metrics.jsonl: losses {losses[:5]}...")
    rates = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r]
    return (f"resumed from step {saved} to {total}; {len(rows)} metric rows, last loss {losses[-1]:.3g}, "
            f"median {sorted(rates)[len(rates) // 2]:.0f} img/s, val top-1 {summary.get('val/top1', math.nan):.1f}%")


def student_loads(ctx: Context, run_dir: Path) -> str:
    """`student.pt` is a plain fp32 state_dict for the student built alone (no fitdist state)."""
    import torch

    from fitdist.config import ModelConfig
    from fitdist.models import build_model

    s = fixtures.sizes(ctx)
    state = torch.load(run_dir / "student.pt", weights_only=True)
    model = build_model(ModelConfig(s["student"], s["student_kwargs"]), s["classes"], 3)
    model.load_state_dict(state)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    if dtypes != ["float32"]:
        raise CheckFailed(f"student.pt holds {dtypes}, expected float32 only")
    return f"{len(state)} tensors, float32, loads into {s['student']}"


def run(ctx: Context, checks: Checks) -> None:
    if checks.run("shard", make_shards, ctx) is None:
        return
    hint, kd = steps(ctx)
    config = fixtures.run_config(ctx, "e2e", [{"name": "hint", "steps": hint, "ce": 0.0, "hint": 1.0},
                                              {"name": "kd", "steps": kd, "ce": 1.0, "kd": [4.0, 1.0]}])
    run_dir = ctx.work / "runs" / "e2e"
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous check's run would look like a checkpoint
    if checks.run("train + SIGTERM", preempt, ctx, config, run_dir, hint + kd) is None:
        return
    if checks.run("resume", resume, ctx, config, run_dir, hint + kd) is None:
        return
    checks.run("student.pt", student_loads, ctx, run_dir)
