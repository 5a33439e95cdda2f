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
bound by launches, not by the bytes each reads. `_few_rows_kernel` gives each program a block of output columns:
it streams W's block and all of A once (A's float32 tiles cast in registers), keeps x A^T (rows, r) beside the
base product, and adds s (x A^T) B^T in its epilogue.

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
# Launch configuration of the few-rows kernel on a GPU: the fastest or within 3% of it for 1 and 8 rows at each of
# Trinity-Mini's projections (benchmarks/bench_decode_ops.py, H200): 8.6-15.7 us against 10-21 us for cuBLAS's three
# GEMMs. Each program's pass over K is serial, so small layers are bound by its latency, not by bandwidth.
FEW_ROWS_GPU_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


@triton.jit
def _few_rows_kernel(
    x_ptr, stride_xm, w_ptr, stride_wn, bias_ptr, a_ptr, stride_ar, b_ptr, stride_bn, out_ptr, stride_om,
    M, N, K, R, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[:, n block] = x W[n block]^T + bias + scaling (x A^T) B[n block]^T for all M (<= BLOCK_M) rows."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, n_mask, r_mask = offs_m < M, offs_n < N, offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
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
    # As the Function: x A^T rounded to the activations' dtype, then its product with B scaled and added.
    x_dtype = x_ptr.dtype.element_ty
    lora = tl.dot(xa.to(x_dtype), b.to(x_dtype), input_precision=DOT_PRECISION)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(x_dtype),
             mask=m_mask[:, None] & n_mask[None, :])


def lora_linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The forward alone, in one launch, for at most FEW_ROWS rows of x (..., in); no autograd."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, k = x2.shape
    n, rank = weight.shape[0], lora_a.shape[0]
    if rows > FEW_ROWS:
        raise ValueError(f"lora_linear_few_rows takes at most {FEW_ROWS} rows, got {rows}")
    x2, w = x2.contiguous(), weight if weight.stride(-1) == 1 else weight.contiguous()
    a = lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()
    b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    config = dict(FEW_ROWS_GPU_CONFIG) if x.is_cuda else {"BLOCK_N": 16, "BLOCK_K": 32}
    _few_rows_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        x2, x2.stride(0), w, w.stride(0), bias, a, a.stride(0), b, b.stride(0), out, out.stride(0),
        rows, n, k, rank, float(scaling),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, triton.next_power_of_2(rows)),
        BLOCK_R=max(16, triton.next_power_of_2(rank)), DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **config,
    )
    return out.view(*x.shape[:-1], n)


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
