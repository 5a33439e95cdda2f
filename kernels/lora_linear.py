"""A frozen linear layer plus LoRA in one autograd Function with a hand-written backward (Unsloth's fast_lora idea).

    y = x W^T + b + s (x A^T) B^T          W (out, in) frozen, A (r, in), B (out, r), s = alpha / r

What peft's autograd does instead: peft's `lora.Linear` runs the LoRA branch in the adapters' float32 (casting the
activations up and the result back: two full-size copies per call) as four separate ops; peft's `ParamWrapper`
(LoRA on a Linear's `weight` as a parameter) materialises W + s B A on every call, then computes a full weight
gradient (x^T g, as costly as the forward GEMM) only to reduce it to dA and dB. Here the backward does exactly

    dx = g W + s (g B) A,   dA = s (g B)^T x,   dB = s g^T (x A^T)

and keeps only x and the thin x A^T (tokens, r) between forward and backward. The GEMMs are cuBLAS's (these are
large dense matmuls, which cuBLAS already runs near peak); the win is in the work and memory not done.

Precision: the LoRA factors are used in the activations' dtype (bf16 in training), as under torch.autocast, which
is how transformers' Trainer runs peft with bf16=True; gradients return in the factors' own dtype (peft's
float32). Without autocast, peft itself runs its LoRA branch in float32, copying the activations up.

A 4-bit base weight (bitsandbytes) is passed as a zero-argument callable that dequantizes it: it is dequantized
for the forward GEMM and again in the backward, so no 16-bit copy outlives either GEMM.

Decoding (a few rows, nothing to differentiate) takes one Triton kernel instead: cuBLAS's base GEMM, the two thin
LoRA GEMMs and the add are four launches (plus the factors' casts), and at a handful of rows a decode step is
bound by launches, not by the bytes each reads. `_few_rows_kernel` splits K as well as the output columns, since one
program per column block walking all of K is too few programs, each a long serial loop, to keep the GPU's memory
busy: program (column block, split) streams W's block and A over its share of K (A's float32 tiles cast in
registers), and adds s (partial x A^T) B^T to its partial base product (the LoRA term is linear in x A^T, so the
splits' terms sum to the whole). It writes that float32 partial to a workspace; the last program of its column
block to arrive (a counter per block, which that program resets for the next launch) sums the partials in split
order, so the result does not depend on which split finished first, adds the bias and stores the output. One launch
takes up to four linear layers of one input (attention's q, k, v and output gate, numbering their column blocks one
after another), or a gated MLP's gate and up as a pair whose programs compute both tiles of a column block and store
silu(gate) * up: each launch costs some microseconds of ramp-up and drain whatever it reads, a large share at a few
megabytes. bitsandbytes' 4-bit weights go in as they are stored (NF4 codes and absmax) and are decoded tile by tile,
so that a decode step never writes a 16-bit copy of them. At one row (batch-1 decoding) the products are a GEMV on
the CUDA cores rather than tl.dot's 16-row minimum: no operand staged in shared memory, so more programs run at once
(about half the time of the tl.dot form, NF4 and bf16; see _few_rows_config).

A layer whose output nobody reads (a decoder layer's last projection in checkpointing's recompute, whose output's
value the backward never reads: fastmoe.models.shared) skips it inside `output_unused()`: the base product and
LoRA's up-projection, the largest GEMM of Command R's layer (its 22,528 -> 8,192 down projection) among them. The
forward then computes and keeps only what the backward reads (x and x A^T) and returns a tensor of the output's shape
whose values nobody may read: uninitialised on a GPU, NaN elsewhere (where the tests would see any use of it).

Unlike the Triton ops, this one is not a torch.library custom op: its body is plain PyTorch, which torch.compile
traces, the Function's hand-written backward included (dynamo traces autograd Functions), so inductor sees the GEMMs
and the casts around them; and a custom op could not take the dequantizing callable.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .custom_op import unread_output
from .dispatch import use_triton
from .grid import cdiv, next_power_of_2
from .moe.nf4 import Nf4Weight, absmax_fp32, check_register_decode_layout, dequantize_nf4_tile, nf4_code, triton_dtype
from .moe import one_token
from .moe.one_token import gemv_lora_a_step, gemv_register_decode, gemv_tile_sums, gemv_x
from .reused_casts import cast, derived, scope_active
from .split_k import GEMV_BLOCK_K, GPU_SMS, arrival_counts, gemv_split, interpreter_split, last_to_arrive

Weight = torch.Tensor | Callable[[], torch.Tensor]


def reference_lora_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Plain PyTorch: x (..., in) -> (..., out)."""
    w = weight() if callable(weight) else weight
    return F.linear(x, w, bias) + scaling * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


# Rows up to which the few-rows kernel runs (decode batches); its row block is the rows rounded up to 16, tl.dot's
# minimum, so every program's product is one MMA tile tall.
FEW_ROWS = 64
# Linear layers of one input that one few-rows launch computes at most (attention's q, k, v and output gate).
MAX_PROJECTIONS = 4


class Projection(NamedTuple):
    """One linear layer of a few-rows launch: x W^T + bias + scaling (x A^T) B^T, lora_a and lora_b None for a layer
    without LoRA. W (out, in) in x's dtype, or NF4 (a one-expert Nf4Weight (1, out, in): bitsandbytes' 4-bit storage,
    dequantized tile by tile in the kernel); the factors in any float dtype (rounded to x's in the kernel)."""

    weight: torch.Tensor | Nf4Weight
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float


def takes_few_rows(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether a forward of x (..., in) with these tensors (weights, biases, LoRA factors; None for absent ones) is
    one the few-rows kernel serves: at most FEW_ROWS rows, nothing autograd would differentiate, Triton on them. Not
    under torch.compile, as for several layers (fastmoe.linear_lora): dynamo would trace the launch into inductor's
    graph as a kernel of its own, while the plain path's matmuls compile as PyTorch's."""
    return (not torch.compiler.is_compiling() and x.numel() <= FEW_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)))
            and use_triton(x, *tensors))


def _few_rows_config(rows: int, n: int, k: int, nf4: bool = False) -> dict:
    """Launch configuration of the few-rows kernel on a GPU, for `rows` rows of x (rows, k) and n output columns in
    all (the projections' together; a SwiGLU pair counts its gate's).

    Measured on an H200 (benchmarks/bench_decode_ops.py few-rows, 1 and 8 rows, Trinity-Mini's projections): about one
    program per SM is best, with 64-column blocks wherever they still make 16 or more blocks (N >= 1024), as they read
    x and A once per 64 columns of W instead of 16, and K split to make up the count, each split keeping at least 2
    BLOCK_K iterations for its pipeline. That gave 9.0-9.3 us for 2048->4096 and 4096->2048 (16 MB of W, ~1.9 TB/s;
    unsplit 16-column blocks took 12-16 us), 4.6 us for 2048->512 and 5.0-5.4 us for 2048<->1024. The float32
    partials (written and read back, mostly in L2: 8 * splits * rows * n bytes) stay under half of W's 2 * n * k
    bytes, which binds only at tens of rows. Several layers in one launch (bench_decode_ops.py projections, 1 and 8
    rows): Trinity-Mini's q, k, v and gate (144 blocks, unsplit) 22.2 us against 28.3-28.9 one launch each (split in
    two, 288 programs, 19.4 us), the shared expert's gate and up 7.9-8.4 us against 13.5-14.0 with the SiLU and the
    product, the dense MLP's 23.1-23.3 us (2.2 TB/s) against 32.4-33.0.

    NF4 weights (bitsandbytes' 4-bit layers, `nf4`) bring a quarter of the bytes per K step and decode them in the
    program, which one program per SM leaves waiting: their splits also keep doubling while there are fewer than 2.5
    programs per SM, up to 8 splits (bench_decode_ops.py few-rows-nf4, H200, 1 row, double-quantized absmax): the
    attention's q, k, v and gate 36.8 -> 29.6 us (4 splits instead of 1), the dense MLP's gate and up 43.8 -> 34.1 (4
    instead of 1), the other launches within 3% of the best tried (the dense down projection 17.2 -> 16.9, 8 instead
    of 4).

    One row (batch-1 decoding) takes the GEMV form (_split_product): a program then holds no tensor-core operand in
    shared memory, and more of them fit an SM. Its K steps are 64 wide and its splits double while the programs stay
    within 5 per SM, each split keeping at least 2 K steps. Trinity-Mini's six few-rows launches of a layer at one row
    (bench_decode_ops.py few-rows-gemv, H200; 64- and 128-wide K steps in 2 to 16 splits swept), against the tl.dot
    form: NF4 q, k, v and gate 29.6 -> 14.1 us (4 splits), o_proj 13.0 -> 7.3 (16), the shared expert's gate and up
    10.2 -> 5.8 (16) and down 6.0 -> 4.1 (8), the dense MLP's gate and up 34.2 -> 16.1 (4) and down 17.0 -> 9.5 (16),
    110 -> 57 us in all; bf16 22.4 -> 10.1, 8.9 -> 5.7, 7.9 -> 5.1, 5.2 -> 3.6, 23.3 -> 13.4 and 11.3 -> 6.9, 79 ->
    45 us. Each is the best configuration swept or within 8% of it.
    """
    block_n = 64 if n >= 1024 else 16
    blocks = cdiv(n, block_n)
    if rows == 1:
        return {"BLOCK_N": block_n, "BLOCK_K": GEMV_BLOCK_K, "SPLIT_K": gemv_split(blocks, k), "GEMV": True,
                "num_warps": 4, "num_stages": 3}
    block_k = 128
    max_split = max(1, min(cdiv(k, block_k) // 2, k // (8 * rows)))
    split = 1
    while split * 2 <= max_split and (
            blocks * split * 2 <= GPU_SMS or nf4 and split < 8 and blocks * split < 2.5 * GPU_SMS):
        split *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "GEMV": False, "num_warps": 4, "num_stages": 3}


def _few_rows_interpreter_config(rows: int, k: int) -> dict:
    """Small blocks for the CPU interpreter, K split so that the CPU tests go through the split-K fix-up
    (split_k.interpreter_split); one row takes the GEMV form, as on a GPU."""
    return {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": interpreter_split(k, 32), "GEMV": rows == 1}


@triton.jit
def _pick(index, v0, v1, v2, v3, PROJECTIONS: tl.constexpr):
    """v<index> of the first PROJECTIONS values (scalars: pointers, sizes, scalings)."""
    v = v0
    if PROJECTIONS > 1:
        v = tl.where(index == 1, v1, v)
    if PROJECTIONS > 2:
        v = tl.where(index == 2, v2, v)
    if PROJECTIONS > 3:
        v = tl.where(index == 3, v3, v)
    return v


def _out_features(projection: Projection) -> int:
    weight = projection.weight
    return weight.shape[1] if isinstance(weight, Nf4Weight) else weight.shape[0]


@triton.jit
def _split_product(x, x_ptr, k0, K, w_ptr, absmax_ptr, code, a_ptr, offs_n, offs_k, offs_r, n_mask, row0, n, r_mask,
                   acc, xa, NF4: tl.constexpr, K_ALIGNED: tl.constexpr, WHOLE_K: tl.constexpr, W_DTYPE: tl.constexpr,
                   GEMV: tl.constexpr, DOT_PRECISION: tl.constexpr, REGISTER_DECODE: tl.constexpr,
                   MMA: tl.constexpr):
    """acc += x W[n block, k block]^T and xa += x A[:, k block]^T, W (n, K) and A (r, K) row-major, the block's rows
    offs_n = row0 + arange (n_mask: below n); with NF4, W's packed codes and fp32 absmax (K_ALIGNED: K % 64 == 0;
    WHOLE_K: K % BLOCK_K == 0). GEMV (x one row): the weight tile is multiplied where it was loaded or decoded and
    summed over its columns, with no tensor-core operand to stage; its NF4 tiles decoded by the PTX register decode
    with REGISTER_DECODE (one_token.gemv_register_decode), and with MMA multiplied on the tensor cores
    (one_token.gemv_mma)."""
    k_mask = offs_k < K - k0
    if GEMV:  # x (1, BLOCK_K), the row at x_ptr; xa (BLOCK_R, BLOCK_K) products, summed by the caller
        x_tile = gemv_x(x_ptr, k0, K, offs_k, NF4 and REGISTER_DECODE, WHOLE_K, MMA)
        acc += gemv_tile_sums(w_ptr, K, 1, absmax_ptr, None, 0.0, None, code, row0, n, k0, K, offs_k, x_tile,
                              offs_n.shape[0], NF4, False, K_ALIGNED, WHOLE_K, W_DTYPE, x.dtype, REGISTER_DECODE,
                              MMA)[None, :]
        xa = gemv_lora_a_step(a_ptr, K, 1, offs_r, r_mask, k0, K, offs_k, x.to(tl.float32), xa, x.dtype)
    else:
        if NF4:
            w = tl.trans(dequantize_nf4_tile(w_ptr, absmax_ptr, code, offs_n, n_mask, k0, K, K_ALIGNED, False, WHOLE_K,
                                             offs_k.shape[0], W_DTYPE, x.dtype))
        else:
            w = tl.load(w_ptr + offs_n[None, :] * K + (k0 + offs_k)[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        a = tl.load(a_ptr + offs_r[None, :] * K + (k0 + offs_k)[:, None], mask=r_mask[None, :] & k_mask[:, None],
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        xa = tl.dot(x, a.to(x.dtype), xa, input_precision=DOT_PRECISION)
    return acc, xa


@triton.jit
def _lora_term(acc, xa, b_ptr, r, scaling, offs_n, offs_r, n_mask, DTYPE: tl.constexpr, GEMV: tl.constexpr):
    """acc + scaling (x A^T) B[n block]^T, B (n, r) row-major."""
    b = tl.load(b_ptr + offs_n[None, :] * r + offs_r[:, None], mask=n_mask[None, :] & (offs_r < r)[:, None],
                other=0.0)
    # x A^T stays float32, where the Function rounds it to the activations' dtype: a split holds only part of the sum,
    # and rounding each part would add one error per split. B is rounded to the activations' dtype as A is, so float32
    # factors and their reused casts (kernels/reused_casts.py) give the same result. ieee, as (rows, r) x (r, BLOCK_N)
    # is too small to cost.
    b = b.to(DTYPE).to(tl.float32)
    if GEMV:  # one row: tl.dot takes 16 at least
        term = tl.sum(xa[:, :, None] * b[None, :, :], axis=1)
    else:
        term = tl.dot(xa, b, input_precision="ieee")
    return acc + scaling * term


@triton.jit
def _few_rows_kernel(
    x_ptr, M, K, STEPS_PER_SPLIT, partials_ptr, arrivals_ptr, COLUMNS, code_ptr,
    w0, m0, a0, b0, bias0, out0, n0, r0, s0,
    w1, m1, a1, b1, bias1, out1, n1, r1, s1, first1,
    w2, m2, a2, b2, bias2, out2, n2, r2, s2, first2,
    w3, m3, a3, b3, bias3, out3, n3, r3, s3, first3,
    PROJECTIONS: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    NF4: tl.constexpr, K_ALIGNED: tl.constexpr, WHOLE_K: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, GEMV: tl.constexpr, DOT_PRECISION: tl.constexpr, REGISTER_DECODE: tl.constexpr,
    LOOP_STAGES: tl.constexpr, MMA: tl.constexpr,
):
    """Up to four linear layers of one input x (M <= BLOCK_M rows, K, row-major): out_i = x W_i^T + bias_i + s_i (x
    A_i^T) B_i^T. Column blocks are numbered across the layers (layer i's from first_i); program (block, split)
    computes the split's STEPS_PER_SPLIT steps of BLOCK_K of one block (whole steps: each k0 is then known to be a
    multiple of BLOCK_K, so that NF4 rows load 16 bytes at a time for the register decode). With SWIGLU, layers 0 and
    1 (gate and up, the same width) share their blocks and out0 = silu(gate) * up. Partials (SPLIT_K, M, COLUMNS)
    float32 hold the splits' sums and arrivals (one int32 per block, zero on entry and on exit) elects the last. With
    NF4, w_i are packed codes and m_i their fp32 absmax (code_ptr: the 16 NF4 values). GEMV (one row, BLOCK_M = 1):
    the products on the CUDA cores instead of tl.dot (see _split_product)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    if SWIGLU:
        index = block * 0
    else:
        index = (block >= first1).to(tl.int32) + (block >= first2).to(tl.int32) + (block >= first3).to(tl.int32)
    first = _pick(index, 0, first1, first2, first3, PROJECTIONS)
    w_ptr = _pick(index, w0, w1, w2, w3, PROJECTIONS)
    absmax_ptr = _pick(index, m0, m1, m2, m3, PROJECTIONS)
    a_ptr = _pick(index, a0, a1, a2, a3, PROJECTIONS)
    n = _pick(index, n0, n1, n2, n3, PROJECTIONS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = (block - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, n_mask = offs_m < M, offs_n < n
    r = _pick(index, r0, r1, r2, r3, PROJECTIONS)
    # GEMV: xa holds float32 products per k (BLOCK_R, BLOCK_K), summed after the K loop.
    XA_ROWS: tl.constexpr = BLOCK_R if GEMV else BLOCK_M
    XA_COLS: tl.constexpr = BLOCK_K if GEMV else BLOCK_R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((XA_ROWS, XA_COLS), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa_up = tl.zeros((XA_ROWS, XA_COLS), dtype=tl.float32)
    if NF4:
        code = tl.load(code_ptr + tl.arange(0, 16))
    else:
        code = tl.zeros((16,), dtype=tl.float32)  # unused
    k_start = split * STEPS_PER_SPLIT * BLOCK_K
    for k0 in tl.range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * BLOCK_K, K), BLOCK_K,
                       num_stages=LOOP_STAGES):
        x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :],
                    mask=m_mask[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        acc, xa = _split_product(x, x_ptr, k0, K, w_ptr, absmax_ptr, code, a_ptr, offs_n, offs_k, offs_r, n_mask,
                                 (block - first) * BLOCK_N, n, offs_r < r, acc, xa, NF4, K_ALIGNED, WHOLE_K, W_DTYPE,
                                 GEMV, DOT_PRECISION, REGISTER_DECODE, MMA)
        if SWIGLU:
            up, xa_up = _split_product(x, x_ptr, k0, K, w1, m1, code, a1, offs_n, offs_k, offs_r, n_mask,
                                       (block - first) * BLOCK_N, n, offs_r < r1, up, xa_up, NF4, K_ALIGNED, WHOLE_K,
                                       W_DTYPE, GEMV, DOT_PRECISION, REGISTER_DECODE, MMA)
    if GEMV:  # (1, BLOCK_R), the row the rest of the kernel handles as a block of BLOCK_M = 1
        xa, xa_up = tl.sum(xa, axis=1)[None, :], tl.sum(xa_up, axis=1)[None, :]
    dtype = x_ptr.dtype.element_ty
    acc = _lora_term(acc, xa, _pick(index, b0, b1, b2, b3, PROJECTIONS), r, _pick(index, s0, s1, s2, s3, PROJECTIONS),
                     offs_n, offs_r, n_mask, dtype, GEMV)
    if SWIGLU:
        up = _lora_term(up, xa_up, b1, r1, s1, offs_n, offs_r, n_mask, dtype, GEMV)
    columns = block * BLOCK_N + tl.arange(0, BLOCK_N)  # this block's columns in the partials
    up_columns = columns + COLUMNS // 2
    if SPLIT_K > 1:
        rows = partials_ptr + split * M * COLUMNS + offs_m[:, None] * COLUMNS
        tl.store(rows + columns[None, :], acc, mask=m_mask[:, None])
        if SWIGLU:
            tl.store(rows + up_columns[None, :], up, mask=m_mask[:, None])
        is_last = last_to_arrive(arrivals_ptr, block, SPLIT_K)
        if is_last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order whichever arrived last: deterministic sums
                rows = partials_ptr + s * M * COLUMNS + offs_m[:, None] * COLUMNS
                acc += tl.load(rows + columns[None, :], mask=m_mask[:, None], other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    up += tl.load(rows + up_columns[None, :], mask=m_mask[:, None], other=0.0, cache_modifier=".cg")
    else:
        is_last = True
    if is_last:
        if HAS_BIAS:
            acc += tl.load(_pick(index, bias0, bias1, bias2, bias3, PROJECTIONS) + offs_n, mask=n_mask,
                           other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                up += tl.load(bias1 + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            # Rounded as PyTorch's act_fn(gate_proj(x)) * up_proj(x) rounds: each product, the activation, the product.
            gate = acc.to(dtype).to(tl.float32)
            acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
        out_ptr = _pick(index, out0, out1, out2, out3, PROJECTIONS)
        tl.store(out_ptr + offs_m[:, None] * n + offs_n[None, :], acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def _launch_few_rows(x2: torch.Tensor, projections: Sequence[Projection], config: dict,
                     swiglu: bool = False) -> list[torch.Tensor]:
    """_few_rows_kernel on x2 (rows, in) with the launch configuration given: each projection's (rows, out) in x2's
    dtype, or with swiglu the one (rows, out) silu(gate) * up of the pair (gate, up)."""
    rows, k = x2.shape
    x2 = x2.contiguous()
    config = {"GEMV": False, **config}
    # The GEMV form's loop pipelined as one_token.GEMV_LOOP_STAGES says; the tl.dot form's as its num_stages (what the
    # compiler does by itself for loads that feed a tl.dot).
    config.setdefault("LOOP_STAGES", one_token.GEMV_LOOP_STAGES if config["GEMV"] else config.get("num_stages", 3))
    if config["GEMV"] and rows != 1:
        raise ValueError(f"the few-rows kernel's GEMV form takes one row, got {rows}")
    nf4 = isinstance(projections[0].weight, Nf4Weight)
    # NF4 tiles multiplied on the tensor cores (one_token.GEMV_MMA) take their own K step.
    mma = config["GEMV"] and nf4 and one_token.gemv_mma(projections[0].weight, x2.dtype, config["BLOCK_N"],
                                                         config.get("num_warps", 4))
    if mma:
        config["BLOCK_K"] = one_token.GEMV_MMA_BLOCK_K
    block_n, block_k, split_k = config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
    # One pointer type per argument across the layers: factors in the first adapted layer's dtypes, and a layer
    # without LoRA (rank 0 masks every factor load) passes that layer's factors as stand-ins.
    adapted = next((p for p in projections if p.lora_a is not None), None)
    args, outs, first = [], [], 0
    for i, (weight, bias, lora_a, lora_b, scaling) in enumerate(projections):
        n = _out_features(projections[i])
        if nf4:
            # Double-quantized absmax decoded to fp32 for the whole weight; while decoding, once (reused_casts).
            absmax = weight.absmax if not weight.double_quant else derived(
                weight.absmax, "absmax_fp32", lambda weight=weight: absmax_fp32(weight))
            weight = weight.packed
        else:
            weight = absmax = weight.contiguous()  # 16-bit: the absmax argument is a stand-in, never read
        if adapted is None:
            lora_a = lora_b = weight
            rank = 0
        elif lora_a is None:
            lora_a, lora_b, rank = adapted.lora_a, adapted.lora_b, 0
        else:
            lora_a, lora_b, rank = lora_a.to(adapted.lora_a.dtype), lora_b.to(adapted.lora_b.dtype), lora_a.shape[0]
        out = torch.empty(rows, n, dtype=x2.dtype, device=x2.device) if i == 0 or not swiglu else outs[0]
        if i == 0 or not swiglu:
            outs.append(out)
        args += [weight, absmax, lora_a.contiguous(), lora_b.contiguous(), bias if bias is not None else weight,
                 out, n, rank, float(scaling)] + ([first] if i else [])
        first += 0 if swiglu else cdiv(n, block_n)
    blocks = cdiv(_out_features(projections[0]), block_n) if swiglu else first
    unused = args[:9] + [1 << 30]  # a block number no program reaches
    args += unused * (MAX_PROJECTIONS - len(projections))
    columns = blocks * block_n * (2 if swiglu else 1)
    steps_per_split = cdiv(cdiv(k, block_k), split_k)
    register_decode = (nf4 and config["GEMV"] and gemv_register_decode(
        projections[0].weight, x2.dtype, block_n, block_k, config.get("num_warps", 4)))
    # Every slot is written whole by its program, empty splits included: no zeroing.
    partials = torch.empty(split_k, rows, columns, dtype=torch.float32, device=x2.device) if split_k > 1 else None
    arrivals = arrival_counts(x2.device, blocks) if split_k > 1 else None
    ranks = [p.lora_a.shape[0] for p in projections if p.lora_a is not None]
    compiled = _few_rows_kernel[(blocks, split_k)](
        x2, rows, k, steps_per_split, partials, arrivals, columns, nf4_code(x2.device) if nf4 else x2, *args,
        PROJECTIONS=len(projections), SWIGLU=swiglu, HAS_BIAS=projections[0].bias is not None,
        NF4=nf4, K_ALIGNED=k % 64 == 0, WHOLE_K=k % block_k == 0,
        W_DTYPE=triton_dtype(projections[0].weight.dtype) if nf4 else None,
        BLOCK_M=1 if config["GEMV"] else max(16, next_power_of_2(rows)),
        BLOCK_R=max(16, next_power_of_2(max(ranks, default=1))),
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", REGISTER_DECODE=register_decode, MMA=mma,
        **config,
    )
    if register_decode:
        check_register_decode_layout(compiled)
    return outs


def lora_linears_few_rows(x: torch.Tensor, projections: Sequence[Projection],
                          swiglu: bool = False) -> list[torch.Tensor]:
    """The forwards alone of up to MAX_PROJECTIONS linear layers of one input, in one launch, for at most FEW_ROWS
    rows of x (..., in); no autograd. Each layer's (..., out), or with swiglu the one silu(gate) * up of the pair
    (gate, up). The layers have biases all or none."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, k = x2.shape
    if rows > FEW_ROWS:
        raise ValueError(f"lora_linears_few_rows takes at most {FEW_ROWS} rows, got {rows}")
    if not 1 <= len(projections) <= MAX_PROJECTIONS or (swiglu and len(projections) != 2):
        raise ValueError(f"lora_linears_few_rows takes 1 to {MAX_PROJECTIONS} layers, a SwiGLU pair 2; got "
                         f"{len(projections)}")
    if len({p.bias is None for p in projections}) != 1:
        raise ValueError("lora_linears_few_rows takes layers with biases all or none")
    if len({p.weight.dtype if isinstance(p.weight, Nf4Weight) else None for p in projections}) != 1:
        raise ValueError("lora_linears_few_rows takes 16-bit layers or NF4 layers of one dtype, not a mix")
    if swiglu and projections[0].weight.shape != projections[1].weight.shape:
        raise ValueError("a SwiGLU pair's gate and up weights must have the same shape")
    n = _out_features(projections[0]) if swiglu else sum(_out_features(p) for p in projections)
    nf4 = isinstance(projections[0].weight, Nf4Weight)
    config = _few_rows_config(rows, n, k, nf4) if x.is_cuda else _few_rows_interpreter_config(rows, k)
    outs = _launch_few_rows(x2, projections, config, swiglu)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]


def lora_linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The forward alone, in one launch, for at most FEW_ROWS rows of x (..., in); no autograd."""
    return lora_linears_few_rows(x, [Projection(weight, bias, lora_a, lora_b, scaling)])[0]


# Whether the output of the lora_linear calls now running is read (see output_unused): a context variable, so that
# autograd's backward thread, which runs a checkpointed layer's recompute, sees what that recompute sets.
_OUTPUT_READ: contextvars.ContextVar[bool] = contextvars.ContextVar("fastmoe_lora_linear_output_read", default=True)


@contextlib.contextmanager
def output_unused():
    """Within this block, lora_linear's autograd forward skips its output (the base product and LoRA's
    up-projection) and keeps what its backward reads; the output is a tensor of its shape whose values nobody may
    read (uninitialised on a GPU, NaN elsewhere). For a decoder layer's last projection in a checkpointed recompute
    (fastmoe.models.shared.last_projection)."""
    token = _OUTPUT_READ.set(False)
    try:
        yield
    finally:
        _OUTPUT_READ.reset(token)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = cast(lora_a, x.dtype), cast(lora_b, x.dtype)  # reused across forwards while decoding
        xa = x2 @ a.t()
        # Under torch.compile nothing sets it (graphed checkpointing leaves compiled layers to torch's checkpoint), and
        # dynamo cannot trace a context variable.
        if torch.compiler.is_compiling() or _OUTPUT_READ.get():
            w = weight() if callable(weight) else weight
            out = F.linear(x2, w, bias)
            out.addmm_(xa, b.t(), alpha=scaling)
        else:
            out = unread_output(x2.shape[0], lora_b.shape[0], x2)
        ctx.weight = None if isinstance(weight, torch.Tensor) else weight
        ctx.save_for_backward(x2, xa, a, b, weight if isinstance(weight, torch.Tensor) else None)
        ctx.scaling = scaling
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, a, b, weight = ctx.saved_tensors
        s = ctx.scaling
        needs_x, _, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        gb = g @ b  # (tokens, r)
        grad_x = grad_a = grad_b = grad_bias = None
        if needs_x:
            w = weight if weight is not None else ctx.weight()
            grad_x = (g @ w).addmm_(gb, a, alpha=s).view(*grad_out.shape[:-1], x2.shape[-1])
        if needs_a:
            grad_a = (gb.t() @ x2).mul_(s).to(ctx.lora_dtypes[0])
        if needs_b:
            grad_b = (g.t() @ xa).mul_(s).to(ctx.lora_dtypes[1])
        if needs_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x (..., in) through a frozen linear layer plus LoRA: x W^T + b + s (x A^T) B^T.

    weight: (out, in) in x's dtype, or a callable returning it (a quantized weight, dequantized on demand); it
    gets no gradient. lora_a (r, in), lora_b (out, r) in any float dtype (peft keeps them in float32); their
    products are computed in x's dtype and their gradients returned in their own. Under autocast, everything is
    computed in autocast's dtype, as autocast computes F.linear.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast makes of F.linear: both operands in its dtype. The Function runs outside autocast so that
        # its in-place products see the dtypes it chose.
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(dtype)
        else:
            dequantize = weight

            def weight() -> torch.Tensor:
                return dequantize().to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scaling)
    w_dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    if w_dtype is not None and w_dtype != x.dtype:
        raise TypeError(f"lora_linear: input is {x.dtype} but the base weight is {w_dtype}; cast the input first")
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear keeps the base weight frozen; it got a weight that requires grad")
    if isinstance(weight, torch.Tensor) and takes_few_rows(x, weight, bias, lora_a, lora_b):
        if scope_active():  # decoding: the factors' reused casts, half the bytes each program reads
            lora_a, lora_b = cast(lora_a, x.dtype), cast(lora_b, x.dtype)
        return lora_linear_few_rows(x, weight, bias, lora_a, lora_b, scaling)
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
