"""RMSNorm as transformers' Llama-style models compute it: statistics in fp32, weight applied in fp32.

Forward stores one fp32 rstd per row; backward recomputes x_hat from x and that rstd. dweight is summed per
program into a (programs, hidden) fp32 buffer and reduced afterwards, so no two programs touch the same address.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .custom_op import KernelOp, no_gradient
from .dispatch import use_triton
from .grid import cdiv, next_power_of_2


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., hidden) -> (..., hidden), in x's dtype."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(input_dtype)


def row_tile(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for row-wise kernels: about 4K elements per tile keeps registers in check."""
    block_d = next_power_of_2(hidden)
    block_m = max(1, min(32, 4096 // block_d))
    num_warps = min(8, max(1, block_m * block_d // 512))
    return block_m, block_d, num_warps


def backward_programs(device: torch.device, rows: int, block_m: int) -> tuple[int, int]:
    """(programs, rows_per_program) for a backward that accumulates a weight gradient per program.

    A few programs per SM: enough to fill the GPU, few enough that the (programs, hidden) partial-sum buffer
    and its final reduction stay small. On the CPU interpreter, fewer programs just means fewer Python loops.
    """
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    tiles = cdiv(rows, block_m)
    programs = max(1, min(tiles, target))
    rows_per_program = cdiv(tiles, programs) * block_m
    return cdiv(rows, rows_per_program), rows_per_program


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, SUM, W, Y, RSTD,
    stride_x, stride_r, stride_sum, stride_y, M, D, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_m = rows < M
    mask = mask_m[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype before the norm sees it, as `residual + h` is in transformers.
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + rows64[:, None] * stride_sum + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=mask_m)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DY, DSUM, DX, RSTD, DW_PARTIAL,
    stride_x, stride_dy, stride_dsum, stride_dx, M, D, rows_per_program,
    HAS_DSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_d[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
        x_hat = x * rstd[:, None]
        dx_hat = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))
        c = tl.sum(dx_hat * x_hat, axis=1) / D
        dx = (dx_hat - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DSUM:
            # rms_norm_add: the residual sum is also an output, its gradient adds straight through.
            dx += tl.load(DSUM + rows64[:, None] * stride_dsum + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask_d)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., hidden) -> (rows, hidden) with unit column stride, copying only when a view cannot do it."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rms_norm_forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (..., hidden) -> normed (..., hidden), the sum x + residual (..., hidden) (empty without a
    residual), rstd (rows,) fp32."""
    x2, w = _rows(x), weight.contiguous()
    m, d = x2.shape
    y = torch.empty((m, d), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    r = _rows(residual) if residual is not None else x2
    total = torch.empty_like(y) if residual is not None else x2
    block_m, block_d, num_warps = row_tile(d)
    _rms_norm_fwd_kernel[(cdiv(m, block_m),)](
        x2, r, total, w, y, rstd, x2.stride(0), r.stride(0), total.stride(0), y.stride(0), m, d, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    total = total.view(x.shape) if residual is not None else no_gradient(x)
    return y.view(x.shape), total, rstd


def _rms_norm_forward_fake(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total = x.new_empty(x.shape) if residual is not None else no_gradient(x)
    return x.new_empty(x.shape), total, x.new_empty(math.prod(x.shape[:-1]), dtype=torch.float32)


def _rms_norm_backward(
    dy: torch.Tensor, dsum: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (and dsum, the sum's gradient, with a residual) (..., hidden) -> dx (..., hidden) in x's dtype (dsum
    included), dweight (hidden,) in weight's dtype (empty unless weight_grad). x: the normalised input."""
    x2, w, dy2 = _rows(x), weight.contiguous(), _rows(dy)
    dsum2 = _rows(dsum) if dsum is not None else dy2
    m, d = x2.shape
    dx = torch.empty((m, d), dtype=x2.dtype, device=x2.device)
    block_m, block_d, num_warps = row_tile(d)
    programs, rows_per_program = backward_programs(x2.device, m, block_m)
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(programs,)](
        x2, w, dy2, dsum2, dx, rstd, dw_partial,
        x2.stride(0), dy2.stride(0), dsum2.stride(0), dx.stride(0), m, d, rows_per_program,
        HAS_DSUM=dsum is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if weight_grad else no_gradient(weight)
    return dx.view(x.shape), dw


def _rms_norm_backward_fake(
    dy: torch.Tensor, dsum: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape) if weight_grad else no_gradient(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _ = inputs
    _, total, rstd = output
    ctx.has_residual = residual is not None
    # The backward reads what was normalised: the sum when there is a residual.
    ctx.save_for_backward(total if ctx.has_residual else x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    if not ctx.has_residual:
        ctx.mark_non_differentiable(total)


def _gradients(ctx, backward, dy, dsum, _):
    normalised, weight, rstd = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[2]
    dx, dw = backward(dy, dsum if ctx.has_residual else None, normalised, weight, rstd, weight_grad)
    # With a residual, x and residual enter only through their sum: one gradient for both.
    return dx, dx if ctx.has_residual else None, dw if weight_grad else None, None


_rms_norm = KernelOp("rms_norm", _rms_norm_forward, _rms_norm_forward_fake, _setup_context, _gradients,
                     _rms_norm_backward, _rms_norm_backward_fake)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., hidden), weight (hidden,) (fp32 or x's dtype) -> (..., hidden) in x's dtype."""
    if use_triton(x, weight):
        return _rms_norm(x, None, weight, eps)[0]
    return reference_rms_norm(x, weight, eps)


def reference_rms_norm_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., hidden) -> (rms_norm(x + residual), x + residual), the sum in x's dtype."""
    total = residual + x
    return reference_rms_norm(total, weight, eps), total


def rms_norm_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., hidden) of one shape and dtype, weight (hidden,) -> (normed, x + residual).

    The residual-add-then-norm of a decoder layer in one pass: the sum is written once and normalised from registers.
    """
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"rms_norm_add needs x and residual of one shape and dtype, got {x.shape}/{x.dtype} "
                         f"and {residual.shape}/{residual.dtype}")
    if use_triton(x, residual, weight):
        normed, total, _ = _rms_norm(x, residual, weight, eps)
        return normed, total
    return reference_rms_norm_add(x, residual, weight, eps)
