"""AFMoE's attention output gate: out = o * sigmoid(g), elementwise over (..., n).

Forward reads o and g once and writes out; backward reads o, g and dout and writes do and dg, recomputing
sigmoid(g) rather than saving it (one fewer tensor of activations kept per layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .custom_op import KernelOp
from .dispatch import use_triton
from .grid import cdiv

_BLOCK = 1024


def reference_attention_gate(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """o, g (..., n) -> (..., n) in o's dtype; sigmoid and product in fp32."""
    return (o.float() * torch.sigmoid(g.float())).to(o.dtype)


@triton.jit
def _attention_gate_fwd_kernel(O, G, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (o * tl.sigmoid(g)).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _attention_gate_bwd_kernel(O, G, DOUT, DO, DG, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DO + offs, (dout * sig).to(DO.dtype.element_ty), mask=mask)
    # d sigmoid(g) / dg = sigmoid(g) * (1 - sigmoid(g))
    tl.store(DG + offs, (dout * o * sig * (1.0 - sig)).to(DG.dtype.element_ty), mask=mask)


def _attention_gate_forward(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    o, g = o.contiguous(), g.contiguous()
    out = torch.empty_like(o)
    n = o.numel()
    _attention_gate_fwd_kernel[(cdiv(n, _BLOCK),)](o, g, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


def _attention_gate_forward_fake(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return o.new_empty(o.shape)


def _attention_gate_backward(dout: torch.Tensor, o: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    o, g, dout = o.contiguous(), g.contiguous(), dout.contiguous()
    do, dg = torch.empty_like(o), torch.empty_like(g)
    n = o.numel()
    _attention_gate_bwd_kernel[(cdiv(n, _BLOCK),)](o, g, dout, do, dg, n, BLOCK=_BLOCK, num_warps=4)
    return do, dg


def _attention_gate_backward_fake(
    dout: torch.Tensor, o: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return o.new_empty(o.shape), g.new_empty(g.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gradients(ctx, backward, dout):
    return backward(dout, *ctx.saved_tensors)


_attention_gate = KernelOp("attention_gate", _attention_gate_forward, _attention_gate_forward_fake, _setup_context,
                           _gradients, _attention_gate_backward, _attention_gate_backward_fake)


def attention_gate(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """o (attention output), g (gate projection), both (..., n) of one shape -> (..., n) in o's dtype."""
    if o.shape != g.shape:
        raise ValueError(f"attention_gate needs o and g of one shape, got {tuple(o.shape)} and {tuple(g.shape)}")
    if use_triton(o, g):
        return _attention_gate(o, g)
    return reference_attention_gate(o, g)
