"""Grouped GEMMs over (token, slot) rows sorted by expert: the Triton building blocks of ``moe_experts`` and of
``expert_map`` / ``expert_reduce``.

Rows are addressed through index vectors instead of permuted copies (ScatterMoE's idea): a kernel reads
row ``a_rows[s]`` of its input for sorted row ``s`` and writes row ``out_rows[s]`` of its output, so the gather
of tokens into expert order and the scatter back happen inside the loads and stores.

A weight is an (experts, N, K) stack read as W or, with ``transpose``, as W^T: 16-bit, as a view with any strides
(peft's permuted LoRA views need no copy), or NF4 (``nf4.Nf4Weight``, frozen), dequantized tile by tile in registers
(``nf4.dequantize_nf4_tile``). A kernel has one body for both: the weight tile of a K step is behind the ``NF4``
constexpr, a branch Triton resolves when it compiles, so a 16-bit kernel holds no trace of the NF4 one.

LoRA enters the output GEMMs as one extra ``tl.dot`` per tile: ``acc += L[s, :r] @ B[e, n, :r]^T`` where the
caller computed the thin ``L = scaling * x @ A_e^T`` (rows, r) with the same kernel. The rank is padded to 16
inside registers (tl.dot's minimum), never in memory, and the delta ``B @ A`` is never formed.

Kernels:
* ``_grouped_mm_kernel``: out[out_rows[s]] = row_scale[s] * (a[a_rows[s]] @ W_e^T + L[s] @ B_e^T + bias_e) * out_scale
* ``_grouped_mm_swiglu_kernel``: the gate and up columns of one tile, SwiGLU in the epilogue; optionally also
  stores the pre-activation (gate | up) for the backward.
* ``_grouped_mm_swiglu_bwd_kernel``: d(h) = dout @ W_down (+LoRA) with the SwiGLU backward in the epilogue;
  also recomputes h and each row's partial <d(h), h> for the routing-weight gradient.

The SwiGLU kernels also take gpt-oss's form, each part behind a constexpr: a bias per expert on the gate_up
columns (HAS_BIAS), gate and up interleaved column by column instead of in two halves (INTERLEAVED: one more
stride pattern for the weight rows, LoRA B rows, bias and stored pre-activation), and the clamped activation
``ClampedSwiglu`` (CLAMPED). gpt-oss stores its weights (E, in, out), the transpose of the (E, out, in) these
kernels read: a transposed view, read through its strides, not a copy.
* ``_grouped_wgrad_kernel`` (16-bit): dW[e] = sum over the rows s of e of g[g_rows[s]]^T x[x_rows[s]].

* ``_grouped_mm_lora_in_tile_kernel`` (16-bit, decoding): ``_grouped_mm_kernel`` or the SwiGLU forward with the thin
  LoRA product computed in the tile's own pass over K.

The first three also serve as the epilogue of a base product a[a_rows] @ W^T computed before them by torch's grouped
GEMM (``base_product``, the PRODUCT_GIVEN constexpr): where each expert's product is large, its CUTLASS kernels run
it faster than these kernels' own loop over K (1.3-1.4x on Mixtral's experts), and the kernel then only reads the
product's tile and adds the rest (see ``products_by_torch``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..grid import cdiv, next_power_of_2
from .nf4 import (
    Nf4Weight,
    TransposedNf4Weight,
    absmax_fp32,
    check_register_decode_layout,
    dequantize_nf4,
    dequantize_nf4_tile,
    nf4_code,
    nf4_tile_layout,
    register_decode_fits,
)
from .routing import ExpertSchedule

# An (E, N, K) expert weight stack as the GEMMs take it: 16-bit (any strides), NF4 stored (E, N, K), or NF4 stored
# (E, K, N) and read transposed.
GemmWeight = torch.Tensor | Nf4Weight | TransposedNf4Weight


@dataclass(frozen=True)
class ClampedSwiglu:
    """gpt-oss's gated activation: h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), with
    g = min(gate, limit). Without one the SwiGLU kernels compute silu(gate) * up."""

    alpha: float
    limit: float

# ----------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_matmul(
    acc, a_ptr, stride_am, stride_ak, a_rows, row_mask, expert,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr, offs_n, n_mask, n0, N, K,
    NF4: tl.constexpr, TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc (BLOCK_M, len(offs_n)) += a[a_rows, :K] @ W[offs_n, :K]^T with W (N, K) the weight of `expert`.

    16-bit: W is the (E, N, K) view given by w_ptr and its strides. NF4 (w_ptr: packed codes, absmax_ptr: fp32
    absmax, code_ptr: the 16 NF4 values; no strides within an expert): W stored as (N, K), or as (K, N) when
    TRANSPOSED. offs_n may be any rows of a stored W (the SwiGLU forward interleaves gate and up rows); a TRANSPOSED
    read loads stored columns, so offs_n is n0 + arange. WHOLE_TILES (NF4): K is a multiple of BLOCK_K and, read
    TRANSPOSED, N of len(offs_n), so the K loop and the weight tiles need no masks beyond the rows' (each mask is
    instructions in a loop that the decode makes bound by instruction issue)."""
    w_ptr = w_ptr + expert.to(tl.int64) * stride_we
    if NF4:
        absmax_ptr = absmax_ptr + expert.to(tl.int64) * stride_ae
        code = tl.load(code_ptr + tl.arange(0, 16))
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    if not NF4:
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        if WHOLE_TILES:
            k_mask = tl.full((BLOCK_K,), True, tl.int1)
        else:
            k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if not NF4:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        elif TRANSPOSED:
            w = dequantize_nf4_tile(w_ptr, absmax_ptr, code, k0 + offs_k, k_mask, n0, N, ROWS_ALIGNED,
                                    REGISTER_DECODE, WHOLE_TILES, offs_n.shape[0], W_DTYPE, a_ptr.dtype.element_ty)
        else:
            w = tl.trans(dequantize_nf4_tile(w_ptr, absmax_ptr, code, offs_n, n_mask, k0, K, ROWS_ALIGNED,
                                             REGISTER_DECODE, WHOLE_TILES, BLOCK_K, W_DTYPE, a_ptr.dtype.element_ty))
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        if not NF4:
            w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _tile_matmul_gate_up(
    a_ptr, stride_am, stride_ak, a_rows, row_mask, expert,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr, offs_n, n_mask, n0, I, K,
    NF4: tl.constexpr, TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(gate, up), each (BLOCK_M, BLOCK_N) fp32: a[a_rows] @ W[gate rows]^T and a[a_rows] @ W[up rows]^T for the
    gate_up weight W (2I, K) of `expert` (rows _gate_up_rows gives), in one pass over K: each A tile (gathered rows)
    is loaded once for both products, so a (BLOCK_M, 2 x BLOCK_N) output costs one A stream, as a single GEMM tile
    of that width would. TRANSPOSED (NF4 stored (K, 2I), gpt-oss's layout): the tile's rows are stored columns, one
    contiguous run only when INTERLEAVED."""
    tl.static_assert(INTERLEAVED or not TRANSPOSED, "a transposed gate_up tile needs gate and up interleaved")
    # Gate row n and its up row side by side in one (2 x BLOCK_N)-row weight tile: one pass over K dequantizes (NF4)
    # and multiplies both in one wide dot, and the accumulator's column pairs split into gate and up in registers.
    # Stored interleaved (gpt-oss), those rows are one contiguous run: a 16-bit tile loads whole, where separate gate
    # and up tiles would each read every other element (10x slower at gpt-oss-20b's shapes on an H200). Stored as
    # [gate; up] halves, each row is still one contiguous run along K. With the GPU configuration below the wide dot
    # ran 2-14% faster than two dots of BLOCK_N columns a K step (H200, benchmarks/sweep_expert_configs.py).
    if INTERLEAVED:
        w_row0 = 2 * n0
        w_rows = w_row0 + tl.arange(0, 2 * BLOCK_N)
        w_mask = w_rows < 2 * I
    else:
        w_row0 = n0  # unread: only a transposed read takes its rows as one run from w_row0
        gate_rows, up_rows = _gate_up_rows(offs_n, I, INTERLEAVED)
        w_rows = tl.reshape(tl.join(gate_rows, up_rows), (2 * BLOCK_N,))
        w_mask = tl.reshape(tl.join(n_mask, n_mask), (2 * BLOCK_N,))
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc = _tile_matmul(acc, a_ptr, stride_am, stride_ak, a_rows, row_mask, expert,
                       w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr,
                       w_rows, w_mask, w_row0, 2 * I, K,
                       NF4, TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE, BLOCK_K, DOT_PRECISION)
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    return gate, up


@triton.jit
def _load_gate_up(ptr, stride_m, stride_n, rows64, row_mask, offs_n, n_mask, n0, I, INTERLEAVED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(gate, up) tiles (BLOCK_M, BLOCK_N) of a (rows, 2I) gate_up tensor for columns offs_n = n0 + arange: stored
    INTERLEAVED, one contiguous (BLOCK_M, 2 x BLOCK_N) load split in two."""
    if INTERLEAVED:
        cols = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        pairs = tl.load(ptr + rows64 * stride_m + cols[None, :] * stride_n,
                        mask=row_mask[:, None] & (cols < 2 * I)[None, :], other=0.0)
        gate, up = tl.split(tl.reshape(pairs, (BLOCK_M, BLOCK_N, 2)))
    else:
        mask = row_mask[:, None] & n_mask[None, :]
        gate = tl.load(ptr + rows64 * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0)
        up = tl.load(ptr + rows64 * stride_m + (offs_n + I)[None, :] * stride_n, mask=mask, other=0.0)
    return gate, up


@triton.jit
def _store_gate_up(ptr, stride_m, stride_n, rows64, row_mask, offs_n, n_mask, n0, I, gate, up,
                   INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store (gate, up) tiles as _load_gate_up loads them."""
    if INTERLEAVED:
        cols = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        tl.store(ptr + rows64 * stride_m + cols[None, :] * stride_n,
                 tl.reshape(tl.join(gate, up), (BLOCK_M, 2 * BLOCK_N)),
                 mask=row_mask[:, None] & (cols < 2 * I)[None, :])
    else:
        mask = row_mask[:, None] & n_mask[None, :]
        tl.store(ptr + rows64 * stride_m + offs_n[None, :] * stride_n, gate, mask=mask)
        tl.store(ptr + rows64 * stride_m + (offs_n + I)[None, :] * stride_n, up, mask=mask)


@triton.jit
def _gate_up_rows(offs_n, I, INTERLEAVED: tl.constexpr):
    """Where gate column n and its up column sit among the 2I gate_up columns (weight rows, LoRA B rows, bias entries,
    the stored pre-activation): [gate | up] halves (n, I + n), or INTERLEAVED pairs (2n, 2n + 1), as gpt-oss stores
    them."""
    if INTERLEAVED:
        return 2 * offs_n, 2 * offs_n + 1
    return offs_n, offs_n + I


@triton.jit
def _glu(gate, up, alpha, limit, CLAMPED: tl.constexpr):
    """h of fp32 gate and up: silu(gate) * up, or CLAMPED (gpt-oss): gate clamped above and up on both sides at
    limit, (up + 1) * gate * sigmoid(alpha * gate)."""
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _glu_backward(dh, gate, up, alpha, limit, CLAMPED: tl.constexpr):
    """(d gate, d up, h) of fp32 dh, gate and up for _glu. A clamped input gets no gradient where the clamp held it
    (torch.clamp's: the gradient passes at the limit itself)."""
    if CLAMPED:
        gate_c = tl.minimum(gate, limit)
        up_c = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(alpha * gate_c)
        glu = gate_c * sig
        dgate = dh * (up_c + 1.0) * sig * (1.0 + alpha * gate_c * (1.0 - sig))
        dgate = tl.where(gate <= limit, dgate, 0.0)
        dup = tl.where((up >= -limit) & (up <= limit), dh * glu, 0.0)
        return dgate, dup, (up_c + 1.0) * glu
    sig = tl.sigmoid(gate)
    silu = gate * sig
    return dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * silu, silu * up


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
def _base_tile(
    p_ptr, stride_pm, stride_pn, a_ptr, stride_am, stride_ak, a_rows_ptr, offs_m, row_mask, expert,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr, offs_n, n_mask, n0, N, K,
    PRODUCT_GIVEN: tl.constexpr, NF4: tl.constexpr, TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    REGISTER_DECODE: tl.constexpr, WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The fp32 tile (offs_m, offs_n) of a[a_rows] @ W^T: read from the product computed before the kernel
    (PRODUCT_GIVEN, sorted rows), or the tile's own pass over K."""
    if PRODUCT_GIVEN:
        ptrs = p_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :] * stride_pn
        acc = tl.load(ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    else:
        a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
        acc = _tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr, stride_am, stride_ak, a_rows,
                           row_mask, expert, w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr,
                           offs_n, n_mask, n0, N, K, NF4, TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES,
                           W_DTYPE, BLOCK_K, DOT_PRECISION)
    return acc


@triton.jit
def _tile_ids(N, BLOCK_N: tl.constexpr):
    """(row tile, N block) of this program. N blocks vary fastest: the programs running together share one
    row tile (gathered activations read once from HBM) and consecutive tiles of an expert share its weight
    blocks in L2, instead of every N block streaming all S rows again."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    return pid // num_n, pid % num_n


@triton.jit
def _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M: tl.constexpr,
               ROW_SPLIT: tl.constexpr):
    """(expert, sorted rows, row mask) of program row pid_m; expert is -1 for a surplus tile. ROW_SPLIT > 1: the
    schedule's tiles are ROW_SPLIT x BLOCK_M rows, and program row pid_m takes part pid_m % ROW_SPLIT of tile
    pid_m // ROW_SPLIT."""
    tile = pid_m // ROW_SPLIT
    expert = tl.load(tile_expert_ptr + tile)
    row_start = tl.load(tile_row_start_ptr + tile) + (pid_m % ROW_SPLIT) * BLOCK_M
    row_end = tl.load(expert_offsets_ptr + tl.maximum(expert, 0) + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    return expert, offs_m, offs_m < row_end


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
# The weight arguments (w_ptr .. code_ptr) hold a 16-bit weight's strides or an NF4 one's absmax and code, None for
# what the other kind uses; the LoRA ones are None without LoRA (see _launch_row_gemm).


@triton.jit
def _grouped_mm_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr,
    l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br,
    p_ptr, stride_pm, stride_pn,  # a[a_rows] @ W^T computed already (S, N) in sorted rows, when PRODUCT_GIVEN
    out_ptr, stride_om, stride_on, out_rows_ptr,
    row_scale_ptr,
    bias_ptr, stride_bias_e,  # (E, N), when HAS_BIAS
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    N, K, R, out_scale,
    HAS_LORA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PRODUCT_GIVEN: tl.constexpr,
    NF4: tl.constexpr, TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROW_SPLIT: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(N, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M,
                                          ROW_SPLIT)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = _base_tile(p_ptr, stride_pm, stride_pn, a_ptr, stride_am, stride_ak, a_rows_ptr, offs_m, row_mask, expert,
                     w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr, offs_n, n_mask, n0, N, K,
                     PRODUCT_GIVEN, NF4, TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE, BLOCK_M,
                     BLOCK_N, BLOCK_K, DOT_PRECISION)
    if HAS_LORA:
        acc = _tile_lora(
            acc, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
            b_ptr + expert.to(tl.int64) * stride_be, stride_bn, stride_br, offs_n, n_mask, R,
            BLOCK_R, DOT_PRECISION,
        )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + offs_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = acc * out_scale
    if HAS_ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
    out_rows = tl.load(out_rows_ptr + offs_m, mask=row_mask, other=0)
    out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_mm_swiglu_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr,  # (E, 2I, K): gate rows, then up rows
    l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br,  # L (S, r), B (E, 2I, r)
    p_ptr, stride_pm, stride_pn,  # a[a_rows] @ W^T computed already (S, 2I) in sorted rows, when PRODUCT_GIVEN
    h_ptr, stride_hm, stride_hn,  # (S, I) sorted rows
    gu_ptr, stride_gm, stride_gn,  # (S, 2I) sorted rows, written when STORE_GATE_UP
    bias_ptr, stride_bias_e,  # (E, 2I), when HAS_BIAS
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    I, K, R, alpha, limit,
    HAS_LORA: tl.constexpr, STORE_GATE_UP: tl.constexpr, HAS_BIAS: tl.constexpr, INTERLEAVED: tl.constexpr,
    CLAMPED: tl.constexpr, PRODUCT_GIVEN: tl.constexpr,
    NF4: tl.constexpr, TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(I, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M, 1)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    if PRODUCT_GIVEN:
        gate, up = _load_gate_up(p_ptr, stride_pm, stride_pn, offs_m[:, None].to(tl.int64), row_mask, offs_n, n_mask,
                                 n0, I, INTERLEAVED, BLOCK_M, BLOCK_N)
        gate, up = gate.to(tl.float32), up.to(tl.float32)
    else:
        a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
        gate, up = _tile_matmul_gate_up(a_ptr, stride_am, stride_ak, a_rows, row_mask, expert,
                                        w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr,
                                        offs_n, n_mask, n0, I, K,
                                        NF4, TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE,
                                        INTERLEAVED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    gate_cols, up_cols = _gate_up_rows(offs_n, I, INTERLEAVED)
    if HAS_LORA:
        b_e = b_ptr + expert.to(tl.int64) * stride_be
        gate = _tile_lora(gate, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
                          b_e, stride_bn, stride_br, gate_cols, n_mask, R, BLOCK_R, DOT_PRECISION)
        up = _tile_lora(up, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
                        b_e, stride_bn, stride_br, up_cols, n_mask, R, BLOCK_R, DOT_PRECISION)
    if HAS_BIAS:
        bias_e = bias_ptr + expert.to(tl.int64) * stride_bias_e
        gate += tl.load(bias_e + gate_cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(bias_e + up_cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Round gate/up to the storage dtype first, as eager does (its linear returns bf16): the backward
    # recomputes h from the stored gate/up and must see the same h the down GEMM consumed.
    gate = gate.to(h_ptr.dtype.element_ty)
    up = up.to(h_ptr.dtype.element_ty)
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    if STORE_GATE_UP:
        _store_gate_up(gu_ptr, stride_gm, stride_gn, rows64, row_mask, offs_n, n_mask, n0, I, gate, up, INTERLEAVED,
                       BLOCK_M, BLOCK_N)
    h = _glu(gate.to(tl.float32), up.to(tl.float32), alpha, limit, CLAMPED)
    tl.store(h_ptr + rows64 * stride_hm + offs_n[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_mm_swiglu_bwd_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,  # d(out) (T, H), gathered by token
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr,  # W_down (E, H, I), read as (E, I, H)
    l_ptr, stride_lm, stride_lr, b_ptr, stride_be, stride_bn, stride_br,  # s * d(out) B_down (S, r), A_down (E, I, r)
    p_ptr, stride_pm, stride_pn,  # d(out)[a_rows] @ W_down computed already (S, I), when PRODUCT_GIVEN
    gu_ptr, stride_gm, stride_gn,  # stored (gate | up) (S, 2I)
    row_scale_ptr,  # routing weight of each sorted row (S,) fp32
    dgu_ptr, stride_dm, stride_dn,  # out: d(gate | up) (S, 2I)
    h_ptr, stride_hm, stride_hn,  # out: recomputed h (S, I), for the down projection's weight gradients
    dscale_ptr,  # out: (num N blocks, S) fp32 partial sums of <d(y), y> per row
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    S, I, K, R, alpha, limit,
    HAS_LORA: tl.constexpr, INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr, PRODUCT_GIVEN: tl.constexpr,
    NF4: tl.constexpr, TRANSPOSED: tl.constexpr, ROWS_ALIGNED: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    WHOLE_TILES: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(I, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M, 1)
    if expert < 0:
        return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    # Unweighted d(h): y = h @ W^T + ..., out += w * y  =>  d(h) = w * (d(out) @ W + ...), d(w) = <d(out) @ W, h>
    dh = _base_tile(p_ptr, stride_pm, stride_pn, a_ptr, stride_am, stride_ak, a_rows_ptr, offs_m, row_mask, expert,
                    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr, offs_n, n_mask, n0, I, K,
                    PRODUCT_GIVEN, NF4, TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE, WHOLE_TILES, W_DTYPE, BLOCK_M,
                    BLOCK_N, BLOCK_K, DOT_PRECISION)
    if HAS_LORA:
        dh = _tile_lora(dh, l_ptr, stride_lm, stride_lr, offs_m, row_mask,
                        b_ptr + expert.to(tl.int64) * stride_be, stride_bn, stride_br, offs_n, n_mask, R,
                        BLOCK_R, DOT_PRECISION)
    # Recompute h from the stored (gate | up) and store it, the partial <d(h), h> per row (the routing weight's
    # gradient), and d(gate | up).
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    gate, up = _load_gate_up(gu_ptr, stride_gm, stride_gn, rows64, row_mask, offs_n, n_mask, n0, I, INTERLEAVED,
                             BLOCK_M, BLOCK_N)
    # d(gate) and d(up) are linear in d(h): the routing weight scales them afterwards.
    dgate, dup, h = _glu_backward(dh, gate.to(tl.float32), up.to(tl.float32), alpha, limit, CLAMPED)
    h = h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows64 * stride_hm + offs_n[None, :] * stride_hn, h, mask=mask)
    tl.store(dscale_ptr + pid_n.to(tl.int64) * S + offs_m, tl.sum(dh * h.to(tl.float32), axis=1), mask=row_mask)
    row_scale = tl.load(row_scale_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
    dgate, dup = dgate * row_scale, dup * row_scale
    _store_gate_up(dgu_ptr, stride_dm, stride_dn, rows64, row_mask, offs_n, n_mask, n0, I,
                   dgate.to(dgu_ptr.dtype.element_ty), dup.to(dgu_ptr.dtype.element_ty), INTERLEAVED, BLOCK_M, BLOCK_N)


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


@triton.jit
def _grouped_mm_lora_in_tile_kernel(
    a_ptr, stride_am, stride_ak, a_rows_ptr,
    w_ptr, stride_we, stride_wn, stride_wk,  # (E, N, K), or (E, 2N, K) as [gate; up] with SWIGLU
    la_ptr, stride_lae, stride_lar, stride_lak,  # LoRA A (E, r, K)
    b_ptr, stride_be, stride_bn, stride_br,  # LoRA B (E, N, r), or (E, 2N, r)
    out_ptr, stride_om, stride_on, out_rows_ptr,
    row_scale_ptr,
    tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
    N, K, R, lora_scale,
    SWIGLU: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """16-bit weights with LoRA, the thin product L = lora_scale * a A_e^T computed in the same pass over K as the
    base product (decoding: it would otherwise be a launch of its own, as long as the GEMM at a handful of rows):
    out[out_rows[s]] = row_scale[s] * (a[a_rows[s]] @ W_e^T + L[s] @ B_e^T), or with SWIGLU silu(gate) * up of the
    gate and up halves. L is rounded to a's dtype before its product with B, as the separate launch stores it."""
    pid_m, pid_n = _tile_ids(N, BLOCK_N)
    expert, offs_m, row_mask = _tile_rows(pid_m, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, BLOCK_M, 1)
    if expert < 0:
        return
    e64 = expert.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask, r_mask = offs_n < N, offs_r < R
    a_rows = tl.load(a_rows_ptr + offs_m, mask=row_mask, other=0)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + e64 * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    la_ptrs = la_ptr + e64 * stride_lae + offs_k[:, None] * stride_lak + offs_r[None, :] * stride_lar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            up = tl.dot(a, tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0), up, input_precision=DOT_PRECISION)
        la = tl.load(la_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        xa = tl.dot(a, la, xa, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        la_ptrs += BLOCK_K * stride_lak
    lo = (xa * lora_scale).to(a_ptr.dtype.element_ty)
    b_ptrs = b_ptr + e64 * stride_be + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    b_mask = r_mask[:, None] & n_mask[None, :]
    acc = tl.dot(lo, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=DOT_PRECISION)
    if SWIGLU:
        up = tl.dot(lo, tl.load(b_ptrs + N * stride_bn, mask=b_mask, other=0.0), up, input_precision=DOT_PRECISION)
        # gate and up rounded to the storage dtype first, as _grouped_mm_swiglu_kernel does.
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up.to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
    out_rows = tl.load(out_rows_ptr + offs_m, mask=row_mask, other=0)
    out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


# (token, slot) pairs up to which the row GEMMs take their decoding configuration: a handful of rows per expert,
# so 16-row tiles (tl.dot's minimum) and narrower column blocks, more programs streaming the touched experts' weights.
DECODE_PAIRS = 512


def gemm_block_m(device: torch.device, num_pairs: int, num_experts: int) -> int:
    """Rows per tile of the sorted-row GEMMs; ExpertSchedule tiles must be built with it."""
    if device.type != "cuda" or num_pairs <= DECODE_PAIRS:
        # Decoding: a handful of rows per expert. The interpreter runs programs one by one in Python: small tiles
        # keep odd-shape tests exercising several tiles per expert while staying fast.
        return 16
    # 128-row tiles run ~35% faster than 64 on H100 (bf16, H=2048), but a tile never spans two experts:
    # below ~128 rows per expert the padding of the last tile would cost more than the larger tile saves.
    return 128 if num_pairs >= 128 * num_experts else 64


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently go through TF32 on Ampere+: tests hold fp32 to 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, next_power_of_2(max(size, 1))))


# (BLOCK_N cap, BLOCK_K cap, launch options) per kernel family. Measured at 4096 tokens of Trinity-Mini,
# LFM2-8B-A1B, JetMoe-8B, Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b experts on an H200 (bf16, LoRA r=16,
# benchmarks/sweep_expert_configs.py, 2026-12-03); the choice is the best or within 5% of it at every shape
# unless said otherwise:
# * row GEMMs reading W (the down projection): 128x128x64 tiles, 8 warps, 3 stages, 339-497 TFLOP/s;
# * row GEMMs reading W^T (d(x) through gate_up): 256 columns, 5-23% faster than 128 (419-604 TFLOP/s); a second
#   sweep over three of the shapes found 4 stages 1-9% faster than 3 (Trinity-Mini, LFM2, Mixtral), untried elsewhere;
# * the SwiGLU forward (its BLOCK_N counts h's columns: the weight tile has twice as many rows, gate and up):
#   128 + 128 columns, 8 warps, 4 stages, 4-29% faster than 64 + 64 with 3 stages (376-459 TFLOP/s);
# * the SwiGLU backward, whose epilogue holds d(h), gate, up and their gradients: 64 columns, 4 warps, 4 stages,
#   16-28% faster than 128 columns with 8 warps (184-262 TFLOP/s, bound by the epilogue). ptxas spills 1.5 KB a
#   thread at this configuration (Nsight Compute: 6.9M local-memory requests in Trinity-Mini's block), and 64 columns
#   with 8 warps do not spill (217 registers), yet they ran 0-22% slower (H100, 2026-12-06: Trinity-Mini 0.788 /
#   0.789 ms, LFM2-8B-A1B 0.608 / 0.643, JetMoe-8B 0.922 / 0.962, Qwen3-30B-A3B 0.626 / 0.614, gpt-oss-20b 1.134 /
#   1.380), as did 32 columns with 4 warps: the spills are not what bounds it;
# * the weight-gradient reduction (128x128 output, 32-row steps): 4 warps, 4 stages, the best or within 3% of it for
#   LoRA's factor gradients;
# LoRA's rank-16 row products took 0.05-0.08 ms under every configuration tried: latency, not tiles, bounds them.
_GPU_ROW_GEMM = (128, 64, {"num_warps": 8, "num_stages": 3})
_GPU_ROW_GEMM_TRANSPOSED = (256, 64, {"num_warps": 8, "num_stages": 3})
_GPU_SWIGLU = (128, 64, {"num_warps": 8, "num_stages": 4})
_GPU_SWIGLU_BWD = (64, 64, {"num_warps": 4, "num_stages": 4})
_GPU_WGRAD = (128, 128, {"num_warps": 4, "num_stages": 4})
# The NF4 row GEMMs have their own entries because their budget differs: each K step decodes a weight tile in
# registers and stores it to shared memory for the wgmma, whose wait leaves the decode of one program to overlap
# the tensor cores of another. Measured on H100s (bench_nf4_experts.py --nf4-configs, 2026-11-23, PTX decode), on
# the Trinity-Mini expert GEMMs: 4 warps 250-300 TFLOP/s in two runs, 8 warps 266-295 in one and 200-269 in the
# other; BLOCK_K 128 or BLOCK_N 64 were slower.
_GPU_NF4_ROW_GEMM = (128, 64, {"num_warps": 4, "num_stages": 3})
_GPU_NF4_SWIGLU = (64, 64, {"num_warps": 4, "num_stages": 3})
# The NF4 SwiGLU backward holds a (128 rows, BLOCK_N) d(h) tile and then the stored gate and up tiles of the same
# size for its epilogue: at BLOCK_N 128 and 4 warps that spills 5.7 KB a thread (ptxas, sm_90) and ran at 65
# TFLOP/s; half the N block runs at 151, as fast as the bf16 kernel (158), and 8 warps at 135.
_GPU_NF4_SWIGLU_BWD = (64, 64, {"num_warps": 4, "num_stages": 3})
# Decoding (at most DECODE_PAIRS rows, 16-row tiles): the best or within 1% of it for 1, 8 and 64 tokens of top-8
# over Trinity-Mini's 128 experts with LoRA (benchmarks/bench_decode_ops.py, H200): 59 / 186 / 476 us, 1.7-3.5 TB/s
# of the touched experts' weights, against 72 / 208 / 493 us with the training tiles' 128-wide columns.
_GPU_DECODE_ROW_GEMM = (64, 128, {"num_warps": 4, "num_stages": 3})
# NF4 decoding (the SwiGLU forward and the down GEMM): 32 columns (more programs over the few touched experts), 4
# stages. One token of top-8 over Trinity-Mini's 128 NF4 experts with LoRA (double-quantized absmax, H200,
# bench_decode_ops.py moe-nf4): 67.1 us for the expert block against 74.5 with the training tiles; 8 tokens 256.7 vs
# 260.4. 16 columns, 256-wide K steps and 8 warps were slower.
_GPU_NF4_DECODE_ROW_GEMM = (32, 128, {"num_warps": 4, "num_stages": 4})
# The kernels as epilogues of a base product computed before them (expert_product): no K loop, so BLOCK_K is unread
# and one stage; each program reads its product tile (two for SwiGLU), adds LoRA's rank-r product and stores.
_GPU_EPILOGUE = (64, 64, {"num_warps": 4, "num_stages": 1})
# The SwiGLU backward's epilogue (d(h)'s product in, d(gate_up), h and the routing weight's gradient out) with 8 warps:
# on an H100 at 4,096 tokens (sweep_expert_configs.py --kernels epilogue) 0.343 against 0.633 ms at JetMoe-8B's
# experts, 0.536 against 0.823 at gpt-oss-20b's, 0.242 against 0.429 at LFM2-8B-A1B's; the other epilogues gained
# nothing from 8 warps (the SwiGLU forward's lost 3%) or wider tiles.
_GPU_SWIGLU_BWD_EPILOGUE = (64, 64, {"num_warps": 8, "num_stages": 1})
# Thin products (LoRA's x A^T: at most THIN_PRODUCT_COLUMNS columns) in parts of THIN_PRODUCT_ROWS rows of a tile
# (_thin_row_split): 128-wide K steps, 4 warps for a (32, 16) output tile. JetMoe-8B's experts block at 4,096 tokens
# (H100, forward + backward, GPU kernel time; the epilogues share the kernel's name): _grouped_mm_kernel 0.533 ms
# with whole 128-row tiles, 0.428 in 32-row parts (the block 3.27 -> 3.19 ms). One configuration tried.
THIN_PRODUCT_COLUMNS = 32
THIN_PRODUCT_ROWS = 32
_GPU_THIN = (32, 128, {"num_warps": 4, "num_stages": 3})
_INTERPRETER = (32, 32, {})
_INTERPRETER_SWIGLU = (16, 32, {})


def _config(device: torch.device, kernel: str = "row_gemm", nf4: bool = False,
            pairs: int | None = None) -> tuple[int, int, dict]:
    """(BLOCK_N cap, BLOCK_K cap, launch options) of kernel: "row_gemm", "row_gemm_transposed", "swiglu",
    "swiglu_backward", "wgrad", or "epilogue" / "swiglu_epilogue" / "swiglu_backward_epilogue" (any of the first four
    given its product)."""
    if device.type != "cuda":
        return _INTERPRETER_SWIGLU if kernel in ("swiglu", "swiglu_epilogue") else _INTERPRETER
    if kernel == "thin":
        return _GPU_THIN
    if kernel in ("epilogue", "swiglu_epilogue"):
        return _GPU_EPILOGUE
    if kernel == "swiglu_backward_epilogue":
        return _GPU_SWIGLU_BWD_EPILOGUE
    decoding = pairs is not None and pairs <= DECODE_PAIRS
    if decoding and kernel in ("row_gemm", "swiglu") and nf4:
        return _GPU_NF4_DECODE_ROW_GEMM
    if decoding and kernel in ("row_gemm", "row_gemm_transposed", "swiglu") and not nf4:
        cap_n, cap_k, options = _GPU_DECODE_ROW_GEMM
        return (cap_n // 2 if kernel == "swiglu" else cap_n), cap_k, options
    if kernel == "wgrad":
        return _GPU_WGRAD
    if nf4:
        return {"swiglu": _GPU_NF4_SWIGLU, "swiglu_backward": _GPU_NF4_SWIGLU_BWD}.get(kernel, _GPU_NF4_ROW_GEMM)
    return {"row_gemm": _GPU_ROW_GEMM, "row_gemm_transposed": _GPU_ROW_GEMM_TRANSPOSED, "swiglu": _GPU_SWIGLU,
            "swiglu_backward": _GPU_SWIGLU_BWD}[kernel]


@dataclass
class _WeightOperand:
    """A weight stack as the row-GEMM kernels take it, read as (E, n, k) (W, or W^T when transposed)."""

    args: tuple  # w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_ae, code_ptr
    layout: dict  # the kernels' NF4, TRANSPOSED, ROWS_ALIGNED, REGISTER_DECODE and W_DTYPE constexprs
    n: int
    k: int


def _weight_operand(weight: GemmWeight, transpose: bool, compute_dtype: torch.dtype,
                    schedule: ExpertSchedule, product_given: bool = False) -> _WeightOperand:
    """weight (E, N, K) read as W or, when transpose, as W^T (E, K, N), by a GEMM in compute_dtype over schedule's
    tiles (product_given: by an epilogue of its base product, which reads no weight tile)."""
    if isinstance(weight, TransposedNf4Weight):
        weight, transpose = weight.stored, not transpose
    if isinstance(weight, torch.Tensor):
        w = weight.transpose(1, 2) if transpose else weight
        layout = {"NF4": False, "TRANSPOSED": False, "ROWS_ALIGNED": False, "REGISTER_DECODE": False, "W_DTYPE": None}
        return _WeightOperand((w, w.stride(0), w.stride(1), w.stride(2), None, None, None), layout, w.shape[1],
                              w.shape[2])
    if any(t.stride(-1) != 1 for t in weight.tensors()):
        raise ValueError("NF4 packed codes and absmax (and its double quantization) must be contiguous per expert")
    # Double-quantized absmax is decoded here (see the note above nf4.dequantize_nf4_tile): for the whole stack, or at
    # decoding sizes for the experts the tiles hold (the GEMM reads no other expert's).
    _, n, k = weight.shape
    absmax = weight.absmax if product_given else absmax_fp32(
        weight, schedule.tile_expert if schedule.num_pairs <= DECODE_PAIRS else None)
    args = (weight.packed, weight.packed.stride(0), None, None, absmax, absmax.stride(0), nf4_code(weight.device))
    layout = {"NF4": True, "TRANSPOSED": transpose, **nf4_tile_layout(weight, compute_dtype)}
    return _WeightOperand(args, layout, (k if transpose else n), (n if transpose else k))


def _lora_args(lora_l: torch.Tensor | None, lora_b: torch.Tensor | None) -> tuple:
    """L (S, r) and B (E, N, r) of the LoRA up-projection with their strides, or Nones without LoRA."""
    if lora_l is None:
        return (None,) * 7
    return (lora_l, lora_l.stride(0), lora_l.stride(-1), lora_b, lora_b.stride(0), lora_b.stride(1), lora_b.stride(-1))


def _rank(lora_l: torch.Tensor | None) -> int:
    return lora_l.shape[1] if lora_l is not None else 0


def _launch_row_gemm(
    kernel, a: torch.Tensor, a_rows: torch.Tensor, weight: _WeightOperand,
    lora_l: torch.Tensor | None, lora_b: torch.Tensor | None, product: torch.Tensor | None, outputs: tuple,
    schedule: ExpertSchedule, sizes: tuple, num_n: int, block_n: int, block_k: int, tile_rows: int, options: dict,
    **flags,
) -> None:
    """Launch a row-GEMM kernel over num_n output columns: its arguments are the rows of a, the weight, the LoRA
    factors, the base product when it was computed already (the kernel is then its epilogue: see base_product),
    the kernel's own tensors (outputs), the schedule's tiles and its sizes, then the constexprs. tile_rows: the weight
    rows (as read) a program multiplies each K step (BLOCK_N, or 2 x BLOCK_N for gate and up). A ROW_SPLIT flag
    (_grouped_mm_kernel's) runs that many programs per schedule tile, each on block_m / ROW_SPLIT of its rows."""
    row_split = flags.get("ROW_SPLIT", 1)
    product_args = (product, product.stride(0), product.stride(1)) if product is not None else (None,) * 3
    layout = weight.layout
    whole_tiles = False
    if layout["NF4"]:
        stored_tile = (block_k, tile_rows) if layout["TRANSPOSED"] else (tile_rows, block_k)
        fits = register_decode_fits(*stored_tile, num_warps=options.get("num_warps", 4))
        layout = {**layout, "REGISTER_DECODE": layout["REGISTER_DECODE"] and fits}
        whole_tiles = weight.k % block_k == 0 and (not layout["TRANSPOSED"] or weight.n % tile_rows == 0)
    # 16-bit tiles keep their K and column masks: dropping them paid off in the NF4 loop, bound by instruction issue.
    compiled = kernel[(schedule.max_tiles * row_split * cdiv(num_n, block_n),)](
        a, a.stride(0), a.stride(1), a_rows, *weight.args, *_lora_args(lora_l, lora_b), *product_args, *outputs,
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        *sizes,
        HAS_LORA=lora_l is not None, PRODUCT_GIVEN=product is not None, **flags, **layout, WHOLE_TILES=whole_tiles,
        BLOCK_M=schedule.block_m // row_split, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(_rank(lora_l), 1 << 30),
        DOT_PRECISION=_dot_precision(a.dtype),
        **options,
    )
    if layout["REGISTER_DECODE"]:
        check_register_decode_layout(compiled)


def grouped_mm(
    a: torch.Tensor, a_rows: torch.Tensor, weight: GemmWeight, schedule: ExpertSchedule,
    out: torch.Tensor, out_rows: torch.Tensor,
    lora_l: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None, out_scale: float = 1.0, transpose: bool = False,
    bias: torch.Tensor | None = None, product: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[out_rows[s]] = row_scale[s] * out_scale * (a[a_rows[s]] @ W[e_s]^T + lora_l[s] @ lora_b[e_s]^T
    + bias[e_s]), with W the weight or, when transpose, its transpose.

    a: (rows_a, K); a_rows, out_rows: (S,) int32; weight: (E, N, K) (transpose: (E, K, N)), 16-bit with any strides
    or an Nf4Weight; out: (rows_out, N); lora_l: (S, r) in sorted order; lora_b: (E, N, r); row_scale: (S,) float32;
    bias: (E, N), unit stride along N. Rows of out not named by out_rows are left untouched. product: a[a_rows] @ W^T
    (S, N) in sorted rows, computed already (base_product): the kernel then only adds the rest.
    """
    operand = _weight_operand(weight, transpose, a.dtype, schedule, product is not None)
    row_split = _thin_row_split(operand, product, schedule)
    kernel = ("thin" if row_split > 1 else "epilogue" if product is not None
              else "row_gemm_transposed" if transpose else "row_gemm")
    cap_n, cap_k, options = _config(a.device, kernel, nf4=operand.layout["NF4"], pairs=schedule.num_pairs)
    block_n, block_k = _block(operand.n, cap_n), _block(operand.k, cap_k)
    _launch_row_gemm(
        _grouped_mm_kernel, a, a_rows, operand, lora_l, lora_b, product,
        (out, out.stride(0), out.stride(1), out_rows, row_scale, *_bias_args(bias)),
        schedule, (operand.n, operand.k, _rank(lora_l), out_scale), operand.n, block_n, block_k, block_n, options,
        HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None, ROW_SPLIT=row_split,
    )
    return out


def _thin_row_split(operand: _WeightOperand, product: torch.Tensor | None, schedule: ExpertSchedule) -> int:
    """Into how many parts each schedule tile's rows go for a thin product (LoRA's x A^T, rank columns): one program
    per (tile, part). Such a product reads every row's K elements for a few columns, so its time is the read's
    latency spread over the programs that run: a training schedule of few experts has few tiles (JetMoe-8B and
    Mixtral at 4,096 tokens: 64-72 tiles of 128 rows for 132 SMs), and parts of THIN_PRODUCT_ROWS rows put several
    programs on every SM."""
    if product is not None or operand.layout["NF4"] or operand.n > THIN_PRODUCT_COLUMNS:
        return 1
    return max(1, schedule.block_m // THIN_PRODUCT_ROWS)


def _bias_args(bias: torch.Tensor | None) -> tuple:
    """An (E, N) expert bias and its expert stride, or Nones without one."""
    if bias is None:
        return None, None
    if bias.stride(-1) != 1:
        raise ValueError("expert biases must have unit stride along their features")
    return bias, bias.stride(0)


def _glu_args(activation: ClampedSwiglu | None) -> tuple[float, float]:
    """The SwiGLU kernels' alpha and limit (unread without CLAMPED)."""
    return (float(activation.alpha), float(activation.limit)) if activation is not None else (1.0, 0.0)


def grouped_mm_swiglu(
    a: torch.Tensor, a_rows: torch.Tensor, gate_up: GemmWeight, schedule: ExpertSchedule,
    lora_l: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, store_gate_up: bool = False,
    bias: torch.Tensor | None = None, interleaved: bool = False, activation: ClampedSwiglu | None = None,
    product: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h = silu(gate) * up (or `activation`) with (gate, up) the columns of
    a[a_rows[s]] @ gate_up[e_s]^T (+ lora_l[s] @ lora_b[e_s]^T) (+ bias[e_s]).

    a: (rows_a, H); gate_up: (E, 2I, H), 16-bit (any strides), Nf4Weight or (interleaved only) TransposedNf4Weight,
    its rows [gate; up] or, interleaved, gate and up alternating (gate row n at 2n, up at 2n + 1; lora_b's rows and
    the bias's entries alike);
    lora_l: (S, r); lora_b: (E, 2I, r); bias: (E, 2I).
    Returns h (S, I) in sorted order and, if store_gate_up, the pre-activation (S, 2I) in gate_up's row order, both
    in a's dtype. product: a[a_rows] @ gate_up^T (S, 2I) in sorted rows, computed already (base_product); it becomes
    the stored pre-activation (each tile is read before it is written).
    """
    operand = _weight_operand(gate_up, False, a.dtype, schedule, product is not None)
    num_rows, inter, hidden = schedule.num_pairs, operand.n // 2, operand.k
    h = torch.empty(num_rows, inter, dtype=a.dtype, device=a.device)
    if not store_gate_up:
        gu = h
    elif product is not None:
        gu = product
    else:
        gu = torch.empty(num_rows, 2 * inter, dtype=a.dtype, device=a.device)
    kernel = "swiglu_epilogue" if product is not None else "swiglu"
    cap_n, cap_k, options = _config(a.device, kernel, nf4=operand.layout["NF4"], pairs=num_rows)
    block_n, block_k = _block(inter, cap_n), _block(hidden, cap_k)
    _launch_row_gemm(
        _grouped_mm_swiglu_kernel, a, a_rows, operand, lora_l, lora_b, product,
        (h, h.stride(0), h.stride(1), gu, gu.stride(0), gu.stride(1), *_bias_args(bias)),
        schedule, (inter, hidden, _rank(lora_l), *_glu_args(activation)),
        inter, block_n, block_k, 2 * block_n, options, STORE_GATE_UP=store_gate_up, HAS_BIAS=bias is not None,
        INTERLEAVED=interleaved, CLAMPED=activation is not None,
    )
    return h, (gu if store_gate_up else None)


def grouped_mm_lora_in_tile(
    a: torch.Tensor, a_rows: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    lora_scale: float, schedule: ExpertSchedule, out: torch.Tensor, out_rows: torch.Tensor,
    row_scale: torch.Tensor | None = None, swiglu: bool = False,
) -> torch.Tensor:
    """grouped_mm (or, with swiglu, grouped_mm_swiglu's h) with LoRA, for rows nothing differentiates: the thin
    product scaling * a A_e^T is computed inside each tile instead of by a launch of its own (at a decode step's
    handful of rows that launch costs as much as the GEMM it feeds).

    a: (rows_a, K); weight: (E, N, K) 16-bit, or (E, 2N, K) as [gate; up] with swiglu; lora_a: (E, r, K);
    lora_b: (E, N, r) or (E, 2N, r); out: (rows_out, N) written at out_rows; row_scale: (S,) fp32.
    """
    n = weight.shape[1] // 2 if swiglu else weight.shape[1]
    k, rank = weight.shape[2], lora_a.shape[1]
    cap_n, cap_k, options = _config(a.device, pairs=schedule.num_pairs)
    # With SwiGLU two accumulators (gate and up) per program: half the N block keeps the register budget of one.
    block_n, block_k = _block(n, cap_n // 2 if swiglu else cap_n), _block(k, cap_k)
    _grouped_mm_lora_in_tile_kernel[(schedule.max_tiles * cdiv(n, block_n),)](
        a, a.stride(0), a.stride(1), a_rows,
        weight, weight.stride(0), weight.stride(1), weight.stride(2),
        lora_a, lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b, lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        out, out.stride(0), out.stride(1), out_rows, row_scale,
        schedule.tile_expert, schedule.tile_row_start, schedule.expert_offsets,
        n, k, rank, float(lora_scale),
        SWIGLU=swiglu, HAS_ROW_SCALE=row_scale is not None,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block(rank, 1 << 30),
        DOT_PRECISION=_dot_precision(a.dtype), **options,
    )
    return out


def grouped_mm_swiglu_backward(
    grad_out: torch.Tensor, grad_rows: torch.Tensor, down: GemmWeight,
    gate_up: torch.Tensor, row_scale: torch.Tensor, schedule: ExpertSchedule,
    lora_l: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
    interleaved: bool = False, activation: ClampedSwiglu | None = None, product: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward through the weighted down projection and SwiGLU (or `activation`).

    grad_out: (T, H) gathered by grad_rows (S,); down: W_down (E, H, I), 16-bit or Nf4Weight, read transposed;
    gate_up: stored pre-activation (S, 2I), [gate | up] or interleaved (as grouped_mm_swiglu stored it);
    row_scale: (S,) fp32 routing weights; lora_l: scaling * grad_out[rows] @ B_down (S, r); lora_b: A_down viewed as
    (E, I, r). Returns d(pre-activation) (S, 2I) in gate_up's column order, h (S, I) and the part of the
    routing-weight gradient that excludes a down bias, <d(out), h W_down^T + LoRA> (S,) fp32, all in sorted order.
    product: grad_out[grad_rows] @ W_down (S, I) in sorted rows, computed already (base_product); h is written over
    it (each tile is read before it is written).
    """
    operand = _weight_operand(down, True, grad_out.dtype, schedule, product is not None)
    num_rows, inter, hidden = schedule.num_pairs, operand.n, operand.k
    dgu = torch.empty(num_rows, 2 * inter, dtype=gate_up.dtype, device=gate_up.device)
    h = product if product is not None else torch.empty(num_rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    kernel = "swiglu_backward_epilogue" if product is not None else "swiglu_backward"
    cap_n, cap_k, options = _config(gate_up.device, kernel, nf4=operand.layout["NF4"])
    block_n, block_k = _block(inter, cap_n), _block(hidden, cap_k)
    # One partial per N block instead of atomics: deterministic, summed below.
    dscale = torch.zeros(cdiv(inter, block_n), num_rows, dtype=torch.float32, device=gate_up.device)
    _launch_row_gemm(
        _grouped_mm_swiglu_bwd_kernel, grad_out, grad_rows, operand, lora_l, lora_b, product,
        (gate_up, gate_up.stride(0), gate_up.stride(1), row_scale, dgu, dgu.stride(0), dgu.stride(1),
         h, h.stride(0), h.stride(1), dscale),
        schedule, (num_rows, inter, hidden, _rank(lora_l), *_glu_args(activation)),
        inter, block_n, block_k, block_n, options, INTERLEAVED=interleaved, CLAMPED=activation is not None,
    )
    return dgu, h, dscale.sum(0)


# ----------------------------------------------------------------------------------------------------------
# Base products by torch's grouped GEMM
# ----------------------------------------------------------------------------------------------------------
# Where each expert's product is large, torch's grouped GEMM (CUTLASS kernels on Hopper) runs the base product faster
# than these kernels' K loop (Mixtral-8x7B's gate_up at 4,096 tokens: 742 against 355 TFLOP/s on an H100,
# bench_moe_block.py, 2026-12-05), and the kernels become its epilogue: the product (S, N) is written once and read
# once by a kernel that adds LoRA, the bias, the routing weight and the SwiGLU (forward or backward) and scatters the
# rows. That costs a gathered copy of the input rows and one pass over (S, N) in HBM, in proportion to S (N + K),
# while torch's GEMM gains in proportion to S N K: the gain outweighs the passes where the reduction is long (K) and
# each expert has rows enough for CUTLASS's tiles. "auto" takes it on Hopper GPUs for products of
# MACS_PER_EXPERT_FOR_TORCH_PRODUCTS multiply-adds per expert (mean rows per expert x the expert weight's elements)
# or more whose weight is at least MIN_SIDE_FOR_TORCH_PRODUCTS on both sides (either side is K in one direction).
# Measured as what the training step pays, the block's GPU kernel time (its layers replay as CUDA graphs, so host
# launch time does not count; bench_moe_block.py's fwd_bwd_kernel_ms, forward + backward, LoRA r=16, H100,
# 2026-12-06), torch's products for both weights against none: Mixtral-8x7B 31% / 36% less at 4,096 / 16,384
# tokens, JetMoe-8B 12% / 16% less, LFM2-8B-A1B 5% / 9%, Trinity-Mini 3% / 3%, and Qwen3-30B-A3B (K = 768 for its down
# projection, 8e8 multiply-adds per expert for gate_up at 4,096 tokens) 1% more / 1-2% more. In bench_sft.py's
# step (H100, the same day) all of them on torch's products took JetMoe-8B's 24 layers from 227 to 214 ms of GPU time
# per step and LFM2-8B-A1B's from 121 to 118; Trinity-Mini and Qwen3-30B-A3B at 8 layers within 1%.
MACS_PER_EXPERT_FOR_TORCH_PRODUCTS = 10**9
MIN_SIDE_FOR_TORCH_PRODUCTS = 1024
# An NF4 stack (load_in_4bit) takes torch's products by being dequantized whole first (nf4.dequantize_nf4, one pass
# at HBM speed, the 16-bit copy freed after the product). That costs in proportion to the stack's elements (the copy
# written, then read by the GEMM in place of the 4-bit codes: some 4 bytes an element, ~1.2 ps on an H100), while the
# products gain in proportion to the rows: fastmoe's NF4 kernels decode each weight tile in registers for every tile
# of rows, which held JetMoe-8B's 4-bit step's expert GEMMs at 185 ms against 135 for its bf16 ones (bench_sft.py's
# profiles, H200, 2026-12-03 and -06: some 275 against 375 TFLOP/s), 2 fs a row and element, so the copy breaks even
# at 600-700 rows per expert. "auto" dequantizes where the 16-bit rule above holds and each expert has
# ROWS_PER_EXPERT_FOR_DEQUANTIZED_PRODUCTS rows or more on average (JetMoe-8B's and Mixtral's 4,096-token steps),
# for stacks of at most DEQUANTIZED_STACK_MAX_BYTES in 16 bits (the copy lives only for its product, but it is memory
# a 4-bit run does not otherwise need: Mixtral-8x7B's gate_up is 1.9 GB).
ROWS_PER_EXPERT_FOR_DEQUANTIZED_PRODUCTS = 1024
DEQUANTIZED_STACK_MAX_BYTES = 2 << 30
# Process-wide, not thread-local: autograd runs a CUDA graph's backward (and a checkpointed layer's recomputed
# forward) on its own device thread, which must see the choice made around the forward.
_base_products_by = "auto"


@contextlib.contextmanager
def base_products(by: str):
    """Compute the expert GEMMs' base products with "triton" (inside fastmoe's kernels), "torch" (torch's grouped
    GEMM wherever it takes the weight's dtype, NF4 stacks dequantized first) or "auto" (the default: torch's on Hopper
    GPUs where products_by_torch's rule holds) inside this block, in every thread (autograd runs the backward in its
    own). For tests and benchmarks."""
    if by not in ("auto", "triton", "torch"):
        raise ValueError(f'base_products takes "auto", "triton" or "torch", got {by!r}')
    global _base_products_by
    previous, _base_products_by = _base_products_by, by
    try:
        yield
    finally:
        _base_products_by = previous


def products_by_torch(weight: GemmWeight, schedule: ExpertSchedule, a: torch.Tensor) -> bool:
    """Whether the base product of this expert weight ((E, N, K)) over a's rows comes from expert_product (an NF4
    stack dequantized first)."""
    by = _base_products_by
    if by == "triton" or isinstance(weight, TransposedNf4Weight):
        return False
    # torch's grouped GEMM takes 16-bit weights with rows of a multiple of 16 bytes; bf16 on the GPU (its Hopper
    # kernels), fp32 as well on the CPU (where tests check the epilogues under the interpreter).
    supported = a.dtype == torch.bfloat16 or (a.device.type == "cpu" and a.dtype == torch.float32)
    if not (supported and weight.dtype == a.dtype
            and all(size * a.element_size() % 16 == 0 for size in weight.shape[1:])):
        return False
    if by == "torch":
        return True
    if not (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9
            and products_large_enough_for_torch(weight.shape, schedule.num_pairs, schedule.num_experts)):
        return False
    return isinstance(weight, torch.Tensor) or dequantized_products_pay(weight.shape, schedule.num_pairs, a)


def products_large_enough_for_torch(shape: tuple[int, ...], num_rows: int, num_experts: int) -> bool:
    """Whether each expert's share of num_rows @ a weight of this shape ((E, N, K)) is large enough for torch's
    grouped GEMM to pay (see MACS_PER_EXPERT_FOR_TORCH_PRODUCTS)."""
    return (num_rows * shape[1] * shape[2] / num_experts >= MACS_PER_EXPERT_FOR_TORCH_PRODUCTS
            and min(shape[1:]) >= MIN_SIDE_FOR_TORCH_PRODUCTS)


def dequantized_products_pay(shape: tuple[int, int, int], num_rows: int, a: torch.Tensor) -> bool:
    """Whether an NF4 stack of this shape is worth dequantizing whole for torch's products over num_rows rows (see
    ROWS_PER_EXPERT_FOR_DEQUANTIZED_PRODUCTS), within DEQUANTIZED_STACK_MAX_BYTES."""
    num_experts, n, k = shape
    return (num_rows / num_experts >= ROWS_PER_EXPERT_FOR_DEQUANTIZED_PRODUCTS
            and num_experts * n * k * a.element_size() <= DEQUANTIZED_STACK_MAX_BYTES)


def expert_product(rows: torch.Tensor, weight: torch.Tensor, schedule: ExpertSchedule,
                   transpose: bool = False) -> torch.Tensor:
    """rows (S, K), sorted by expert as schedule sorts them, @ weight[e_s]^T ((E, N, K)), or @ weight[e_s] ((E, K, N))
    when transpose: (S, N) in rows' dtype, by torch's grouped GEMM."""
    return F.grouped_mm(rows, weight if transpose else weight.transpose(1, 2), offs=schedule.expert_offsets[1:])


def base_product(a: torch.Tensor, weight: GemmWeight, schedule: ExpertSchedule, a_rows: torch.Tensor | None = None,
                 transpose: bool = False) -> torch.Tensor | None:
    """The `product` argument of the row GEMMs above for a[a_rows] (a itself, already in sorted order, without
    a_rows) and weight read as W (W^T when transpose): expert_product of the gathered rows where products_by_torch
    takes it, else None (the kernel then runs its own loop over K). An NF4 stack is dequantized to a's dtype for it,
    the 16-bit copy freed once the product is computed."""
    if not products_by_torch(weight, schedule, a):
        return None
    dense = dequantize_nf4(weight, a.dtype) if isinstance(weight, Nf4Weight) else weight
    return expert_product(a if a_rows is None else a.index_select(0, a_rows), dense, schedule, transpose)


def grouped_wgrad(
    g: torch.Tensor, g_rows: torch.Tensor, x: torch.Tensor, x_rows: torch.Tensor, schedule: ExpertSchedule,
    out: torch.Tensor, row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[e] = sum over sorted rows s of expert e of row_scale[s] * g[g_rows[s]]^T x[x_rows[s]].

    g: (rows_g, N); x: (rows_x, K); g_rows, x_rows: (S,) int32; out: (E, N, K), any strides and dtype
    (accumulated in fp32). Experts without rows get zeros.
    """
    num_experts, num_n, num_k = out.shape
    cap_n, cap_k, options = _config(g.device, "wgrad")
    block_n, block_k = _block(num_n, cap_n), _block(num_k, cap_k)
    grid = (num_experts * cdiv(num_n, block_n) * cdiv(num_k, block_k),)
    _grouped_wgrad_kernel[grid](
        g, g.stride(0), g.stride(1), g_rows, x, x.stride(0), x.stride(1), x_rows,
        row_scale if row_scale is not None else g,
        out, out.stride(0), out.stride(1), out.stride(2),
        schedule.expert_offsets, num_n, num_k,
        HAS_ROW_SCALE=row_scale is not None,
        BLOCK_M=32 if g.device.type == "cuda" else 16, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(g.dtype),
        **options,
    )
    return out
