"""A gated MLP's activation, h = silu(gate) * up, elementwise over (..., n), forward and backward in one pass each.

PyTorch runs it as two kernels forward (silu, then the product) and three backward (two products and silu's
backward), each reading or writing a (tokens, intermediate) tensor: at Command R's 22,528-wide MLP that is 184 MB a
pass at 4,096 tokens, and autograd keeps silu(gate) beside gate and up for the backward. Here the forward reads gate
and up and writes h; the backward reads d(h), gate and up and writes d(gate) and d(up), recomputing silu(gate); only
gate and up are kept. The roundings are PyTorch's: silu(gate) rounded to the activations' dtype before the product,
d(silu) = d(h) * up rounded before silu's backward (computed in fp32 like the rest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .custom_op import KernelOp
from .dispatch import use_triton
from .grid import cdiv

_BLOCK = 1024


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., n) -> silu(gate) * up (..., n), as transformers' gated MLPs compute it."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(G, U, H, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(H.dtype.element_ty).to(tl.float32)
    tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    s = (g * sig).to(DU.dtype.element_ty).to(tl.float32)
    tl.store(DU + offs, (dh * s).to(DU.dtype.element_ty), mask=mask)
    ds = (dh * u).to(DG.dtype.element_ty).to(tl.float32)
    # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
    tl.store(DG + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK, num_warps=4)
    return h


def _swiglu_forward_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


def _swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dh, gate, up = dh.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(cdiv(n, _BLOCK),)](dh, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4)
    return dgate, dup


def _swiglu_backward_fake(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gradients(ctx, backward, dh):
    return backward(dh, *ctx.saved_tensors)


_swiglu = KernelOp("swiglu", _swiglu_forward, _swiglu_forward_fake, _setup_context, _gradients, _swiglu_backward,
                   _swiglu_backward_fake)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., n) of one shape and dtype -> silu(gate) * up (..., n)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)}/{gate.dtype} and "
                         f"{tuple(up.shape)}/{up.dtype}")
    if use_triton(gate, up):
        return _swiglu(gate, up)
    return reference_swiglu(gate, up)
