"""Triton kernels for the fused hint loss with a pointwise (1×1 conv or linear) regressor: the
math of `kernels/hint.PointwiseHint` on `b c p` maps.

Forward: each program owns one sample's block of positions and one block of output channels,
computes `z = W x + b` with `tl.dot` over input-channel blocks (fp32 accumulation), applies the
ReLU, subtracts the hint tile and writes one partial Σr²; torch sums the partials in fp32. Nothing
of output size is written.

Backward: each program owns one sample's block of positions and walks all output-channel blocks:
it recomputes z, forms `dz = 2·scale·g·(relu(z) − t)·[z > 0]`, accumulates `Wᵀ dz` into its own
columns of an fp32 grad-input buffer (no other program touches them) and adds `dz xᵀ` and `Σ dz`
into the fp32 weight and bias gradients with atomics (so their summation order is not fixed).

`UPCAST` converts bf16/fp16 tiles to fp32 before `tl.dot`: Triton's CPU interpreter mis-computes
low-precision dots, so tests run with it on; on a GPU it is off and dots use the tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_O, BLOCK_P, BLOCK_C = 32, 64, 32


@triton.jit
def _project(x_ptr, w_ptr, b_ptr, offs_o, offs_p, Cs, Ct, P, sxc, sxp, swo, swc,
             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """z = W[offs_o, :] @ x[:, offs_p] + b[offs_o], fp32 (BLOCK_O × BLOCK_P)."""
    acc = tl.zeros([BLOCK_O, BLOCK_P], tl.float32)
    for c0 in range(0, Cs, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(
            w_ptr + offs_o[:, None] * swo + offs_c[None, :] * swc,
            mask=(offs_o[:, None] < Ct) & (offs_c[None, :] < Cs), other=0.0,
        )  # fmt: skip
        x = tl.load(
            x_ptr + offs_c[:, None] * sxc + offs_p[None, :] * sxp,
            mask=(offs_c[:, None] < Cs) & (offs_p[None, :] < P), other=0.0,
        )  # fmt: skip
        if UPCAST:
            w, x = w.to(tl.float32), x.to(tl.float32)
        if IEEE:  # fp32 inputs: true fp32 products, not TF32
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=offs_o < Ct, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _hint_fwd(x_ptr, w_ptr, b_ptr, t_ptr, part_ptr, Cs, Ct, P, n_pblk,
              sxb, sxc, sxp, swo, swc, stb, sto, stp,
              HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_C: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = (pid // n_pblk).to(tl.int64)
    offs_p = (pid % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    z = _project(x_ptr + b * sxb, w_ptr, b_ptr, offs_o, offs_p, Cs, Ct, P, sxc, sxp, swo, swc,
                 HAS_BIAS, IEEE, UPCAST, BLOCK_O, BLOCK_P, BLOCK_C)  # fmt: skip
    if RELU:
        z = tl.maximum(z, 0.0)
    mask = (offs_o[:, None] < Ct) & (offs_p[None, :] < P)
    t = tl.load(
        t_ptr + b * stb + offs_o[:, None] * sto + offs_p[None, :] * stp, mask=mask, other=0.0
    )
    r = tl.where(mask, z - t.to(tl.float32), 0.0)
    tl.store(part_ptr + pid * tl.num_programs(1) + pid_o, tl.sum(tl.sum(r * r, 1), 0))


@triton.jit
def _hint_bwd(x_ptr, w_ptr, b_ptr, t_ptr, coef_ptr, gx_ptr, gw_ptr, gb_ptr, Cs, Ct, P, n_pblk,
              sxb, sxc, sxp, swo, swc, stb, sto, stp,
              HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_C: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // n_pblk).to(tl.int64)
    offs_p = (pid % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    coef = tl.load(coef_ptr)  # 2·scale·grad_output, read on device: no host synchronisation
    x_b = x_ptr + b * sxb
    gx_b = gx_ptr + b * Cs * P  # the fp32 grad buffer is contiguous b c p
    for o0 in range(0, Ct, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        z = _project(x_b, w_ptr, b_ptr, offs_o, offs_p, Cs, Ct, P, sxc, sxp, swo, swc,
                     HAS_BIAS, IEEE, UPCAST, BLOCK_O, BLOCK_P, BLOCK_C)  # fmt: skip
        mask = (offs_o[:, None] < Ct) & (offs_p[None, :] < P)
        t = tl.load(t_ptr + b * stb + offs_o[:, None] * sto + offs_p[None, :] * stp, mask=mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        if RELU:
            dz = tl.where(z > 0, z - t, 0.0)  # F.relu passes gradient only where z > 0
        else:
            dz = z - t
        dz = tl.where(mask, dz * coef, 0.0)
        if HAS_BIAS:
            tl.atomic_add(gb_ptr + offs_o, tl.sum(dz, 1), mask=offs_o < Ct)
        if UPCAST or IEEE:
            dz_in = dz
        else:  # low-precision dots on the GPU, as the regressor itself would run
            dz_in = dz.to(w_ptr.dtype.element_ty)
        for c0 in range(0, Cs, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mw = (offs_o[:, None] < Ct) & (offs_c[None, :] < Cs)
            mx = (offs_c[:, None] < Cs) & (offs_p[None, :] < P)
            w = tl.load(w_ptr + offs_o[:, None] * swo + offs_c[None, :] * swc, mask=mw, other=0.0)
            x = tl.load(x_b + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mx, other=0.0)
            if UPCAST:
                w, x = w.to(tl.float32), x.to(tl.float32)
            gx_tile = gx_b + offs_c[:, None] * P + offs_p[None, :]
            gx = tl.load(gx_tile, mask=mx, other=0.0)
            if IEEE:
                gx = tl.dot(tl.trans(w), dz_in, gx, input_precision="ieee")
                gw = tl.dot(dz_in, tl.trans(x), input_precision="ieee")
            else:
                gx = tl.dot(tl.trans(w), dz_in, gx)
                gw = tl.dot(dz_in, tl.trans(x))
            tl.store(gx_tile, gx, mask=mx)
            tl.atomic_add(gw_ptr + offs_o[:, None] * Cs + offs_c[None, :], gw, mask=mw)


def int32_offsets(*maps: torch.Tensor) -> bool:
    """Whether the kernels' in-sample offsets fit int32 for these `b c p` maps.

    Only the sample index is widened to int64 in the kernels; an element offset within a sample
    (from the strides, and `c·p` in the grad-input buffer) past 2³¹ would wrap around silently.
    """
    for m in maps:
        extent = sum((n - 1) * abs(st) for n, st in zip(m.shape[1:], m.stride()[1:]))
        if max(extent, m[0].numel()) >= 2**31:
            return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_args(x, w, hint, bias):
    ieee = x.dtype == torch.float32 and w.dtype == torch.float32
    upcast = _interpreting() and not ieee
    b, cs, p = x.shape
    ct = w.shape[0]
    n_pblk = triton.cdiv(p, BLOCK_P)
    dims = (cs, ct, p, n_pblk, *x.stride(), *w.stride(), *hint.stride())
    meta = {"HAS_BIAS": bias is not None, "IEEE": ieee, "UPCAST": upcast,
            "BLOCK_O": BLOCK_O, "BLOCK_P": BLOCK_P, "BLOCK_C": BLOCK_C}  # fmt: skip
    return b * n_pblk, dims, meta


class TritonPointwiseHint(torch.autograd.Function):
    """scale · Σ(relu?(W x + b) − t)² over `b c p` maps, with the Triton kernels above."""

    @staticmethod
    def forward(ctx, x, weight, bias, hint, scale, relu, dtype):
        w = weight.reshape(weight.shape[0], -1).to(dtype)
        xc = x.to(dtype)
        grid0, dims, meta = _launch_args(xc, w, hint, bias)
        n_oblk = triton.cdiv(w.shape[0], BLOCK_O)
        parts = torch.empty(grid0 * n_oblk, dtype=torch.float32, device=x.device)
        b_arg = bias if bias is not None else w  # never read when HAS_BIAS is off
        _hint_fwd[(grid0, n_oblk)](xc, w, b_arg, hint, parts, *dims, RELU=relu, **meta)
        ctx.save_for_backward(x, weight, bias, hint)
        ctx.scale, ctx.relu, ctx.dtype = scale, relu, dtype
        return parts.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, hint = ctx.saved_tensors
        w = weight.reshape(weight.shape[0], -1).to(ctx.dtype)
        xc = x.to(ctx.dtype)
        grid0, dims, meta = _launch_args(xc, w, hint, bias)
        coef = (grad_out.float() * (2.0 * ctx.scale)).reshape(1)
        f32 = {"dtype": torch.float32, "device": x.device}
        gx = torch.zeros(x.shape, **f32)
        gw = torch.zeros(w.shape, **f32)
        gb = torch.zeros(w.shape[0], **f32)
        b_arg = bias if bias is not None else w
        _hint_bwd[(grid0,)](xc, w, b_arg, hint, coef, gx, gw, gb, *dims, RELU=ctx.relu, **meta)
        grad_b = gb.to(bias.dtype) if bias is not None else None
        return gx.to(x.dtype), gw.to(weight.dtype).view_as(weight), grad_b, None, None, None, None


def triton_pointwise_hint(x3, spec, hint3, scale, dtype):
    """The fused pointwise hint loss on `b c p` views with the Triton kernels."""
    return TritonPointwiseHint.apply(x3, spec.weight, spec.bias, hint3, scale, spec.relu, dtype)
