"""JetMoe's mixture-of-attention projections: ``expert_map`` (each token through its k experts' query projections)
and ``expert_reduce`` (each (token, slot) row back through its expert's output projection, summed with the routing
weights), with optional LoRA on the 3D expert weight.

They are the grouped GEMMs of the experts block (``grouped_gemm``, over rows sorted by expert) with one weight each
and no activation between: the forward is one ``grouped_mm`` (plus a thin one for LoRA), the backward one
``grouped_mm`` through the weight read transposed and one ``grouped_wgrad`` per trained tensor.
"""

from __future__ import annotations

import torch

from ..custom_op import KernelOp, ReferenceOp, no_gradient
from ..dispatch import use_triton
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
from .grouped_gemm import grouped_mm, grouped_wgrad

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
        out = out.index_put((token_idx, slot), _reference_expert_linear(hidden[token_idx], weight, lora, expert))
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
# Triton path: the forward and backward over grouped_gemm, one differentiable op each
# ----------------------------------------------------------------------------------------------------------


def _expert_map_forward(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (T, k, N), the schedule's five tensors and the thin LoRA activation (empty without LoRA)."""
    num_tokens, top_k = top_k_index.shape
    dtype = hidden.dtype
    schedule, identity = _schedule(top_k_index, weight.shape[0])
    w, a_, b_ = weight.to(dtype), _cast(lora_a, dtype), _cast(lora_b, dtype)
    tok, pair = schedule.sorted_token, schedule.sorted_pair
    l = None
    if a_ is not None:
        l = grouped_mm(hidden, tok, a_, schedule, _thin(schedule.num_pairs, a_.shape[1], hidden), identity,
                       out_scale=scaling)
    out = torch.empty(schedule.num_pairs, w.shape[1], dtype=dtype, device=hidden.device)
    grouped_mm(hidden, tok, w, schedule, out, pair, l, b_)
    return (out.view(num_tokens, top_k, -1), *_schedule_tensors(schedule),
            l if l is not None else no_gradient(hidden))


def _expert_map_forward_fake(
    hidden: torch.Tensor, top_k_index: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, top_k = top_k_index.shape
    l = hidden.new_empty(num_tokens * top_k, lora_a.shape[1]) if lora_a is not None else no_gradient(hidden)
    return (hidden.new_empty(num_tokens, top_k, weight.shape[1]), *_schedule_fakes(top_k_index, weight.shape[0]), l)


def _expert_map_backward(
    grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight, lora_a and lora_b, each where needs says (else empty)."""
    needs_hidden, needs_weight, needs_a, needs_b = needs
    num_tokens, top_k, _ = grad_out.shape
    schedule, identity = _saved_schedule(schedule, top_k)
    w, a_, b_ = weight.to(hidden.dtype), _cast(lora_a, hidden.dtype), _cast(lora_b, hidden.dtype)
    tok, pair = schedule.sorted_token, schedule.sorted_pair
    g = grad_out.to(hidden.dtype).reshape(num_tokens * top_k, -1)
    g_l = None
    if a_ is not None:
        g_l = grouped_mm(g, pair, b_.transpose(1, 2), schedule, _thin(schedule.num_pairs, a_.shape[1], g),
                         identity, out_scale=scaling)
    grad_hidden = no_gradient(hidden)
    if needs_hidden:
        dx = torch.empty(schedule.num_pairs, hidden.shape[1], dtype=hidden.dtype, device=g.device)
        grouped_mm(g, pair, w.transpose(1, 2), schedule, dx, pair, g_l,
                   a_.transpose(1, 2) if a_ is not None else None)
        grad_hidden = _sum_slots(dx, num_tokens, top_k, hidden.dtype)
    grad_weight = no_gradient(hidden)
    if needs_weight:
        grad_weight = grouped_wgrad(g, pair, hidden, tok, schedule, torch.empty_like(weight))
    grad_a = _lora_grad(needs_a, lora_a, lambda out: grouped_wgrad(g_l, identity, hidden, tok, schedule, out), g)
    grad_b = _lora_grad(needs_b, lora_b, lambda out: grouped_wgrad(g, pair, l, identity, schedule, out), g)
    return grad_hidden, grad_weight, grad_a, grad_b


def _expert_map_backward_fake(
    grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor], l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    needs_hidden, needs_weight, needs_a, needs_b = needs
    return (_like(hidden, needs_hidden, hidden), torch.empty_like(weight) if needs_weight else no_gradient(hidden),
            _like(lora_a, needs_a, hidden), _like(lora_b, needs_b, hidden))


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
    """-> out (T, H), the schedule's five tensors, the routing weight of each sorted row (S,) fp32 and the thin
    LoRA activation (empty without LoRA)."""
    num_tokens, top_k = top_k_index.shape
    dtype = x.dtype
    schedule, identity = _schedule(top_k_index, weight.shape[0])
    row_weight = top_k_weights.reshape(-1).float()[schedule.sorted_pair]
    w, a_, b_ = weight.to(dtype), _cast(lora_a, dtype), _cast(lora_b, dtype)
    pair = schedule.sorted_pair
    x_pairs = x.reshape(num_tokens * top_k, -1)
    l = None
    if a_ is not None:
        l = grouped_mm(x_pairs, pair, a_, schedule, _thin(schedule.num_pairs, a_.shape[1], x), identity,
                       out_scale=scaling)
    y = torch.empty(schedule.num_pairs, w.shape[1], dtype=dtype, device=x.device)
    grouped_mm(x_pairs, pair, w, schedule, y, pair, l, b_, row_scale=row_weight)
    return (_sum_slots(y, num_tokens, top_k, dtype), *_schedule_tensors(schedule), row_weight,
            l if l is not None else no_gradient(x))


def _expert_reduce_forward_fake(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    num_tokens, top_k = top_k_index.shape
    num_rows = num_tokens * top_k
    l = x.new_empty(num_rows, lora_a.shape[1]) if lora_a is not None else no_gradient(x)
    return (x.new_empty(num_tokens, weight.shape[1]), *_schedule_fakes(top_k_index, weight.shape[0]),
            x.new_empty(num_rows, dtype=torch.float32), l)


def _expert_reduce_backward(
    grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor],
    row_weight: torch.Tensor, l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, top_k_weights, weight, lora_a and lora_b, each where needs says (else empty)."""
    needs_x, needs_weights, needs_weight, needs_a, needs_b = needs
    num_tokens, top_k, _ = x.shape
    schedule, identity = _saved_schedule(schedule, top_k)
    w, a_, b_ = weight.to(x.dtype), _cast(lora_a, x.dtype), _cast(lora_b, x.dtype)
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
        grouped_mm(g, tok, w.transpose(1, 2), schedule, gx, pair, g_l,
                   a_.transpose(1, 2) if a_ is not None else None)
        gx32 = gx.float()
        if needs_x:
            grad_x = (gx32 * top_k_weights.reshape(-1, 1).float()).to(x.dtype).view_as(x)
        if needs_weights:
            grad_weights = (gx32 * x_pairs.float()).sum(-1).view(num_tokens, top_k).to(top_k_weights.dtype)
    grad_weight = no_gradient(x)
    if needs_weight:
        grad_weight = grouped_wgrad(g, tok, x_pairs, pair, schedule, torch.empty_like(weight), row_weight)
    grad_a = _lora_grad(needs_a, lora_a,
                        lambda out: grouped_wgrad(g_l, identity, x_pairs, pair, schedule, out, row_weight), g)
    grad_b = _lora_grad(needs_b, lora_b,
                        lambda out: grouped_wgrad(g, tok, l, identity, schedule, out, row_weight), g)
    return grad_x, grad_weights, grad_weight, grad_a, grad_b


def _expert_reduce_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor, weight: torch.Tensor,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float, schedule: list[torch.Tensor],
    row_weight: torch.Tensor, l: torch.Tensor, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    needs_x, needs_weights, needs_weight, needs_a, needs_b = needs
    return (_like(x, needs_x, x), _like(top_k_weights, needs_weights, x),
            torch.empty_like(weight) if needs_weight else no_gradient(x),
            _like(lora_a, needs_a, x), _like(lora_b, needs_b, x))


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


_expert_map_reference_op = ReferenceOp("expert_map_reference", _expert_map_reference, _expert_map_reference_fake)
_expert_reduce_reference_op = ReferenceOp("expert_reduce_reference", _expert_reduce_reference,
                                          _expert_reduce_reference_fake)


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
