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
order, so the result does not depend on which split finished first, adds the bias and stores the output.

Unlike the Triton ops, this one is not a torch.library custom op: its body is plain PyTorch, which torch.compile
traces, the Function's hand-written backward included (dynamo traces autograd Functions), so inductor sees the GEMMs
and the casts around them; and a custom op could not take the dequantizing callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import use_triton
from .reused_casts import cast, scope_active

Weight = torch.Tensor | Callable[[], torch.Tensor]


def reference_lora_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Plain PyTorch: x (..., in) -> (..., out)."""
    w = weight() if callable(weight) else weight
    return F.linear(x, w, bias) + scaling * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


# Rows up to which the few-rows kernel runs (decode batches); its row block is the rows rounded up to 16, tl.dot's
# minimum, so every program's product is one MMA tile tall.
FEW_ROWS = 64
# SMs of the H200 the few-rows configuration is aimed at; on another GPU it is still correct, only less well fitted.
_GPU_SMS = 132


def _few_rows_config(rows: int, n: int, k: int) -> dict:
    """Launch configuration of the few-rows kernel on a GPU, for `rows` rows of x (rows, k) and W (n, k).

    Measured on an H200 (benchmarks/bench_decode_ops.py few-rows, 1 and 8 rows, Trinity-Mini's projections): about one
    program per SM is best, with 64-column blocks wherever they still make 16 or more blocks (N >= 1024), as they read
    x and A once per 64 columns of W instead of 16, and K split to make up the count, each split keeping at least 2
    BLOCK_K iterations for its pipeline. That gave 9.0-9.3 us for 2048->4096 and 4096->2048 (16 MB of W, ~1.9 TB/s;
    unsplit 16-column blocks took 12-16 us), 4.6 us for 2048->512 and 5.0-5.4 us for 2048<->1024. The float32
    partials (written and read back, mostly in L2: 8 * splits * rows * n bytes) stay under half of W's 2 * n * k
    bytes, which binds only at tens of rows.
    """
    block_k = 128
    block_n = 64 if n >= 1024 else 16
    blocks = triton.cdiv(n, block_n)
    max_split = max(1, min(triton.cdiv(k, block_k) // 2, k // (8 * rows)))
    split = 1
    while split * 2 <= max_split and blocks * split * 2 <= _GPU_SMS:
        split *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4, "num_stages": 3}


def _few_rows_interpreter_config(k: int) -> dict:
    """Small blocks for the CPU interpreter, and K split into 1-2 iterations a split (at most 4 splits, the last ones
    short or empty when K is not a multiple), so that the CPU tests go through the split-K fix-up."""
    block_k = 32
    split = min(4, triton.next_power_of_2(triton.cdiv(k, block_k) + 1) // 2)
    return {"BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": split}


@triton.jit
def _few_rows_kernel(
    x_ptr, stride_xm, w_ptr, stride_wn, bias_ptr, a_ptr, stride_ar, b_ptr, stride_bn, out_ptr, stride_om,
    partials_ptr, arrivals_ptr, M, N, K, R, K_PER_SPLIT, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[:, n block] = x W[n block]^T + bias + scaling (x A^T) B[n block]^T for all M (<= BLOCK_M) rows; program
    (n block, split) computes the split's K_PER_SPLIT (a multiple of BLOCK_K) share, partials (SPLIT_K, M, N)
    float32 hold the splits' sums and arrivals (one int32 per n block, zero on entry and on exit) elects the last."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, n_mask, r_mask = offs_m < M, offs_n < N, offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None],
                    other=0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None],
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        xa = tl.dot(x, a.to(x.dtype), xa, input_precision=DOT_PRECISION)
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None],
                other=0.0)
    # x A^T stays float32, where the Function rounds it to the activations' dtype: a split holds only part of the sum,
    # and rounding each part would add one error per split. B is rounded to the activations' dtype as A is, so float32
    # factors and their reused casts (kernels/reused_casts.py) give the same result. ieee, as (rows, r) x (r, BLOCK_N)
    # is too small to cost.
    acc += scaling * tl.dot(xa, b.to(x_ptr.dtype.element_ty).to(tl.float32), input_precision="ieee")
    offs_mn = offs_m[:, None] * N + offs_n[None, :]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.store(partials_ptr + split * M * N + offs_mn, acc, mask=mn_mask)
        # Triton's scalar atomic is issued by one thread: the barrier puts every thread's partial before it, and its
        # release makes them visible to the program whose acquire sees the final count.
        tl.debug_barrier()
        is_last = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1
        if is_last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order whichever arrived last: deterministic sums
                # .cg: from L2, where the other programs' stores are; this SM's L1 is not kept coherent with them
                acc += tl.load(partials_ptr + s * M * N + offs_mn, mask=mn_mask, other=0.0, cache_modifier=".cg")
            tl.store(arrivals_ptr + pid_n, 0)
    else:
        is_last = True
    if is_last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(x_ptr.dtype.element_ty),
                 mask=mn_mask)


# Per device, one int32 arrival count per column block for the split-K fix-up, zero between launches (each block's
# last program resets its own), so one tensor serves every call and every CUDA graph replay; launches that share it
# must not run at once (one stream, as decoding runs). Grown, never shrunk, and the outgrown tensors kept alive: a
# graph captured earlier still points at them.
_arrival_counts: dict[torch.device, list[torch.Tensor]] = {}


def _arrival_counts_for(device: torch.device, blocks: int) -> torch.Tensor:
    held = _arrival_counts.setdefault(device, [])
    if not held or held[-1].numel() < blocks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Zeros allocated under capture would only be written when the graph replays.
            raise RuntimeError("lora_linear_few_rows needs more arrival counters than it has: run the layer once "
                               "before capturing it in a CUDA graph")
        # 1024 counters to start: more column blocks than a decoder's projections have, so growing is rare.
        size = max(blocks, 2 * held[-1].numel() if held else 1024)
        held.append(torch.zeros(size, dtype=torch.int32, device=device))
    return held[-1]


def _launch_few_rows(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: float, config: dict) -> torch.Tensor:
    """_few_rows_kernel on x2 (rows, in) with the launch configuration given: (rows, out) in x2's dtype."""
    rows, k = x2.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    x2, w = x2.contiguous(), weight if weight.stride(-1) == 1 else weight.contiguous()
    a = lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()
    b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()
    out = torch.empty(rows, n, dtype=x2.dtype, device=x2.device)
    block_n, block_k, split_k = config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
    blocks = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    # Every slot is written whole by its program, empty splits included: no zeroing.
    partials = torch.empty(split_k, rows, n, dtype=torch.float32, device=x2.device) if split_k > 1 else None
    arrivals = _arrival_counts_for(x2.device, blocks) if split_k > 1 else None
    _few_rows_kernel[(blocks, split_k)](
        x2, x2.stride(0), w, w.stride(0), bias, a, a.stride(0), b, b.stride(0), out, out.stride(0),
        partials, arrivals, rows, n, k, rank, k_per_split, float(scaling),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, triton.next_power_of_2(rows)),
        BLOCK_R=max(16, triton.next_power_of_2(rank)), DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        **config,
    )
    return out


def lora_linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The forward alone, in one launch, for at most FEW_ROWS rows of x (..., in); no autograd."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, k = x2.shape
    n = weight.shape[0]
    if rows > FEW_ROWS:
        raise ValueError(f"lora_linear_few_rows takes at most {FEW_ROWS} rows, got {rows}")
    config = _few_rows_config(rows, n, k) if x.is_cuda else _few_rows_interpreter_config(k)
    return _launch_few_rows(x2, weight, bias, lora_a, lora_b, scaling, config).view(*x.shape[:-1], n)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        w = weight() if callable(weight) else weight
        x2 = x.reshape(-1, x.shape[-1])
        a, b = cast(lora_a, x.dtype), cast(lora_b, x.dtype)  # reused across forwards while decoding
        out = F.linear(x2, w, bias)
        xa = x2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scaling)
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
    differentiated = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (x, bias, lora_a, lora_b))
    if (not differentiated and isinstance(weight, torch.Tensor) and x.numel() <= FEW_ROWS * x.shape[-1]
            and use_triton(x, weight, lora_a, lora_b)):
        if scope_active():  # decoding: the factors' reused casts, half the bytes each program reads
            lora_a, lora_b = cast(lora_a, x.dtype), cast(lora_b, x.dtype)
        return lora_linear_few_rows(x, weight, bias, lora_a, lora_b, scaling)
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
