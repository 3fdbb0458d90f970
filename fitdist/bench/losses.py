"""`fitdist bench losses`: fused versus reference distillation losses, forward + backward.

For each case both implementations run in the same process, interleaved, after a warm-up; the
time is the median over repetitions. Peak extra memory is the highest number of bytes held by
tensors allocated during one forward + backward (inputs and parameters are allocated before and
not counted; the gradients produced are). On CPU it is read from PyTorch's profiler allocation
events (`total_allocated`, the allocator's running total of live bytes since profiling started),
so it covers everything allocated through PyTorch's allocator, and not BLAS/oneDNN scratch that
bypasses it. On CUDA it is `torch.cuda.max_memory_allocated` around the call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fitdist.kernels import fused_hint_loss, fused_kd_ce_loss
from fitdist.losses import hint_loss, kd_loss, kd_loss_to_target
from fitdist.regressors import Regressor

# (name, batch, student C×H×W, teacher C×H×W); 1×1 regressors (equal spatial sizes).
HINT_CASES = [
    ("hint 256x14x14->512x14x14 b64", 64, (256, 14, 14), (512, 14, 14)),
    ("hint r18->r34 layer1 64x56x56 b32", 32, (64, 56, 56), (64, 56, 56)),
]
KD_CASES = [("kd 256x1000", 256, 1000), ("kd 4096x1000", 4096, 1000)]
KD_PROBS_CASES = [("kd target_probs 4096x1000", 4096, 1000)]  # KD against a given distribution
SMALL_HINT = [("hint small", 4, (16, 6, 6), (24, 6, 6))]
SMALL_KD = [("kd small", 32, 100)]
SMALL_KD_PROBS = [("kd target_probs small", 32, 100)]


@dataclass
class Result:
    case: str
    ref_ms: float
    fused_ms: float
    time_ratio: float  # fused / reference
    ref_peak_mib: float
    fused_peak_mib: float
    mem_ratio: float  # fused / reference


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes held by tensors allocated while `fn` runs (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def median_ms(fns: list[Callable[[], object]], reps: int, warmup: int, device) -> list[float]:
    """Median wall time of each fn, interleaved so drifting machine load hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def _hint_fns(batch, s_shape, t_shape, device):
    reg = Regressor(nn.Conv2d(s_shape[0], t_shape[0], 1), None, False, None).to(device)
    x = torch.randn(batch, *s_shape, device=device, requires_grad=True)
    t = torch.randn(batch, *t_shape, device=device)

    def ref():
        hint_loss(reg(x), t).backward()
        x.grad = None  # drop the gradients so every run allocates them afresh, like training
        reg.zero_grad(set_to_none=True)

    def fused():
        fused_hint_loss(x, reg, t).backward()
        x.grad = None
        reg.zero_grad(set_to_none=True)

    return ref, fused


def _kd_fns(batch, classes, device):
    s = torch.randn(batch, classes, device=device, requires_grad=True)
    t = torch.randn(batch, classes, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    temp = 4.0

    def ref():
        ce = F.cross_entropy(s.float(), y)
        kd = kd_loss(s, t, temp)
        (ce + kd).backward()
        s.grad = None

    def fused():
        fused_kd_ce_loss(s, t, y, temp).loss.backward()
        s.grad = None

    return ref, fused


def _kd_probs_fns(batch, classes, device):
    """KD against a target distribution (e.g. a teacher ensemble's mean) with labels."""
    s = torch.randn(batch, classes, device=device, requires_grad=True)
    p = torch.randn(batch, classes, device=device).softmax(-1)
    y = torch.randint(0, classes, (batch,), device=device)
    temp = 4.0

    def ref():
        (F.cross_entropy(s.float(), y) + kd_loss_to_target(s, p, temp)).backward()
        s.grad = None

    def fused():
        fused_kd_ce_loss(s, None, y, temp, target_probs=p).loss.backward()
        s.grad = None

    return ref, fused


def run(args) -> list[Result]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cases = [
        (n, _hint_fns(b, s, t, device)) for n, b, s, t in (SMALL_HINT if args.small else HINT_CASES)
    ]
    cases += [(n, _kd_fns(b, k, device)) for n, b, k in (SMALL_KD if args.small else KD_CASES)]
    probs_cases = SMALL_KD_PROBS if args.small else KD_PROBS_CASES
    cases += [(n, _kd_probs_fns(b, k, device)) for n, b, k in probs_cases]
    results = []
    for name, (ref, fused) in cases:
        ref_ms, fused_ms = median_ms([ref, fused], args.reps, args.warmup, device)
        ref_mem, fused_mem = peak_extra_bytes(ref, device), peak_extra_bytes(fused, device)
        results.append(Result(
            name, round(ref_ms, 3), round(fused_ms, 3), round(fused_ms / ref_ms, 3),
            round(ref_mem / 2**20, 2), round(fused_mem / 2**20, 2),
            round(fused_mem / max(ref_mem, 1), 3),
        ))  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fitdist bench losses", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # pinned: the ratios compare like with like
    try:
        results = run(args)
    finally:
        torch.set_num_threads(threads)  # leave a calling process (e.g. a test) as it was
    if args.json:
        meta = {"device": args.device, "threads": args.threads, "reps": args.reps}
        print(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
        return 0
    head = f"{'case':36} {'ref ms':>9} {'fused ms':>9} {'time x':>7} {'ref MiB':>9} {'fused MiB':>9} {'mem x':>6}"
    print(head)
    for r in results:
        print(
            f"{r.case:36} {r.ref_ms:9.2f} {r.fused_ms:9.2f} {r.time_ratio:7.2f} "
            f"{r.ref_peak_mib:9.1f} {r.fused_peak_mib:9.1f} {r.mem_ratio:6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
