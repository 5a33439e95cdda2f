"""Rotary position embedding on (batch, heads, seq, head_dim), half-rotation (Llama) or interleaved pairs (Cohere).

Each element pairs with one partner: (j, j + dim/2) for half rotation, (2j, 2j + 1) for interleaved (loaded as
contiguous rows and de-interleaved in registers). Both members of every pair are in registers, so one program
rotates a whole (batch, position) row of heads. The pair helpers here are shared with qk_norm_rope.
Backward is the transposed rotation, the same kernel with BACKWARD set; it needs only cos and sin, not x.

``apply_rope_swapping_heads`` is RoPE on heads that come as (a, b) pairs, written in (b, a) order: JetMoe's queries,
(slot, kv head) from its attention experts, read by grouped-query attention as (kv head, slot). The rotation and the
regrouping then make one pass over the queries instead of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .custom_op import KernelOp
from .dispatch import use_triton
from .grid import cdiv, next_power_of_2


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        # Cohere pairs neighbours (0,1), (2,3), ...; its cos/sin arrive repeat-interleaved to match.
        return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (batch, heads, seq, head_dim), cos/sin (batch or 1, seq, head_dim) -> like x, in x's dtype.

    Computed in fp32 and cast back, as Cohere's apply_rotary_pos_emb does.
    """
    x32 = x.float()
    cos = cos.unsqueeze(1).float()
    sin = sin.unsqueeze(1).float()
    return (x32 * cos + _rotate(x32, interleaved) * sin).to(x.dtype)


@triton.jit
def pair_masks(D, HALF, BLOCK_HALF: tl.constexpr):
    """(BLOCK_HALF,) masks of the valid first and second pair members: pairs (j, j + HALF), or (2j, 2j + 1)
    where D is even; HALF = ceil(D / 2), so the half split also covers an odd D (norm without RoPE).

    HALF comes from the host rather than being computed here: as a kernel argument Triton specialises it
    when it is a multiple of 16, which lets the second half's loads be vectorised."""
    j = tl.arange(0, BLOCK_HALF)
    return j < HALF, (j < HALF) & (j + HALF < D)


@triton.jit
def load_pairs(
    base, rows, row_mask, D, HALF, INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """First and second members of each rotation pair, (ROWS, BLOCK_HALF) fp32 each, of rows at element offsets
    rows (ROWS,) from base. Masked-off elements read as 0."""
    if INTERLEAVED:
        # One contiguous load, de-interleaved in registers: stride-2 loads use half of every memory transaction.
        cols = tl.arange(0, 2 * BLOCK_HALF)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(base + rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (ROWS, BLOCK_HALF, 2)))
    else:
        j = tl.arange(0, BLOCK_HALF)
        mask_1, mask_2 = pair_masks(D, HALF, BLOCK_HALF)
        ptrs = base + rows[:, None] + j[None, :]
        x1 = tl.load(ptrs, mask=row_mask[:, None] & mask_1[None, :], other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=row_mask[:, None] & mask_2[None, :], other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def store_pairs(
    base, rows, row_mask, y1, y2, D, HALF,
    INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Inverse of load_pairs: writes (ROWS, BLOCK_HALF) pair members, cast to base's element type."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)
        y = tl.reshape(tl.join(y1, y2), (ROWS, 2 * BLOCK_HALF))
        mask = row_mask[:, None] & (cols < D)[None, :]
        tl.store(base + rows[:, None] + cols[None, :], y.to(base.dtype.element_ty), mask=mask)
    else:
        j = tl.arange(0, BLOCK_HALF)
        mask_1, mask_2 = pair_masks(D, HALF, BLOCK_HALF)
        ptrs = base + rows[:, None] + j[None, :]
        tl.store(ptrs, y1.to(base.dtype.element_ty), mask=row_mask[:, None] & mask_1[None, :])
        tl.store(ptrs + HALF, y2.to(base.dtype.element_ty), mask=row_mask[:, None] & mask_2[None, :])


@triton.jit
def load_cos_sin(COS, SIN, offset, D, HALF, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin of one position as (1, BLOCK_HALF) pair members, ready to broadcast over heads."""
    rows = tl.zeros((1,), dtype=tl.int64) + offset
    live = tl.full((1,), 1, tl.int1)
    c1, c2 = load_pairs(COS, rows, live, D, HALF, INTERLEAVED, 1, BLOCK_HALF)
    s1, s2 = load_pairs(SIN, rows, live, D, HALF, INTERLEAVED, 1, BLOCK_HALF)
    return c1, c2, s1, s2


@triton.jit
def rotate_pairs(x1, x2, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    """y = x * cos + rotate(x) * sin on pairs; BACKWARD applies the transpose (exact for any cos/sin)."""
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    return y1, y2


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    stride_xb, stride_xh, stride_xs, stride_yb, stride_yh, stride_ys, stride_cb, stride_cs,
    S, H, D, HALF,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    live = heads < H
    c1, c2, s1, s2 = load_cos_sin(COS, SIN, b * stride_cb + s * stride_cs, D, HALF, INTERLEAVED, BLOCK_HALF)
    x_rows = b * stride_xb + s * stride_xs + heads * stride_xh
    x1, x2 = load_pairs(X, x_rows, live, D, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)
    y1, y2 = rotate_pairs(x1, x2, c1, c2, s1, s2, BACKWARD)
    y_rows = b * stride_yb + s * stride_ys + heads * stride_yh
    store_pairs(Y, y_rows, live, y1, y2, D, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF)


def rope_tile(heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): all heads of one position per program, capped near 2K pairs."""
    block_half = next_power_of_2(head_dim // 2)
    block_h = min(next_power_of_2(heads), max(1, 2048 // block_half))
    num_warps = min(8, max(1, block_h * block_half // 256))
    return block_h, block_half, num_warps


def broadcast_cos_sin(cos: torch.Tensor, sin: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch or 1, seq, dim) or (seq, dim) -> (batch, seq, dim) views with unit last stride (stride 0 on a
    broadcast batch)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)


def _launch_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, backward: bool
) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, seq, dim = x.shape
    # empty_like keeps a transposed (batch, seq, heads, dim) layout, so the output matches what SDPA is given.
    y = torch.empty_like(x)
    block_h, block_half, num_warps = rope_tile(heads, dim)
    _rope_kernel[(batch * seq, cdiv(heads, block_h))](
        x, cos, sin, y,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), cos.stride(0), cos.stride(1),
        seq, heads, dim, dim // 2,
        INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    return y


def _rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    cos, sin = broadcast_cos_sin(cos, sin, x.shape[0])
    return _launch_rope(x, cos, sin, interleaved, backward=False)


def _rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    cos, sin = broadcast_cos_sin(cos, sin, dy.shape[0])
    return _launch_rope(dy, cos, sin, interleaved, backward=True)


def _rope_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # As _launch_rope allocates: in x's layout (its unit-stride copy when the last dim is strided).
    return torch.empty_like(x if x.stride(-1) == 1 else x.contiguous())


def _setup_context(ctx, inputs, output):
    _, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


def _gradients(ctx, backward, dy):
    cos, sin = ctx.saved_tensors
    # cos and sin come from position ids, not parameters: no gradient flows to them.
    return backward(dy, cos, sin, ctx.interleaved), None, None, None


_rope = KernelOp("rope", _rope_forward, _rope_fake, _setup_context, _gradients, _rope_backward, _rope_fake)


def check_even_head_dim(head_dim: int) -> None:
    """RoPE rotates pairs of a head's elements: an odd head_dim has one left over."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")


def reference_rope_swapping_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                  interleaved: bool) -> torch.Tensor:
    """x (batch, seq, a, b, head_dim), cos/sin (batch or 1, seq, head_dim) -> RoPE'd (batch, seq, b, a, head_dim)
    contiguous, in x's dtype."""
    batch, seq, a, b, dim = x.shape
    heads = x.reshape(batch, seq, a * b, dim).transpose(1, 2)
    rotated = reference_rope(heads, cos, sin, interleaved).transpose(1, 2).reshape(batch, seq, a, b, dim)
    return rotated.transpose(2, 3).contiguous()


def _launch_rope_swapping_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                                backward: bool) -> torch.Tensor:
    """x (batch, seq, a, b, dim) -> (batch, seq, b, a, dim) contiguous: the rope kernel over tokens (its batch axis),
    a (its sequence axis: every a of a token has the token's angle) and b (its heads)."""
    batch, seq, a, b, dim = x.shape
    if x.stride(-1) != 1 or x.stride(0) != seq * x.stride(1):  # tokens one stride apart
        x = x.contiguous()
    cos, sin = broadcast_cos_sin(cos, sin, batch)
    if batch > 1 and cos.stride(0) != seq * cos.stride(1):
        cos, sin = cos.contiguous(), sin.contiguous()
    y = x.new_empty(batch, seq, b, a, dim)
    block_h, block_half, num_warps = rope_tile(b, dim)
    _rope_kernel[(batch * seq * a, cdiv(b, block_h))](
        x, cos, sin, y,
        x.stride(1), x.stride(3), x.stride(2), y.stride(1), y.stride(2), y.stride(3), cos.stride(1), 0,
        a, b, dim, dim // 2,
        INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    return y


def _rope_swapping_heads_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                 interleaved: bool) -> torch.Tensor:
    return _launch_rope_swapping_heads(x, cos, sin, interleaved, backward=False)


def _rope_swapping_heads_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                  interleaved: bool) -> torch.Tensor:
    # dy is laid out (batch, seq, b, a, dim): the same swap takes it back to x's (a, b) order.
    return _launch_rope_swapping_heads(dy, cos, sin, interleaved, backward=True)


def _swapped_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    batch, seq, a, b, dim = x.shape
    return x.new_empty(batch, seq, b, a, dim)


_rope_swapping_heads = KernelOp("rope_swapping_heads", _rope_swapping_heads_forward, _swapped_fake, _setup_context,
                                _gradients, _rope_swapping_heads_backward, _swapped_fake)


def apply_rope_swapping_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              interleaved: bool = False) -> torch.Tensor:
    """x (batch, seq, a, b, head_dim): heads as (a, b) pairs, cos/sin (batch or 1, seq, head_dim)
    -> RoPE'd (batch, seq, b, a, head_dim) contiguous. head_dim must be even; cos and sin receive no gradient."""
    check_even_head_dim(x.shape[-1])
    if use_triton(x, cos, sin):
        return _rope_swapping_heads(x, cos, sin, interleaved)
    return reference_rope_swapping_heads(x, cos, sin, interleaved)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x (batch, heads, seq, head_dim) (any strides), cos/sin (batch or 1, seq, head_dim)
    -> (batch, heads, seq, head_dim), in x's layout.

    head_dim must be even. cos and sin receive no gradient.
    """
    check_even_head_dim(x.shape[-1])
    if use_triton(x, cos, sin):
        return _rope(x, cos, sin, interleaved)
    return reference_rope(x, cos, sin, interleaved)
