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
inputs get gradients, the base weights none. One forward and one backward serve both, registered as the custom ops
``fastmoe::moe_experts`` and ``fastmoe::moe_experts_nf4`` (``custom_op.KernelOp``): the grouped GEMMs take either kind
of weight, and ``DenseExpertWeights`` / ``Nf4ExpertWeights`` supply the rest (their op arguments, what autograd saves,
the base weight gradients). Under torch.compile the references run as ops of their own too (``ReferenceOp``): their
loop over experts has shapes that depend on the routing.

The autograd plumbing below (schedule, saving, LoRA gradients) also serves ``expert_map_reduce``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..custom_op import KernelOp, ReferenceOp, no_gradient, unread_output
from ..dispatch import use_triton
from ..grid import cdiv, next_power_of_2
from ..reused_casts import cast
from .grouped_gemm import (
    ClampedSwiglu,
    GemmWeight,
    gemm_block_m,
    DECODE_PAIRS,
    base_product,
    grouped_mm,
    grouped_mm_lora_in_tile,
    grouped_mm_swiglu,
    grouped_mm_swiglu_backward,
    grouped_wgrad,
)
from .nf4 import Nf4Weight, TransposedNf4Weight, reference_dequantize_nf4
from .one_token import one_token_experts
from .routing import ExpertSchedule, sort_by_expert, tile_bound


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


def reference_moe_experts_clamped_swiglu(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """(tokens, hidden) -> (tokens, hidden), transformers' GptOssExperts eager loop with LoRA added: weights stored
    (E, in, out), gate and up interleaved, the clamped activation. LoRA factors are as peft's for those stacks:
    A (E, r, in), B (E, out, r)."""
    out = torch.zeros_like(hidden)
    for expert in range(gate_up_proj.shape[0]):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        gate_up = _reference_expert_linear(x, gate_up_proj.transpose(1, 2), gate_up_lora, expert) + gate_up_bias[expert]
        gate = gate_up[..., ::2].clamp(min=None, max=limit)
        up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
        y = _reference_expert_linear(h, down_proj.transpose(1, 2), down_lora, expert) + down_bias[expert]
        y = y * top_k_weights[token_idx, slot, None]
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out


def reference_moe_experts_clamped_swiglu_nf4(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: Nf4Weight,
    gate_up_bias: torch.Tensor,
    down_proj: Nf4Weight,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """``reference_moe_experts_clamped_swiglu`` on the dequantized stacks (materialises both: a reference)."""
    return reference_moe_experts_clamped_swiglu(hidden, top_k_index, top_k_weights,
                                                reference_dequantize_nf4(gate_up_proj), gate_up_bias,
                                                reference_dequantize_nf4(down_proj), down_bias, alpha, limit,
                                                gate_up_lora, down_lora)


# ----------------------------------------------------------------------------------------------------------
# Triton path: the forward and backward over grouped_gemm, one differentiable op per kind of expert weights
# ----------------------------------------------------------------------------------------------------------
# The helpers down to _sum_slots also serve expert_map_reduce.


# Identity row indices of decode-sized schedules (at most DECODE_PAIRS rows), made once per device and size: read,
# never written, they can serve every later call and CUDA graph, and spare a decode step one launch per MoE layer.
_identities: dict[tuple[torch.device, int], torch.Tensor] = {}


def _identity(num_rows: int, device: torch.device) -> torch.Tensor:
    """(num_rows,) int32 0, 1, ..."""
    if (num_rows > DECODE_PAIRS or torch.compiler.is_compiling()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        # Beyond decoding sizes vary without bound; under capture a new tensor would live in the graph's pool.
        return torch.arange(num_rows, dtype=torch.int32, device=device)
    identity = _identities.get((device, num_rows))
    if identity is None:
        identity = _identities[(device, num_rows)] = torch.arange(num_rows, dtype=torch.int32, device=device)
    return identity


def _schedule(top_k_index: torch.Tensor, num_experts: int) -> tuple[ExpertSchedule, torch.Tensor]:
    """The schedule of the grouped GEMMs, and the identity row index (S,) int32."""
    block_m = gemm_block_m(top_k_index.device, top_k_index.numel(), num_experts)
    schedule = sort_by_expert(top_k_index, num_experts, block_m)
    return schedule, _identity(schedule.num_pairs, top_k_index.device)


def _schedule_tensors(schedule: ExpertSchedule) -> tuple[torch.Tensor, ...]:
    """What a forward op returns of its schedule, for the backward (the sizes follow from the tensors' shapes)."""
    return (schedule.sorted_pair, schedule.sorted_token, schedule.expert_offsets, schedule.tile_expert,
            schedule.tile_row_start)


def _schedule_fakes(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """_schedule_tensors' shapes: static, sort_by_expert sizes its tiles by their bound."""
    num_pairs = top_k_index.numel()
    max_tiles = tile_bound(num_pairs, num_experts, gemm_block_m(top_k_index.device, num_pairs, num_experts))
    sizes = (num_pairs, num_pairs, num_experts + 1, max_tiles, max_tiles)
    return tuple(top_k_index.new_empty(size, dtype=torch.int32) for size in sizes)


def _saved_schedule(tensors: list[torch.Tensor], top_k: int) -> tuple[ExpertSchedule, torch.Tensor]:
    """_schedule_tensors -> (schedule, identity row index) in a backward."""
    sorted_pair, _, expert_offsets, _, _ = tensors
    num_experts = expert_offsets.numel() - 1
    block_m = gemm_block_m(sorted_pair.device, sorted_pair.numel(), num_experts)
    schedule = ExpertSchedule(*tensors, block_m, num_experts, top_k)
    identity = torch.arange(schedule.num_pairs, dtype=torch.int32, device=sorted_pair.device)
    return schedule, identity


def _row_experts(schedule: ExpertSchedule) -> torch.Tensor:
    """(S,) int64: the expert of each sorted row."""
    counts = schedule.expert_offsets.diff().long()
    experts = torch.arange(schedule.num_experts, device=counts.device)
    return torch.repeat_interleave(experts, counts, output_size=schedule.num_pairs)


def _needs_backward(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a backward: the forward then keeps what it needs (custom ops see no ctx)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cast(t: GemmWeight | None, dtype: torch.dtype) -> GemmWeight | None:
    # Kernels take one dtype per GEMM (tl.dot): a 16-bit weight is cast to the activations' (a no-op when it has it
    # already; reused across forwards while decoding: reused_casts); an NF4 one is decoded to it tile by tile.
    return cast(t, dtype) if isinstance(t, torch.Tensor) else t


def _sum_slots(pairs: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(T*K, N) rows in (token, slot) order -> (T, N), summed in fp32 like transformers' grouped_mm path.

    One pass of a Triton kernel where it runs: torch's sum over the middle dimension of (T, K, N) read JetMoe-8B's
    4,096 x 2 x 2,048 bf16 pairs at about 1.2 TB/s (42 us, five per layer and step, H100)."""
    if top_k == 1:
        return pairs.to(dtype)
    if not (use_triton(pairs) and pairs.is_contiguous()):
        return pairs.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(dtype)
    width = pairs.shape[1]
    out = torch.empty(num_tokens, width, dtype=dtype, device=pairs.device)
    block = min(next_power_of_2(width), 1024)
    _sum_slots_kernel[(num_tokens, cdiv(width, block))](pairs, out, width, TOP_K=top_k, BLOCK_N=block)
    return out


@triton.jit
def _sum_slots_kernel(pairs_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    rows = pairs_ptr + token * TOP_K * N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):  # in slot order, as torch's fp32 sum adds them
        total += tl.load(rows + slot * N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * N + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


def _thin(rows: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(rows, rank, dtype=like.dtype, device=like.device)


def _like(t: torch.Tensor | None, needed: bool, absent: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous tensor shaped like t where a gradient is needed (fakes), else the absent one."""
    return t.new_empty(t.shape) if needed and t is not None else no_gradient(absent)


def _lora_grad(needed: bool, factor: torch.Tensor | None, grad_fn, absent: torch.Tensor) -> torch.Tensor:
    """The gradient of a LoRA factor, written by grad_fn into a fresh tensor of its shape and dtype."""
    if not needed or factor is None:
        return no_gradient(absent)
    return grad_fn(torch.empty(factor.shape, dtype=factor.dtype, device=factor.device))


@dataclass
class DenseExpertWeights:
    """16-bit stacks gate_up (E, 2I, H) as [gate; up] and down (E, H, I), trained with the block (full
    fine-tuning) when they require grad. Op arguments: the two tensors."""

    OP_PARAMETERS = (("gate_up_proj", torch.Tensor), ("down_proj", torch.Tensor))

    gate_up: torch.Tensor
    down: torch.Tensor
    # The plain form: SwiGLU on [gate; up] rows, no biases (ClampedSwigluExpertWeights is the other).
    gate_up_bias = down_bias = activation = None
    interleaved = False

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.gate_up, self.down

    def rebuilder(self):
        """tensors() -> these weights, holding no tensor itself: backward rebuilds them from what it unpacks."""
        return DenseExpertWeights

    def op_args(self) -> tuple:
        return self.gate_up, self.down

    @classmethod
    def from_op_args(cls, *args) -> DenseExpertWeights:
        return cls(*args)

    def weight_grads(self, needs: tuple[bool, ...], grad_fns: dict, absent: torch.Tensor) -> tuple:
        """Gradients of tensors(), each written by its grad_fns entry ("gate_up", "down") into a tensor laid out like
        the weight."""
        needs_gate_up, needs_down = needs
        return (grad_fns["gate_up"](torch.empty_like(self.gate_up)) if needs_gate_up else no_gradient(absent),
                grad_fns["down"](torch.empty_like(self.down)) if needs_down else no_gradient(absent))

    def weight_grad_fakes(self, needs: tuple[bool, bool], absent: torch.Tensor) -> tuple:
        needs_gate_up, needs_down = needs
        return (torch.empty_like(self.gate_up) if needs_gate_up else no_gradient(absent),
                torch.empty_like(self.down) if needs_down else no_gradient(absent))

    @staticmethod
    def needs_weight_grads(needs_op_args: tuple[bool, ...]) -> tuple[bool, bool]:
        return tuple(needs_op_args)

    @staticmethod
    def op_arg_grads(grad_gate_up: torch.Tensor | None, grad_down: torch.Tensor | None) -> tuple:
        return grad_gate_up, grad_down


@dataclass
class Nf4ExpertWeights:
    """Frozen NF4 stacks (QLoRA, ``nf4``) gate_up (E, 2I, H) and down (E, H, I): the grouped GEMMs dequantize
    weight tiles in registers, reading them transposed for the backward. Never a weight gradient. Op arguments:
    each stack's packed, absmax, absmax_scale and absmax_offset (None without double quantization), both shapes as
    six ints, both dtypes (no lists of tensors: autograd.Function and custom ops disagree on their gradients)."""

    OP_PARAMETERS = (
        ("gate_up_packed", torch.Tensor), ("gate_up_absmax", torch.Tensor),
        ("gate_up_absmax_scale", torch.Tensor | None), ("gate_up_absmax_offset", torch.Tensor | None),
        ("down_packed", torch.Tensor), ("down_absmax", torch.Tensor),
        ("down_absmax_scale", torch.Tensor | None), ("down_absmax_offset", torch.Tensor | None),
        ("shapes", list[int]), ("gate_up_dtype", torch.dtype), ("down_dtype", torch.dtype),
    )

    gate_up: Nf4Weight
    down: Nf4Weight
    gate_up_bias = down_bias = activation = None
    interleaved = False

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return *self.gate_up.tensors(), *self.down.tensors()

    def rebuilder(self):
        num_gate_up = len(self.gate_up.tensors())
        rebuild_gate_up, rebuild_down = self.gate_up.rebuilder(), self.down.rebuilder()

        def rebuild(*tensors):
            return Nf4ExpertWeights(rebuild_gate_up(*tensors[:num_gate_up]), rebuild_down(*tensors[num_gate_up:]))
        return rebuild

    def op_args(self) -> tuple:
        gate_up, down = self.gate_up, self.down
        return (gate_up.packed, gate_up.absmax, gate_up.absmax_scale, gate_up.absmax_offset,
                down.packed, down.absmax, down.absmax_scale, down.absmax_offset,
                [*gate_up.shape, *down.shape], gate_up.dtype, down.dtype)

    @staticmethod
    def from_op_args(*args) -> Nf4ExpertWeights:
        *tensors, shapes, gate_up_dtype, down_dtype = args
        return Nf4ExpertWeights(Nf4Weight(*tensors[:2], tuple(shapes[:3]), gate_up_dtype, *tensors[2:4]),
                                Nf4Weight(*tensors[4:6], tuple(shapes[3:]), down_dtype, *tensors[6:]))

    def weight_grads(self, needs: tuple[bool, ...], grad_fns: dict, absent: torch.Tensor) -> tuple:
        return no_gradient(absent), no_gradient(absent)

    def weight_grad_fakes(self, needs: tuple[bool, bool], absent: torch.Tensor) -> tuple:
        return no_gradient(absent), no_gradient(absent)

    @staticmethod
    def needs_weight_grads(needs_op_args: tuple[bool, ...]) -> tuple[bool, bool]:
        return False, False

    @staticmethod
    def op_arg_grads(grad_gate_up: torch.Tensor | None, grad_down: torch.Tensor | None) -> tuple:
        return (None,) * 11


@dataclass
class ClampedSwigluExpertWeights:
    """16-bit stacks as gpt-oss stores them: gate_up_proj (E, H, 2I) with gate and up columns interleaved (gate
    column n at 2n, up at 2n + 1) and its bias (E, 2I), down_proj (E, I, H) and its bias (E, H), under the
    activation ``ClampedSwiglu``. The GEMMs read the (E, in, out) stacks through transposed views (``gate_up`` (E, 2I,
    H), ``down`` (E, H, I)), never a copy. Op arguments: the four tensors, then alpha and limit. Each tensor gets a
    gradient when it requires one (full fine-tuning; LoRA leaves them frozen)."""

    OP_PARAMETERS = (("gate_up_proj", torch.Tensor), ("gate_up_bias", torch.Tensor), ("down_proj", torch.Tensor),
                     ("down_bias", torch.Tensor), ("alpha", float), ("limit", float))

    gate_up_proj: torch.Tensor
    gate_up_bias: torch.Tensor
    down_proj: torch.Tensor
    down_bias: torch.Tensor
    alpha: float
    limit: float
    interleaved = True

    @property
    def gate_up(self) -> torch.Tensor:
        return self.gate_up_proj.transpose(1, 2)

    @property
    def down(self) -> torch.Tensor:
        return self.down_proj.transpose(1, 2)

    @property
    def activation(self) -> ClampedSwiglu:
        return ClampedSwiglu(self.alpha, self.limit)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.gate_up_proj, self.gate_up_bias, self.down_proj, self.down_bias

    def rebuilder(self):
        alpha, limit = self.alpha, self.limit

        def rebuild(*tensors):
            return ClampedSwigluExpertWeights(*tensors, alpha, limit)
        return rebuild

    def op_args(self) -> tuple:
        return (*self.tensors(), self.alpha, self.limit)

    @classmethod
    def from_op_args(cls, *args) -> ClampedSwigluExpertWeights:
        return cls(*args)

    def weight_grads(self, needs: tuple[bool, ...], grad_fns: dict, absent: torch.Tensor) -> tuple:
        """Gradients of tensors(), laid out as the stored (E, in, out) stacks: the GEMMs write through the
        transposed view they read."""
        needs_gate_up, needs_gate_up_bias, needs_down, needs_down_bias = needs

        def stack_grad(needed, stored, fn):
            if not needed:
                return no_gradient(absent)
            grad = torch.empty_like(stored, memory_format=torch.contiguous_format)
            fn(grad.transpose(1, 2))
            return grad

        return (stack_grad(needs_gate_up, self.gate_up_proj, grad_fns["gate_up"]),
                grad_fns["gate_up_bias"]().to(self.gate_up_bias.dtype) if needs_gate_up_bias else no_gradient(absent),
                stack_grad(needs_down, self.down_proj, grad_fns["down"]),
                grad_fns["down_bias"]().to(self.down_bias.dtype) if needs_down_bias else no_gradient(absent))

    def weight_grad_fakes(self, needs: tuple[bool, ...], absent: torch.Tensor) -> tuple:
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need else no_gradient(absent)
                     for t, need in zip(self.tensors(), needs))

    @staticmethod
    def needs_weight_grads(needs_op_args: tuple[bool, ...]) -> tuple[bool, ...]:
        return tuple(needs_op_args[:4])

    @staticmethod
    def op_arg_grads(*grads: torch.Tensor | None) -> tuple:
        return (*grads, None, None)


@dataclass
class ClampedSwigluNf4ExpertWeights:
    """gpt-oss's stacks in NF4 (QLoRA): gate_up_proj stored (E, H, 2I), gate and up columns interleaved, and
    down_proj stored (E, I, H), each quantized along its stored rows (``quantize_nf4`` of the stored stack), with
    their 16-bit biases, under ``ClampedSwiglu``. The GEMMs read the stored tiles transposed (``gate_up`` (E, 2I, H),
    ``down`` (E, H, I): ``TransposedNf4Weight``). The stacks never get a gradient; a bias does when it requires one.
    Op arguments: each stack's packed, absmax, absmax_scale and absmax_offset (None without double quantization)
    followed by its bias, both stored shapes as six ints, both dtypes, alpha and limit."""

    OP_PARAMETERS = (
        ("gate_up_packed", torch.Tensor), ("gate_up_absmax", torch.Tensor),
        ("gate_up_absmax_scale", torch.Tensor | None), ("gate_up_absmax_offset", torch.Tensor | None),
        ("gate_up_bias", torch.Tensor), ("down_packed", torch.Tensor), ("down_absmax", torch.Tensor),
        ("down_absmax_scale", torch.Tensor | None), ("down_absmax_offset", torch.Tensor | None),
        ("down_bias", torch.Tensor), ("shapes", list[int]), ("gate_up_dtype", torch.dtype),
        ("down_dtype", torch.dtype), ("alpha", float), ("limit", float),
    )

    gate_up_proj: Nf4Weight
    gate_up_bias: torch.Tensor
    down_proj: Nf4Weight
    down_bias: torch.Tensor
    alpha: float
    limit: float
    interleaved = True

    @property
    def gate_up(self) -> TransposedNf4Weight:
        return TransposedNf4Weight(self.gate_up_proj)

    @property
    def down(self) -> TransposedNf4Weight:
        return TransposedNf4Weight(self.down_proj)

    @property
    def activation(self) -> ClampedSwiglu:
        return ClampedSwiglu(self.alpha, self.limit)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return *self.gate_up_proj.tensors(), self.gate_up_bias, *self.down_proj.tensors(), self.down_bias

    def rebuilder(self):
        num_gate_up = len(self.gate_up_proj.tensors())
        rebuild_gate_up, rebuild_down = self.gate_up_proj.rebuilder(), self.down_proj.rebuilder()
        alpha, limit = self.alpha, self.limit

        def rebuild(*tensors):
            gate_up, down = tensors[:num_gate_up + 1], tensors[num_gate_up + 1:]
            return ClampedSwigluNf4ExpertWeights(rebuild_gate_up(*gate_up[:-1]), gate_up[-1],
                                                 rebuild_down(*down[:-1]), down[-1], alpha, limit)
        return rebuild

    def op_args(self) -> tuple:
        gate_up, down = self.gate_up_proj, self.down_proj
        return (gate_up.packed, gate_up.absmax, gate_up.absmax_scale, gate_up.absmax_offset, self.gate_up_bias,
                down.packed, down.absmax, down.absmax_scale, down.absmax_offset, self.down_bias,
                [*gate_up.shape, *down.shape], gate_up.dtype, down.dtype, self.alpha, self.limit)

    @staticmethod
    def from_op_args(*args) -> ClampedSwigluNf4ExpertWeights:
        *tensors, shapes, gate_up_dtype, down_dtype, alpha, limit = args
        return ClampedSwigluNf4ExpertWeights(
            Nf4Weight(*tensors[:2], tuple(shapes[:3]), gate_up_dtype, *tensors[2:4]), tensors[4],
            Nf4Weight(*tensors[5:7], tuple(shapes[3:]), down_dtype, *tensors[7:9]), tensors[9], alpha, limit)

    def weight_grads(self, needs: tuple[bool, ...], grad_fns: dict, absent: torch.Tensor) -> tuple:
        """The biases' gradients (the stacks are frozen)."""
        needs_gate_up_bias, needs_down_bias = needs
        return (grad_fns["gate_up_bias"]().to(self.gate_up_bias.dtype) if needs_gate_up_bias else no_gradient(absent),
                grad_fns["down_bias"]().to(self.down_bias.dtype) if needs_down_bias else no_gradient(absent))

    def weight_grad_fakes(self, needs: tuple[bool, ...], absent: torch.Tensor) -> tuple:
        return tuple(torch.empty_like(bias) if need else no_gradient(absent)
                     for bias, need in zip((self.gate_up_bias, self.down_bias), needs))

    @staticmethod
    def needs_weight_grads(needs_op_args: tuple[bool, ...]) -> tuple[bool, ...]:
        return needs_op_args[4], needs_op_args[9]

    @staticmethod
    def op_arg_grads(grad_gate_up_bias: torch.Tensor | None, grad_down_bias: torch.Tensor | None) -> tuple:
        return (None,) * 4 + (grad_gate_up_bias,) + (None,) * 4 + (grad_down_bias,) + (None,) * 5


ExpertWeights = DenseExpertWeights | Nf4ExpertWeights | ClampedSwigluExpertWeights | ClampedSwigluNf4ExpertWeights
# out, the schedule's five tensors, then what the backward reads: row_weight, (gate | up), the two thin LoRA
# activations (empty tensors for what is not kept).
ForwardOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# Gradients of hidden, top_k_weights and the four LoRA factors, then the weights' (needs_weight_grads says which; empty
# where not asked for).
BackwardOutputs = tuple[torch.Tensor, ...]


# Whether the experts' output is read (see output_unused): a context variable, so that autograd's backward thread,
# which runs graphed checkpointing's recompute, sees what that recompute sets.
_OUTPUT_READ: contextvars.ContextVar[bool] = contextvars.ContextVar("fastmoe_experts_output_read", default=True)


@contextlib.contextmanager
def output_unused():
    """Within this block, the experts blocks' forwards skip their output: the down projection's product, its LoRA up
    -projection, the routing weights and the sum over slots, the largest GEMM of a block after gate_up. What the
    backward reads is still computed and kept (the pre-activation, h's LoRA thin product, the schedule), and the
    output is a tensor of the right shape whose values nobody may read: uninitialised on a GPU, NaN elsewhere (the
    CPU tests then see any use of it). For a checkpointed decoder layer's recompute, whose output value the
    backward never reads (fastmoe.models.shared.residual_plus_feed_forward)."""
    token = _OUTPUT_READ.set(False)
    try:
        yield
    finally:
        _OUTPUT_READ.reset(token)


@contextlib.contextmanager
def output_read():
    """Inside an output_unused block, a part whose output is read after all (Qwen2-MoE's shared expert, scaled by a
    gate whose gradient reads it)."""
    token = _OUTPUT_READ.set(True)
    try:
        yield
    finally:
        _OUTPUT_READ.reset(token)


def output_is_read() -> bool:
    """False inside output_unused (and not in a nested output_read)."""
    return _OUTPUT_READ.get()


def _unread(out: torch.Tensor) -> torch.Tensor:
    """The reference ops' output under output_unused: NaN values (any reader would show them) with out's gradient."""
    # Under torch.compile nothing sets it (graphed checkpointing leaves compiled layers to torch's checkpoint), and
    # dynamo cannot trace a context variable.
    if torch.compiler.is_compiling() or _OUTPUT_READ.get() or not out.requires_grad:
        return out
    return out + (torch.full_like(out, float("nan")) - out).detach()


def _one_token_form(experts: ExpertWeights) -> bool:
    """Whether one_token_experts computes these experts: the plain SwiGLU form, 16-bit or NF4 stored (E, N, K)."""
    return (experts.activation is None and experts.gate_up_bias is None and not experts.interleaved
            and not any(isinstance(w, TransposedNf4Weight) for w in (experts.gate_up, experts.down)))


def _absent_outputs(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept (gate_up, l_gu, l_down) of a forward that keeps nothing: three tensors, since a custom op's outputs
    may not alias each other (torch.library checks it whenever the op runs, compiled or through always_custom_ops)."""
    return no_gradient(hidden), no_gradient(hidden), no_gradient(hidden)


def _experts_forward(
    experts: ExpertWeights, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float, store_for_backward: bool,
) -> ForwardOutputs:
    num_tokens, top_k = top_k_index.shape
    dtype = hidden.dtype
    gu_a_, gu_b_, down_a_, down_b_ = (_cast(t, dtype) for t in (gu_a, gu_b, down_a, down_b))
    if not store_for_backward and num_tokens == 1 and _one_token_form(experts):
        # Batch-1 decoding: two GEMV launches, no schedule (one_token.py).
        out = one_token_experts(hidden, top_k_index, top_k_weights, _cast(experts.gate_up, dtype),
                                _cast(experts.down, dtype), gu_a_, gu_b_, gu_scaling, down_a_, down_b_, down_scaling)
        return (out, *_schedule_fakes(top_k_index, experts.gate_up.shape[0]),
                hidden.new_empty(top_k, dtype=torch.float32), *_absent_outputs(hidden))
    schedule, identity = _schedule(top_k_index, experts.gate_up.shape[0])
    row_weight = top_k_weights.reshape(-1).float()[schedule.sorted_pair]
    num_rows = schedule.num_pairs
    if (not store_for_backward and num_rows <= DECODE_PAIRS and isinstance(experts, DenseExpertWeights)
            and gu_a_ is not None and down_a_ is not None):
        # Decoding: each LoRA's thin product inside its GEMM's tiles, two launches fewer (nothing is kept).
        h = torch.empty(num_rows, experts.gate_up.shape[1] // 2, dtype=dtype, device=hidden.device)
        grouped_mm_lora_in_tile(hidden, schedule.sorted_token, _cast(experts.gate_up, dtype), gu_a_, gu_b_,
                                gu_scaling, schedule, h, identity, swiglu=True)
        y = torch.empty(num_rows, experts.down.shape[1], dtype=dtype, device=hidden.device)
        grouped_mm_lora_in_tile(h, identity, _cast(experts.down, dtype), down_a_, down_b_, down_scaling, schedule, y,
                                schedule.sorted_pair, row_scale=row_weight)
        return (_sum_slots(y, num_tokens, top_k, dtype), *_schedule_tensors(schedule), row_weight,
                *_absent_outputs(hidden))

    gate_up_w, down_w = _cast(experts.gate_up, dtype), _cast(experts.down, dtype)
    l_gu = None
    if gu_a_ is not None:
        l_gu = grouped_mm(hidden, schedule.sorted_token, gu_a_, schedule, _thin(num_rows, gu_a.shape[1], hidden),
                          identity, out_scale=gu_scaling)
    h, gate_up = grouped_mm_swiglu(hidden, schedule.sorted_token, gate_up_w, schedule, l_gu,
                                   gu_b_, store_gate_up=store_for_backward, bias=_cast(experts.gate_up_bias, dtype),
                                   interleaved=experts.interleaved, activation=experts.activation,
                                   product=base_product(hidden, gate_up_w, schedule, schedule.sorted_token))
    l_down = None
    if down_a_ is not None:
        l_down = grouped_mm(h, identity, down_a_, schedule, _thin(num_rows, down_a.shape[1], h),
                            identity, out_scale=down_scaling)
    kept = tuple(t if t is not None else no_gradient(hidden) for t in (gate_up, l_gu, l_down))
    if store_for_backward and not _OUTPUT_READ.get():
        return (unread_output(num_tokens, experts.down.shape[1], hidden), *_schedule_tensors(schedule), row_weight,
                *kept)
    y = torch.empty(num_rows, experts.down.shape[1], dtype=dtype, device=hidden.device)
    grouped_mm(h, identity, down_w, schedule, y, schedule.sorted_pair, l_down, down_b_,
               row_scale=row_weight, bias=_cast(experts.down_bias, dtype),
               product=base_product(h, down_w, schedule))
    return (_sum_slots(y, num_tokens, top_k, dtype), *_schedule_tensors(schedule), row_weight, *kept)


def _experts_forward_fake(
    experts: ExpertWeights, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float, store_for_backward: bool,
) -> ForwardOutputs:
    num_tokens, top_k = top_k_index.shape
    num_experts, hidden_size, inter = experts.down.shape
    num_rows = num_tokens * top_k
    gate_up = hidden.new_empty(num_rows, 2 * inter) if store_for_backward else no_gradient(hidden)
    l_gu = hidden.new_empty(num_rows, gu_a.shape[1]) if gu_a is not None else no_gradient(hidden)
    l_down = hidden.new_empty(num_rows, down_a.shape[1]) if down_a is not None else no_gradient(hidden)
    return (hidden.new_empty(num_tokens, hidden_size), *_schedule_fakes(top_k_index, num_experts),
            hidden.new_empty(num_rows, dtype=torch.float32), gate_up, l_gu, l_down)


def _experts_backward(
    experts: ExpertWeights, grad_out: torch.Tensor, hidden: torch.Tensor, top_k_weights: torch.Tensor,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
    schedule: list[torch.Tensor], row_weight: torch.Tensor, gate_up: torch.Tensor, l_gu: torch.Tensor,
    l_down: torch.Tensor, needs: list[bool],
) -> BackwardOutputs:
    """needs: whether hidden, top_k_weights, gu_a, gu_b, down_a, down_b and the two base weights want gradients."""
    needs_hidden, needs_weights, needs_gu_a, needs_gu_b, needs_down_a, needs_down_b, *needs_base = needs
    num_tokens, top_k = top_k_weights.shape
    schedule, identity = _saved_schedule(schedule, top_k)
    num_rows, num_experts = schedule.num_pairs, schedule.num_experts
    dtype = hidden.dtype
    gu_a_, gu_b_, down_a_, down_b_ = (_cast(t, dtype) for t in (gu_a, gu_b, down_a, down_b))
    tok, pair = schedule.sorted_token, schedule.sorted_pair
    g = grad_out.to(dtype)
    gate_up_w, down_w = _cast(experts.gate_up, dtype), _cast(experts.down, dtype)

    # Down projection and SwiGLU.
    g_down = None
    if down_a_ is not None:
        g_down = grouped_mm(g, tok, down_b_.transpose(1, 2), schedule, _thin(num_rows, down_a.shape[1], g),
                            identity, out_scale=down_scaling)
    dgu, h, d_row_weight = grouped_mm_swiglu_backward(
        g, tok, down_w, gate_up, row_weight, schedule,
        g_down, down_a_.transpose(1, 2) if down_a_ is not None else None,
        interleaved=experts.interleaved, activation=experts.activation,
        product=base_product(g, down_w, schedule, tok, transpose=True),
    )
    row_expert = None
    if experts.gate_up_bias is not None or experts.down_bias is not None:
        row_expert = _row_experts(schedule)
    if experts.down_bias is not None:
        # The bias's share of each row's output before weighting, <d(out)[token], bias[expert]>: a (T, E) product
        # read at each row's (token, expert).
        d_row_weight = d_row_weight + (g.float() @ experts.down_bias.float().T)[tok.long(), row_expert]
    grad_weights = no_gradient(hidden)
    if needs_weights:
        grad_weights = torch.empty(num_rows, dtype=torch.float32, device=g.device)
        grad_weights[pair.long()] = d_row_weight
        grad_weights = grad_weights.view(num_tokens, top_k).to(top_k_weights.dtype)
    grad_down_a = _lora_grad(needs_down_a, down_a,
                             lambda out: grouped_wgrad(g_down, identity, h, identity, schedule, out, row_weight), g)
    grad_down_b = _lora_grad(needs_down_b, down_b,
                             lambda out: grouped_wgrad(g, tok, l_down, identity, schedule, out, row_weight), g)

    # Gate/up projection.
    g_gu = None
    if gu_a_ is not None:
        g_gu = grouped_mm(dgu, identity, gu_b_.transpose(1, 2), schedule, _thin(num_rows, gu_a.shape[1], dgu),
                          identity, out_scale=gu_scaling)
    grad_hidden = no_gradient(hidden)
    if needs_hidden:
        dx = torch.empty(num_rows, hidden.shape[1], dtype=dtype, device=g.device)
        grouped_mm(dgu, identity, gate_up_w, schedule, dx, pair,
                   g_gu, gu_a_.transpose(1, 2) if gu_a_ is not None else None, transpose=True,
                   product=base_product(dgu, gate_up_w, schedule, transpose=True))
        grad_hidden = _sum_slots(dx, num_tokens, top_k, dtype)
    grad_gu_a = _lora_grad(needs_gu_a, gu_a, lambda out: grouped_wgrad(g_gu, identity, hidden, tok, schedule, out), g)
    grad_gu_b = _lora_grad(needs_gu_b, gu_b, lambda out: grouped_wgrad(dgu, identity, l_gu, identity, schedule, out), g)
    grad_fns = {
        "gate_up": lambda out: grouped_wgrad(dgu, identity, hidden, tok, schedule, out),
        "down": lambda out: grouped_wgrad(g, tok, h, identity, schedule, out, row_weight),
        # Bias gradients, summed over each expert's rows: d(pre-activation) as it is; d(out) weighted by the
        # routing weights, as a (E, T) @ (T, H) product instead of a gathered (rows, H) copy.
        "gate_up_bias": lambda: torch.zeros(num_experts, dgu.shape[1], dtype=torch.float32, device=g.device)
        .index_add_(0, row_expert, dgu.float()),
        "down_bias": lambda: torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=g.device)
        .index_put_((tok.long(), row_expert), row_weight, accumulate=True).T @ g.float(),
    }
    grad_base = experts.weight_grads(tuple(needs_base), grad_fns, g)
    return grad_hidden, grad_weights, grad_gu_a, grad_gu_b, grad_down_a, grad_down_b, *grad_base


def _experts_backward_fake(
    experts: ExpertWeights, grad_out: torch.Tensor, hidden: torch.Tensor, top_k_weights: torch.Tensor,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
    schedule: list[torch.Tensor], row_weight: torch.Tensor, gate_up: torch.Tensor, l_gu: torch.Tensor,
    l_down: torch.Tensor, needs: list[bool],
) -> BackwardOutputs:
    needs_hidden, needs_weights, needs_gu_a, needs_gu_b, needs_down_a, needs_down_b, *needs_base = needs
    return (_like(hidden, needs_hidden, hidden), _like(top_k_weights, needs_weights, hidden),
            _like(gu_a, needs_gu_a, hidden), _like(gu_b, needs_gu_b, hidden),
            _like(down_a, needs_down_a, hidden), _like(down_b, needs_down_b, hidden),
            *experts.weight_grad_fakes(tuple(needs_base), hidden))


# The ops' arguments before the weights' (op_args()), with the types the custom ops' schemas are read from. One
# autograd glue serves every kind of weights.
_LORA_PARAMETERS = (
    ("gu_a", torch.Tensor | None), ("gu_b", torch.Tensor | None), ("gu_scaling", float),
    ("down_a", torch.Tensor | None), ("down_b", torch.Tensor | None), ("down_scaling", float),
)
_FORWARD_PARAMETERS = (
    ("hidden", torch.Tensor), ("top_k_index", torch.Tensor), ("top_k_weights", torch.Tensor), *_LORA_PARAMETERS,
    ("store_for_backward", bool),
)
_BACKWARD_PARAMETERS = (
    ("grad_out", torch.Tensor), ("hidden", torch.Tensor), ("top_k_weights", torch.Tensor), *_LORA_PARAMETERS,
    ("schedule", list[torch.Tensor]), ("row_weight", torch.Tensor), ("gate_up", torch.Tensor),
    ("l_gu", torch.Tensor), ("l_down", torch.Tensor), ("needs", list[bool]),
)
_COMMON_ARGS = len(_FORWARD_PARAMETERS)


def _experts_setup_context(ctx, inputs, output, kind):
    hidden, _, top_k_weights, gu_a, gu_b, gu_scaling, down_a, down_b, down_scaling, _ = inputs[:_COMMON_ARGS]
    experts = kind.from_op_args(*inputs[_COMMON_ARGS:])
    kept = output[1:]
    # Everything through save_for_backward, never as ctx attributes: saved-tensor hooks (activation checkpointing,
    # CPU offload) only see what goes through it.
    ctx.save_for_backward(hidden, top_k_weights, gu_a, gu_b, down_a, down_b, *kept, *experts.tensors())
    ctx.scalings = (gu_scaling, down_scaling)
    ctx.rebuild_experts = experts.rebuilder()
    ctx.mark_non_differentiable(*kept)


def _experts_gradients(ctx, backward, grad_out, *_):
    hidden, top_k_weights, gu_a, gu_b, down_a, down_b, *saved = ctx.saved_tensors
    schedule, (row_weight, gate_up, l_gu, l_down), weight_tensors = saved[:5], saved[5:9], saved[9:]
    experts = ctx.rebuild_experts(*weight_tensors)
    needs_input = ctx.needs_input_grad
    needs = [needs_input[0], needs_input[2], needs_input[3], needs_input[4], needs_input[6], needs_input[7],
             *experts.needs_weight_grads(needs_input[_COMMON_ARGS:])]
    grads = backward(grad_out, hidden, top_k_weights, gu_a, gu_b, ctx.scalings[0], down_a, down_b, ctx.scalings[1],
                     list(schedule), row_weight, gate_up, l_gu, l_down, needs, *experts.op_args())
    grad_hidden, grad_weights, grad_gu_a, grad_gu_b, grad_down_a, grad_down_b, *grad_base = (
        grad if need else None for grad, need in zip(grads, needs))
    return (grad_hidden, None, grad_weights, grad_gu_a, grad_gu_b, None, grad_down_a, grad_down_b, None, None,
            *experts.op_arg_grads(*grad_base))


def _experts_op(name: str, kind) -> KernelOp:
    """The experts block over `kind`'s weights as a KernelOp: forward, backward and their fakes take the common
    arguments (_FORWARD_PARAMETERS, _BACKWARD_PARAMETERS), then kind.OP_PARAMETERS, the weights' op_args(). The
    functions are built here, each with the signature torch.library reads its schema from."""
    num_forward, num_backward = _COMMON_ARGS, len(_BACKWARD_PARAMETERS)
    weight_gradients = len(kind.needs_weight_grads((False,) * len(kind.OP_PARAMETERS)))

    def forward(*args) -> ForwardOutputs:
        return _experts_forward(kind.from_op_args(*args[num_forward:]), *args[:num_forward])

    def forward_fake(*args) -> ForwardOutputs:
        return _experts_forward_fake(kind.from_op_args(*args[num_forward:]), *args[:num_forward])

    def backward(*args) -> BackwardOutputs:
        return _experts_backward(kind.from_op_args(*args[num_backward:]), *args[:num_backward])

    def backward_fake(*args) -> BackwardOutputs:
        return _experts_backward_fake(kind.from_op_args(*args[num_backward:]), *args[:num_backward])

    forward.__signature__ = forward_fake.__signature__ = _signature(
        _FORWARD_PARAMETERS + kind.OP_PARAMETERS, ForwardOutputs)
    # Gradients of hidden, top_k_weights and the four LoRA factors, then the weights' (empty where not asked for).
    backward.__signature__ = backward_fake.__signature__ = _signature(
        _BACKWARD_PARAMETERS + kind.OP_PARAMETERS, tuple[(torch.Tensor,) * (6 + weight_gradients)])
    return KernelOp(name, forward, forward_fake,
                    lambda ctx, inputs, output: _experts_setup_context(ctx, inputs, output, kind),
                    _experts_gradients, backward, backward_fake)


def _signature(parameters: tuple[tuple[str, object], ...], returns: object) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
                              for name, annotation in parameters], return_annotation=returns)


_moe_experts = _experts_op("moe_experts", DenseExpertWeights)
_moe_experts_nf4 = _experts_op("moe_experts_nf4", Nf4ExpertWeights)
_moe_experts_clamped_swiglu = _experts_op("moe_experts_clamped_swiglu", ClampedSwigluExpertWeights)
_moe_experts_clamped_swiglu_nf4 = _experts_op("moe_experts_clamped_swiglu_nf4", ClampedSwigluNf4ExpertWeights)


# ----------------------------------------------------------------------------------------------------------
# The references as ops: under torch.compile their loops over experts (shapes that depend on the routing) run as
# one node each
# ----------------------------------------------------------------------------------------------------------


def _lora(a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> ExpertLora | None:
    return ExpertLora(a, b, scaling) if a is not None else None


def _moe_experts_reference(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
) -> torch.Tensor:
    return reference_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
                                 _lora(gu_a, gu_b, gu_scaling), _lora(down_a, down_b, down_scaling))


def _moe_experts_nf4_reference(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_packed: torch.Tensor, gate_up_absmax: torch.Tensor, gate_up_absmax_scale: torch.Tensor | None,
    gate_up_absmax_offset: torch.Tensor | None, down_packed: torch.Tensor, down_absmax: torch.Tensor,
    down_absmax_scale: torch.Tensor | None, down_absmax_offset: torch.Tensor | None, shapes: list[int],
    gate_up_dtype: torch.dtype, down_dtype: torch.dtype,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
) -> torch.Tensor:
    experts = Nf4ExpertWeights.from_op_args(gate_up_packed, gate_up_absmax, gate_up_absmax_scale,
                                            gate_up_absmax_offset, down_packed, down_absmax, down_absmax_scale,
                                            down_absmax_offset, shapes, gate_up_dtype, down_dtype)
    return reference_moe_experts_nf4(hidden, top_k_index, top_k_weights, experts.gate_up, experts.down,
                                     _lora(gu_a, gu_b, gu_scaling), _lora(down_a, down_b, down_scaling))


def _moe_experts_clamped_swiglu_reference(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor, gate_up_bias: torch.Tensor, down_proj: torch.Tensor, down_bias: torch.Tensor,
    alpha: float, limit: float,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
) -> torch.Tensor:
    return reference_moe_experts_clamped_swiglu(hidden, top_k_index, top_k_weights, gate_up_proj, gate_up_bias,
                                                down_proj, down_bias, alpha, limit, _lora(gu_a, gu_b, gu_scaling),
                                                _lora(down_a, down_b, down_scaling))


def _moe_experts_clamped_swiglu_nf4_reference(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_packed: torch.Tensor, gate_up_absmax: torch.Tensor, gate_up_absmax_scale: torch.Tensor | None,
    gate_up_absmax_offset: torch.Tensor | None, gate_up_bias: torch.Tensor, down_packed: torch.Tensor,
    down_absmax: torch.Tensor, down_absmax_scale: torch.Tensor | None, down_absmax_offset: torch.Tensor | None,
    down_bias: torch.Tensor, shapes: list[int], gate_up_dtype: torch.dtype, down_dtype: torch.dtype, alpha: float,
    limit: float,
    gu_a: torch.Tensor | None, gu_b: torch.Tensor | None, gu_scaling: float,
    down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scaling: float,
) -> torch.Tensor:
    experts = ClampedSwigluNf4ExpertWeights.from_op_args(
        gate_up_packed, gate_up_absmax, gate_up_absmax_scale, gate_up_absmax_offset, gate_up_bias, down_packed,
        down_absmax, down_absmax_scale, down_absmax_offset, down_bias, shapes, gate_up_dtype, down_dtype, alpha, limit)
    return reference_moe_experts_clamped_swiglu_nf4(
        hidden, top_k_index, top_k_weights, experts.gate_up_proj, experts.gate_up_bias, experts.down_proj,
        experts.down_bias, alpha, limit, _lora(gu_a, gu_b, gu_scaling), _lora(down_a, down_b, down_scaling))


def _hidden_like(hidden: torch.Tensor, *args) -> torch.Tensor:
    return hidden.new_empty(hidden.shape)


_moe_experts_reference_op = ReferenceOp("moe_experts_reference", _moe_experts_reference, _hidden_like)
_moe_experts_nf4_reference_op = ReferenceOp("moe_experts_nf4_reference", _moe_experts_nf4_reference, _hidden_like)
_moe_experts_clamped_swiglu_reference_op = ReferenceOp(
    "moe_experts_clamped_swiglu_reference", _moe_experts_clamped_swiglu_reference, _hidden_like)
_moe_experts_clamped_swiglu_nf4_reference_op = ReferenceOp(
    "moe_experts_clamped_swiglu_nf4_reference", _moe_experts_clamped_swiglu_nf4_reference, _hidden_like)


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
    gu, dn = _lora_tensors(gate_up_lora), _lora_tensors(down_lora)
    trained = (hidden, top_k_weights, gate_up_proj, down_proj, *gu[:2], *dn[:2])
    if hidden.shape[0] > 0 and use_triton(*trained):
        return _moe_experts(hidden, top_k_index, top_k_weights, *gu, *dn, _needs_backward(*trained),
                            gate_up_proj, down_proj)[0]
    return _unread(_moe_experts_reference_op(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, *gu,
                                             *dn))


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

    Same result as ``moe_experts`` on ``dequantize_nf4`` of both, without keeping a 16-bit copy of either stack: the
    grouped GEMMs dequantize tiles in registers, or, where each expert has rows enough, a product dequantizes its
    stack whole for torch's grouped GEMM and frees the copy after it (grouped_gemm.products_by_torch).
    Differentiable w.r.t. hidden, top_k_weights and the LoRA factors.
    """
    if gate_up.shape[0] != down.shape[0] or gate_up.shape[2] != down.shape[1] or gate_up.shape[1] != 2 * down.shape[2]:
        raise ValueError(f"NF4 experts shapes do not fit: gate_up {gate_up.shape}, down {down.shape}")
    experts = Nf4ExpertWeights(gate_up, down)
    gu, dn = _lora_tensors(gate_up_lora), _lora_tensors(down_lora)
    trained = (hidden, top_k_weights, *gu[:2], *dn[:2])
    # bf16 weights are rounded to bf16 inside the kernels, which the interpreter cannot be trusted with.
    interpreted_bf16 = not hidden.is_cuda and torch.bfloat16 in (gate_up.dtype, down.dtype)
    if hidden.shape[0] > 0 and not interpreted_bf16 and use_triton(*trained, *experts.tensors()):
        return _moe_experts_nf4(hidden, top_k_index, top_k_weights, *gu, *dn, _needs_backward(*trained),
                                *experts.op_args())[0]
    return _unread(_moe_experts_nf4_reference_op(hidden, top_k_index, top_k_weights, *experts.op_args(), *gu,
                                                 *dn))


def moe_experts_clamped_swiglu(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """gpt-oss's experts block (transformers' GptOssExperts) with optional LoRA on both expert weights.

    hidden: (tokens, H); top_k_index: (tokens, k) int64; top_k_weights: (tokens, k); gate_up_proj: (E, H, 2I), gate
    and up columns interleaved; gate_up_bias: (E, 2I); down_proj: (E, I, H); down_bias: (E, H); the activation
    ``ClampedSwiglu(alpha, limit)``. LoRA as peft puts it on these (E, in, out) stacks: A (E, r, in), B (E, out, r).
    Returns (tokens, H) in hidden's dtype. Differentiable w.r.t. hidden, top_k_weights, the four base tensors and the
    LoRA factors. The kernels read the stacks in place (strided), with no copy in another layout.
    """
    experts = ClampedSwigluExpertWeights(gate_up_proj, gate_up_bias, down_proj, down_bias, float(alpha), float(limit))
    gu, dn = _lora_tensors(gate_up_lora), _lora_tensors(down_lora)
    trained = (hidden, top_k_weights, *experts.tensors(), *gu[:2], *dn[:2])
    if hidden.shape[0] > 0 and use_triton(*trained):
        return _moe_experts_clamped_swiglu(hidden, top_k_index, top_k_weights, *gu, *dn, _needs_backward(*trained),
                                           *experts.op_args())[0]
    return _unread(_moe_experts_clamped_swiglu_reference_op(hidden, top_k_index, top_k_weights, *experts.op_args(),
                                                           *gu, *dn))


def moe_experts_clamped_swiglu_nf4(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: Nf4Weight,
    gate_up_bias: torch.Tensor,
    down_proj: Nf4Weight,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    gate_up_lora: ExpertLora | None = None,
    down_lora: ExpertLora | None = None,
) -> torch.Tensor:
    """``moe_experts_clamped_swiglu`` with frozen NF4 stacks (QLoRA): gate_up_proj and down_proj are ``quantize_nf4``
    of the stored (E, H, 2I) and (E, I, H) stacks. Same result as ``moe_experts_clamped_swiglu`` on their
    dequantization, without a 16-bit copy: the grouped GEMMs decode the stored tiles and read them transposed.
    Differentiable w.r.t. hidden, top_k_weights, the biases and the LoRA factors."""
    experts_count, hidden_size, gate_up_width = gate_up_proj.shape
    if down_proj.shape != (experts_count, gate_up_width // 2, hidden_size) or gate_up_width % 2:
        raise ValueError(f"NF4 gpt-oss experts shapes do not fit: gate_up_proj {gate_up_proj.shape}, "
                         f"down_proj {down_proj.shape}")
    experts = ClampedSwigluNf4ExpertWeights(gate_up_proj, gate_up_bias, down_proj, down_bias, float(alpha),
                                            float(limit))
    gu, dn = _lora_tensors(gate_up_lora), _lora_tensors(down_lora)
    trained = (hidden, top_k_weights, gate_up_bias, down_bias, *gu[:2], *dn[:2])
    # bf16 weights are rounded to bf16 inside the kernels, which the interpreter cannot be trusted with.
    interpreted_bf16 = not hidden.is_cuda and torch.bfloat16 in (gate_up_proj.dtype, down_proj.dtype)
    if hidden.shape[0] > 0 and not interpreted_bf16 and use_triton(*trained, *experts.tensors()):
        return _moe_experts_clamped_swiglu_nf4(hidden, top_k_index, top_k_weights, *gu, *dn,
                                               _needs_backward(*trained), *experts.op_args())[0]
    return _unread(_moe_experts_clamped_swiglu_nf4_reference_op(hidden, top_k_index, top_k_weights,
                                                                *experts.op_args(), *gu, *dn))
