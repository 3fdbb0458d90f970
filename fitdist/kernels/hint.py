"""Fused FitNets hint loss (Romero et al. 2014, eq. 3) with its regressor, in chunked PyTorch.

`hint_loss(regressor(feats), hint)` materialises the projected map, its ReLU, an fp32 copy, the
difference and its square, and autograd keeps several of them alive until backward. Here the
regressor is applied to a chunk of positions at a time, the squared error of the chunk is reduced
into an fp32 scalar, and backward recomputes the chunk's projection instead of storing it. Peak
extra memory is a few chunks, whatever the batch size.

Regressors (which ones fuse is decided in `kernels/spec.py`): 1×1 convolution or linear
projection (one matmul per chunk, gradients written by hand), and the paper's k×k valid
convolution (conv2d per batch chunk, gradients by a local autograd call on the recomputed chunk).
Both with optional ReLU, no BatchNorm (its batch statistics span the whole batch) and no resize.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange

from fitdist.kernels.spec import HintSpec
from fitdist.losses import HINT_REDUCTIONS

# Elements of the projected map handled per chunk: 2^20 fp32 values = 4 MiB per temporary, a small
# fraction of the map at training shapes. Smaller chunks are no faster on an idle CPU, and on a
# busy one every extra op is another OpenMP barrier to wait at (2^18 ran 6× slower under load).
CHUNK_ELEMENTS = 1 << 20


def hint_scale(reduction: str, target: torch.Tensor) -> float:
    """The factor turning Σ(pred − target)² into `hint_loss(..., reduction)`."""
    if reduction == "mean":
        return 1.0 / target.numel()
    if reduction == "paper":
        return 0.5 / target.shape[0]
    raise ValueError(f"reduction must be one of {HINT_REDUCTIONS}, got {reduction!r}")


def compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the reference regressor would run in: autocast's, else type promotion.

    Autocast casts only fp32/fp16/bf16 operands: a float64 regressor on float64 feats runs in
    float64 under it too (and a float64/fp32 mix would fail in the reference).
    """
    promoted = torch.promote_types(x.dtype, w.dtype)
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and promoted != torch.float64:
        return torch.get_autocast_dtype(dev)
    return promoted


def as_maps(
    feats: torch.Tensor, hint: torch.Tensor, linear: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views `b c p` of feats and hint, so a pointwise regressor is `W @ x[b]` per sample.

    Conv maps flatten their positions (a view, no copy, for contiguous or channels-last maps).
    For a linear regressor every index but the last is a position: the features become one
    "sample" whose positions are those indices (a transposed view when they flatten as a view).
    """
    if not linear:
        return rearrange(feats, "b c h w -> b c (h w)"), rearrange(hint, "b c h w -> b c (h w)")
    return rearrange(feats, "... c -> 1 c (...)"), rearrange(hint, "... c -> 1 c (...)")


def chunks(batch: int, positions: int, rows: int) -> Iterator[tuple[slice, slice]]:
    """(batch, position) slices covering `batch × positions`, about `rows` positions each."""
    rows = max(1, rows)
    if positions <= rows:
        step = rows // positions
        for b0 in range(0, batch, step):
            yield slice(b0, min(b0 + step, batch)), slice(0, positions)
    else:
        for b in range(batch):
            for p0 in range(0, positions, rows):
                yield slice(b, b + 1), slice(p0, min(p0 + rows, positions))


def default_rows(out_channels: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, out_channels))


class PointwiseHint(torch.autograd.Function):
    """Σ(relu?(W x + b) − t)² · scale over `b c p` maps, one chunk of positions at a time."""

    @staticmethod
    def forward(ctx, x, weight, bias, hint, scale, relu, rows, dtype):
        w = weight.reshape(weight.shape[0], -1).to(dtype)  # (Ct, Cs); 1×1 conv weight is Ct×Cs×1×1
        bf = None if bias is None else bias.float()
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for bs, ps in chunks(x.shape[0], x.shape[2], rows):
            r = _residual(w, bf, x[bs, :, ps].to(dtype), hint[bs, :, ps], relu)[0]
            total += torch.dot(r.view(-1), r.view(-1))
        ctx.save_for_backward(x, weight, bias, hint)
        ctx.scale, ctx.relu, ctx.rows, ctx.dtype = scale, relu, rows, dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, hint = ctx.saved_tensors
        dtype = ctx.dtype
        w = weight.reshape(weight.shape[0], -1).to(dtype)
        bf = None if bias is None else bias.float()
        coef = grad_out.float() * (2.0 * ctx.scale)  # d(scale·Σr²)/dr = 2·scale·r
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=x.device)
        gb = torch.zeros(w.shape[0], dtype=torch.float32, device=x.device)
        for bs, ps in chunks(x.shape[0], x.shape[2], ctx.rows):
            xc = x[bs, :, ps].to(dtype)
            r, mask = _residual(w, bf, xc, hint[bs, :, ps], ctx.relu)
            dz = r.mul_(coef)
            if mask is not None:
                dz.mul_(mask)  # ReLU passes gradient only where its input was > 0 (as F.relu)
            gb += dz.sum(dim=(0, 2))
            dzc = dz.to(dtype)
            if gx is not None:
                gxc = gx[bs, :, ps]
                if gxc.is_contiguous() and gxc.dtype == dzc.dtype:  # in place: no temporary
                    torch.matmul(w.t(), dzc, out=gxc)
                else:
                    gxc.copy_(torch.matmul(w.t(), dzc))
            for i in range(xc.shape[0]):  # Σ over samples of dz·xᵀ, without copying the chunk
                if dzc.dtype == torch.float32:
                    gw.addmm_(dzc[i], xc[i].t())
                else:
                    gw += torch.matmul(dzc[i], xc[i].t()).float()
        grad_w = None
        if ctx.needs_input_grad[1]:  # in the weight's own layout (a channels_last 1×1 conv's, say):
            grad_w = torch.empty_like(weight).copy_(gw.view(weight.shape))  # DDP buckets expect it
        grad_b = gb.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return gx, grad_w, grad_b, None, None, None, None, None


def _residual(w, bias, xc, hc, relu):
    """relu?(W x + b) − t for one chunk, in fp32; also the ReLU mask when relu is on."""
    z = torch.matmul(w, xc).float()
    if bias is not None:
        z += bias[:, None]
    mask = None
    if relu:
        mask = z > 0
        z.clamp_(min=0)
    return z.sub_(hc.float()), mask


class ConvHint(torch.autograd.Function):
    """The same loss for a k×k valid-conv regressor, chunked over the batch.

    Backward recomputes each chunk's conv and differentiates it locally with autograd: the conv
    backward is PyTorch's own, only the chunking and the fp32 accumulation are ours.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, hint, scale, relu, rows, dtype):
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        per_sample = hint[0].numel() // hint.shape[1]
        step = max(1, rows // per_sample)
        for b0 in range(0, x.shape[0], step):
            r = _conv_residual(x[b0 : b0 + step], weight, bias, hint[b0 : b0 + step], relu, dtype)
            total += torch.dot(r.reshape(-1), r.reshape(-1))
        ctx.save_for_backward(x, weight, bias, hint)
        ctx.scale, ctx.relu, ctx.step, ctx.dtype = scale, relu, step, dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, hint = ctx.saved_tensors
        coef = grad_out.float() * ctx.scale
        w = weight.detach().requires_grad_()
        b = None if bias is None else bias.detach().requires_grad_()
        params = [w] if b is None else [w, b]
        gx = torch.empty_like(x)
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for b0 in range(0, x.shape[0], ctx.step):
            with torch.enable_grad():
                xc = x[b0 : b0 + ctx.step].detach().requires_grad_()
                r = _conv_residual(xc, w, b, hint[b0 : b0 + ctx.step], ctx.relu, ctx.dtype)
                loss = torch.dot(r.reshape(-1), r.reshape(-1)) * coef
                grads = torch.autograd.grad(loss, [xc, *params])
            gx[b0 : b0 + ctx.step] = grads[0]
            for a, g in zip(acc, grads[1:]):
                a += g.float()
        grad_w = acc[0].to(weight.dtype)
        grad_b = acc[1].to(bias.dtype) if bias is not None else None
        return gx, grad_w, grad_b, None, None, None, None, None


def _conv_residual(xc, weight, bias, hc, relu, dtype):
    z = F.conv2d(xc.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    z = z.float()
    if relu:
        z = F.relu(z)
    return z - hc.detach().float()


def chunked_hint_loss(
    feats: torch.Tensor,
    spec: HintSpec,
    hint: torch.Tensor,
    reduction: str,
    rows: int | None = None,
) -> torch.Tensor:
    """The fused hint loss in chunked PyTorch; shapes must already be checked."""
    scale = hint_scale(reduction, hint)
    dtype = compute_dtype(feats, spec.weight)
    rows = rows or default_rows(spec.weight.shape[0])
    hint = hint.detach()
    with torch.autocast(feats.device.type, enabled=False):  # dtypes are chosen explicitly above
        if spec.kind == "conv":
            return ConvHint.apply(
                feats, spec.weight, spec.bias, hint, scale, spec.relu, rows, dtype
            )
        x3, h3 = as_maps(feats, hint, spec.weight.dim() == 2)
        return PointwiseHint.apply(x3, spec.weight, spec.bias, h3, scale, spec.relu, rows, dtype)
