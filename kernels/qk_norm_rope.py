"""Per-head q/k normalisation followed by RoPE, fused: (batch, seq, heads, head_dim) -> (batch, heads, seq, head_dim).

One program normalises and rotates every head of a few (batch, position) rows, reading x once and writing the
result once in the (batch, seq, heads, head_dim) layout the projection produced; the caller gets the
(batch, heads, seq, head_dim) transposed view, which SDPA accepts. Backward reads x and dy once, undoes the
rotation, and recomputes the norm statistics from x instead of saving normalised values or per-row stats.
The weight gradient is summed per program into a (programs, heads, head_dim) fp32 buffer: no atomics.

Elements are handled as pairs (first, second) of head_dim: (j, j + ceil(dim/2)) or (2j, 2j + 1) when
interleaved, so the RoPE partner of every element is in registers; without RoPE the same split covers odd dims.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from .custom_op import KernelOp, no_gradient
from .dispatch import use_triton
from .grid import cdiv, next_power_of_2
from .layer_norm import reference_layer_norm
from .rms_norm import backward_programs, reference_rms_norm
from .rope import (
    apply_rope,
    broadcast_cos_sin,
    check_even_head_dim,
    load_pairs,
    pair_masks,
    reference_rope,
    rotate_pairs,
    store_pairs,
)

NormKind = Literal["rms", "layer"] | None


def reference_qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    norm: NormKind = "rms",
    interleaved: bool = False,
) -> torch.Tensor:
    """x (batch, seq, heads, head_dim), weight (head_dim,) or (heads, head_dim) or None,
    cos/sin (batch or 1, seq, head_dim) or None -> (batch, heads, seq, head_dim) in x's dtype."""
    if norm is not None:
        w = weight if weight is not None else torch.ones(x.shape[-1], device=x.device, dtype=torch.float32)
        x = reference_rms_norm(x, w, eps) if norm == "rms" else reference_layer_norm(x, w, eps)
    x = x.transpose(1, 2)
    if cos is not None:
        x = reference_rope(x, cos, sin, interleaved)
    return x


@triton.jit
def _normalise(x1, x2, D, HALF, eps, IS_RMS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """fp32 (x - mean) * rstd on both pair members (mean = 0 for RMSNorm), and rstd per head."""
    if IS_RMS:
        xc1 = x1
        xc2 = x2
    else:
        mask_1, mask_2 = pair_masks(D, HALF, BLOCK_HALF)
        mean = (tl.sum(x1, axis=1) + tl.sum(x2, axis=1)) / D
        # Padding lanes must stay 0 for the variance and the backward's sums.
        xc1 = tl.where(mask_1[None, :], x1 - mean[:, None], 0.0)
        xc2 = tl.where(mask_2[None, :], x2 - mean[:, None], 0.0)
    rstd = tl.rsqrt((tl.sum(xc1 * xc1, axis=1) + tl.sum(xc2 * xc2, axis=1)) / D + eps)
    return xc1 * rstd[:, None], xc2 * rstd[:, None], rstd


@triton.jit
def _token_head_rows(tok0, pid_h, T, S, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """A tile's rows are (token, head) pairs, BLOCK_T tokens from tok0 times BLOCK_H heads: (batch, position,
    head) index vectors (BLOCK_T * BLOCK_H,) and which rows are real. Tokens past T are clamped to the last
    one so that every address stays in bounds; the mask keeps them from being stored or summed."""
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    heads = pid_h * BLOCK_H + r % BLOCK_H
    tok = tok0 + r // BLOCK_H
    live = (heads < H) & (tok < T)
    tok = tl.minimum(tok, T - 1)
    return (tok // S).to(tl.int64), (tok % S).to(tl.int64), heads, live


@triton.jit
def _qk_norm_rope_fwd_kernel(
    X, W, COS, SIN, Y,
    stride_xb, stride_xs, stride_xh, stride_wh, stride_cb, stride_cs,
    T, S, H, D, HALF, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_T * BLOCK_H
    b, s, heads, live = _token_head_rows(tl.program_id(0) * BLOCK_T, tl.program_id(1), T, S, H, BLOCK_T, BLOCK_H)

    x_rows = b * stride_xb + s * stride_xs + heads * stride_xh
    x1, x2 = load_pairs(X, x_rows, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
    n1, n2, rstd = _normalise(x1, x2, D, HALF, eps, IS_RMS, BLOCK_HALF)
    if HAS_WEIGHT:
        w1, w2 = load_pairs(W, heads * stride_wh, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
        n1 = n1 * w1
        n2 = n2 * w2
    if HAS_ROPE:
        cs = b * stride_cb + s * stride_cs
        c1, c2 = load_pairs(COS, cs, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
        s1, s2 = load_pairs(SIN, cs, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
        n1, n2 = rotate_pairs(n1, n2, c1, c2, s1, s2, False)
    # Y is a fresh contiguous (batch, seq, heads, dim) tensor.
    store_pairs(Y, ((b * S + s) * H + heads) * D, live, n1, n2, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    X, W, COS, SIN, DY, DX, DW_PARTIAL,
    stride_xb, stride_xs, stride_xh, stride_wh, stride_cb, stride_cs, stride_dyb, stride_dyh, stride_dys,
    T, S, H, D, HALF, eps, toks_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_T * BLOCK_H
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    heads = pid_h * BLOCK_H + tl.arange(0, ROWS) % BLOCK_H
    if HAS_WEIGHT:
        w1, w2 = load_pairs(W, heads * stride_wh, heads < H, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
    # Weight gradients accumulate per row of the tile and are summed over its tokens once, after the loop.
    dw1 = tl.zeros((ROWS, BLOCK_HALF), dtype=tl.float32)
    dw2 = tl.zeros((ROWS, BLOCK_HALF), dtype=tl.float32)
    first_tok = pid * toks_per_program
    for tok0 in range(first_tok, first_tok + toks_per_program, BLOCK_T):
        b, s, heads, live = _token_head_rows(tok0, pid_h, T, S, H, BLOCK_T, BLOCK_H)
        dy_rows = b * stride_dyb + s * stride_dys + heads * stride_dyh
        dn1, dn2 = load_pairs(DY, dy_rows, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
        if HAS_ROPE:
            cs = b * stride_cb + s * stride_cs
            c1, c2 = load_pairs(COS, cs, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
            s1, s2 = load_pairs(SIN, cs, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
            dn1, dn2 = rotate_pairs(dn1, dn2, c1, c2, s1, s2, True)

        x_rows = b * stride_xb + s * stride_xs + heads * stride_xh
        x1, x2 = load_pairs(X, x_rows, live, D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
        xh1, xh2, rstd = _normalise(x1, x2, D, HALF, eps, IS_RMS, BLOCK_HALF)
        if HAS_WEIGHT:
            dw1 += dn1 * xh1
            dw2 += dn2 * xh2
            dn1 = dn1 * w1
            dn2 = dn2 * w2
        # d/dx of (x - mean) * rstd: rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat));
        # RMSNorm has no mean term.
        c_proj = (tl.sum(dn1 * xh1, axis=1) + tl.sum(dn2 * xh2, axis=1)) / D
        dx1 = dn1 - xh1 * c_proj[:, None]
        dx2 = dn2 - xh2 * c_proj[:, None]
        if not IS_RMS:
            c_mean = (tl.sum(dn1, axis=1) + tl.sum(dn2, axis=1)) / D
            dx1 -= c_mean[:, None]
            dx2 -= c_mean[:, None]
        dx_rows = ((b * S + s) * H + heads) * D
        store_pairs(DX, dx_rows, live, dx1 * rstd[:, None], dx2 * rstd[:, None], D, HALF, INTERLEAVED, ROWS, BLOCK_HALF)
    if HAS_WEIGHT:
        dw1 = tl.sum(tl.reshape(dw1, (BLOCK_T, BLOCK_H, BLOCK_HALF)), axis=0)
        dw2 = tl.sum(tl.reshape(dw2, (BLOCK_T, BLOCK_H, BLOCK_HALF)), axis=0)
        head_block = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        dw_rows = (pid * H + head_block) * D
        store_pairs(DW_PARTIAL, dw_rows, head_block < H, dw1, dw2, D, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)


def _tile(heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HALF, num_warps): all heads of a few tokens per tile, about 2K pairs in all;
    several tokens per tile keep a few kv heads from leaving most lanes idle."""
    block_half = next_power_of_2((head_dim + 1) // 2)
    block_h = min(next_power_of_2(heads), max(1, 2048 // block_half))
    block_t = max(1, 2048 // (block_h * block_half))
    num_warps = min(8, max(1, block_t * block_h * block_half // 256))
    return block_t, block_h, block_half, num_warps


def _qk_norm_rope_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    interleaved: bool,
) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, seq, heads, dim = x.shape
    has_rope = cos is not None
    if has_rope:
        cos, sin = broadcast_cos_sin(cos, sin, batch)
    w = weight.contiguous() if weight is not None else None
    y = torch.empty((batch, seq, heads, dim), dtype=x.dtype, device=x.device)
    block_t, block_h, block_half, num_warps = _tile(heads, dim)
    _qk_norm_rope_fwd_kernel[(cdiv(batch * seq, block_t), cdiv(heads, block_h))](
        x, w if w is not None else x, cos if has_rope else x, sin if has_rope else x, y,
        x.stride(0), x.stride(1), x.stride(2),
        # A (head_dim,) weight is shared by all heads: head stride 0.
        w.stride(0) if w is not None and w.dim() == 2 else 0,
        cos.stride(0) if has_rope else 0, cos.stride(1) if has_rope else 0,
        batch * seq, seq, heads, dim, (dim + 1) // 2, eps,
        IS_RMS=is_rms, HAS_WEIGHT=w is not None, HAS_ROPE=has_rope, INTERLEAVED=interleaved and has_rope,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    return y.transpose(1, 2)


def _qk_norm_rope_forward_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    interleaved: bool,
) -> torch.Tensor:
    return x.new_empty(x.shape).transpose(1, 2)


def _qk_norm_rope_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    interleaved: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (batch, heads, seq, head_dim) -> dx (batch, seq, heads, head_dim), dweight like weight (empty unless
    weight_grad)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    batch, seq, heads, dim = x.shape
    has_rope = cos is not None
    if has_rope:
        cos, sin = broadcast_cos_sin(cos, sin, batch)
    w = weight.contiguous() if weight is not None else None
    dx = torch.empty((batch, seq, heads, dim), dtype=x.dtype, device=x.device)
    block_t, block_h, block_half, num_warps = _tile(heads, dim)
    tokens = batch * seq
    programs, toks_per_program = backward_programs(x.device, tokens, block_t)
    dw_partial = torch.empty((programs, heads, dim), dtype=torch.float32, device=x.device) if w is not None else None
    _qk_norm_rope_bwd_kernel[(programs, cdiv(heads, block_h))](
        x, w if w is not None else x, cos if has_rope else x, sin if has_rope else x, dy, dx,
        dw_partial if w is not None else dx,
        x.stride(0), x.stride(1), x.stride(2),
        w.stride(0) if w is not None and w.dim() == 2 else 0,
        cos.stride(0) if has_rope else 0, cos.stride(1) if has_rope else 0,
        dy.stride(0), dy.stride(1), dy.stride(2),
        tokens, seq, heads, dim, (dim + 1) // 2, eps, toks_per_program,
        IS_RMS=is_rms, HAS_WEIGHT=w is not None, HAS_ROPE=has_rope, INTERLEAVED=interleaved and has_rope,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    if w is None or not weight_grad:
        return dx, no_gradient(x)
    dw = dw_partial.sum(0)
    return dx, (dw if w.dim() == 2 else dw.sum(0)).to(w.dtype)


def _qk_norm_rope_backward_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    interleaved: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dw = weight.new_empty(weight.shape) if weight is not None and weight_grad else no_gradient(x)
    return x.new_empty(x.shape), dw


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps, is_rms, interleaved = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps, ctx.is_rms, ctx.interleaved = eps, is_rms, interleaved


def _gradients(ctx, backward, dy):
    x, weight, cos, sin = ctx.saved_tensors
    weight_grad = weight is not None and ctx.needs_input_grad[1]
    dx, dw = backward(dy, x, weight, cos, sin, ctx.eps, ctx.is_rms, ctx.interleaved, weight_grad)
    return dx, dw if weight_grad else None, None, None, None, None, None


_qk_norm_rope = KernelOp("qk_norm_rope", _qk_norm_rope_forward, _qk_norm_rope_forward_fake, _setup_context,
                         _gradients, _qk_norm_rope_backward, _qk_norm_rope_backward_fake)


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    norm: NormKind = "rms",
    interleaved: bool = False,
) -> torch.Tensor:
    """rope(norm(x).transpose(1, 2), cos, sin), fused.

    x (batch, seq, heads, head_dim) as ``proj(h).view(...)`` gives it; weight (head_dim,), (heads, head_dim) or
    None (no affine); cos/sin (batch or 1, seq, head_dim), or None for no RoPE; norm "rms" (transformers'
    RMSNorm), "layer" (Cohere's bias-free LayerNorm) or None. Returns (batch, heads, seq, head_dim), a
    transposed view of a contiguous (batch, seq, heads, head_dim) tensor. cos and sin receive no gradient.
    """
    if norm not in ("rms", "layer", None):
        raise ValueError(f"norm must be 'rms', 'layer' or None, got {norm!r}")
    if cos is not None:
        check_even_head_dim(x.shape[-1])
    if weight is not None and tuple(weight.shape) not in ((x.shape[-1],), tuple(x.shape[-2:])):
        raise ValueError(
            f"weight {tuple(weight.shape)} must be (head_dim,) or (heads, head_dim) for x {tuple(x.shape)}"
        )
    if norm is None:
        x = x.transpose(1, 2)
        return apply_rope(x, cos, sin, interleaved) if cos is not None else x
    if use_triton(x, weight, cos, sin):
        return _qk_norm_rope(x, weight, cos, sin, eps, norm == "rms", interleaved)
    return reference_qk_norm_rope(x, weight, cos, sin, eps, norm, interleaved)
