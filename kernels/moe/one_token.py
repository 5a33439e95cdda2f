"""The experts block of one token (batch-1 decoding) in two GEMV launches: 16-bit or NF4 experts, LoRA unmerged.

At one token the k selected experts are k different weights of one row each. The grouped GEMMs (``grouped_gemm``)
would run them as 16-row tiles, tl.dot's minimum: 15 rows of padding, every weight tile staged in shared memory for
the tensor cores (NF4 ones decoded first), and around them the launches of a sorted schedule, the gather of the
routing weights, the thin LoRA products and the sum over slots, each some microseconds at this size. Here the block
is two launches whose products run on the CUDA cores, each program multiplying the weight tile where it was loaded
or decoded (the GEMV form of ``lora_linear``'s few-rows kernel):

* ``_gate_up_kernel``, program (column block, slot, K split): the gate and up rows of the block of the slot's expert
  times x, and x A_gu^T over the same K steps; its partial, LoRA term included (linear in x A^T, so the splits' terms
  sum to the whole), goes to a float32 workspace. The last split of (slot, block) to arrive sums them in split order
  and stores h = silu(gate) * up, (k, I).
* ``_down_kernel``, program (column block, slot and K split): h_slot W_down^T and its LoRA term. Slots are split-K
  partials too: the last of a column block's k x splits programs sums each slot's splits in order, scales it by its
  routing weight and rounds it to the activations' dtype, then sums the slots in float32, as the grouped path sums
  its (token, slot) rows; the output (1, H) comes out of the launch whole.

NF4 experts are decoded in the programs, a double-quantized absmax too (``nf4.absmax_values``: the grouped path
decodes it to an fp32 copy first, one launch per weight). K is split as in the few-rows kernel (``split_k``). The
sums are those of the grouped path in another order: the routing weight, each projection and h rounded to the
activations' dtype where it rounds them; x A^T stays float32 (the grouped path rounds the thin product to the
activations' dtype before B).

The reference is ``experts.reference_moe_experts`` (``reference_moe_experts_nf4``): the same op at any size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grid import cdiv, next_power_of_2
from ..split_k import GEMV_BLOCK_K, arrival_counts, gemv_split, interpreter_split, last_to_arrive
from .nf4 import (
    Nf4Weight,
    absmax_fp32,
    absmax_per_byte,
    aligned_nf4_tile,
    check_register_decode_layout,
    dequantize_nf4_tile,
    dynamic_code,
    nf4_code,
    nf4_decode_halves,
    nf4_gemv_mma,
    nf4_tile_layout,
    register_decode_fits,
    triton_dtype,
)

# Output columns of a program on a GPU; gate_up's programs take this many gate and as many up rows.
_GPU_BLOCK_N = 64
# NF4 tiles decoded by the PTX byte-permute decode where the tile and GPU allow it (gemv_register_decode), else by
# the portable decode (a code lookup per weight). A switch for bench_decode_ops.py, which times both.
GEMV_REGISTER_DECODE = True
# K steps of a GEMV program's loop (these kernels' and lora_linear's few-rows GEMV form) in flight: with more than 1
# the compiler issues a step's weight, absmax and x loads that many steps ahead (cp.async through shared memory),
# which it does by itself only for loads that feed a tl.dot; with 1 each step loads its tile and then multiplies it.
# Measured on an H100 (bench_decode_ops.py one-token; bench_generate.py --gemv-loop-stages 1,3, graph replay): one
# token's bf16 experts block at Trinity-Mini's shapes 56.8 -> 44.6 us; the batch-1 bf16 decode step 1.51 -> 1.35 ms
# (Trinity-Mini, 8 layers) and 2.54 -> 2.09 ms (LFM2-8B-A1B); 4-bit 1.30 -> 1.26 and 1.97 -> 1.87 ms (LFM2's NF4
# gate/up GEMVs 24.1 -> 22.7 us a layer, down 14.8 -> 13.3); batch 8 (grouped GEMMs) unchanged. NF4 tiles, bound by
# their decode's instructions rather than by HBM, gain less.
GEMV_LOOP_STAGES = 3
# NF4 GEMV tiles of 64 rows through the register decode multiplied on the tensor cores (nf4.nf4_gemv_mma: 128-column
# K steps, the decoded bf16 pairs as mma.sync's A operand, x as B) instead of converted to fp32 and FMA'd: ptxas for
# sm_90 counts 307 instructions a K step of a lane's 64 weights against 584 (the one-token gate/up loop). Measured on
# an H100 (bench_generate.py --gemv-mma 0,1, 4-bit, batch 1, graph replay): LFM2-8B-A1B 24 layers 1.853 -> 1.817 ms,
# Trinity-Mini 8 layers 1.246 -> 1.213 ms. Only 2%: Nsight Compute (benchmarks/ncu_kernels.py decode) shows these
# kernels bound by the integer (ALU) pipe, which runs the decode's prmt, lop3 and shifts at half the issue rate (51% of
# its peak, 1.65 instructions a cycle an SM issued, DRAM at 21%), and the MMA removed FMA-pipe instructions. The MMA
# form also lets the decode look up unscaled values and scale each block's sum instead (see nf4_gemv_mma).
GEMV_MMA = True
# A double-quantized absmax (load_in_4bit's) decoded by the GEMV tiles in every K step (nf4.absmax_values: a gather
# from the 256-entry dynamic code that the step's decode then waits on) or, with GEMV_PREDECODED_ABSMAX, for the chosen
# experts first by one launch a weight (nf4.absmax_fp32; the tiles then read 4 bytes of absmax per 64 weights instead
# of 1). Bit-identical outputs. Measured on an H100 (bench_generate.py --gemv-predecoded-absmax 0,1, LFM2-8B-A1B 4-bit
# batch 1, graph replay): 1.780 -> 1.818 ms, the two launches a layer cost more than the gathers they save: off.
GEMV_PREDECODED_ABSMAX = False
# The down projection's LoRA x A^T (x = h, A (r, I)): computed by every column block's programs of _down_kernel over
# their K range again (32 times at a hidden size of 2048), or, with DOWN_XA_IN_GATE_UP, once by the programs that
# finish h (each its 64 columns of h times those columns of A, a partial the down programs sum). ptxas for sm_90 (NF4,
# MMA, double-quantized absmax): the down kernel 96 -> 64 registers a thread (its (r, BLOCK_K) float32 x A^T
# accumulator gone), gate_up unchanged at 128 (96 without LoRA). Measured on an H100 (bench_generate.py
# --down-xa-in-gate-up 0,1, LFM2-8B-A1B 4-bit batch 1, graph replay): 1.780 -> 1.782 ms, no gain: off.
DOWN_XA_IN_GATE_UP = False


@triton.jit
def _expert_weight(index_ptr, slot, w_ptr, stride_we, code_ptr, offset_ptr, NF4: tl.constexpr,
                   DOUBLE_QUANT: tl.constexpr):
    """(expert, its weight, absmax offset (double quantization), the NF4 code) of `slot`: expert index[slot] of a
    stack. The absmax pointers are moved by the kernels themselves: a 16-bit stack has none, and Triton (3.6) cannot
    return None from a @jit function."""
    expert = tl.load(index_ptr + slot).to(tl.int64)
    offset = 0.0
    if NF4:
        code = tl.load(code_ptr + tl.arange(0, 16))
        if DOUBLE_QUANT:
            offset = tl.load(offset_ptr + expert)
    else:
        code = tl.zeros((16,), dtype=tl.float32)  # unused: no absmax nor code
    return expert, w_ptr + expert * stride_we, offset, code


@triton.jit
def gemv_weight_tile(w_ptr, stride_wn, stride_wk, absmax_ptr, scale_ptr, offset, absmax_code_ptr, code, rows,
                     row_mask, k0, K, offs_k, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     ROWS_ALIGNED: tl.constexpr, WHOLE_K: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr):
    """(len(rows), BLOCK_K) float32: W[rows, k0 + offs_k] of one expert's W (N, K), in x's dtype: 16-bit through its
    strides (already in x's dtype), or NF4 (packed codes, absmax fp32 or double-quantized) by the portable decode
    (the register decode's tiles go through gemv_tile_sums' own forms)."""
    if NF4:
        w = dequantize_nf4_tile(w_ptr, absmax_ptr, code, rows, row_mask, k0, K, ROWS_ALIGNED, False, WHOLE_K,
                                offs_k.shape[0], W_DTYPE, X_DTYPE, absmax_code_ptr, scale_ptr, offset, DOUBLE_QUANT)
    else:
        w = tl.load(w_ptr + rows[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk,
                    mask=row_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
    return w.to(tl.float32)


@triton.jit
def gemv_x(x_ptr, k0, K, offs_k, HALVES: tl.constexpr, WHOLE_K: tl.constexpr, PAIRS: tl.constexpr = False):
    """x[k0 + offs_k] for gemv_tile_sums, loaded once for the weight tiles of a K step: with PAIRS (its MMA form) as
    the 16-bit values two to an int32 word, (pairs, pairs); with HALVES (NF4 tiles through the register decode) in
    float32 as the two halves of each run of 32 columns, the order in which that decode leaves the weights
    (nf4.nf4_decode_halves); else whole in float32, as (x, x)."""
    if PAIRS:  # K % 64 == 0 (NF4 rows on 64-weight blocks): whole words
        words = k0 // 2 + tl.arange(0, offs_k.shape[0] // 2)
        first = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + words, mask=words < K // 2, other=0)
        second = first
    elif HALVES:
        j = tl.arange(0, offs_k.shape[0] // 2)
        cols = k0 + (j // 16) * 32 + j % 16  # the first halves' columns; the second halves' are 16 further
        if WHOLE_K:
            first = tl.load(x_ptr + cols).to(tl.float32)
            second = tl.load(x_ptr + cols + 16).to(tl.float32)
        else:
            first = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            second = tl.load(x_ptr + cols + 16, mask=cols + 16 < K, other=0.0).to(tl.float32)
    else:
        first = tl.load(x_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0).to(tl.float32)
        second = first
    return first, second


@triton.jit
def gemv_tile_sums(w_ptr, stride_wn, stride_wk, absmax_ptr, scale_ptr, offset, absmax_code_ptr, code, row0, row_end,
                   k0, K, offs_k, x, ROWS: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   ROWS_ALIGNED: tl.constexpr, WHOLE_K: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
                   REGISTER_DECODE: tl.constexpr = False, MMA: tl.constexpr = False):
    """(ROWS,) float32: W[rows, k0 + offs_k] x[k0 + offs_k], rows = row0 + arange(ROWS) (those from row_end on read
    as 0), one K step of W x for one expert's W (N, K) (see gemv_weight_tile), x as gemv_x gives it (HALVES = NF4 and
    REGISTER_DECODE, PAIRS = MMA), each weight multiplied where it was loaded or decoded.

    NF4 tiles through the register decode are multiplied before their weights are put back in order, x read in that
    order: 16 contiguous values at a time, two 16-byte loads a thread, where x in the tile's order took one 2-byte
    load per weight a thread holds (the layout the reordering leaves). With MMA (64 rows, 128 columns, 4 warps) the
    tile's halves go through nf4.nf4_gemv_mma, the products on the tensor cores."""
    if NF4 and REGISTER_DECODE and MMA:
        HALF: tl.constexpr = ROWS // 2
        COLS: tl.constexpr = offs_k.shape[0]
        rows_lo = row0 + tl.arange(0, HALF)
        rows_hi = rows_lo + HALF
        packed_lo, absmax_lo = aligned_nf4_tile(w_ptr, absmax_ptr, rows_lo, rows_lo < row_end, k0, K, WHOLE_K, COLS,
                                                absmax_code_ptr, scale_ptr, offset, DOUBLE_QUANT)
        packed_hi, absmax_hi = aligned_nf4_tile(w_ptr, absmax_ptr, rows_hi, rows_hi < row_end, k0, K, WHOLE_K, COLS,
                                                absmax_code_ptr, scale_ptr, offset, DOUBLE_QUANT)
        lo, hi = nf4_gemv_mma(packed_lo, absmax_per_byte(absmax_lo, COLS), packed_hi, absmax_per_byte(absmax_hi, COLS),
                              x[0], X_DTYPE)
        sums = tl.reshape(tl.permute(tl.join(lo, hi), (1, 0)), (ROWS,))  # rows lo, then hi
    elif NF4 and REGISTER_DECODE:
        COLS: tl.constexpr = offs_k.shape[0]
        rows = row0 + tl.arange(0, ROWS)
        packed, absmax = aligned_nf4_tile(w_ptr, absmax_ptr, rows, rows < row_end, k0, K, WHOLE_K, COLS,
                                          absmax_code_ptr, scale_ptr, offset, DOUBLE_QUANT)
        first, second = nf4_decode_halves(packed, absmax_per_byte(absmax, COLS), X_DTYPE)
        sums = (tl.sum(first.to(tl.float32) * x[0][None, :], axis=1)
                + tl.sum(second.to(tl.float32) * x[1][None, :], axis=1))
    else:
        rows = row0 + tl.arange(0, ROWS)
        w = gemv_weight_tile(w_ptr, stride_wn, stride_wk, absmax_ptr, scale_ptr, offset, absmax_code_ptr, code, rows,
                             rows < row_end, k0, K, offs_k, NF4, DOUBLE_QUANT, ROWS_ALIGNED, WHOLE_K, W_DTYPE, X_DTYPE)
        sums = tl.sum(w * x[0][None, :], axis=1)
    return sums


@triton.jit
def gemv_lora_a_step(a_ptr, stride_ar, stride_ak, offs_r, r_mask, k0, K, offs_k, x, xa, X_DTYPE: tl.constexpr):
    """xa (BLOCK_R, BLOCK_K) += A[:, k0 + offs_k] * x: the float32 products of x A^T for one K step, A (r, K),
    summed over K by the caller after its loop (a sum per step would shuffle across the threads of each A row)."""
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak,
                mask=r_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
    return xa + a.to(X_DTYPE).to(tl.float32) * x


@triton.jit
def _lora_up(xa, b_ptr, stride_bn, stride_br, rows, row_mask, offs_r, r_mask, X_DTYPE: tl.constexpr):
    """(len(rows),) float32: (x A^T) B[rows]^T, xa (BLOCK_R,) the float32 x A^T and B (N, r) rounded to x's dtype."""
    b = tl.load(b_ptr + rows[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=row_mask[None, :] & r_mask[:, None], other=0.0)
    return tl.sum(xa[:, None] * b.to(X_DTYPE).to(tl.float32), axis=0)


@triton.jit
def _gate_up_kernel(
    x_ptr, index_ptr,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_me, code_ptr,  # gate_up (E, 2I, H) as [gate; up]
    absmax_code_ptr, scale_ptr, stride_se, offset_ptr,  # its absmax's double quantization (DOUBLE_QUANT)
    # LoRA: A (E, r, H), B (E, 2I, r)
    a_ptr, stride_ae, stride_ar, stride_ak, b_ptr, stride_be, stride_bn, stride_br, scaling,
    h_ptr, partials_ptr, arrivals_ptr,
    # DOWN_XA: the down LoRA's A (E, r, I) and the (TOP_K, blocks, BLOCK_R) float32 partials of h A^T
    down_a_ptr, stride_dae, stride_dar, stride_dak, down_xa_ptr, DOWN_R,
    I, K, R, STEPS_PER_SPLIT,
    HAS_LORA: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    REGISTER_DECODE: tl.constexpr, WHOLE_K: tl.constexpr,
    W_DTYPE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, LOOP_STAGES: tl.constexpr, MMA: tl.constexpr,
    DOWN_XA: tl.constexpr,
):
    """h[slot, block] = silu(gate) * up of x (K,) through the gate_up weight of expert index[slot]; partials
    (SPLIT_K, TOP_K, 2, I) float32, one arrival counter per (slot, block). With DOWN_XA the program that finishes the
    block also stores h[slot, block] A_down[:, block]^T, its block's partial of the down LoRA's x A^T."""
    block, slot, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = x_ptr.dtype.element_ty
    expert, w_ptr, offset, code = _expert_weight(index_ptr, slot, w_ptr, stride_we, code_ptr, offset_ptr, NF4,
                                                 DOUBLE_QUANT)
    if NF4:
        absmax_ptr += expert * stride_me
    if DOUBLE_QUANT:
        scale_ptr += expert * stride_se
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # Each K step's products summed over its columns at once: a row's weights of a step lie in one or two threads, so
    # the sum costs a shuffle or none, and the accumulators take a register per row instead of one per weight held
    # (with x read in the decode's order, gemv_x: 212 -> 96 registers a thread for NF4 tiles, ptxas for sm_90).
    gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    xa = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    # A split's K range in whole BLOCK_K steps, so that the compiler knows each k0 is a multiple of BLOCK_K: a row's
    # packed NF4 bytes then load 16 at a time, as the register decode takes them.
    k_start = split * STEPS_PER_SPLIT * BLOCK_K
    for k0 in tl.range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * BLOCK_K, K), BLOCK_K,
                       num_stages=LOOP_STAGES):
        x = gemv_x(x_ptr, k0, K, offs_k, NF4 and REGISTER_DECODE, WHOLE_K, MMA)
        gate += gemv_tile_sums(w_ptr, stride_wn, stride_wk, absmax_ptr, scale_ptr, offset, absmax_code_ptr, code,
                               block * BLOCK_N, I, k0, K, offs_k, x, BLOCK_N, NF4, DOUBLE_QUANT, ROWS_ALIGNED,
                               WHOLE_K, W_DTYPE, dtype, REGISTER_DECODE, MMA)
        up += gemv_tile_sums(w_ptr, stride_wn, stride_wk, absmax_ptr, scale_ptr, offset, absmax_code_ptr, code,
                             block * BLOCK_N + I, 2 * I, k0, K, offs_k, x, BLOCK_N, NF4, DOUBLE_QUANT, ROWS_ALIGNED,
                             WHOLE_K, W_DTYPE, dtype, REGISTER_DECODE, MMA)
        if HAS_LORA:  # x whole again, in the layout of A's tile
            x_row = tl.load(x_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0).to(tl.float32)[None, :]
            xa = gemv_lora_a_step(a_ptr + expert * stride_ae, stride_ar, stride_ak, offs_r, r_mask, k0, K, offs_k,
                                  x_row, xa, dtype)
    if HAS_LORA:
        xa = tl.sum(xa, axis=1)
        b_e = b_ptr + expert * stride_be
        gate += scaling * _lora_up(xa, b_e, stride_bn, stride_br, offs_n, n_mask, offs_r, r_mask, dtype)
        up += scaling * _lora_up(xa, b_e, stride_bn, stride_br, offs_n + I, n_mask, offs_r, r_mask, dtype)
    if SPLIT_K > 1:
        partial = partials_ptr + (split * TOP_K + slot) * 2 * I
        tl.store(partial + offs_n, gate, mask=n_mask)
        tl.store(partial + I + offs_n, up, mask=n_mask)
        is_last = last_to_arrive(arrivals_ptr, slot * tl.num_programs(0) + block, SPLIT_K)
        if is_last:
            gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
            up = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order whichever arrived last: deterministic sums
                partial = partials_ptr + (s * TOP_K + slot) * 2 * I
                gate += tl.load(partial + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
                up += tl.load(partial + I + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
    else:
        is_last = True
    if is_last:
        # gate and up rounded to the activations' dtype, as the grouped SwiGLU kernel (and eager) round them.
        gate = gate.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        h = (gate * tl.sigmoid(gate) * up).to(dtype)
        tl.store(h_ptr + slot * I + offs_n, h, mask=n_mask)
        if DOWN_XA:  # h as stored (rounded) times A rounded to h's dtype, as _down_kernel's own product takes them
            down_r_mask = offs_r < DOWN_R
            a = tl.load(down_a_ptr + expert * stride_dae + offs_r[:, None] * stride_dar + offs_n[None, :] * stride_dak,
                        mask=down_r_mask[:, None] & n_mask[None, :], other=0.0)
            xa_part = tl.sum(a.to(dtype).to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
            tl.store(down_xa_ptr + (slot * tl.num_programs(0) + block) * BLOCK_R + offs_r, xa_part)


@triton.jit
def _down_kernel(
    h_ptr, index_ptr, weights_ptr,
    w_ptr, stride_we, stride_wn, stride_wk, absmax_ptr, stride_me, code_ptr,  # down (E, H, I)
    absmax_code_ptr, scale_ptr, stride_se, offset_ptr,  # its absmax's double quantization (DOUBLE_QUANT)
    # LoRA: A (E, r, I), B (E, H, r)
    a_ptr, stride_ae, stride_ar, stride_ak, b_ptr, stride_be, stride_bn, stride_br, scaling,
    out_ptr, partials_ptr, arrivals_ptr,
    xa_given_ptr, XA_PARTS,  # XA_GIVEN: (TOP_K, XA_PARTS, BLOCK_R) float32 partials of h A^T (_gate_up_kernel's)
    N, K, R, STEPS_PER_SPLIT,
    HAS_LORA: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
    REGISTER_DECODE: tl.constexpr, WHOLE_K: tl.constexpr,
    W_DTYPE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, LOOP_STAGES: tl.constexpr, MMA: tl.constexpr,
    XA_GIVEN: tl.constexpr, XA_PARTS_BLOCK: tl.constexpr,
):
    """out[block] = sum over slots of weights[slot] * (h[slot] W_down[index[slot]]^T + LoRA), h (TOP_K, K); program
    (block, slot * SPLIT_K + split); partials (TOP_K * SPLIT_K, N) float32, one arrival counter per block. With
    XA_GIVEN the LoRA's h A^T is the sum of the given partials, its B term added by each slot's split 0."""
    block, part = tl.program_id(0), tl.program_id(1)
    slot = part // SPLIT_K
    split = part % SPLIT_K
    dtype = h_ptr.dtype.element_ty
    expert, w_ptr, offset, code = _expert_weight(index_ptr, slot, w_ptr, stride_we, code_ptr, offset_ptr, NF4,
                                                 DOUBLE_QUANT)
    if NF4:
        absmax_ptr += expert * stride_me
    if DOUBLE_QUANT:
        scale_ptr += expert * stride_se
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # each K step summed at once, as in _gate_up_kernel
    xa = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    k_start = split * STEPS_PER_SPLIT * BLOCK_K  # whole BLOCK_K steps, as in _gate_up_kernel
    for k0 in tl.range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * BLOCK_K, K), BLOCK_K,
                       num_stages=LOOP_STAGES):
        x = gemv_x(h_ptr + slot * K, k0, K, offs_k, NF4 and REGISTER_DECODE, WHOLE_K, MMA)
        acc += gemv_tile_sums(w_ptr, stride_wn, stride_wk, absmax_ptr, scale_ptr, offset, absmax_code_ptr, code,
                              block * BLOCK_N, N, k0, K, offs_k, x, BLOCK_N, NF4, DOUBLE_QUANT, ROWS_ALIGNED, WHOLE_K,
                              W_DTYPE, dtype, REGISTER_DECODE, MMA)
        if HAS_LORA and not XA_GIVEN:
            x_row = tl.load(h_ptr + slot * K + k0 + offs_k, mask=offs_k < K - k0, other=0.0).to(tl.float32)[None, :]
            xa = gemv_lora_a_step(a_ptr + expert * stride_ae, stride_ar, stride_ak, offs_r, r_mask, k0, K, offs_k,
                                  x_row, xa, dtype)
    y = acc
    if HAS_LORA and XA_GIVEN:
        if split == 0:  # the partials loaded at once and summed in the reduction's fixed order
            blocks_of_h = tl.arange(0, XA_PARTS_BLOCK)
            given = xa_given_ptr + (slot * XA_PARTS + blocks_of_h[:, None]) * BLOCK_R + offs_r[None, :]
            xa_whole = tl.sum(tl.load(given, mask=(blocks_of_h < XA_PARTS)[:, None], other=0.0), axis=0)
            y += scaling * _lora_up(xa_whole, b_ptr + expert * stride_be, stride_bn, stride_br, offs_n, n_mask, offs_r,
                                    r_mask, dtype)
    elif HAS_LORA:
        y += scaling * _lora_up(tl.sum(xa, axis=1), b_ptr + expert * stride_be, stride_bn, stride_br, offs_n, n_mask,
                                offs_r, r_mask, dtype)
    if TOP_K * SPLIT_K > 1:
        tl.store(partials_ptr + part * N + offs_n, y, mask=n_mask)
        is_last = last_to_arrive(arrivals_ptr, block, TOP_K * SPLIT_K)
        if is_last:
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in tl.static_range(TOP_K):
                y_slot = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for p in tl.static_range(SPLIT_K):
                    y_slot += tl.load(partials_ptr + (s * SPLIT_K + p) * N + offs_n, mask=n_mask, other=0.0,
                                      cache_modifier=".cg")
                # Each slot's row rounded to the activations' dtype, the rows summed in float32: the grouped path's
                # (token, slot) rows and their sum.
                y += (y_slot * tl.load(weights_ptr + s).to(tl.float32)).to(dtype).to(tl.float32)
    else:
        is_last = True
        y = (y * tl.load(weights_ptr).to(tl.float32)).to(dtype).to(tl.float32)
    if is_last:
        tl.store(out_ptr + offs_n, y.to(dtype), mask=n_mask)


def _weight_args(weight: torch.Tensor | Nf4Weight, dtype: torch.dtype) -> tuple[tuple, dict]:
    """A weight stack (E, N, K) as the kernels take it: (pointer, its three strides, absmax, its expert stride, NF4
    code, then the dynamic code, absmax scale, its expert stride and absmax offset of a double-quantized absmax) and
    the NF4, DOUBLE_QUANT, ROWS_ALIGNED and W_DTYPE constexprs."""
    if isinstance(weight, Nf4Weight):
        # A double-quantized absmax is decoded where the tiles read it: no fp32 copy, no launch of its own.
        double_quant = (dynamic_code(weight.device), weight.absmax_scale, weight.absmax_scale.stride(0),
                        weight.absmax_offset) if weight.double_quant else (None,) * 4
        args = (weight.packed, weight.packed.stride(0), 0, 0, weight.absmax, weight.absmax.stride(0),
                nf4_code(weight.device), *double_quant)
        return args, {"NF4": True, "DOUBLE_QUANT": weight.double_quant, "ROWS_ALIGNED": weight.shape[2] % 64 == 0,
                      "W_DTYPE": triton_dtype(weight.dtype)}
    if weight.dtype != dtype:
        raise ValueError(f"one_token_experts takes 16-bit expert weights in the activations' dtype {dtype}, got "
                         f"{weight.dtype}")
    args = (weight, weight.stride(0), weight.stride(1), weight.stride(2)) + (None,) * 7
    return args, {"NF4": False, "DOUBLE_QUANT": False, "ROWS_ALIGNED": False, "W_DTYPE": None}


def gemv_register_decode(weight: torch.Tensor | Nf4Weight, dtype: torch.dtype, block_n: int, block_k: int,
                         num_warps: int) -> bool:
    """Whether a GEMV over `weight` decodes its (block_n, block_k) NF4 tiles with the PTX byte-permute decode: NF4
    rows on 64-weight blocks, stored in the activations' dtype, an NVIDIA GPU from Ampere on, 16 bytes of each tile
    per thread (``nf4.nf4_tile_layout``, ``nf4.register_decode_fits``). The portable decode instead gathers each
    weight from the 16 codes and interleaves the two nibbles of each byte (join and reshape). Measured on an H100
    (both ways in one process, the same outputs to bf16 rounding): one token's NF4 experts block with LoRA 42.3 ->
    37.4 us at Trinity-Mini's experts and 38.9 -> 35.5 at LFM2-8B-A1B's; the few-rows NF4 linears at one row 5-22%
    faster (LFM2-8B-A1B's dense gate/up pair 27.0 -> 21.0 us). Bound by the decode's instructions (about 4 a weight
    of 9-11 in the loop), not by HBM: about 1.1-1.3e12 weights a second on an H100."""
    return (GEMV_REGISTER_DECODE and isinstance(weight, Nf4Weight)
            and nf4_tile_layout(weight, dtype)["REGISTER_DECODE"] and register_decode_fits(block_n, block_k, num_warps))


# The K step of nf4_gemv_mma's tiles: four lanes of 16 bytes a row.
GEMV_MMA_BLOCK_K = 128


def gemv_mma(weight: torch.Tensor | Nf4Weight, dtype: torch.dtype, block_n: int, num_warps: int) -> bool:
    """Whether a GEMV over `weight` multiplies its NF4 tiles on the tensor cores (GEMV_MMA; gemv_tile_sums' MMA
    form): register-decoded NF4 rows in tiles of 64 rows and GEMV_MMA_BLOCK_K columns over 4 warps, the lane layout
    nf4.nf4_gemv_mma's fragments take."""
    return (GEMV_MMA and block_n == 64 and num_warps == 4
            and gemv_register_decode(weight, dtype, block_n, GEMV_MMA_BLOCK_K, num_warps))


def _with_fp32_absmax(weight: torch.Tensor | Nf4Weight, experts: torch.Tensor) -> torch.Tensor | Nf4Weight:
    """A double-quantized NF4 stack with the absmax of `experts` decoded to fp32 (the other experts' rows unwritten:
    the kernels read only the chosen experts); any other weight as it is."""
    if not (isinstance(weight, Nf4Weight) and weight.double_quant):
        return weight
    return Nf4Weight(weight.packed, absmax_fp32(weight, experts), weight.shape, weight.dtype)


def _lora_args(lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float) -> tuple:
    if lora_a is None:
        return (None,) * 8 + (0.0,)
    return (lora_a, *lora_a.stride(), lora_b, *lora_b.stride(), float(scaling))


def one_token_experts(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up: torch.Tensor | Nf4Weight, down: torch.Tensor | Nf4Weight,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
) -> torch.Tensor:
    """The SwiGLU experts block (``moe_experts``' forward) of one token, no autograd.

    hidden (1, H); top_k_index (1, k) int; top_k_weights (1, k); gate_up (E, 2I, H) as [gate; up] and down (E, H, I),
    16-bit in hidden's dtype (any strides) or Nf4Weight; LoRA factors gu_a (E, r, H), gu_b (E, 2I, r), down_a (E, r,
    I), down_b (E, H, r) (any strides, rounded to hidden's dtype in the kernels), or None. Returns (1, H)."""
    if hidden.shape[0] != 1 or top_k_index.shape[0] != 1:
        raise ValueError(f"one_token_experts takes one token, got {hidden.shape[0]}")
    x = hidden.reshape(-1).contiguous()
    index = top_k_index.reshape(-1).contiguous()
    if GEMV_PREDECODED_ABSMAX:
        gate_up, down = _with_fp32_absmax(gate_up, index), _with_fp32_absmax(down, index)
    weights = top_k_weights.reshape(-1).contiguous()
    top_k = index.numel()
    (_, two_inter, k_gate_up), (_, n_down, k_down) = gate_up.shape, down.shape
    inter = two_inter // 2
    dtype, device = hidden.dtype, hidden.device
    if device.type == "cuda":
        block_n, options = _GPU_BLOCK_N, {"num_warps": 4, "num_stages": 3}
        mma = all(gemv_mma(w, dtype, block_n, options["num_warps"]) for w in (gate_up, down))
        block_k = GEMV_MMA_BLOCK_K if mma else GEMV_BLOCK_K
        gate_up_split = gemv_split(top_k * cdiv(inter, block_n), k_gate_up, block_k)
        down_split = gemv_split(top_k * cdiv(n_down, block_n), k_down, block_k)
    else:  # the interpreter: small blocks, and K split so that the CPU tests go through the fix-ups
        block_n, block_k, options, mma = 16, 32, {}, False
        gate_up_split, down_split = interpreter_split(k_gate_up, block_k), interpreter_split(k_down, block_k)
    gate_up_blocks, down_blocks = cdiv(inter, block_n), cdiv(n_down, block_n)
    arrivals = arrival_counts(device, max(top_k * gate_up_blocks, down_blocks))
    ranks = [t.shape[1] for t in (gu_a, down_a) if t is not None]
    block_r = max(16, next_power_of_2(max(ranks, default=1)))

    def steps_per_split(k: int, split: int) -> int:
        return cdiv(cdiv(k, block_k), split)

    num_warps = options.get("num_warps", 4)
    h = torch.empty(top_k, inter, dtype=dtype, device=device)
    down_xa = DOWN_XA_IN_GATE_UP and down_a is not None
    down_xa_parts = (torch.empty(top_k, gate_up_blocks, block_r, dtype=torch.float32, device=device) if down_xa
                     else None)
    down_a_args = ((down_a, *down_a.stride(), down_xa_parts, down_a.shape[1]) if down_xa else (None,) * 5 + (0,))
    w_args, layout = _weight_args(gate_up, dtype)
    layout["REGISTER_DECODE"] = gemv_register_decode(gate_up, dtype, block_n, block_k, num_warps)
    partials = (torch.empty(gate_up_split, top_k, 2, inter, dtype=torch.float32, device=device)
                if gate_up_split > 1 else None)
    compiled = _gate_up_kernel[(gate_up_blocks, top_k, gate_up_split)](
        x, index, *w_args, *_lora_args(gu_a, gu_b, gu_scaling), h, partials, arrivals, *down_a_args,
        inter, k_gate_up, gu_a.shape[1] if gu_a is not None else 0, steps_per_split(k_gate_up, gate_up_split),
        HAS_LORA=gu_a is not None, **layout, WHOLE_K=k_gate_up % block_k == 0, TOP_K=top_k, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=gate_up_split, LOOP_STAGES=GEMV_LOOP_STAGES, MMA=mma,
        DOWN_XA=down_xa, **options,
    )
    if layout["REGISTER_DECODE"]:
        check_register_decode_layout(compiled)
    out = torch.empty(1, n_down, dtype=dtype, device=device)
    w_args, layout = _weight_args(down, dtype)
    layout["REGISTER_DECODE"] = gemv_register_decode(down, dtype, block_n, block_k, num_warps)
    partials = (torch.empty(top_k * down_split, n_down, dtype=torch.float32, device=device)
                if top_k * down_split > 1 else None)
    compiled = _down_kernel[(down_blocks, top_k * down_split)](
        h, index, weights, *w_args, *_lora_args(down_a, down_b, down_scaling), out, partials, arrivals,
        down_xa_parts, gate_up_blocks, n_down, k_down, down_a.shape[1] if down_a is not None else 0,
        steps_per_split(k_down, down_split),
        HAS_LORA=down_a is not None, **layout, WHOLE_K=k_down % block_k == 0, TOP_K=top_k, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=down_split, LOOP_STAGES=GEMV_LOOP_STAGES, MMA=mma,
        XA_GIVEN=down_xa, XA_PARTS_BLOCK=next_power_of_2(gate_up_blocks), **options,
    )
    if layout["REGISTER_DECODE"]:
        check_register_decode_layout(compiled)
    return out
