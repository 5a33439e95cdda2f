"""LayerNorm without bias, as Cohere computes it (fp32 statistics); weight may be per head.

x is seen as (tokens, heads, dim) with heads = 1 for a (dim,) weight. Programs own one head and a block of
tokens, so a per-head weight is one row per program and its gradient accumulates per program in
a (programs, heads, dim) fp32 buffer, reduced afterwards: no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .custom_op import KernelOp, no_gradient
from .dispatch import use_triton
from .grid import cdiv
from .rms_norm import backward_programs, row_tile


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., [heads,] dim), weight ([heads,] dim) -> same shape as x, in x's dtype."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)
    x32 = (x32 - mean) * torch.rsqrt(var + eps)
    return (weight.to(torch.float32) * x32).to(input_dtype)


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, Y, MEAN, RSTD,
    stride_xt, stride_xh, stride_yt, stride_yh, T, H, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_m = toks < T
    mask_d = cols < D
    mask = mask_m[:, None] & mask_d[None, :]
    toks64 = toks.to(tl.int64)
    x = tl.load(X + toks64[:, None] * stride_xt + head * stride_xh + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(W + head * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    tl.store(Y + toks64[:, None] * stride_yt + head * stride_yh + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    stat = toks64 * H + head
    tl.store(MEAN + stat, mean, mask=mask_m)
    tl.store(RSTD + stat, rstd, mask=mask_m)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PARTIAL,
    stride_xt, stride_xh, stride_dyt, stride_dyh, stride_dxt, stride_dxh, T, H, D, toks_per_program,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + head * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid * toks_per_program
    for start in range(first, first + toks_per_program, BLOCK_M):
        toks = start + tl.arange(0, BLOCK_M)
        mask_m = toks < T
        mask = mask_m[:, None] & mask_d[None, :]
        toks64 = toks.to(tl.int64)
        x = tl.load(X + toks64[:, None] * stride_xt + head * stride_xh + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + toks64[:, None] * stride_dyt + head * stride_dyh + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        stat = toks64 * H + head
        mean = tl.load(MEAN + stat, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + stat, mask=mask_m, other=0.0)
        x_hat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        dx_hat = dy * w[None, :]
        # d/dx of (x - mean) * rstd: rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))
        c1 = tl.sum(dx_hat, axis=1) / D
        c2 = tl.sum(dx_hat * x_hat, axis=1) / D
        dx = (dx_hat - c1[:, None] - x_hat * c2[:, None]) * rstd[:, None]
        tl.store(
            DX + toks64[:, None] * stride_dxt + head * stride_dxh + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + (pid * H + head) * D + cols, dw, mask=mask_d)


def _tokens_heads_dim(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., [heads,] dim) -> (tokens, heads, dim) with unit dim stride, copying only when a view cannot do it."""
    t3 = t.reshape(-1, heads, t.shape[-1])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def _layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., [heads,] dim) -> y like x, mean and rstd (tokens * heads,) fp32."""
    heads = weight.shape[0] if weight.dim() == 2 else 1
    x3 = _tokens_heads_dim(x, heads)
    w = weight.contiguous()
    t, h, d = x3.shape
    y = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    mean = torch.empty(t * h, dtype=torch.float32, device=x.device)
    rstd = torch.empty(t * h, dtype=torch.float32, device=x.device)
    block_m, block_d, num_warps = row_tile(d)
    _layer_norm_fwd_kernel[(cdiv(t, block_m), h)](
        x3, w, y, mean, rstd, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1), t, h, d, eps,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y.view(x.shape), mean, rstd


def _layer_norm_forward_fake(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = math.prod(x.shape[:-1])
    return x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def _layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy like x -> dx like x, dweight like weight (empty unless weight_grad)."""
    heads = weight.shape[0] if weight.dim() == 2 else 1
    x3, dy3 = _tokens_heads_dim(x, heads), _tokens_heads_dim(dy, heads)
    w = weight.contiguous()
    t, h, d = x3.shape
    dx = torch.empty((t, h, d), dtype=x3.dtype, device=x3.device)
    block_m, block_d, num_warps = row_tile(d)
    programs, toks_per_program = backward_programs(x3.device, t, block_m)
    dw_partial = torch.empty((programs, h, d), dtype=torch.float32, device=x3.device)
    _layer_norm_bwd_kernel[(programs, h)](
        x3, w, dy3, dx, mean, rstd, dw_partial,
        x3.stride(0), x3.stride(1), dy3.stride(0), dy3.stride(1), dx.stride(0), dx.stride(1),
        t, h, d, toks_per_program,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    dw = dw_partial.sum(0).view(weight.shape).to(weight.dtype) if weight_grad else no_gradient(weight)
    return dx.view(x.shape), dw


def _layer_norm_backward_fake(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape) if weight_grad else no_gradient(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _gradients(ctx, backward, dy, _mean, _rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx, dw = backward(dy, x, weight, mean, rstd, weight_grad)
    return dx, dw if weight_grad else None, None


_layer_norm = KernelOp("layer_norm", _layer_norm_forward, _layer_norm_forward_fake, _setup_context, _gradients,
                       _layer_norm_backward, _layer_norm_backward_fake)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim) with weight (dim,), or x (..., heads, dim) with weight (heads, dim) -> like x, in x's dtype."""
    if weight.dim() == 2 and (x.dim() < 2 or tuple(x.shape[-2:]) != tuple(weight.shape)):
        raise ValueError(f"a (heads, dim) weight {tuple(weight.shape)} needs x (..., heads, dim), got {tuple(x.shape)}")
    if use_triton(x, weight):
        return _layer_norm(x, weight, eps)[0]
    return reference_layer_norm(x, weight, eps)
