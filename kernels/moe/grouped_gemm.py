"""Grouped GEMMs over (token, slot) rows sorted by expert: the Triton building blocks of ``moe_experts``.

Rows are addressed through index vectors instead of permuted copies (ScatterMoE's idea): a kernel reads
row ``a_rows[s]`` of its input for sorted row ``s`` and writes row ``out_rows[s]`` of its output, so the gather
of tokens into expert order and the scatter back happen inside the loads and stores.

Every weight is passed as an (experts, N, K) view with arbitrary strides; ``w.transpose(1, 2)`` is how a
backward pass multiplies by W instead of W^T, and peft's permuted LoRA views need no copy.

LoRA enters the output GEMMs as one extra ``tl.dot`` per tile: ``acc += L[s, :r] @ B[e, n, :r]^T`` where the
caller computed the thin ``L = scaling * x @ A_e^T`` (rows, r) with the same kernel. The rank is padded to 16
inside registers (tl.dot's minimum), never in memory, and the delta ``B @ A`` is never formed.

Kernels:
* ``_grouped_mm_kernel``: out[out_rows[s]] = row_scale[s] * (a[a_rows[s]] @ W_e^T + L[s] @ B_e^T) * out_scale
* ``_grouped_mm_swiglu_kernel``: the same GEMM for the gate and the up columns of one tile, SwiGLU in the
  epilogue; optionally also stores the pre-activation (gate | up) for the backward.
* ``_grouped_mm_swiglu_bwd_kernel``: d(h) = dout @ W_down (+LoRA) with the SwiGLU backward in the epilogue;
  also recomputes h and each row's partial <d(h), h> for the routing-weight gradient.
* ``_grouped_wgrad_kernel``: dW[e] = sum over the rows of e of g[g_rows[s]]^T x[x_rows[s]] (one program per
  expert and (N, K) block, looping over the expert's rows; experts without rows store zeros).
* ``_grouped_mm_nf4_kernel``, ``_grouped_mm_swiglu_nf4_kernel``, ``_grouped_mm_swiglu_bwd_nf4_kernel``: the first
  three with an NF4 weight (kernels/nf4.py) dequantized per tile in registers, read as W or as W^T. No weight
  gradient: a quantized base is frozen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import ExpertSchedule
from .nf4 import (
    BLOCKSIZE,
    Nf4Weight,
    absmax_fp32,
    check_register_decode_layout,
    has_register_decode,
    nf4_code,
    nf4_decode_runs,
    triton_dtype,
)

# ----------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_matmul(
    acc, a_ptr, stride_am, stride_ak, a_rows, row_mask,
    w_ptr, stride_wn, stride_wk, offs_n, n_mask, K,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc (BLOCK_M, BLOCK_N) += a[a_rows, :K] @ w[offs_n, :K]^T, w already offset to its expert."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _tile_matmul_gate_up(
    gate, up, a_ptr, stride_am, stride_ak, a_rows, row_mask,
    w_ptr, stride_wn, stride_wk, offs_n, n_mask, I, K,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """gate += a[a_rows] @ w[offs_n]^T and up += a[a_rows] @ w[I + offs_n]^T in one pass over K: each A tile
    (gathered rows) is loaded once for both products, so a (BLOCK_M, 2 x BLOCK_N) output costs one A stream, as a
    single GEMM tile of that width would."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    up_offset = I * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w_gate = tl.load(w_ptrs, mask=w_mask, other=0.0)
        w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
        gate = tl.dot(a, w_gate, gate, input_precision=DOT_PRECISION)
        up = tl.dot(a, w_up, up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return gate, up


@triton.jit
def _tile_lora(
    acc, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
    b_ptr, stride_bn, stride_br, offs_n, n_mask, R,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc += L[offs_m, :R] @ B[offs_n, :R]^T: the LoRA up-projection of a tile (L holds scaling * x A^T)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    lo = tl.load(
        l_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
        mask=row_mask[:, None] & r_mask[None, :], other=0.0,
    )
    b = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=r_mask[:, None] & n_mask[None, :], other=0.0,
    )
    return tl.dot(lo, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tile_ids(N, BLOCK_N: tl.constexpr):
    """(row tile, N block) of this program. N blocks vary fastest: the programs running together share one
    row tile (gathered activations read once from HBM) and consecutive tiles of an expert share its weight
    blocks in L2, instead of every N block streaming all S rows again."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    return pid // num_n, pid % num_n


@triton.jit
def _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M: tl.constexpr):
    """(expert, sorted rows, row mask) of row tile pid_m; expert is -1 for a surplus tile."""
    expert = tl.load(tile_expert_ptr + pid_m)
    row_start = tl.load(tile_row_start_ptr + pid_m)
    row_end = tl.load(expert_offsets_ptr + tl.maximum(expert, 0) + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    return expert, offs_m, offs_m < row_end


@triton.jit
def _grouped_mm_epilogue(
    acc, expert, offs_m, row_mask, offs_n, n_mask,
    l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
    out_ptr, stride_om, stride_on, out_rows_ptr, row_scale_ptr, out_scale,
    HAS_LORA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """What a grouped_mm tile does after its base GEMM, whatever the weight's storage (16-bit or NF4): add the
    LoRA up-projection, scale (out_scale, then each row's routing weight) and scatter the rows to out_rows."""
    if HAS_LORA:
        acc = _tile_lora(
            acc, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
            b_ptr + expert.to(tl.int64) * stride_be, stride_bn, stride_br, offs_n, n_mask, R,
            BLOCK_R, DOT_PRECISION,
        )
    acc = acc * out_scale
    if HAS_ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
    out_rows = tl.load(out_rows_ptr + offs_m, mask=row_mask, other=0)
    out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _swiglu_epilogue(
    gate, up, expert, offs_m, row_mask, offs_n, n_mask, I,
    l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
    h_ptr, stride_hm, stride_hn, gu_ptr, stride_gm, stride_gn,
    HAS_LORA: tl.constexpr, STORE_GATE_UP: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """After the gate/up GEMM tiles: add their LoRA up-projections, store (gate | up) if the backward needs it and
    h = silu(gate) * up."""
    if HAS_LORA:
        b_e = b_ptr + expert.to(tl.int64) * stride_be
        gate = _tile_lora(gate, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
                          b_e, stride_bn, stride_br, offs_n, n_mask, R, BLOCK_R, DOT_PRECISION)
        up = _tile_lora(up, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
                        b_e, stride_bn, stride_br, offs_n + I, n_mask, R, BLOCK_R, DOT_PRECISION)
    # Round gate/up to the storage dtype first, as eager does (its linear returns bf16): the backward
    # recomputes h from the stored gate/up and must see the same h the down GEMM consumed.
    gate = gate.to(h_ptr.dtype.element_ty)
    up = up.to(h_ptr.dtype.element_ty)
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    if STORE_GATE_UP:
        gu_ptrs = gu_ptr + rows64 * stride_gm + offs_n[None, :] * stride_gn
        tl.store(gu_ptrs, gate, mask=mask)
        tl.store(gu_ptrs + I * stride_gn, up, mask=mask)
    gate32 = gate.to(tl.float32)
    h = gate32 * tl.sigmoid(gate32) * up.to(tl.float32)
    tl.store(h_ptr + rows64 * stride_hm + offs_n[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_epilogue(
    dh, expert, pid_n, offs_m, row_mask, offs_n, n_mask, S, I,
    l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
    gu_ptr, stride_gm, stride_gn, row_scale_ptr, dgu_ptr, stride_dm, stride_dn,
    h_ptr, stride_hm, stride_hn, dscale_ptr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """After the d(h) GEMM tile (d(out) @ W_down, unweighted): add its LoRA term, recompute h from the stored
    (gate | up) and store it, the partial <d(h), h> per row (the routing weight's gradient), and d(gate | up)."""
    if HAS_LORA:
        dh = _tile_lora(dh, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
                        b_ptr + expert.to(tl.int64) * stride_be, stride_bn, stride_br, offs_n, n_mask, R,
                        BLOCK_R, DOT_PRECISION)
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    gu_ptrs = gu_ptr + rows64 * stride_gm + offs_n[None, :] * stride_gn
    gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptrs + I * stride_gn, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows64 * stride_hm + offs_n[None, :] * stride_hn, h, mask=mask)
    tl.store(dscale_ptr + pid_n.to(tl.int64) * S + offs_m, tl.sum(dh * h.to(tl.float32), axis=1), mask=row_mask)
    dh = dh * tl.load(row_scale_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dh * silu
    dgu_ptrs = dgu_ptr + rows64 * stride_dm + offs_n[None, :] * stride_dn
    tl.store(dgu_ptrs, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptrs + I * stride_dn, dup.to(dgu_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_mm_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    w_ptr, stride_we, stride_wn, stride_wk,
    l_ptr, stride_lm, stride_lr,
    b_ptr, stride_be, stride_bn, stride_br,
    out_ptr, stride_om, stride_on, out_rows_ptr,
    row_scale_ptr,
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    N, K, R, out_scale,
    HAS_LORA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(N, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _tile_matmul(
        acc, a_ptr, stride_am, stride_ak, a_rows, row_mask,
        w_ptr + expert.to(tl.int64) * stride_we, stride_wn, stride_wk, offs_n, n_mask, K,
        BLOCK_K, DOT_PRECISION,
    )
    _grouped_mm_epilogue(acc, expert, offs_m, row_mask, offs_n, n_mask,
                         l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
                         out_ptr, stride_om, stride_on, out_rows_ptr, row_scale_ptr, out_scale,
                         HAS_LORA, HAS_ROW_SCALE, BLOCK_R, DOT_PRECISION)


@triton.jit
def _grouped_mm_swiglu_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    w_ptr, stride_we, stride_wn, stride_wk,  # (E, 2I, K): gate rows [0, I), up rows [I, 2I)
    l_ptr, stride_lm, stride_lr,
    b_ptr, stride_be, stride_bn, stride_br,  # (E, 2I, r)
    h_ptr, stride_hm, stride_hn,  # (S, I) sorted rows
    gu_ptr, stride_gm, stride_gn,  # (S, 2I) sorted rows, written when STORE_GATE_UP
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    I, K, R,
    HAS_LORA: tl.constexpr, STORE_GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(I, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate, up = _tile_matmul_gate_up(gate, up, a_ptr, stride_am, stride_ak, a_rows, row_mask,
                                    w_e, stride_wn, stride_wk, offs_n, n_mask, I, K, BLOCK_K, DOT_PRECISION)
    _swiglu_epilogue(gate, up, expert, offs_m, row_mask, offs_n, n_mask, I,
                     l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
                     h_ptr, stride_hm, stride_hn, gu_ptr, stride_gm, stride_gn,
                     HAS_LORA, STORE_GATE_UP, BLOCK_R, DOT_PRECISION)


@triton.jit
def _grouped_mm_swiglu_bwd_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,  # d(out) (T, H), gathered by token
    w_ptr, stride_we, stride_wn, stride_wk,  # W_down as (E, I, H)
    l_ptr, stride_lm, stride_lr,  # scaling * d(out) @ B_down (S, r)
    b_ptr, stride_be, stride_bn, stride_br,  # A_down as (E, I, r)
    gu_ptr, stride_gm, stride_gn,  # stored (gate | up) (S, 2I)
    row_scale_ptr,  # routing weight of each sorted row (S,) fp32
    dgu_ptr, stride_dm, stride_dn,  # out: d(gate | up) (S, 2I)
    h_ptr, stride_hm, stride_hn,  # out: recomputed h (S, I), for the down projection's weight gradients
    dscale_ptr,  # out: (num N blocks, S) fp32 partial sums of <d(y), y> per row
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    S, I, K, R,
    HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(I, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    # Unweighted d(h): y = h @ W^T + ..., out += w * y  =>  d(h) = w * (d(out) @ W + ...), d(w) = <d(out) @ W, h>
    dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dh = _tile_matmul(dh, a_ptr, stride_am, stride_ak, a_rows, row_mask,
                      w_ptr + expert.to(tl.int64) * stride_we, stride_wn, stride_wk, offs_n, n_mask, K,
                      BLOCK_K, DOT_PRECISION)
    _swiglu_backward_epilogue(dh, expert, pid_n, offs_m, row_mask, offs_n, n_mask, S, I,
                              l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
                              gu_ptr, stride_gm, stride_gn, row_scale_ptr, dgu_ptr, stride_dm, stride_dn,
                              h_ptr, stride_hm, stride_hn, dscale_ptr,
                              HAS_LORA, BLOCK_R, DOT_PRECISION)


@triton.jit
def _grouped_wgrad_kernel(
    g_ptr, stride_gm, stride_gn, g_rows_ptr,
    x_ptr, stride_xm, stride_xk, x_rows_ptr,
    row_scale_ptr,
    dw_ptr, stride_de, stride_dn, stride_dk,
    expert_offsets_ptr,
    N, K,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Expert slowest: the (N, K) blocks of one expert run together and share its rows in L2.
    pid = tl.program_id(0)
    num_n, num_k = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    expert = pid // (num_n * num_k)
    pid_n = (pid // num_k) % num_n
    pid_k = pid % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < row_end
        g_rows = tl.load(g_rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        x_rows = tl.load(x_rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        g_t = tl.load(g_ptr + g_rows[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                      mask=n_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_ROW_SCALE:
            scale = tl.load(row_scale_ptr + offs_m, mask=row_mask, other=0.0)
            x = (x.to(tl.float32) * scale[:, None]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(g_t, x, acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_de + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def gemm_block_m(device: torch.device, num_pairs: int, num_experts: int) -> int:
    """Rows per tile of the sorted-row GEMMs; ExpertSchedule tiles must be built with it."""
    if device.type != "cuda":
        # The interpreter runs programs one by one in Python: small tiles keep odd-shape tests exercising
        # several tiles per expert while staying fast.
        return 16
    # 128-row tiles run ~35% faster than 64 on H100 (bf16, H=2048), but a tile never spans two experts:
    # below ~128 rows per expert the padding of the last tile would cost more than the larger tile saves.
    return 128 if num_pairs >= 128 * num_experts else 64


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently go through TF32 on Ampere+: tests hold fp32 to 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


# (BLOCK_N cap, BLOCK_K cap, launch options) per kernel family. On H100 (bf16, the benchmark's shapes) the
# row GEMMs peak with 128x128x64 tiles, 8 warps, 3 stages (~420-470 TFLOP/s) and the weight-gradient
# reduction (128x128 output, 32-row steps) with 4 warps, 4 stages.
_GPU_ROW_GEMM = (128, 64, {"num_warps": 8, "num_stages": 3})
_GPU_WGRAD = (128, 128, {"num_warps": 4, "num_stages": 4})
# The NF4 row GEMMs have their own entries because their budget differs: each K step decodes a weight tile in
# registers and stores it to shared memory for the wgmma, whose wait leaves the decode of one program to overlap
# the tensor cores of another. Measured on H100s (bench_nf4_experts.py --nf4-configs, 2026-11-23, PTX decode), on
# the Trinity-Mini expert GEMMs: 4 warps 250-300 TFLOP/s in two runs, 8 warps 266-295 in one and 200-269 in the
# other; BLOCK_K 128 or BLOCK_N 64 were slower.
_GPU_NF4_ROW_GEMM = (128, 64, {"num_warps": 4, "num_stages": 3})
# The NF4 SwiGLU backward holds a (128 rows, BLOCK_N) d(h) tile and then the stored gate and up tiles of the same
# size for its epilogue: at BLOCK_N 128 and 4 warps that spills 5.7 KB a thread (ptxas, sm_90) and ran at 65
# TFLOP/s; half the N block runs at 151, as fast as the bf16 kernel (158), and 8 warps at 135.
_GPU_NF4_SWIGLU_BWD = (64, 64, {"num_warps": 4, "num_stages": 3})
_INTERPRETER = (32, 32, {})


def _config(device: torch.device, wgrad: bool = False, nf4: bool = False,
            swiglu_backward: bool = False) -> tuple[int, int, dict]:
    if device.type != "cuda":
        return _INTERPRETER
    if wgrad:
        return _GPU_WGRAD
    if nf4:
        return _GPU_NF4_SWIGLU_BWD if swiglu_backward else _GPU_NF4_ROW_GEMM
    return _GPU_ROW_GEMM


def grouped_mm(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    weight: torch.Tensor,
    schedule: ExpertSchedule,
    out: torch.Tensor,
    out_rows: torch.Tensor,
    lora_l: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out_scale: float = 1.0,
) -> torch.Tensor:
    """out[out_rows[s]] = row_scale[s] * out_scale * (a[a_rows[s]] @ weight[e_s]^T + lora_l[s] @ lora_b[e_s]^T).

    a: (rows_a, K); a_rows, out_rows: (S,) int32; weight: (E, N, K) any strides; out: (rows_out, N);
    lora_l: (S, r) in sorted order; lora_b: (E, N, r); row_scale: (S,) float32. Rows of out not named by
    out_rows are left untouched.
    """
    num_n, num_k = weight.shape[1], weight.shape[2]
    cap_n, cap_k, options = _config(a.device)
    block_n, block_k = _block(num_n, cap_n), _block(num_k, cap_k)
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    lora_l_ = lora_l if has_lora else a
    lora_b_ = lora_b if has_lora else weight
    grid = (schedule.max_tiles * triton.cdiv(num_n, block_n),)
    _grouped_mm_kernel[grid](
        a, a.stride(0), a.stride(1), a_rows,
        weight, weight.stride(0), weight.stride(1), weight.stride(2),
        lora_l_, lora_l_.stride(0), lora_l_.stride(-1),
        lora_b_, lora_b_.stride(0), lora_b_.stride(1), lora_b_.stride(-1),
        out, out.stride(0), out.stride(1), out_rows,
        row_scale if row_scale is not None else a,
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        num_n, num_k, rank, out_scale,
        HAS_LORA=has_lora, HAS_ROW_SCALE=row_scale is not None,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(a.dtype),
        **options,
    )
    return out


def grouped_mm_swiglu(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    gate_up: torch.Tensor,
    schedule: ExpertSchedule,
    lora_l: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    store_gate_up: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h = silu(gate) * up with (gate | up) = a[a_rows[s]] @ gate_up[e_s]^T (+ lora_l[s] @ lora_b[e_s]^T).

    a: (rows_a, H); gate_up: (E, 2I, H); lora_l: (S, r); lora_b: (E, 2I, r).
    Returns h (S, I) in sorted order and, if store_gate_up, (gate | up) (S, 2I), both in a's dtype.
    """
    num_rows = schedule.num_pairs
    inter, hidden = gate_up.shape[1] // 2, gate_up.shape[2]
    h = torch.empty(num_rows, inter, dtype=a.dtype, device=a.device)
    gu = torch.empty(num_rows, 2 * inter, dtype=a.dtype, device=a.device) if store_gate_up else h
    cap_n, cap_k, options = _config(a.device)
    # Two accumulators (gate and up) per program: half the N block keeps the register budget of one.
    block_n, block_k = _block(inter, cap_n // 2), _block(hidden, cap_k)
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    lora_l_ = lora_l if has_lora else a
    lora_b_ = lora_b if has_lora else gate_up
    grid = (schedule.max_tiles * triton.cdiv(inter, block_n),)
    _grouped_mm_swiglu_kernel[grid](
        a, a.stride(0), a.stride(1), a_rows,
        gate_up, gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        lora_l_, lora_l_.stride(0), lora_l_.stride(-1),
        lora_b_, lora_b_.stride(0), lora_b_.stride(1), lora_b_.stride(-1),
        h, h.stride(0), h.stride(1),
        gu, gu.stride(0), gu.stride(1),
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        inter, hidden, rank,
        HAS_LORA=has_lora, STORE_GATE_UP=store_gate_up,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(a.dtype),
        **options,
    )
    return h, (gu if store_gate_up else None)


def grouped_mm_swiglu_backward(
    grad_out: torch.Tensor,
    grad_rows: torch.Tensor,
    down_t: torch.Tensor,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    schedule: ExpertSchedule,
    lora_l: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward through the weighted down projection and SwiGLU.

    grad_out: (T, H) gathered by grad_rows (S,); down_t: W_down viewed as (E, I, H); gate_up: stored (S, 2I);
    row_scale: (S,) fp32 routing weights; lora_l: scaling * grad_out[rows] @ B_down (S, r); lora_b: A_down
    viewed as (E, I, r). Returns d(gate | up) (S, 2I), h (S, I) and the routing-weight gradient (S,) fp32,
    all in sorted order.
    """
    num_rows = schedule.num_pairs
    inter, hidden = down_t.shape[1], down_t.shape[2]
    dtype = gate_up.dtype
    dgu = torch.empty(num_rows, 2 * inter, dtype=dtype, device=gate_up.device)
    h = torch.empty(num_rows, inter, dtype=dtype, device=gate_up.device)
    cap_n, cap_k, options = _config(gate_up.device)
    block_n, block_k = _block(inter, cap_n), _block(hidden, cap_k)
    num_blocks_n = triton.cdiv(inter, block_n)
    # One partial per N block instead of atomics: deterministic, summed below.
    dscale = torch.zeros(num_blocks_n, num_rows, dtype=torch.float32, device=gate_up.device)
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    lora_l_ = lora_l if has_lora else gate_up
    lora_b_ = lora_b if has_lora else down_t
    _grouped_mm_swiglu_bwd_kernel[(schedule.max_tiles * num_blocks_n,)](
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_rows,
        down_t, down_t.stride(0), down_t.stride(1), down_t.stride(2),
        lora_l_, lora_l_.stride(0), lora_l_.stride(-1),
        lora_b_, lora_b_.stride(0), lora_b_.stride(1), lora_b_.stride(-1),
        gate_up, gate_up.stride(0), gate_up.stride(1),
        row_scale,
        dgu, dgu.stride(0), dgu.stride(1),
        h, h.stride(0), h.stride(1),
        dscale,
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        num_rows, inter, hidden, rank,
        HAS_LORA=has_lora,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(dtype),
        **options,
    )
    return dgu, h, dscale.sum(0)


def grouped_wgrad(
    g: torch.Tensor,
    g_rows: torch.Tensor,
    x: torch.Tensor,
    x_rows: torch.Tensor,
    schedule: ExpertSchedule,
    out: torch.Tensor,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[e] = sum over sorted rows s of expert e of row_scale[s] * g[g_rows[s]]^T x[x_rows[s]].

    g: (rows_g, N); x: (rows_x, K); g_rows, x_rows: (S,) int32; out: (E, N, K), any strides and dtype
    (accumulated in fp32). Experts without rows get zeros.
    """
    num_experts, num_n, num_k = out.shape
    cap_n, cap_k, options = _config(g.device, wgrad=True)
    block_n, block_k = _block(num_n, cap_n), _block(num_k, cap_k)
    grid = (num_experts * triton.cdiv(num_n, block_n) * triton.cdiv(num_k, block_k),)
    _grouped_wgrad_kernel[grid](
        g, g.stride(0), g.stride(1), g_rows,
        x, x.stride(0), x.stride(1), x_rows,
        row_scale if row_scale is not None else g,
        out, out.stride(0), out.stride(1), out.stride(2),
        schedule.expert_offsets,
        num_n, num_k,
        HAS_ROW_SCALE=row_scale is not None,
        BLOCK_M=32 if g.device.type == "cuda" else 16, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(g.dtype),
        **options,
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# NF4 weights (QLoRA): the same GEMMs with the weight dequantized tile by tile in registers
# ----------------------------------------------------------------------------------------------------------
#
# An NF4 expert is its row-major (R, C) weight flattened (kernels/nf4.py): element i in byte i // 2 (high nibble
# when i is even) with absmax i // 64. A GEMM reads it as W (forward: contraction over C, the tile's rows are W's
# rows) or as W^T (backward: contraction over R, the tile's columns are C). Either way a tile is a block of the
# stored (R, C) layout, loaded along C (unit stride), and the forward transposes it in registers for tl.dot.
#
# When C % 64 == 0 (every real model) each row starts on a byte and on an absmax block, so a tile is a
# (rows, cols / 2) byte block split into nibbles, and a (rows, cols / 64) absmax block broadcast over its 64
# columns. Other shapes (tests, toy models) gather each element's byte and absmax from its flat index.
# The kernels read absmax as fp32: a double-quantized one is decoded for the whole stack first (nf4.absmax_fp32,
# 4 bytes per 64 weights, once per GEMM): decoding it per tile, a dependent gather from the dynamic code each K
# step, made the GEMMs 5-25% slower on an H100.


@triton.jit
def _nf4_tile(q_ptr, absmax_ptr, code, rows, row_mask, col0, C,
              ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr, COLS_IN_RANGE: tl.constexpr,
              COLS: tl.constexpr, W_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Elements (rows, col0 + arange(COLS)) of an NF4 expert stored (R, C) row-major, dequantized to a
    (len(rows), COLS) tile: code[nibble] * absmax in fp32 (code: the 16 NF4 values; absmax: fp32), rounded to the
    weight's dtype (as bitsandbytes' dequantize_4bit) and then to the GEMM's dtype. col0 is a multiple of COLS;
    COLS_IN_RANGE: col0 + COLS <= C (no column mask). Flat indices stay int32: one expert holds far fewer than 2^31
    elements."""
    if ROWS_ALIGNED:
        # C % 64 == 0, so a row holds C / 2 bytes, a multiple of 32: the hint lets row starts vectorise.
        row_bytes = tl.multiple_of(C // 2, 32)
        byte_cols = col0 // 2 + tl.arange(0, COLS // 2)
        # One absmax per 64 columns of a row; a tile narrower than 64 (col0 a multiple of COLS) sits in one block.
        GROUPS: tl.constexpr = (COLS + 63) // 64
        groups = col0 // 64 + tl.arange(0, GROUPS)
        if COLS_IN_RANGE:
            byte_mask, group_mask = row_mask[:, None], row_mask[:, None]
        else:
            byte_mask = row_mask[:, None] & (byte_cols < row_bytes)[None, :]
            group_mask = row_mask[:, None] & (groups < C // 64)[None, :]
        packed = tl.load(q_ptr + rows[:, None] * row_bytes + byte_cols[None, :], mask=byte_mask, other=0)
        absmax = tl.load(absmax_ptr + rows[:, None] * (C // 64) + groups[None, :], mask=group_mask, other=0.0)
        if REGISTER_DECODE:
            byte_absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (rows.shape[0], GROUPS, COLS // 2 // GROUPS)),
                                     (rows.shape[0], COLS // 2))
            return nf4_decode_runs(packed, byte_absmax, OUT_DTYPE)
        packed = packed.to(tl.int32)
        # Element 2j is the high nibble of byte j: join puts it first, reshape interleaves the pairs in place.
        nibbles = tl.reshape(tl.join(packed >> 4, packed & 0xF), (rows.shape[0], COLS))
        scale = tl.reshape(tl.broadcast_to(absmax[:, :, None], (rows.shape[0], GROUPS, COLS // GROUPS)),
                           (rows.shape[0], COLS))
    else:
        cols = col0 + tl.arange(0, COLS)
        idx = rows[:, None] * C + cols[None, :]
        mask = row_mask[:, None] & (cols < C)[None, :]
        byte = tl.load(q_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        nibbles = (byte >> ((1 - (idx & 1)) * 4)) & 0xF
        scale = tl.load(absmax_ptr + (idx >> 6), mask=mask, other=0.0)
    # The lookup is a register gather from the 16 codes, not a load: the pipeliner would turn a load into
    # cp.async copies of every looked-up value into shared memory (4 bytes each, a tile of fp32 per stage).
    flat = tl.gather(code, tl.reshape(nibbles, (nibbles.shape[0] * nibbles.shape[1],)), 0)
    value = tl.reshape(flat, (nibbles.shape[0], nibbles.shape[1])) * scale
    return value.to(W_DTYPE).to(OUT_DTYPE)


@triton.jit
def _tile_matmul_nf4(
    acc, a_ptr, stride_am, stride_ak, a_rows, row_mask,
    q_ptr, absmax_ptr, code_ptr, offs_n, n_mask, n0, N, K,
    TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr, WHOLE_TILES: tl.constexpr,
    W_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc (BLOCK_M, len(offs_n)) += a[a_rows, :K] @ W[offs_n, :K]^T with W (N, K) an NF4 expert (q_ptr, absmax_ptr
    at it) stored as (N, K), or as (K, N) when TRANSPOSED. offs_n may be any rows of a stored W (the SwiGLU forward
    interleaves gate and up rows); a TRANSPOSED read loads stored columns, so offs_n is n0 + arange. WHOLE_TILES:
    K is a multiple of BLOCK_K and, read TRANSPOSED, N of len(offs_n), so the K loop and the weight tiles need no
    masks beyond the rows' (each mask is instructions in a loop that is bound by instruction issue)."""
    code = tl.load(code_ptr + tl.arange(0, 16))
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        if WHOLE_TILES:
            k_mask = tl.full((BLOCK_K,), True, tl.int1)
        else:
            k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if TRANSPOSED:
            w = _nf4_tile(q_ptr, absmax_ptr, code, k0 + offs_k, k_mask, n0, N, ROWS_ALIGNED, REGISTER_DECODE,
                          WHOLE_TILES, offs_n.shape[0], W_DTYPE, a_ptr.dtype.element_ty)
        else:
            w = tl.trans(_nf4_tile(q_ptr, absmax_ptr, code, offs_n, n_mask, k0, K, ROWS_ALIGNED, REGISTER_DECODE,
                                   WHOLE_TILES, BLOCK_K, W_DTYPE, a_ptr.dtype.element_ty))
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _grouped_mm_nf4_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    q_ptr, stride_qe, absmax_ptr, stride_se, code_ptr,
    l_ptr, stride_lm, stride_lr,
    b_ptr, stride_be, stride_bn, stride_br,
    out_ptr, stride_om, stride_on, out_rows_ptr,
    row_scale_ptr,
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    N, K, R, out_scale,
    HAS_LORA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr, WHOLE_TILES: tl.constexpr,
    W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(N, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _tile_matmul_nf4(
        acc, a_ptr, stride_am, stride_ak, a_rows, row_mask,
        q_ptr + expert.to(tl.int64) * stride_qe, absmax_ptr + expert.to(tl.int64) * stride_se, code_ptr,
        offs_n, n_mask, n0, N, K,
        TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE, BLOCK_K, DOT_PRECISION,
    )
    _grouped_mm_epilogue(acc, expert, offs_m, row_mask, offs_n, n_mask,
                         l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
                         out_ptr, stride_om, stride_on, out_rows_ptr, row_scale_ptr, out_scale,
                         HAS_LORA, HAS_ROW_SCALE, BLOCK_R, DOT_PRECISION)


@triton.jit
def _grouped_mm_swiglu_nf4_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    q_ptr, stride_qe, absmax_ptr, stride_se, code_ptr,  # (E, 2I, K): gate, then up rows
    l_ptr, stride_lm, stride_lr,
    b_ptr, stride_be, stride_bn, stride_br,  # (E, 2I, r)
    h_ptr, stride_hm, stride_hn,  # (S, I) sorted rows
    gu_ptr, stride_gm, stride_gn,  # (S, 2I) sorted rows, written when STORE_GATE_UP
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    I, K, R,
    HAS_LORA: tl.constexpr, STORE_GATE_UP: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(I, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    # Gate row n and up row I + n side by side in one (2 x BLOCK_N)-row weight tile: one pass over K dequantizes
    # and multiplies both, and the interleaved accumulator splits into gate and up without moving columns.
    w_rows = tl.reshape(tl.join(offs_n, offs_n + I), (2 * BLOCK_N,))
    w_mask = tl.reshape(tl.join(n_mask, n_mask), (2 * BLOCK_N,))
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc = _tile_matmul_nf4(
        acc, a_ptr, stride_am, stride_ak, a_rows, row_mask,
        q_ptr + expert.to(tl.int64) * stride_qe, absmax_ptr + expert.to(tl.int64) * stride_se, code_ptr,
        w_rows, w_mask, n0, 2 * I, K,
        False, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE, BLOCK_K, DOT_PRECISION,
    )
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    _swiglu_epilogue(gate, up, expert, offs_m, row_mask, offs_n, n_mask, I,
                     l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
                     h_ptr, stride_hm, stride_hn, gu_ptr, stride_gm, stride_gn,
                     HAS_LORA, STORE_GATE_UP, BLOCK_R, DOT_PRECISION)


@triton.jit
def _grouped_mm_swiglu_bwd_nf4_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,  # d(out) (T, H), gathered by token
    q_ptr, stride_qe, absmax_ptr, stride_se, code_ptr,  # W_down (E, H, I), read as (E, I, H)
    l_ptr, stride_lm, stride_lr,  # scaling * d(out) @ B_down (S, r)
    b_ptr, stride_be, stride_bn, stride_br,  # A_down as (E, I, r)
    gu_ptr, stride_gm, stride_gn,  # stored (gate | up) (S, 2I)
    row_scale_ptr,  # routing weight of each sorted row (S,) fp32
    dgu_ptr, stride_dm, stride_dn,  # out: d(gate | up) (S, 2I)
    h_ptr, stride_hm, stride_hn,  # out: recomputed h (S, I)
    dscale_ptr,  # out: (num N blocks, S) fp32 partial sums of <d(y), y> per row
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    S, I, K, R,
    HAS_LORA: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr, WHOLE_TILES: tl.constexpr,
    W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(I, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dh = _tile_matmul_nf4(dh, a_ptr, stride_am, stride_ak, a_rows, row_mask,
                          q_ptr + expert.to(tl.int64) * stride_qe, absmax_ptr + expert.to(tl.int64) * stride_se,
                          code_ptr, offs_n, n_mask, n0, I, K,
                          True, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE, BLOCK_K, DOT_PRECISION)
    _swiglu_backward_epilogue(dh, expert, pid_n, offs_m, row_mask, offs_n, n_mask, S, I,
                              l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br, R,
                              gu_ptr, stride_gm, stride_gn, row_scale_ptr, dgu_ptr, stride_dm, stride_dn,
                              h_ptr, stride_hm, stride_hn, dscale_ptr,
                              HAS_LORA, BLOCK_R, DOT_PRECISION)


def _nf4_operand(weight: Nf4Weight, transpose: bool, compute_dtype: torch.dtype) -> tuple[tuple, dict, int, int]:
    """(kernel arguments, layout constexprs, logical N, logical K) of an NF4 stack (E, N, K) read as W or, when
    transpose, as W^T (E, K, N), by a GEMM in compute_dtype."""
    if any(t.stride(-1) != 1 for t in weight.tensors()):
        raise ValueError("NF4 packed codes and absmax (and its double quantization) must be contiguous per expert")
    # Double-quantized absmax is decoded here, for the whole stack (see the note above _nf4_tile).
    _, n, k = weight.shape
    absmax = absmax_fp32(weight)
    args = (weight.packed, weight.packed.stride(0), absmax, absmax.stride(0), nf4_code(weight.device))
    rows_aligned = k % BLOCKSIZE == 0
    # The PTX decode (nf4.nf4_decode_runs) on NVIDIA GPUs when rows start on a 64-block (a tile is then at least 64
    # columns wide, and a thread's 16-byte runs stay in one block) and the weights round to the GEMM's dtype directly;
    # otherwise the portable decode, whose code lookup goes through shared memory. The launcher also checks the tile
    # size (_use_register_decode).
    register_decode = (rows_aligned and weight.dtype == compute_dtype
                       and has_register_decode(weight.device, compute_dtype))
    layout = {"ROWS_ALIGNED": rows_aligned, "REGISTER_DECODE": register_decode,
              "W_DTYPE": triton_dtype(weight.dtype)}
    return args, layout, (k if transpose else n), (n if transpose else k)


def _use_register_decode(layout: dict, tile_rows: int, tile_cols: int, options: dict) -> dict:
    """layout, with the PTX decode switched off when a tile of stored NF4 bytes has fewer than 16 a thread (it
    decodes 16 consecutive bytes at a time)."""
    threads = 32 * options.get("num_warps", 4)
    return {**layout, "REGISTER_DECODE": layout["REGISTER_DECODE"] and tile_rows * tile_cols // 2 >= 16 * threads}


def _launch_nf4(kernel, grid, *args, **kwargs) -> None:
    compiled = kernel[grid](*args, **kwargs)
    if kwargs["REGISTER_DECODE"]:
        check_register_decode_layout(compiled)


def grouped_mm_nf4(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    weight: Nf4Weight,
    schedule: ExpertSchedule,
    out: torch.Tensor,
    out_rows: torch.Tensor,
    lora_l: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out_scale: float = 1.0,
    transpose: bool = False,
) -> torch.Tensor:
    """``grouped_mm`` with an NF4 weight: W (E, N, K), or W^T (E, K, N) when transpose, dequantized per tile."""
    w_args, w_layout, num_n, num_k = _nf4_operand(weight, transpose, a.dtype)
    cap_n, cap_k, options = _config(a.device, nf4=True)
    block_n, block_k = _block(num_n, cap_n), _block(num_k, cap_k)
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    lora_l_ = lora_l if has_lora else a
    lora_b_ = lora_b if has_lora else a[None]
    grid = (schedule.max_tiles * triton.cdiv(num_n, block_n),)
    w_layout = _use_register_decode(w_layout, *((block_k, block_n) if transpose else (block_n, block_k)), options)
    whole_tiles = num_k % block_k == 0 and (not transpose or num_n % block_n == 0)
    _launch_nf4(
        _grouped_mm_nf4_kernel, grid,
        a, a.stride(0), a.stride(1), a_rows,
        *w_args,
        lora_l_, lora_l_.stride(0), lora_l_.stride(-1),
        lora_b_, lora_b_.stride(0), lora_b_.stride(1), lora_b_.stride(-1),
        out, out.stride(0), out.stride(1), out_rows,
        row_scale if row_scale is not None else a,
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        num_n, num_k, rank, out_scale,
        HAS_LORA=has_lora, HAS_ROW_SCALE=row_scale is not None, TRANSPOSED=transpose, WHOLE_TILES=whole_tiles,
        **w_layout,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(a.dtype),
        **options,
    )
    return out


def grouped_mm_swiglu_nf4(
    a: torch.Tensor,
    a_rows: torch.Tensor,
    gate_up: Nf4Weight,
    schedule: ExpertSchedule,
    lora_l: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    store_gate_up: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grouped_mm_swiglu`` with an NF4 gate_up (E, 2I, H)."""
    num_rows = schedule.num_pairs
    w_args, w_layout, two_inter, hidden = _nf4_operand(gate_up, False, a.dtype)
    inter = two_inter // 2
    h = torch.empty(num_rows, inter, dtype=a.dtype, device=a.device)
    gu = torch.empty(num_rows, 2 * inter, dtype=a.dtype, device=a.device) if store_gate_up else h
    cap_n, cap_k, options = _config(a.device, nf4=True)
    block_n, block_k = _block(inter, cap_n // 2), _block(hidden, cap_k)
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    lora_l_ = lora_l if has_lora else a
    lora_b_ = lora_b if has_lora else a[None]
    grid = (schedule.max_tiles * triton.cdiv(inter, block_n),)
    w_layout = _use_register_decode(w_layout, 2 * block_n, block_k, options)
    _launch_nf4(
        _grouped_mm_swiglu_nf4_kernel, grid,
        a, a.stride(0), a.stride(1), a_rows,
        *w_args,
        lora_l_, lora_l_.stride(0), lora_l_.stride(-1),
        lora_b_, lora_b_.stride(0), lora_b_.stride(1), lora_b_.stride(-1),
        h, h.stride(0), h.stride(1),
        gu, gu.stride(0), gu.stride(1),
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        inter, hidden, rank,
        HAS_LORA=has_lora, STORE_GATE_UP=store_gate_up, WHOLE_TILES=hidden % block_k == 0, **w_layout,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(a.dtype),
        **options,
    )
    return h, (gu if store_gate_up else None)


def grouped_mm_swiglu_backward_nf4(
    grad_out: torch.Tensor,
    grad_rows: torch.Tensor,
    down: Nf4Weight,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor,
    schedule: ExpertSchedule,
    lora_l: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grouped_mm_swiglu_backward`` with the NF4 down projection (E, H, I), read transposed inside the kernel."""
    num_rows = schedule.num_pairs
    w_args, w_layout, inter, hidden = _nf4_operand(down, True, grad_out.dtype)
    dtype = gate_up.dtype
    dgu = torch.empty(num_rows, 2 * inter, dtype=dtype, device=gate_up.device)
    h = torch.empty(num_rows, inter, dtype=dtype, device=gate_up.device)
    cap_n, cap_k, options = _config(gate_up.device, nf4=True, swiglu_backward=True)
    block_n, block_k = _block(inter, cap_n), _block(hidden, cap_k)
    num_blocks_n = triton.cdiv(inter, block_n)
    dscale = torch.zeros(num_blocks_n, num_rows, dtype=torch.float32, device=gate_up.device)
    has_lora = lora_l is not None
    rank = lora_l.shape[1] if has_lora else 0
    lora_l_ = lora_l if has_lora else gate_up
    lora_b_ = lora_b if has_lora else gate_up[None]
    w_layout = _use_register_decode(w_layout, block_k, block_n, options)
    _launch_nf4(
        _grouped_mm_swiglu_bwd_nf4_kernel, (schedule.max_tiles * num_blocks_n,),
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_rows,
        *w_args,
        lora_l_, lora_l_.stride(0), lora_l_.stride(-1),
        lora_b_, lora_b_.stride(0), lora_b_.stride(1), lora_b_.stride(-1),
        gate_up, gate_up.stride(0), gate_up.stride(1),
        row_scale,
        dgu, dgu.stride(0), dgu.stride(1),
        h, h.stride(0), h.stride(1),
        dscale,
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        num_rows, inter, hidden, rank,
        HAS_LORA=has_lora, WHOLE_TILES=hidden % block_k == 0 and inter % block_n == 0, **w_layout,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(dtype),
        **options,
    )
    return dgu, h, dscale.sum(0)
