"""JetMoe's mixture-of-attention projections: ``expert_map`` (each token through its k experts' query projections)
and ``expert_reduce`` (each (token, slot) row back through its expert's output projection, summed with the routing
weights), with optional LoRA on the 3D expert weight; ``expert_map_nf4`` and ``expert_reduce_nf4`` take the weight
frozen in NF4 (QLoRA, ``nf4``).

They are the grouped GEMMs of the experts block (``grouped_gemm``, over rows sorted by expert) with one weight each
and no activation between: the forward is one ``grouped_mm`` (plus a thin one for LoRA), the backward one
``grouped_mm`` through the weight read transposed and one ``grouped_wgrad`` per trained tensor. The grouped GEMMs take
either kind of weight (an NF4 one is decoded tile by tile in registers), so one forward and one backward serve both;
the ops differ only in how the weight travels as op arguments (a tensor, or an NF4 stack's tensors, shape and dtype)
and in the weight gradient, which NF4 weights never get.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..custom_op import KernelOp, ReferenceOp, no_gradient
from ..dispatch import use_triton
from ..grid import next_power_of_2
from .experts import (
    ExpertLora,
    _cast,
    _like,
    _lora,
    _lora_grad,
    _lora_tensors,
    _reference_expert_linear,
    _saved_schedule,
    _schedule,
    _schedule_fakes,
    _schedule_tensors,
    _sum_slots,
    _thin,
)
from .grouped_gemm import GemmWeight, base_product, grouped_mm, grouped_wgrad
from .nf4 import Nf4Weight, reference_dequantize_nf4

# ----------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------


def reference_expert_map(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora: ExpertLora | None = None
) -> torch.Tensor:
    """(tokens, H) -> (tokens, k, N): out[t, k] = hidden[t] @ weight[top_k_index[t, k]]^T (+ LoRA)."""
    num_tokens, top_k = top_k_index.shape
    out = hidden.new_zeros(num_tokens, top_k, weight.shape[1])
    for expert in range(weight.shape[0]):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        # In out's dtype: under autocast F.linear returns autocast's
        y = _reference_expert_linear(hidden[token_idx], weight, lora, expert)
        out = out.index_put((token_idx, slot), y.to(out.dtype))
    return out


def reference_expert_reduce(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weight: torch.Tensor,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """(tokens, k, N) -> (tokens, H): out[t] = sum_k top_k_weights[t, k] * x[t, k] @ weight[e_tk]^T (+ LoRA)."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for expert in range(weight.shape[0]):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        y = _reference_expert_linear(x[token_idx, slot], weight, lora, expert)
        y = y * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out


# ----------------------------------------------------------------------------------------------------------
# Triton path: one forward and one backward over grouped_gemm for both kinds of weight, one differentiable op per kind
# ----------------------------------------------------------------------------------------------------------
# An NF4 weight travels as op arguments packed, absmax, absmax_scale, absmax_offset (None without double
# quantization), its shape as three ints and its dtype: custom ops take no dataclasses.


def _nf4_op_args(weight: Nf4Weight) -> tuple:
    return (weight.packed, weight.absmax, weight.absmax_scale, weight.absmax_offset, list(weight.shape), weight.dtype)


def _nf4_from_op_args(packed: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
                      absmax_offset: torch.Tensor | None, shape: list[int], dtype: torch.dtype) -> Nf4Weight:
    return Nf4Weight(packed, absmax, tuple(shape), dtype, absmax_scale, absmax_offset)


def _map_forward(
    weight: GemmWeight, hidden: torch.Tensor, top_k_index: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, ...]:
    """-> out (T, k, N), the schedule's five tensors and the thin LoRA activation (empty without LoRA)."""
    num_tokens, top_k = top_k_index.shape
    dtype = hidden.dtype
    schedule, identity = _schedule(top_k_index, weight.shape[0])
    w, a_, b_ = _cast(weight, dtype), _cast(lora_a, dtype), _cast(lora_b, dtype)
    tok, pair = schedule.sorted_token, schedule.sorted_pair
    l = None
    if a_ is not None:
        l = grouped_mm(hidden, tok, a_, schedule, _thin(schedule.num_pairs, a_.shape[1], hidden), identity,
                       out_scale=scaling)
    out = torch.empty(schedule.num_pairs, weight.shape[1], dtype=dtype, device=hidden.device)
    grouped_mm(hidden, tok, w, schedule, out, pair, l, b_, product=base_product(hidden, w, schedule, tok))
    return (out.view(num_tokens, top_k, -1), *_schedule_tensors(schedule),
            l if l is not None else no_gradient(hidden))


def _map_forward_fake(
    weight_shape: tuple[int, ...], hidden: torch.Tensor, top_k_index: torch.Tensor, lora_a: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    num_tokens, top_k = top_k_index.shape
    l = hidden.new_empty(num_tokens * top_k, lora_a.shape[1]) if lora_a is not None else no_gradient(hidden)
    return (hidden.new_empty(num_tokens, top_k, weight_shape[1]), *_schedule_fakes(top_k_index, weight_shape[0]), l)


def _map_backward(
    weight: GemmWeight, grad_out: torch.Tensor, hidden: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight (16-bit only), lora_a and lora_b, each where needs says (else empty)."""
    needs_hidden, needs_weight, needs_a, needs_b = needs
    num_tokens, top_k, _ = grad_out.shape
    schedule, identity = _saved_schedule(schedule, top_k)
    w, a_, b_ = _cast(weight, hidden.dtype), _cast(lora_a, hidden.dtype), _cast(lora_b, hidden.dtype)
    tok, pair = schedule.sorted_token, schedule.sorted_pair
    g = grad_out.to(hidden.dtype).reshape(num_tokens * top_k, -1)
    g_l = None
    if a_ is not None:
        g_l = grouped_mm(g, pair, b_.transpose(1, 2), schedule, _thin(schedule.num_pairs, a_.shape[1], g),
                         identity, out_scale=scaling)
    grad_hidden = no_gradient(hidden)
    if needs_hidden:
        dx = torch.empty(schedule.num_pairs, hidden.shape[1], dtype=hidden.dtype, device=g.device)
        grouped_mm(g, pair, w, schedule, dx, pair, g_l, a_.transpose(1, 2) if a_ is not None else None,
                   transpose=True, product=base_product(g, w, schedule, pair, transpose=True))
        grad_hidden = _sum_slots(dx, num_tokens, top_k, hidden.dtype)
    grad_weight = no_gradient(hidden)
    if needs_weight:
        grad_weight = grouped_wgrad(g, pair, hidden, tok, schedule, torch.empty_like(weight))
    grad_a = _lora_grad(needs_a, lora_a, lambda out: grouped_wgrad(g_l, identity, hidden, tok, schedule, out), g)
    grad_b = _lora_grad(needs_b, lora_b, lambda out: grouped_wgrad(g, pair, l, identity, schedule, out), g)
    return grad_hidden, grad_weight, grad_a, grad_b


def _weight_grad_fake(weight: torch.Tensor | None, needed: bool, absent: torch.Tensor) -> torch.Tensor:
    # Laid out like the weight (empty_like), as the backward's grouped_wgrad output is; NF4 weights (None) get none.
    return torch.empty_like(weight) if needed and weight is not None else no_gradient(absent)


def _map_backward_fake(
    weight: torch.Tensor | None, hidden: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    needs_hidden, needs_weight, needs_a, needs_b = needs
    return (_like(hidden, needs_hidden, hidden), _weight_grad_fake(weight, needs_weight, hidden),
            _like(lora_a, needs_a, hidden), _like(lora_b, needs_b, hidden))


def _reduce_forward(
    weight: GemmWeight, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, ...]:
    """-> out (T, H), the schedule's five tensors, the routing weight of each sorted row (S,) fp32 and the thin
    LoRA activation (empty without LoRA)."""
    num_tokens, top_k = top_k_index.shape
    dtype = x.dtype
    schedule, identity = _schedule(top_k_index, weight.shape[0])
    row_weight = top_k_weights.reshape(-1).float()[schedule.sorted_pair]
    w, a_, b_ = _cast(weight, dtype), _cast(lora_a, dtype), _cast(lora_b, dtype)
    pair = schedule.sorted_pair
    x_pairs = x.reshape(num_tokens * top_k, -1)
    l = None
    if a_ is not None:
        l = grouped_mm(x_pairs, pair, a_, schedule, _thin(schedule.num_pairs, a_.shape[1], x), identity,
                       out_scale=scaling)
    y = torch.empty(schedule.num_pairs, weight.shape[1], dtype=dtype, device=x.device)
    grouped_mm(x_pairs, pair, w, schedule, y, pair, l, b_, row_scale=row_weight,
               product=base_product(x_pairs, w, schedule, pair))
    return (_sum_slots(y, num_tokens, top_k, dtype), *_schedule_tensors(schedule), row_weight,
            l if l is not None else no_gradient(x))


def _reduce_forward_fake(
    weight_shape: tuple[int, ...], x: torch.Tensor, top_k_index: torch.Tensor, lora_a: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    num_tokens, top_k = top_k_index.shape
    num_rows = num_tokens * top_k
    l = x.new_empty(num_rows, lora_a.shape[1]) if lora_a is not None else no_gradient(x)
    return (x.new_empty(num_tokens, weight_shape[1]), *_schedule_fakes(top_k_index, weight_shape[0]),
            x.new_empty(num_rows, dtype=torch.float32), l)


def _reduce_backward(
    weight: GemmWeight, grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor],
    row_weight: torch.Tensor, l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, top_k_weights, weight (16-bit only), lora_a and lora_b, each where needs says (else empty)."""
    needs_x, needs_weights, needs_weight, needs_a, needs_b = needs
    num_tokens, top_k, _ = x.shape
    schedule, identity = _saved_schedule(schedule, top_k)
    w, a_, b_ = _cast(weight, x.dtype), _cast(lora_a, x.dtype), _cast(lora_b, x.dtype)
    tok, pair = schedule.sorted_token, schedule.sorted_pair
    g = grad_out.to(x.dtype)
    x_pairs = x.reshape(num_tokens * top_k, -1)
    g_l = None
    if a_ is not None:
        g_l = grouped_mm(g, tok, b_.transpose(1, 2), schedule, _thin(schedule.num_pairs, a_.shape[1], g),
                         identity, out_scale=scaling)
    grad_x = grad_weights = no_gradient(x)
    if needs_x or needs_weights:
        # Unweighted d(x) serves both: d(x) = w * gx and d(w) = <gx, x>.
        gx = torch.empty(schedule.num_pairs, x.shape[2], dtype=x.dtype, device=g.device)
        grouped_mm(g, tok, w, schedule, gx, pair, g_l, a_.transpose(1, 2) if a_ is not None else None,
                   transpose=True, product=base_product(g, w, schedule, tok, transpose=True))
        grad_pairs, grad_pair_weights = _weighted_pair_grads(gx, x_pairs, top_k_weights.reshape(-1), needs_x,
                                                             needs_weights)
        if needs_x:
            grad_x = grad_pairs.view_as(x)
        if needs_weights:
            grad_weights = grad_pair_weights.view(num_tokens, top_k).to(top_k_weights.dtype)
    grad_weight = no_gradient(x)
    if needs_weight:
        grad_weight = grouped_wgrad(g, tok, x_pairs, pair, schedule, torch.empty_like(weight), row_weight)
    grad_a = _lora_grad(needs_a, lora_a,
                        lambda out: grouped_wgrad(g_l, identity, x_pairs, pair, schedule, out, row_weight), g)
    grad_b = _lora_grad(needs_b, lora_b,
                        lambda out: grouped_wgrad(g, tok, l, identity, schedule, out, row_weight), g)
    return grad_x, grad_weights, grad_weight, grad_a, grad_b


def _weighted_pair_grads(gx: torch.Tensor, x_pairs: torch.Tensor, pair_weights: torch.Tensor, needs_x: bool,
                         needs_weights: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From the unweighted d(rows) gx (S, N) of the (token, slot) rows x_pairs (S, N) weighted by pair_weights (S,):
    d(x) = w * gx in x's dtype and d(w) = <gx, x> in fp32, each where asked (else None), both computed in fp32.

    One pass of a Triton kernel where it runs; in torch, fp32 copies of gx and x and their products made seven
    passes over (S, N) (about 0.7 GB of traffic a layer for JetMoe-8B's 8,192 rows of 2,048: some 0.3 ms at an
    H100's bandwidth, estimated, not timed alone)."""
    if use_triton(gx, x_pairs):
        gx, x_pairs = gx.contiguous(), x_pairs.contiguous()
        rows, width = gx.shape
        grad_x = torch.empty_like(x_pairs) if needs_x else None
        grad_w = torch.empty(rows, dtype=torch.float32, device=gx.device) if needs_weights else None
        pair_weights = pair_weights.contiguous()
        # What is not asked for is never written: any tensor stands in for its pointer.
        _weighted_pair_grads_kernel[(rows,)](gx, x_pairs, pair_weights, gx if grad_x is None else grad_x,
                                             pair_weights if grad_w is None else grad_w, width,
                                             NEEDS_X=needs_x, NEEDS_WEIGHTS=needs_weights,
                                             BLOCK_N=min(next_power_of_2(width), 2048))
        return grad_x, grad_w
    gx32 = gx.float()
    grad_x = (gx32 * pair_weights.reshape(-1, 1).float()).to(x_pairs.dtype) if needs_x else None
    grad_w = (gx32 * x_pairs.float()).sum(-1) if needs_weights else None
    return grad_x, grad_w


@triton.jit
def _weighted_pair_grads_kernel(gx_ptr, x_ptr, weights_ptr, grad_x_ptr, grad_w_ptr, N, NEEDS_X: tl.constexpr,
                                NEEDS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(weights_ptr + row).to(tl.float32)
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        g = tl.load(gx_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if NEEDS_X:
            tl.store(grad_x_ptr + row * N + cols, (g * weight).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEEDS_WEIGHTS:
            dot += g * tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if NEEDS_WEIGHTS:
        tl.store(grad_w_ptr + row, tl.sum(dot, axis=0))


def _reduce_backward_fake(
    weight: torch.Tensor | None, x: torch.Tensor, top_k_weights: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    needs_x, needs_weights, needs_weight, needs_a, needs_b = needs
    return (_like(x, needs_x, x), _like(top_k_weights, needs_weights, x), _weight_grad_fake(weight, needs_weight, x),
            _like(lora_a, needs_a, x), _like(lora_b, needs_b, x))


# 16-bit weight: trained when it requires grad (full fine-tuning).


def _expert_map_forward(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _map_forward(weight, hidden, top_k_index, lora_a, lora_b, scaling)


def _expert_map_forward_fake(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _map_forward_fake(weight.shape, hidden, top_k_index, lora_a)


def _expert_map_backward(
    grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _map_backward(weight, grad_out, hidden, lora_a, lora_b, scaling, schedule, l, needs)


def _expert_map_backward_fake(
    grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _map_backward_fake(weight, hidden, lora_a, lora_b, needs)


def _expert_map_setup_context(ctx, inputs, output):
    hidden, _, weight, lora_a, lora_b, scaling = inputs
    kept = output[1:]
    ctx.save_for_backward(hidden, weight, lora_a, lora_b, *kept)
    ctx.scaling = scaling
    ctx.mark_non_differentiable(*kept)


def _expert_map_gradients(ctx, backward, grad_out, *_):
    hidden, weight, lora_a, lora_b, *schedule, l = ctx.saved_tensors
    needs_input = ctx.needs_input_grad
    needs = [needs_input[0], needs_input[2], needs_input[3], needs_input[4]]
    grads = backward(grad_out, hidden, weight, lora_a, lora_b, ctx.scaling, schedule, l, needs)
    grad_hidden, grad_weight, grad_a, grad_b = (grad if need else None for grad, need in zip(grads, needs))
    return grad_hidden, None, grad_weight, grad_a, grad_b, None


_expert_map = KernelOp("expert_map", _expert_map_forward, _expert_map_forward_fake, _expert_map_setup_context,
                       _expert_map_gradients, _expert_map_backward, _expert_map_backward_fake)


def _expert_reduce_forward(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    return _reduce_forward(weight, x, top_k_index, top_k_weights, lora_a, lora_b, scaling)


def _expert_reduce_forward_fake(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    return _reduce_forward_fake(weight.shape, x, top_k_index, lora_a)


def _expert_reduce_backward(
    grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor],
    row_weight: torch.Tensor, l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reduce_backward(weight, grad_out, x, top_k_weights, lora_a, lora_b, scaling, schedule, row_weight, l,
                            needs)


def _expert_reduce_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor],
    row_weight: torch.Tensor, l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reduce_backward_fake(weight, x, top_k_weights, lora_a, lora_b, needs)


def _expert_reduce_setup_context(ctx, inputs, output):
    x, _, top_k_weights, weight, lora_a, lora_b, scaling = inputs
    kept = output[1:]
    ctx.save_for_backward(x, top_k_weights, weight, lora_a, lora_b, *kept)
    ctx.scaling = scaling
    ctx.mark_non_differentiable(*kept)


def _expert_reduce_gradients(ctx, backward, grad_out, *_):
    x, top_k_weights, weight, lora_a, lora_b, *schedule, row_weight, l = ctx.saved_tensors
    needs_input = ctx.needs_input_grad
    needs = [needs_input[0], needs_input[2], needs_input[3], needs_input[4], needs_input[5]]
    grads = backward(grad_out, x, top_k_weights, weight, lora_a, lora_b, ctx.scaling, schedule, row_weight, l, needs)
    grad_x, grad_weights, grad_weight, grad_a, grad_b = (grad if need else None for grad, need in zip(grads, needs))
    return grad_x, None, grad_weights, grad_weight, grad_a, grad_b, None


_expert_reduce = KernelOp("expert_reduce", _expert_reduce_forward, _expert_reduce_forward_fake,
                          _expert_reduce_setup_context, _expert_reduce_gradients, _expert_reduce_backward,
                          _expert_reduce_backward_fake)


# NF4 weight: frozen, never a weight gradient.


def _expert_map_nf4_forward(
    hidden: torch.Tensor, top_k_index: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
    scaling: float, packed: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _nf4_from_op_args(packed, absmax, absmax_scale, absmax_offset, shape, weight_dtype)
    return _map_forward(weight, hidden, top_k_index, lora_a, lora_b, scaling)


def _expert_map_nf4_forward_fake(
    hidden: torch.Tensor, top_k_index: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
    scaling: float, packed: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _map_forward_fake(shape, hidden, top_k_index, lora_a)


def _expert_map_nf4_backward(
    grad_out: torch.Tensor, hidden: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
    scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool], packed: torch.Tensor,
    absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int],
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _nf4_from_op_args(packed, absmax, absmax_scale, absmax_offset, shape, weight_dtype)
    return _map_backward(weight, grad_out, hidden, lora_a, lora_b, scaling, schedule, l, needs)


def _expert_map_nf4_backward_fake(
    grad_out: torch.Tensor, hidden: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
    scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool], packed: torch.Tensor,
    absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int],
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _map_backward_fake(None, hidden, lora_a, lora_b, needs)


def _nf4_setup_context(ctx, saved_inputs: tuple, scaling: float, nf4_args: tuple, output) -> None:
    """Saves what the backward reads of the inputs, the kept outputs and the NF4 tensors; the weight's shape and
    dtype stay on ctx."""
    packed, absmax, absmax_scale, absmax_offset, shape, weight_dtype = nf4_args
    kept = output[1:]
    ctx.save_for_backward(*saved_inputs, *kept, packed, absmax, absmax_scale, absmax_offset)
    ctx.scaling, ctx.weight_layout = scaling, (shape, weight_dtype)
    ctx.mark_non_differentiable(*kept)


def _expert_map_nf4_gradients(ctx, backward, grad_out, *_):
    hidden, lora_a, lora_b, *kept = ctx.saved_tensors
    schedule, l, nf4_tensors = kept[:5], kept[5], kept[6:]
    needs_input = ctx.needs_input_grad
    needs = [needs_input[0], False, needs_input[2], needs_input[3]]
    grads = backward(grad_out, hidden, lora_a, lora_b, ctx.scaling, schedule, l, needs, *nf4_tensors,
                     *ctx.weight_layout)
    grad_hidden, _, grad_a, grad_b = (grad if need else None for grad, need in zip(grads, needs))
    return grad_hidden, None, grad_a, grad_b, None, None, None, None, None, None, None


_expert_map_nf4 = KernelOp(
    "expert_map_nf4", _expert_map_nf4_forward, _expert_map_nf4_forward_fake,
    lambda ctx, inputs, output: _nf4_setup_context(ctx, (inputs[0], *inputs[2:4]), inputs[4], inputs[5:], output),
    _expert_map_nf4_gradients, _expert_map_nf4_backward, _expert_map_nf4_backward_fake,
)


def _expert_reduce_nf4_forward(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, packed: torch.Tensor, absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    weight = _nf4_from_op_args(packed, absmax, absmax_scale, absmax_offset, shape, weight_dtype)
    return _reduce_forward(weight, x, top_k_index, top_k_weights, lora_a, lora_b, scaling)


def _expert_reduce_nf4_forward_fake(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, packed: torch.Tensor, absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    return _reduce_forward_fake(shape, x, top_k_index, lora_a)


def _expert_reduce_nf4_backward(
    grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], row_weight: torch.Tensor,
    l: torch.Tensor, needs: list[bool], packed: torch.Tensor, absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _nf4_from_op_args(packed, absmax, absmax_scale, absmax_offset, shape, weight_dtype)
    return _reduce_backward(weight, grad_out, x, top_k_weights, lora_a, lora_b, scaling, schedule, row_weight, l,
                            needs)


def _expert_reduce_nf4_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], row_weight: torch.Tensor,
    l: torch.Tensor, needs: list[bool], packed: torch.Tensor, absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reduce_backward_fake(None, x, top_k_weights, lora_a, lora_b, needs)


def _expert_reduce_nf4_gradients(ctx, backward, grad_out, *_):
    x, top_k_weights, lora_a, lora_b, *kept = ctx.saved_tensors
    schedule, row_weight, l, nf4_tensors = kept[:5], kept[5], kept[6], kept[7:]
    needs_input = ctx.needs_input_grad
    needs = [needs_input[0], needs_input[2], False, needs_input[3], needs_input[4]]
    grads = backward(grad_out, x, top_k_weights, lora_a, lora_b, ctx.scaling, schedule, row_weight, l, needs,
                     *nf4_tensors, *ctx.weight_layout)
    grad_x, grad_weights, _, grad_a, grad_b = (grad if need else None for grad, need in zip(grads, needs))
    return grad_x, None, grad_weights, grad_a, grad_b, None, None, None, None, None, None, None


def _expert_reduce_nf4_setup_context(ctx, inputs, output):
    # top_k_index (input 1) is not saved: the schedule replaces it.
    _nf4_setup_context(ctx, (inputs[0], *inputs[2:5]), inputs[5], inputs[6:], output)


_expert_reduce_nf4 = KernelOp(
    "expert_reduce_nf4", _expert_reduce_nf4_forward, _expert_reduce_nf4_forward_fake,
    _expert_reduce_nf4_setup_context, _expert_reduce_nf4_gradients, _expert_reduce_nf4_backward,
    _expert_reduce_nf4_backward_fake,
)


# ----------------------------------------------------------------------------------------------------------
# The references as ops: under torch.compile their loops over experts run as one node each
# ----------------------------------------------------------------------------------------------------------


def _expert_map_reference(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    return reference_expert_map(hidden, top_k_index, weight, _lora(lora_a, lora_b, scaling))


def _expert_map_reference_fake(hidden, top_k_index, weight, lora_a, lora_b, scaling) -> torch.Tensor:
    return hidden.new_empty(*top_k_index.shape, weight.shape[1])


def _expert_reduce_reference(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    return reference_expert_reduce(x, top_k_index, top_k_weights, weight, _lora(lora_a, lora_b, scaling))


def _expert_reduce_reference_fake(x, top_k_index, top_k_weights, weight, lora_a, lora_b, scaling) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def _expert_map_nf4_reference(
    hidden: torch.Tensor, top_k_index: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int], weight_dtype: torch.dtype,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    weight = reference_dequantize_nf4(_nf4_from_op_args(packed, absmax, absmax_scale, absmax_offset, shape,
                                                        weight_dtype))
    return reference_expert_map(hidden, top_k_index, weight, _lora(lora_a, lora_b, scaling))


def _expert_map_nf4_reference_fake(hidden, top_k_index, packed, absmax, absmax_scale, absmax_offset, shape,
                                   weight_dtype, lora_a, lora_b, scaling) -> torch.Tensor:
    return hidden.new_empty(*top_k_index.shape, shape[1])


def _expert_reduce_nf4_reference(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, packed: torch.Tensor,
    absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None, shape: list[int],
    weight_dtype: torch.dtype, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    weight = reference_dequantize_nf4(_nf4_from_op_args(packed, absmax, absmax_scale, absmax_offset, shape,
                                                        weight_dtype))
    return reference_expert_reduce(x, top_k_index, top_k_weights, weight, _lora(lora_a, lora_b, scaling))


def _expert_reduce_nf4_reference_fake(x, top_k_index, top_k_weights, packed, absmax, absmax_scale, absmax_offset,
                                      shape, weight_dtype, lora_a, lora_b, scaling) -> torch.Tensor:
    return x.new_empty(x.shape[0], shape[1])


_expert_map_reference_op = ReferenceOp("expert_map_reference", _expert_map_reference, _expert_map_reference_fake)
_expert_reduce_reference_op = ReferenceOp("expert_reduce_reference", _expert_reduce_reference,
                                          _expert_reduce_reference_fake)
_expert_map_nf4_reference_op = ReferenceOp("expert_map_nf4_reference", _expert_map_nf4_reference,
                                           _expert_map_nf4_reference_fake)
_expert_reduce_nf4_reference_op = ReferenceOp("expert_reduce_nf4_reference", _expert_reduce_nf4_reference,
                                              _expert_reduce_nf4_reference_fake)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def expert_map(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora: ExpertLora | None = None
) -> torch.Tensor:
    """(tokens, H) -> (tokens, k, N): out[t, k] = hidden[t] @ weight[top_k_index[t, k]]^T (+ LoRA).

    weight: (E, N, H). JetMoe's mixture-of-attention query projection.
    """
    a, b, s = _lora_tensors(lora)
    if hidden.shape[0] > 0 and use_triton(hidden, weight, a, b):
        return _expert_map(hidden, top_k_index, weight, a, b, s)[0]
    return _expert_map_reference_op(hidden, top_k_index, weight, a, b, s)


def expert_reduce(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weight: torch.Tensor,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """(tokens, k, N) -> (tokens, H): out[t] = sum_k top_k_weights[t, k] * x[t, k] @ weight[e_tk]^T (+ LoRA).

    weight: (E, H, N). JetMoe's mixture-of-attention output projection.
    """
    a, b, s = _lora_tensors(lora)
    if x.shape[0] > 0 and use_triton(x, top_k_weights, weight, a, b):
        return _expert_reduce(x, top_k_index, top_k_weights, weight, a, b, s)[0]
    return _expert_reduce_reference_op(x, top_k_index, top_k_weights, weight, a, b, s)


def _runs_nf4_kernels(x: torch.Tensor, weight: Nf4Weight, *tensors: torch.Tensor | None) -> bool:
    # bf16 weights are rounded to bf16 inside the kernels, which the interpreter cannot be trusted with.
    interpreted_bf16 = not x.is_cuda and weight.dtype == torch.bfloat16
    return x.shape[0] > 0 and not interpreted_bf16 and use_triton(x, *tensors, *weight.tensors())


def expert_map_nf4(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: Nf4Weight, lora: ExpertLora | None = None
) -> torch.Tensor:
    """``expert_map`` with a frozen NF4 weight (E, N, H): the same result as ``expert_map`` on its dequantized
    values, without a 16-bit copy of the stack. Differentiable w.r.t. hidden and the LoRA factors."""
    a, b, s = _lora_tensors(lora)
    if _runs_nf4_kernels(hidden, weight, a, b):
        return _expert_map_nf4(hidden, top_k_index, a, b, s, *_nf4_op_args(weight))[0]
    return _expert_map_nf4_reference_op(hidden, top_k_index, *_nf4_op_args(weight), a, b, s)


def expert_reduce_nf4(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weight: Nf4Weight,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """``expert_reduce`` with a frozen NF4 weight (E, H, N): the same result as ``expert_reduce`` on its dequantized
    values, without a 16-bit copy of the stack. Differentiable w.r.t. x, top_k_weights and the LoRA factors."""
    a, b, s = _lora_tensors(lora)
    if _runs_nf4_kernels(x, weight, top_k_weights, a, b):
        return _expert_reduce_nf4(x, top_k_index, top_k_weights, a, b, s, *_nf4_op_args(weight))[0]
    return _expert_reduce_nf4_reference_op(x, top_k_index, top_k_weights, *_nf4_op_args(weight), a, b, s)
