"""The SwiGLU experts block of an MoE layer, with optional LoRA on its 3D expert weights, 16-bit or NF4.

Semantics are transformers' eager experts (e.g. ``AfmoeExperts.forward``): for every (token t, slot k) with
expert e = top_k_index[t, k],

    gate, up = (x_t @ gate_up_proj[e]^T).chunk(2)        # (+ LoRA)
    out[t]  += top_k_weights[t, k] * ((silu(gate) * up) @ down_proj[e]^T)   # (+ LoRA)

LoRA on an expert weight W (E, out, in) is ``ExpertLora(A (E, r, in), B (E, out, r), scaling)`` and adds
``scaling * (x @ A[e]^T) @ B[e]^T``; the (out, in) delta is never formed.

The Triton path (``grouped_gemm``) sorts the T*K (token, slot) pairs by expert on the device and runs:

forward   L_gu = s * x[tok] A_gu^T           thin GEMM, rows gathered by token
          h    = SwiGLU(x[tok] W_gu^T + L_gu B_gu^T)      one kernel; (gate | up) kept for the backward
          L_d  = s * h A_d^T                 thin GEMM
          y    = w * (h W_d^T + L_d B_d^T)   stored at its (token, slot) row, then summed over slots
backward  d(h) = w * (g[tok] W_d + G_d A_d), G_d = s * g[tok] B_d, with the SwiGLU backward, h and d(w) in
          the same kernel's epilogue (h is recomputed from the stored gate/up, not stored)
          d(x) = d(gu) W_gu + G_gu A_gu, G_gu = s * d(gu) B_gu, summed over slots
          weight and LoRA gradients: one grouped reduction over each expert's rows per tensor.

Everything is recomputed from (gate | up) (S, 2I) and the two thin LoRA activations (S, r): nothing of size
(S, H) is kept between forward and backward.

``moe_experts_nf4`` is the same block over frozen NF4 weights (QLoRA, ``nf4``): the four base GEMMs dequantize
weight tiles in registers (d(x) reads W_gu transposed, d(h) reads W_down transposed); LoRA, routing weights and
inputs get gradients, the base weights none. One autograd Function runs both: the grouped GEMMs take either kind of
weight, and ``DenseExpertWeights`` / ``Nf4ExpertWeights`` supply the rest (what autograd saves, the base weight
gradients).

The autograd plumbing below (schedule, saving, LoRA gradients) also serves ``expert_map_reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dispatch import use_triton
from .grouped_gemm import (
    GemmWeight,
    gemm_block_m,
    grouped_mm,
    grouped_mm_swiglu,
    grouped_mm_swiglu_backward,
    grouped_wgrad,
)
from .nf4 import Nf4Weight, reference_dequantize_nf4
from .routing import ExpertSchedule, sort_by_expert


@dataclass
class ExpertLora:
    """LoRA factors of a 3D expert weight (E, out, in). Views (e.g. peft's reshaped Linear weights) are fine."""

    A: torch.Tensor  # (E, r, in)
    B: torch.Tensor  # (E, out, r)
    scaling: float


# ----------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------


def _reference_expert_linear(
    x: torch.Tensor, weight: torch.Tensor, lora: ExpertLora | None, expert: int
) -> torch.Tensor:
    """x (n, in) @ weight[expert]^T (+ LoRA) -> (n, out) in x's dtype."""
    y = F.linear(x, weight[expert].to(x.dtype))
    if lora is not None:
        x_a = F.linear(x.to(lora.A.dtype), lora.A[expert])
        y = y + (lora.scaling * F.linear(x_a, lora.B[expert])).to(y.dtype)
    return y


def reference_moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """(tokens, hidden) -> (tokens, hidden), transformers' eager experts loop with LoRA added."""
    out = torch.zeros_like(hidden)
    for expert in range(gate_up_proj.shape[0]):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = _reference_expert_linear(hidden[token_idx], gate_up_proj, gate_up_lora, expert).chunk(2, dim=-1)
        y = _reference_expert_linear(F.silu(gate) * up, down_proj, down_lora, expert)
        y = y * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out


def reference_moe_experts_nf4(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Nf4Weight,
    down: Nf4Weight,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """``reference_moe_experts`` on the dequantized stacks (materialises both: a reference, not a training path)."""
    return reference_moe_experts(hidden, top_k_index, top_k_weights, reference_dequantize_nf4(gate_up),
                                 reference_dequantize_nf4(down), gate_up_lora, down_lora)


# ----------------------------------------------------------------------------------------------------------
# Triton path: autograd Functions over grouped_gemm
# ----------------------------------------------------------------------------------------------------------


def _schedule(top_k_index: torch.Tensor, num_experts: int) -> tuple[ExpertSchedule, torch.Tensor]:
    block_m = gemm_block_m(top_k_index.device, top_k_index.numel(), num_experts)
    schedule = sort_by_expert(top_k_index, num_experts, block_m)
    identity = torch.arange(schedule.num_pairs, dtype=torch.int32, device=top_k_index.device)
    return schedule, identity


def _save(ctx, schedule: ExpertSchedule, *tensors: torch.Tensor | None) -> None:
    """Save the schedule and tensors through save_for_backward, never as ctx attributes: saved-tensor hooks
    (activation checkpointing, CPU offload) only see what goes through it."""
    ctx.schedule_meta = (schedule.block_m, schedule.num_experts, schedule.top_k)
    ctx.save_for_backward(schedule.sorted_pair, schedule.sorted_token, schedule.expert_offsets,
                          schedule.tile_expert, schedule.tile_row_start, *tensors)


def _saved(ctx) -> tuple[ExpertSchedule, torch.Tensor, tuple]:
    """(schedule, identity row index, the other saved tensors) in backward."""
    saved = ctx.saved_tensors
    schedule = ExpertSchedule(*saved[:5], *ctx.schedule_meta)
    identity = torch.arange(schedule.num_pairs, dtype=torch.int32, device=schedule.sorted_pair.device)
    return schedule, identity, saved[5:]


def _cast(t: GemmWeight | None, dtype: torch.dtype) -> GemmWeight | None:
    # Kernels take one dtype per GEMM (tl.dot): a 16-bit weight is cast to the activations' (a no-op when it has it
    # already); an NF4 one is decoded to it tile by tile.
    return t.to(dtype) if isinstance(t, torch.Tensor) else t


def _sum_slots(pairs: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(T*K, N) rows in (token, slot) order -> (T, N), summed in fp32 like transformers' grouped_mm path."""
    if top_k == 1:
        return pairs.to(dtype)
    return pairs.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(dtype)


def _thin(rows: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(rows, rank, dtype=like.dtype, device=like.device)


def _lora_grads(
    needs_a: bool, needs_b: bool, a: torch.Tensor | None, b: torch.Tensor | None,
    a_grad_fn, b_grad_fn,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a LoRA pair, each written by its grad_fn into a fresh tensor of the factor's shape/dtype."""
    grad_a = a_grad_fn(torch.empty(a.shape, dtype=a.dtype, device=a.device)) if needs_a else None
    grad_b = b_grad_fn(torch.empty(b.shape, dtype=b.dtype, device=b.device)) if needs_b else None
    return grad_a, grad_b


@dataclass
class DenseExpertWeights:
    """16-bit stacks gate_up (E, 2I, H) as [gate; up] and down (E, H, I), trained with the block (full
    fine-tuning) when they require grad."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.gate_up, self.down

    def rebuilder(self):
        """tensors() -> these weights, holding no tensor itself: backward rebuilds them from what it unpacks."""
        return DenseExpertWeights

    def weight_grads(self, needs: tuple[bool, ...], gate_up_grad_fn, down_grad_fn) -> tuple:
        """Gradients of tensors(), each written by its grad_fn into a tensor laid out like the weight."""
        needs_gate_up, needs_down = needs
        return (gate_up_grad_fn(torch.empty_like(self.gate_up)) if needs_gate_up else None,
                down_grad_fn(torch.empty_like(self.down)) if needs_down else None)


@dataclass
class Nf4ExpertWeights:
    """Frozen NF4 stacks (QLoRA, ``nf4``) gate_up (E, 2I, H) and down (E, H, I): the grouped GEMMs dequantize
    weight tiles in registers, reading them transposed for the backward. Never a weight gradient."""

    gate_up: Nf4Weight
    down: Nf4Weight

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return *self.gate_up.tensors(), *self.down.tensors()

    def rebuilder(self):
        num_gate_up = len(self.gate_up.tensors())
        rebuild_gate_up, rebuild_down = self.gate_up.rebuilder(), self.down.rebuilder()

        def rebuild(*tensors):
            return Nf4ExpertWeights(rebuild_gate_up(*tensors[:num_gate_up]), rebuild_down(*tensors[num_gate_up:]))
        return rebuild

    def weight_grads(self, needs: tuple[bool, ...], gate_up_grad_fn, down_grad_fn) -> tuple:
        return (None,) * len(needs)


ExpertWeights = DenseExpertWeights | Nf4ExpertWeights


class _MoeExperts(torch.autograd.Function):
    """The SwiGLU experts block over either kind of ExpertWeights.

    apply(hidden, top_k_index, top_k_weights, gu_a, gu_b, gu_scaling, down_a, down_b, down_scaling, experts,
    *experts.tensors()): the weights' tensors follow as arguments of their own because apply only tracks tensor
    arguments (16-bit weights that require grad are trained), and they go through save_for_backward like the rest.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gu_a, gu_b, gu_scaling, down_a, down_b, down_scaling,
                experts: ExpertWeights, *weight_tensors):
        num_tokens, top_k = top_k_index.shape
        dtype = hidden.dtype
        schedule, identity = _schedule(top_k_index, experts.gate_up.shape[0])
        row_weight = top_k_weights.reshape(-1).float()[schedule.sorted_pair]
        gu_a_, gu_b_, down_a_, down_b_ = (_cast(t, dtype) for t in (gu_a, gu_b, down_a, down_b))
        num_rows = schedule.num_pairs

        l_gu = None
        if gu_a_ is not None:
            l_gu = grouped_mm(hidden, schedule.sorted_token, gu_a_, schedule, _thin(num_rows, gu_a.shape[1], hidden),
                              identity, out_scale=gu_scaling)
        h, gate_up = grouped_mm_swiglu(hidden, schedule.sorted_token, _cast(experts.gate_up, dtype), schedule, l_gu,
                                       gu_b_, store_gate_up=any(ctx.needs_input_grad))
        l_down = None
        if down_a_ is not None:
            l_down = grouped_mm(h, identity, down_a_, schedule, _thin(num_rows, down_a.shape[1], h),
                                identity, out_scale=down_scaling)
        y = torch.empty(num_rows, experts.down.shape[1], dtype=dtype, device=hidden.device)
        grouped_mm(h, identity, _cast(experts.down, dtype), schedule, y, schedule.sorted_pair, l_down, down_b_,
                   row_scale=row_weight)

        _save(ctx, schedule, hidden, top_k_weights, gu_a, gu_b, down_a, down_b, row_weight, gate_up, l_gu, l_down,
              *weight_tensors)
        ctx.scalings = (gu_scaling, down_scaling)
        ctx.rebuild_experts = experts.rebuilder()
        return _sum_slots(y, num_tokens, top_k, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        schedule, identity, saved = _saved(ctx)
        (hidden, top_k_weights, gu_a, gu_b, down_a, down_b, row_weight, gate_up, l_gu, l_down,
         *weight_tensors) = saved
        experts = ctx.rebuild_experts(*weight_tensors)
        gu_scaling, down_scaling = ctx.scalings
        (needs_hidden, _, needs_weights, needs_gu_a, needs_gu_b, _, needs_down_a, needs_down_b, _, _,
         *needs_base) = ctx.needs_input_grad
        num_tokens, top_k = top_k_weights.shape
        num_rows = schedule.num_pairs
        dtype = hidden.dtype
        gu_a_, gu_b_, down_a_, down_b_ = (_cast(t, dtype) for t in (gu_a, gu_b, down_a, down_b))
        tok, pair = schedule.sorted_token, schedule.sorted_pair
        g = grad_out.to(dtype)

        # Down projection and SwiGLU.
        g_down = None
        if down_a_ is not None:
            g_down = grouped_mm(g, tok, down_b_.transpose(1, 2), schedule, _thin(num_rows, down_a.shape[1], g),
                                identity, out_scale=down_scaling)
        dgu, h, d_row_weight = grouped_mm_swiglu_backward(
            g, tok, _cast(experts.down, dtype), gate_up, row_weight, schedule,
            g_down, down_a_.transpose(1, 2) if down_a_ is not None else None,
        )
        grad_weights = None
        if needs_weights:
            grad_weights = torch.empty(num_rows, dtype=torch.float32, device=g.device)
            grad_weights[pair.long()] = d_row_weight
            grad_weights = grad_weights.view(num_tokens, top_k).to(top_k_weights.dtype)
        grad_down_a, grad_down_b = _lora_grads(
            needs_down_a, needs_down_b, down_a, down_b,
            lambda out: grouped_wgrad(g_down, identity, h, identity, schedule, out, row_weight),
            lambda out: grouped_wgrad(g, tok, l_down, identity, schedule, out, row_weight),
        )

        # Gate/up projection.
        g_gu = None
        if gu_a_ is not None:
            g_gu = grouped_mm(dgu, identity, gu_b_.transpose(1, 2), schedule, _thin(num_rows, gu_a.shape[1], dgu),
                              identity, out_scale=gu_scaling)
        grad_hidden = None
        if needs_hidden:
            dx = torch.empty(num_rows, hidden.shape[1], dtype=dtype, device=g.device)
            grouped_mm(dgu, identity, _cast(experts.gate_up, dtype), schedule, dx, pair,
                       g_gu, gu_a_.transpose(1, 2) if gu_a_ is not None else None, transpose=True)
            grad_hidden = _sum_slots(dx, num_tokens, top_k, dtype)
        grad_gu_a, grad_gu_b = _lora_grads(
            needs_gu_a, needs_gu_b, gu_a, gu_b,
            lambda out: grouped_wgrad(g_gu, identity, hidden, tok, schedule, out),
            lambda out: grouped_wgrad(dgu, identity, l_gu, identity, schedule, out),
        )
        grad_base = experts.weight_grads(
            tuple(needs_base),
            lambda out: grouped_wgrad(dgu, identity, hidden, tok, schedule, out),
            lambda out: grouped_wgrad(g, tok, h, identity, schedule, out, row_weight),
        )
        return (grad_hidden, None, grad_weights, grad_gu_a, grad_gu_b, None, grad_down_a, grad_down_b, None,
                None, *grad_base)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _lora_tensors(lora: ExpertLora | None) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    return (lora.A, lora.B, float(lora.scaling)) if lora is not None else (None, None, 0.0)


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """SwiGLU experts block, transformers' eager semantics, with optional LoRA on both expert weights.

    hidden: (tokens, H); top_k_index: (tokens, k) int64; top_k_weights: (tokens, k);
    gate_up_proj: (E, 2I, H) as [gate; up]; down_proj: (E, H, I). Returns (tokens, H) in hidden's dtype.
    Differentiable w.r.t. hidden, top_k_weights, both weights and the LoRA factors.
    """
    experts = DenseExpertWeights(gate_up_proj, down_proj)
    gu, dn = _lora_tensors(gate_up_lora), _lora_tensors(down_lora)
    if hidden.shape[0] > 0 and use_triton(hidden, top_k_weights, *experts.tensors(), *gu[:2], *dn[:2]):
        return _MoeExperts.apply(hidden, top_k_index, top_k_weights, *gu, *dn, experts, *experts.tensors())
    return reference_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_lora, down_lora)


def moe_experts_nf4(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Nf4Weight,
    down: Nf4Weight,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """``moe_experts`` with frozen NF4 expert weights (QLoRA): gate_up (E, 2I, H), down (E, H, I) as Nf4Weight.

    Same result as ``moe_experts`` on ``dequantize_nf4`` of both, without a 16-bit copy of either stack: the
    grouped GEMMs dequantize tiles in registers. Differentiable w.r.t. hidden, top_k_weights and the LoRA factors.
    """
    if gate_up.shape[0] != down.shape[0] or gate_up.shape[2] != down.shape[1] or gate_up.shape[1] != 2 * down.shape[2]:
        raise ValueError(f"NF4 experts shapes do not fit: gate_up {gate_up.shape}, down {down.shape}")
    experts = Nf4ExpertWeights(gate_up, down)
    gu, dn = _lora_tensors(gate_up_lora), _lora_tensors(down_lora)
    # bf16 weights are rounded to bf16 inside the kernels, which the interpreter cannot be trusted with.
    interpreted_bf16 = not hidden.is_cuda and torch.bfloat16 in (gate_up.dtype, down.dtype)
    if (hidden.shape[0] > 0 and not interpreted_bf16
            and use_triton(hidden, top_k_weights, *experts.tensors(), *gu[:2], *dn[:2])):
        return _MoeExperts.apply(hidden, top_k_index, top_k_weights, *gu, *dn, experts, *experts.tensors())
    return reference_moe_experts_nf4(hidden, top_k_index, top_k_weights, gate_up, down, gate_up_lora, down_lora)
