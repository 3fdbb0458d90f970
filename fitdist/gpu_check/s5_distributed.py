"""Section 5, distributed strategies on one rank under torchrun: DDP (NCCL on CUDA, gloo in CPU
mode), DeepSpeed ZeRO-2 and ZeRO-3, all in bf16 with channels_last, a few steps each with save and
resume.

Each runs a hint stage then a KD stage (4 + 4 steps, checkpoints at steps 3 and 6 and at each
stage's end) on the generated shards. Resume: a copy of the finished run as a crash after step 6
would have left it (later checkpoints, `student.pt` and `summary.json` removed) continues with
`--resume` from step 6 to the end; its `student.pt` must load and be finite, and its distance to
the uninterrupted run's is reported (bitwise equality is not expected on a GPU).

DeepSpeed runs through `fitdist train` under torchrun; DDP through `ddp_driver.py` (why: there).
"""

from __future__ import annotations

import importlib.util
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fitdist.gpu_check import fixtures
from fitdist.gpu_check.common import (
    CheckFailed,
    Checks,
    Context,
    run_logged,
    summary_of,
    torchrun_cmd,
)

STAGES = [{"name": "hint", "steps": 4, "ce": 0.0, "hint": 1.0}, {"name": "kd", "steps": 4, "ce": 1.0, "kd": [4.0, 1.0]}]
CRASH_AFTER = 6


def command(ctx: Context, kind: str, config: Path, *extra: str) -> list[str]:
    if kind == "ddp":
        return torchrun_cmd(ctx, "-m", "fitdist.gpu_check.ddp_driver", str(config), *extra)
    return torchrun_cmd(ctx, "-m", "fitdist.cli", "train", str(config), *extra)


def overrides(ctx: Context, kind: str) -> list[str]:
    if kind == "ddp":
        return ["strategy.kind=ddp"]
    zero = Path(ctx.repo) / "configs" / "deepspeed" / f"{kind}.json"
    return ["strategy.kind=deepspeed", f"strategy.deepspeed_config={zero}"]


def crashed_copy(run: Path, into: Path) -> Path:
    """`run` as a crash after step CRASH_AFTER would have left it."""
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(run, into)
    for folder in ("checkpoints", "deepspeed"):
        for p in (into / folder).glob("step-*"):
            if int(p.name.removeprefix("step-")) > CRASH_AFTER:
                shutil.rmtree(p)
    for gone in ("student.pt", "summary.json"):
        (into / gone).unlink(missing_ok=True)
    return into


def strategy_run(ctx: Context, kind: str) -> str:
    import torch

    config = fixtures.run_config(ctx, f"dist-{kind}", STAGES, train={"checkpoint_every": 3, "log_every": 2},
                                 data={"num_workers": 2 if ctx.cuda else 0})  # CPU: section 4 covers workers
    runs = ctx.work / "runs"
    first, resumed = runs / f"dist-{kind}", runs / f"dist-{kind}-resumed"
    shutil.rmtree(first, ignore_errors=True)
    _, output = run_logged(ctx, f"{kind}-train", command(ctx, kind, config, *overrides(ctx, kind)), 600, cwd=ctx.work)
    total = sum(s["steps"] for s in STAGES)
    if summary_of(first)["steps"] != total:
        raise CheckFailed(f"{first}/summary.json: not {total} steps")
    backend = next((ln.split("backend ")[1].split(",")[0] for ln in output.splitlines() if "ddp driver: backend" in ln),
                   None)
    crashed_copy(first, resumed)
    _, output = run_logged(ctx, f"{kind}-resume", command(ctx, kind, config, *overrides(ctx, kind),
                                                          f"run.dir={resumed}", "--resume"), 600, cwd=ctx.work)
    if f"resumed from step {CRASH_AFTER}" not in output:
        raise CheckFailed(f"the resumed run does not say 'resumed from step {CRASH_AFTER}' "
                          f"(log: {ctx.logs / f'{kind}-resume.log'})")
    if summary_of(resumed)["steps"] != total:
        raise CheckFailed(f"{resumed}/summary.json: not {total} steps")
    a = torch.load(first / "student.pt", weights_only=True)
    b = torch.load(resumed / "student.pt", weights_only=True)
    if a.keys() != b.keys() or not all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point()):
        raise CheckFailed("the resumed student.pt differs in keys or is not finite")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    how = f"backend {backend}, " if backend else ""
    return f"{how}{total} steps, resumed from step {CRASH_AFTER}; max |resumed - uninterrupted| {diff:.2g}"


def run(ctx: Context, checks: Checks) -> None:
    kinds = ["ddp"]
    if ctx.cuda:
        import torch.distributed as dist

        if not dist.is_nccl_available():
            checks.fail("ddp", "NCCL is not available in this torch build")
            kinds = []
    else:
        checks.skip("ddp nccl", "CPU: no NCCL; DDP runs over gloo instead")
    if importlib.util.find_spec("deepspeed") is None:  # not imported here: it is slow, and the runs do
        checks.skip("deepspeed", "not installed (pip install fitdist[deepspeed])")
    else:
        kinds += ["zero2", "zero3"]
    fixtures.shards(ctx), fixtures.teacher_weights(ctx)  # made once, before the runs share them
    # The three runs are independent (own run directories, own torchrun ports): side by side they
    # take about as long as the slowest, mostly process start-up and imports.
    with ThreadPoolExecutor(len(kinds) or 1) as pool:
        futures = {kind: pool.submit(strategy_run, ctx, kind) for kind in kinds}
    backend = "nccl" if ctx.cuda else "gloo"
    for kind, future in futures.items():
        name = f"ddp {backend} bf16" if kind == "ddp" else f"deepspeed {kind} bf16"
        checks.run(name, future.result)
