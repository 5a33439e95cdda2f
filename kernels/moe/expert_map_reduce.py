"""JetMoe's mixture-of-attention projections: ``expert_map`` (each token through its k experts' query projections)
and ``expert_reduce`` (each (token, slot) row back through its expert's output projection, summed with the routing
weights), with optional LoRA on the 3D expert weight.

They are the grouped GEMMs of the experts block (``grouped_gemm``, over rows sorted by expert) with one weight each
and no activation between: the forward is one ``grouped_mm`` (plus a thin one for LoRA), the backward one
``grouped_mm`` through the weight read transposed and one ``grouped_wgrad`` per trained tensor.
"""

from __future__ import annotations

import torch

from ..dispatch import use_triton
from .experts import (
    ExpertLora,
    _cast,
    _lora_grads,
    _lora_tensors,
    _reference_expert_linear,
    _save,
    _saved,
    _schedule,
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
# Triton path: autograd Functions over grouped_gemm
# ----------------------------------------------------------------------------------------------------------


class _ExpertMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, weight, lora_a, lora_b, scaling):
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
        _save(ctx, schedule, hidden, weight, lora_a, lora_b, l)
        ctx.scaling = scaling
        return out.view(num_tokens, top_k, -1)

    @staticmethod
    def backward(ctx, grad_out):
        schedule, identity, (hidden, weight, lora_a, lora_b, l) = _saved(ctx)
        w, a_, b_ = weight.to(hidden.dtype), _cast(lora_a, hidden.dtype), _cast(lora_b, hidden.dtype)
        needs = ctx.needs_input_grad
        num_tokens, top_k, _ = grad_out.shape
        tok, pair = schedule.sorted_token, schedule.sorted_pair
        g = grad_out.to(hidden.dtype).reshape(num_tokens * top_k, -1)
        g_l = None
        if a_ is not None:
            g_l = grouped_mm(g, pair, b_.transpose(1, 2), schedule, _thin(schedule.num_pairs, a_.shape[1], g),
                             identity, out_scale=ctx.scaling)
        grad_hidden = None
        if needs[0]:
            dx = torch.empty(schedule.num_pairs, hidden.shape[1], dtype=hidden.dtype, device=g.device)
            grouped_mm(g, pair, w.transpose(1, 2), schedule, dx, pair, g_l,
                       a_.transpose(1, 2) if a_ is not None else None)
            grad_hidden = _sum_slots(dx, num_tokens, top_k, hidden.dtype)
        grad_weight = None
        if needs[2]:
            grad_weight = grouped_wgrad(g, pair, hidden, tok, schedule, torch.empty_like(weight))
        grad_a, grad_b = _lora_grads(
            needs[3], needs[4], lora_a, lora_b,
            lambda out: grouped_wgrad(g_l, identity, hidden, tok, schedule, out),
            lambda out: grouped_wgrad(g, pair, l, identity, schedule, out),
        )
        return grad_hidden, None, grad_weight, grad_a, grad_b, None


class _ExpertReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, weight, lora_a, lora_b, scaling):
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
        _save(ctx, schedule, x, top_k_weights, weight, lora_a, lora_b, row_weight, l)
        ctx.scaling = scaling
        return _sum_slots(y, num_tokens, top_k, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        schedule, identity, (x, top_k_weights, weight, lora_a, lora_b, row_weight, l) = _saved(ctx)
        w, a_, b_ = weight.to(x.dtype), _cast(lora_a, x.dtype), _cast(lora_b, x.dtype)
        needs = ctx.needs_input_grad
        num_tokens, top_k, _ = x.shape
        tok, pair = schedule.sorted_token, schedule.sorted_pair
        g = grad_out.to(x.dtype)
        x_pairs = x.reshape(num_tokens * top_k, -1)
        g_l = None
        if a_ is not None:
            g_l = grouped_mm(g, tok, b_.transpose(1, 2), schedule, _thin(schedule.num_pairs, a_.shape[1], g),
                             identity, out_scale=ctx.scaling)
        grad_x = grad_weights = None
        if needs[0] or needs[2]:
            # Unweighted d(x) serves both: d(x) = w * gx and d(w) = <gx, x>.
            gx = torch.empty(schedule.num_pairs, x.shape[2], dtype=x.dtype, device=g.device)
            grouped_mm(g, tok, w.transpose(1, 2), schedule, gx, pair, g_l,
                       a_.transpose(1, 2) if a_ is not None else None)
            gx32 = gx.float()
            if needs[0]:
                grad_x = (gx32 * top_k_weights.reshape(-1, 1).float()).to(x.dtype).view_as(x)
            if needs[2]:
                grad_weights = (gx32 * x_pairs.float()).sum(-1).view(num_tokens, top_k).to(top_k_weights.dtype)
        grad_weight = None
        if needs[3]:
            grad_weight = grouped_wgrad(g, tok, x_pairs, pair, schedule, torch.empty_like(weight), row_weight)
        grad_a, grad_b = _lora_grads(
            needs[4], needs[5], lora_a, lora_b,
            lambda out: grouped_wgrad(g_l, identity, x_pairs, pair, schedule, out, row_weight),
            lambda out: grouped_wgrad(g, tok, l, identity, schedule, out, row_weight),
        )
        return grad_x, None, grad_weights, grad_weight, grad_a, grad_b, None


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
        return _ExpertMap.apply(hidden, top_k_index, weight, a, b, s)
    return reference_expert_map(hidden, top_k_index, weight, lora)


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
        return _ExpertReduce.apply(x, top_k_index, top_k_weights, weight, a, b, s)
    return reference_expert_reduce(x, top_k_index, top_k_weights, weight, lora)
