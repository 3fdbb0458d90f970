"""Section 2, kernels: the Triton hint and KD kernels (`fitdist.kernels`, `impl="triton"`) against
the reference losses (`impl="reference"`), in value and gradient, then timed.

Cases: fp32 and bf16 autocast; NCHW and channels_last feature maps; 1x1-conv and linear
regressors, with and without ReLU; KD with and without labels, against teacher logits and against a
given target distribution (`target_probs`: a 3-teacher weighted mean, in bf16 under bf16); every shape larger than one Triton
block in every dimension (hint: > 32 input and output channels, > 64 positions, several samples;
KD: > 4096 classes, several rows). On CPU the kernels run under `TRITON_INTERPRET=1` (set by the
runner), with small shapes that still span several blocks.

Accuracy: both the kernel and the fp32 reference are compared with the same loss computed in
float64 (on the bf16-rounded inputs under autocast, which is what both see). The reference is the
definition of correct, so a kernel passes when its error, norm-wise relative, is at most 4x the
reference's, or within a floor where the reference happens to be nearly exact: 16·eps·√n for an
fp32 value (n: the length of the sums behind it; tests/fp_accuracy.py's random-walk bound), two
bf16 roundings (1.6%) for a value that passes through bf16. A wrong mask, a dropped block or a
missing factor is off by far more; an fp32 case catches an error of 1e-4 (a loss scaled by
1.0001, a weight gradient by 1.01, both tried), a bf16 case only one above the floor.

Timing (CUDA only): forward + backward, median over repetitions, of the kernel, the reference, and
the reference through `torch.compile`, at the ImageNet pair's shapes in the training setting
(bf16 autocast, channels_last). Under the interpreter on CPU a time means nothing, and
`torch.compile` on CPU takes about a minute per shape, so CPU mode skips timing.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

from fitdist.gpu_check.common import CheckFailed, Checks, Context
from fitdist.kernels import fused_hint_loss, fused_kd_ce_loss, select_impl
from fitdist.losses import hint_loss, kd_loss
from fitdist.regressors import build_regressor

ELEMENTWISE = 8  # roundings each term sees besides its reductions (scale, exp/log, bias, square)
RATIO = 4.0  # a kernel may err up to this many times the fp32 reference's error
SAFETY = 16.0

# (student C×H×W or D, teacher C×H×W or D, batch). Triton blocks: 32 out × 64 positions × 32 in.
HINT_CUDA = [((80, 20, 20), (96, 20, 20), 4), ((256, 14, 14), (256, 14, 14), 8), ((80,), (96,), 300)]
HINT_CPU = [((37, 10, 7), (45, 10, 7), 3), ((37,), (45,), 70)]
# (rows, classes): MAX_BLOCK = 4096 classes per block
KD_CUDA = [(64, 1000), (16, 5000)]
KD_CPU = [(5, 37), (3, 5000)]
TIME_HINT = [((256, 14, 14), (256, 14, 14), 32), ((128, 28, 28), (128, 28, 28), 256)]  # r18/r34 layer3, layer2
TIME_KD = [(256, 1000), (4096, 1000)]


def floor(n: int, dtype: torch.dtype) -> float:
    """The error allowed whatever the reference's: for a value computed in fp32 through sums of
    length `n`, the random-walk bound 16·eps·√n; for one stored in bf16, two of its roundings
    (a norm-wise relative error of one rounding is about eps/√3)."""
    if dtype == torch.float32:
        return SAFETY * torch.finfo(dtype).eps * math.sqrt(max(1, n))
    return 2 * torch.finfo(dtype).eps


def rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = a.detach().double(), exact.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def compare(what: str, kernel: list[torch.Tensor], ref: list[torch.Tensor], exact: list[torch.Tensor],
            names: list[str], floors: list[float]) -> float:
    """Raises CheckFailed when a kernel value errs more than allowed; returns the worst ratio of
    its error to the allowance (for the report)."""
    worst = 0.0
    for name, k, r, e, fl in zip(names, kernel, ref, exact, floors):
        if not torch.isfinite(k).all():
            raise CheckFailed(f"{what} {name}: not finite")
        ek, er = rel_err(k, e), rel_err(r, e)
        allowed = max(RATIO * er, fl)
        if ek > allowed:
            raise CheckFailed(f"{what} {name}: relative error {ek:.2e} > {allowed:.2e} "
                              f"(reference {er:.2e}, floor {fl:.2e})")
        worst = max(worst, ek / allowed)
    return worst


def autocast(device: str, bf16: bool):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


# ------------------------------------------------------------------------------------------ hint
def hint_case(device: str, s_shape, t_shape, batch: int, relu: bool, channels_last: bool, bf16: bool,
              gen: torch.Generator) -> float:
    reg = build_regressor(s_shape, t_shape, relu=relu, where="gpu-check").to(device)
    x = torch.randn(batch, *s_shape, generator=gen).to(device)
    four_d = len(s_shape) == 3
    if channels_last and four_d:
        reg = reg.to(memory_format=torch.channels_last)  # as `place` leaves a channels_last student
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    # float64 on what the kernel and the reference see: under autocast, inputs and weights in bf16
    lowp = torch.bfloat16 if bf16 else torch.float32
    reg64 = copy.deepcopy(reg)
    with torch.no_grad():
        for p in reg64.parameters():
            p.copy_(p.to(lowp).float())
    reg64 = reg64.double()
    x64 = x.detach().to(lowp).double().requires_grad_()
    with torch.no_grad():
        z64 = reg64.proj(x64)
        abs_proj = copy.deepcopy(reg64.proj)
        for p in abs_proj.parameters():
            p.abs_()
        z_terms = abs_proj(x64.abs())  # Σ|w·x| + |b|: what z's rounding error scales with
    t = torch.randn(z64.shape, generator=gen).to(device).double()
    if relu:
        # A post-ReLU hint, 0 wherever z is within rounding of 0: there the two sides of ReLU's
        # kink give the same gradient, so where a rounded z falls costs only rounding (as in
        # tests/test_kernels.py's make_hint).
        t = t.abs()
        margin = floor(s_shape[0], torch.float32) + (SAFETY * torch.finfo(lowp).eps if bf16 else 0.0)
        t[z64.abs() <= margin * z_terms] = 0
    t = t.float()
    if channels_last and four_d:
        t = t.contiguous(memory_format=torch.channels_last)
    params = list(reg.parameters())

    def value_and_grads(impl: str) -> list[torch.Tensor]:
        with autocast(device, bf16):
            loss = fused_hint_loss(x, reg, t, "mean", impl=impl)
        return [loss, *torch.autograd.grad(loss, [x, *params])]

    kernel, ref = value_and_grads("triton"), value_and_grads("reference")
    loss64 = F.mse_loss(reg64(x64), t.double())
    exact = [loss64, *torch.autograd.grad(loss64, [x64, *reg64.parameters()])]
    fan_in, fan_out, rows = s_shape[0], t_shape[0], t.numel() // t_shape[0]
    n_grad = fan_in + fan_out + rows + ELEMENTWISE
    # the loss is an fp32 sum in either implementation; under autocast the gradients pass bf16 operands
    floors = [floor(fan_in + t.numel() + ELEMENTWISE, torch.float32)] + [floor(n_grad, lowp)] * (len(exact) - 1)
    names = ["loss", "d feats", *(f"d {n}" for n, _ in reg.named_parameters())]
    what = (f"hint {'x'.join(map(str, (batch, *s_shape)))}->{'x'.join(map(str, t_shape))} relu={relu} "
            f"{'channels_last' if channels_last and four_d else 'contiguous'} {'bf16' if bf16 else 'fp32'}")
    return compare(what, kernel, ref, exact, names, floors)


def hint_checks(ctx: Context, checks: Checks, gen: torch.Generator) -> None:
    shapes = HINT_CUDA if ctx.cuda else HINT_CPU
    for bf16 in (False, True):
        for channels_last in (False, True):
            cases, worst = 0, 0.0

            def run_all(bf16=bf16, channels_last=channels_last):
                nonlocal cases, worst
                for s, t, b in shapes:
                    if len(s) == 1 and channels_last:
                        continue  # flat features have no memory format
                    for relu in (False, True):
                        worst = max(worst, hint_case(ctx.device, s, t, b, relu, channels_last, bf16, gen))
                        cases += 1
                return f"{cases} cases, worst error {worst:.2g} of the allowed"

            checks.run(f"hint {'bf16' if bf16 else 'fp32'} {'channels_last' if channels_last else 'NCHW'}", run_all)


# -------------------------------------------------------------------------------------------- KD
def kd_case(device: str, n: int, k: int, bf16: bool, labels: bool, gen: torch.Generator,
            probs: bool = False) -> float:
    temperature, ce_w, kd_w = 4.0, 0.5, 2.0
    s = (torch.randn(n, k, generator=gen) * 3).to(device)
    t = (torch.randn(n, k, generator=gen) * 3).to(device)
    y = torch.randint(0, k, (n,), generator=gen).to(device) if labels else None
    if probs:  # a weighted mean of three teachers' softened probabilities
        w = torch.rand(3, generator=gen) + 0.1
        teachers = torch.randn(3, n, k, generator=gen) * 3
        t = ((w / w.sum())[:, None, None] * (teachers / temperature).softmax(-1)).sum(0).to(device)
    if bf16:  # what an autocast classifier head hands the loss
        s, t = s.bfloat16(), t.bfloat16()
    s.requires_grad_()
    kw = {"target_probs": t} if probs else {}

    def value_and_grad(impl: str) -> list[torch.Tensor]:
        with autocast(device, bf16):
            out = fused_kd_ce_loss(s, None if probs else t, y, temperature, ce_w, kd_w, impl=impl, **kw)
        return [out.loss, out.kd, *torch.autograd.grad(out.loss, s)]

    kernel, ref = value_and_grad("triton"), value_and_grad("reference")
    s64 = s.detach().double().requires_grad_()
    log_ps = F.log_softmax(s64 / temperature, -1)
    if probs:  # the target as given (a bf16 one's rows miss 1 by its roundings)
        p64 = t.double()
        kd = temperature**2 * (torch.xlogy(p64, p64) - p64 * log_ps).sum() / n
    else:
        log_pt = F.log_softmax(t.double() / temperature, -1)
        kd = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum() / n
    loss = kd_w * kd + (ce_w * F.cross_entropy(s64, y) if labels else 0.0)
    exact = [loss, kd, *torch.autograd.grad(loss, s64)]
    # every value is computed in fp32 in either implementation; the gradient is stored in s's dtype
    floors = [floor(k + n * k + ELEMENTWISE, torch.float32)] * 2 + [floor(k + ELEMENTWISE, s.dtype)]
    what = (f"kd {'target_probs ' if probs else ''}{n}x{k} {'bf16' if bf16 else 'fp32'} "
            f"{'labels' if labels else 'no labels'}")
    return compare(what, kernel, ref, exact, ["loss", "kd", "d logits"], floors)


def kd_checks(ctx: Context, checks: Checks, gen: torch.Generator) -> None:
    shapes = KD_CUDA if ctx.cuda else KD_CPU
    for probs in (False, True):
        for bf16 in (False, True):
            def run_all(bf16=bf16, probs=probs):
                worst = max(kd_case(ctx.device, n, k, bf16, labels, gen, probs)
                            for n, k in shapes for labels in (True, False))
                return f"{2 * len(shapes)} cases, worst error {worst:.2g} of the allowed"

            checks.run(f"kd {'target_probs ' if probs else ''}{'bf16' if bf16 else 'fp32'}", run_all)


# ---------------------------------------------------------------------------------------- timing
def median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_hint(s_shape, t_shape, batch: int) -> dict:
    reg = build_regressor(s_shape, t_shape, relu=True).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, *s_shape, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    t = torch.randn(batch, *t_shape, device="cuda").relu().contiguous(memory_format=torch.channels_last)

    def hint(impl):
        with autocast("cuda", True):
            loss = fused_hint_loss(x, reg, t, impl=impl)
        loss.backward()

    def hint_ref(x, t):
        with autocast("cuda", True):
            return hint_loss(reg(x), t)

    return time_case(f"hint {batch}x{'x'.join(map(str, s_shape))}", lambda: hint("triton"),
                     lambda: hint("reference"), torch.compile(hint_ref), (x, t))


def time_kd(n: int, k: int) -> dict:
    s = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, k, (n,), device="cuda")

    def kd(impl):
        fused_kd_ce_loss(s, t, y, 4.0, 0.5, 0.5, impl=impl).loss.backward()

    def kd_ref(s, t, y):  # what impl="reference" computes
        return 0.5 * F.cross_entropy(s.float(), y) + 0.5 * kd_loss(s, t, 4.0)

    return time_case(f"kd {n}x{k}", lambda: kd("triton"), lambda: kd("reference"), torch.compile(kd_ref), (s, t, y))


def timing(checks: Checks) -> str:
    """Kernel, reference and compiled reference, forward + backward, bf16 autocast, channels_last."""
    rows = [time_hint(*case) for case in TIME_HINT] + [time_kd(*case) for case in TIME_KD]
    checks.data["timing_ms"] = rows
    return "; ".join(f"{r['case']}: triton {r['triton_ms']:.3f} ms, reference {r['reference_ms']:.3f}, "
                     f"compiled {r['compiled_ms']:.3f}" for r in rows)


def time_case(case: str, triton_fn, ref_fn, compiled, args) -> dict:
    def compiled_fn():
        compiled(*args).backward()

    t0 = time.perf_counter()
    compiled_fn()  # the compile itself, reported apart
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    return {"case": case, "triton_ms": median_ms(triton_fn), "reference_ms": median_ms(ref_fn),
            "compiled_ms": median_ms(compiled_fn), "compile_s": round(compile_s, 1)}


def run(ctx: Context, checks: Checks) -> None:
    try:
        select_impl("triton", ctx.device)
    except ValueError as e:
        checks.fail("triton", str(e))
        return
    gen = torch.Generator().manual_seed(0)
    hint_checks(ctx, checks, gen)
    kd_checks(ctx, checks, gen)
    if ctx.cuda:
        checks.run("timing", timing, checks)
    else:
        checks.skip("timing", "CPU: Triton runs under its interpreter, and torch.compile takes ~1 min per shape")
