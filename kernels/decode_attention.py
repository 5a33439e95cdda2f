"""Attention of one new token per row over a fixed key/value cache (decoding), grouped-query heads read in place.

    out[b, h] = softmax(scaling * q[b, h] K[b, h // G]^T, over the positions mask[b] allows) V[b, h // G]

q (batch, heads, 1, dim); K, V (batch, kv_heads, positions, dim), G = heads / kv_heads; mask (batch, positions)
bool. transformers' SDPA path cannot read such a cache as it is: with a mask it copies K and V out to every query
head (repeat_kv) before calling SDPA, because PyTorch's fused kernels take grouped heads only without a mask. At
Trinity-Mini's decode step those two copies cost more than the attention itself (16 us a layer at batch 1).

Learned attention sinks (gpt-oss: one logit per head that joins the softmax's denominator and weighs no value) enter
the merge as one more split of that maximum and denominator 1, with nothing to add.

Flash decoding in two launches. The positions are cut into splits; a program takes one (row, kv head, split) and all
G query heads of that kv head at once (its K and V tiles are read once for the group), keeping the running maximum,
the softmax denominator and the weighted sum of values in fp32. The second launch merges the splits of each (row,
head). Splitting the positions is what makes a decode step's attention parallel: at batch 1 there are only kv_heads
(row, kv head) pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .grid import cdiv, next_power_of_2

# Positions per program tile; a split is a whole number of tiles, and at most MAX_SPLITS splits are made.
BLOCK_L = 64
MAX_SPLITS = 64


def reference_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                               scaling: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: query (B, H, 1, D), key/value (B, Hkv, L, D), mask (B, L) bool, sinks (H,) logits or None ->
    (B, 1, H, D) in query's dtype (transformers' attention functions' layout). Rows whose mask allows nothing get
    zeros."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = scaling * query.float() @ k.transpose(-1, -2)  # (B, H, 1, L)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, 1, 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2).to(query.dtype)


@triton.jit
def _decode_attention_split_kernel(
    q_ptr, stride_qb, stride_qh, stride_qd, k_ptr, stride_kb, stride_kh, stride_kl, v_ptr, stride_vb, stride_vh,
    stride_vl, mask_ptr, stride_mb, acc_ptr, stat_ptr,
    kv_heads, groups, positions, split_len, num_splits, dim, scaling,
    BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial attention of the G query heads of one (row, kv head) over one split of the positions: the fp32
    weighted sum of values (not yet divided) into acc (B, H, S, D), the running maximum and denominator into
    stat (B, H, S, 2)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row, kv_head = pid // kv_heads, pid % kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < groups, offs_d < dim
    heads = kv_head * groups + offs_g
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    denominator = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, positions)
    for l0 in range(start, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_range = offs_l < end
        allowed = tl.load(mask_ptr + row * stride_mb + offs_l, mask=in_range, other=0).to(tl.int1) & in_range
        k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=in_range[:, None] & d_mask[None, :],
                    other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling
        scores = tl.where(allowed[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A head with nothing allowed so far keeps -inf as its maximum: shift by 0 instead (exp(-inf) = 0 either way).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        denominator = denominator * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=in_range[:, None] & d_mask[None, :],
                    other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max
    heads_total = kv_heads * groups
    slot = (row * heads_total + heads) * num_splits + split
    tl.store(acc_ptr + slot[:, None] * dim + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(stat_ptr + slot * 2, running_max, mask=g_mask)
    tl.store(stat_ptr + slot * 2 + 1, denominator, mask=g_mask)


@triton.jit
def _decode_attention_merge_kernel(
    acc_ptr, stat_ptr, sinks_ptr, out_ptr, stride_ob, stride_oh, heads, num_splits, dim,
    HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[row, 0, head] from the splits' partial sums, each rescaled to the overall maximum; with HAS_SINKS the
    head's sink logit joins the denominator."""
    pid = tl.program_id(0)
    row, head = pid // heads, pid % heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask, d_mask = offs_s < num_splits, offs_d < dim
    slot = pid * num_splits + offs_s
    split_max = tl.load(stat_ptr + slot * 2, mask=s_mask, other=float("-inf"))
    split_den = tl.load(stat_ptr + slot * 2 + 1, mask=s_mask, other=0.0)
    overall = tl.max(split_max, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        overall = tl.maximum(overall, sink)
    shift = tl.where(overall == float("-inf"), 0.0, overall)
    weight = tl.where(split_max == float("-inf"), 0.0, tl.exp(split_max - shift))
    acc = tl.load(acc_ptr + slot[:, None] * dim + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(acc * weight[:, None], axis=0)
    den = tl.sum(split_den * weight, axis=0)
    if HAS_SINKS:
        den += tl.exp(sink - shift)
    out = total / tl.where(den > 0, den, 1.0)  # nothing allowed: total is 0, so zeros, as the reference
    tl.store(out_ptr + row * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _splits(positions: int) -> tuple[int, int]:
    """(positions per split, splits): whole tiles per split, at most MAX_SPLITS splits."""
    tiles = cdiv(positions, BLOCK_L)
    split_len = cdiv(tiles, MAX_SPLITS) * BLOCK_L
    return split_len, cdiv(positions, split_len)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query (B, H, 1, D) any strides; key, value (B, Hkv, L, D) with unit stride on D; mask (B, L) bool; sinks (H,)
    per-head sink logits or None -> (B, 1, H, D) in query's dtype. No autograd (decoding)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    if q_len != 1 or heads % kv_heads or value.shape[:3] != key.shape[:3] or value.shape[-1] != dim:
        raise ValueError(f"decode_attention takes one query per row and grouped heads: query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    if sinks is not None and sinks.shape != (heads,):
        raise ValueError(f"decode_attention takes one sink logit per query head ({heads}), got {tuple(sinks.shape)}")
    if not use_triton(query, key, value, sinks):
        return reference_decode_attention(query, key, value, mask, scaling, sinks)
    groups = heads // kv_heads
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    mask = mask.contiguous()
    split_len, num_splits = _splits(positions)
    acc = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(batch, heads, num_splits, 2, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    block_d = max(16, next_power_of_2(dim))
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _decode_attention_split_kernel[(batch * kv_heads, num_splits)](
        query, query.stride(0), query.stride(1), query.stride(3), key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2), mask.view(torch.uint8), mask.stride(0), acc, stats,
        kv_heads, groups, positions, split_len, num_splits, dim, float(scaling),
        BLOCK_G=max(16, next_power_of_2(groups)), BLOCK_L=BLOCK_L, BLOCK_D=block_d, DOT_PRECISION=precision,
        num_warps=4,
    )
    _decode_attention_merge_kernel[(batch * heads,)](
        acc, stats, sinks.contiguous() if sinks is not None else None, out, out.stride(0), out.stride(2), heads,
        num_splits, dim, HAS_SINKS=sinks is not None, BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d,
        num_warps=4,
    )
    return out
