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

Unlike the Triton ops, this one is not a torch.library custom op: its body is plain PyTorch, which torch.compile
traces, the Function's hand-written backward included (dynamo traces autograd Functions), so inductor sees the GEMMs
and the casts around them; and a custom op could not take the dequantizing callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Weight = torch.Tensor | Callable[[], torch.Tensor]


def reference_lora_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Plain PyTorch: x (..., in) -> (..., out)."""
    w = weight() if callable(weight) else weight
    return F.linear(x, w, bias) + scaling * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        w = weight() if callable(weight) else weight
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
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
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
