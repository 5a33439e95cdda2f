"""MoE routing: top-k expert choice from router logits, and the sort of (token, slot) pairs by expert.

Two routers cover the families fastmoe patches:

* ``route_sigmoid_topk`` (AFMoE, LFM2-MoE): sigmoid scores, experts chosen on scores + a load-balancing bias,
  weights taken from the unbiased scores, optionally renormalised, then scaled.
* ``route_softmax_topk`` (JetMoe): top-k on the logits, softmax over the k chosen logits.

The Triton forward runs one program per block of tokens and picks the k experts by k rounds of argmax.
``router_topk`` is the router whole, its linear layer included: at a decode step's few tokens one launch.
Ties go to the lowest expert index; the references use a stable descending sort so they agree exactly
(``torch.topk`` gives no tie guarantee). The backward is a few elementwise ops on (tokens, k) plus a
scatter into (tokens, experts), so it stays in PyTorch.

``sort_by_expert`` turns ``top_k_index`` into the schedule the grouped GEMMs of ``moe_experts`` use, on the
device and without a host sync. In PyTorch that is about thirty small launches (a radix sort, searchsorted, cumsum,
gathers, casts): most of an MoE layer's launches when decoding a few tokens, and ~3% of JetMoe-8B's training step,
which builds 144 schedules (three per layer, forward and recompute) of 8,192 pairs at 61 us each (graphed, H100).
Up to ``ONE_PROGRAM_PAIRS`` (token, slot) pairs one Triton program (``_schedule_kernel``) builds the same schedule;
beyond, three launches (``_schedule_in_chunks``, a counting sort over chunks of pairs: 10 us there, 9 us for
LFM2-8B-A1B's 16,384 pairs over 32 experts, 55 us against PyTorch's 70 for Trinity-Mini's 32,768 over 128, whose
one-program middle step walks 512 chunks; bench_decode_ops.py schedule, graphed, H100; measured with a middle step
that read the chunks' counts twice, once now).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..custom_op import GraphOp, KernelOp
from ..dispatch import use_triton
from ..grid import cdiv, next_power_of_2
from ..split_k import arrival_counts, gemv_split, interpreter_split, last_to_arrive

# ----------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------


def _stable_topk(values: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices of the top_k largest values along the last dim, ties broken towards the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :top_k]


def reference_route_sigmoid_topk(
    router_logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    normalize: bool,
    norm_eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, experts) logits -> (tokens, k) float32 weights and (tokens, k) int64 expert indices."""
    scores = torch.sigmoid(router_logits.float())
    choice = scores if expert_bias is None else scores + expert_bias.float()
    top_k_index = _stable_topk(choice.detach(), top_k)
    top_k_weights = scores.gather(1, top_k_index)
    if normalize:
        top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + norm_eps)
    return top_k_weights * scale, top_k_index


def reference_route_softmax_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, experts) logits -> (tokens, k) float32 softmax weights over the chosen logits, (tokens, k) int64."""
    logits = router_logits.float()
    top_k_index = _stable_topk(logits.detach(), top_k)
    top_k_weights = torch.softmax(logits.gather(1, top_k_index), dim=-1)
    return top_k_weights, top_k_index


# ----------------------------------------------------------------------------------------------------------
# Triton forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _pick_top_k(logits, rows, row_mask, cols, col_mask, bias_ptr, index_ptr, chosen_ptr, weights_ptr, norm_eps, scale,
                HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, TOP_K: tl.constexpr,
                BLOCK_SLOTS: tl.constexpr):
    """The k picks of each row of a (rows, cols) tile of float32 logits and their weights, stored at index_ptr,
    chosen_ptr (the activated score of each pick) and weights_ptr, (T, TOP_K) each: with SIGMOID the chosen scores,
    divided by their sum (+ norm_eps) when NORMALIZE, times scale; otherwise the softmax of the chosen logits. (At a
    decode step's few tokens these weights were four more launches of their own per MoE layer.)"""
    slots = tl.arange(0, BLOCK_SLOTS)
    scores = logits
    if SIGMOID:
        scores = tl.sigmoid(scores)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # Padding columns can never win; picked columns are knocked out the same way.
    choice = tl.where(col_mask[None, :], choice, float("-inf"))
    picked = tl.zeros((rows.shape[0], BLOCK_SLOTS), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)
        # Lowest index among the maxima: the tie rule the references share.
        pick = tl.min(tl.where(choice == best[:, None], cols[None, :], cols.shape[0]), axis=1)
        hit = cols[None, :] == pick[:, None]
        picked_score = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        tl.store(index_ptr + rows * TOP_K + k, pick.to(tl.int64), mask=row_mask)
        tl.store(chosen_ptr + rows * TOP_K + k, picked_score, mask=row_mask)
        picked = tl.where(slots[None, :] == k, picked_score[:, None], picked)
        choice = tl.where(hit, float("-inf"), choice)
    slot_mask = (slots < TOP_K)[None, :]
    if SIGMOID:
        if NORMALIZE:  # padding slots hold 0
            weights = picked / (tl.sum(picked, axis=1) + norm_eps)[:, None] * scale
        else:
            weights = picked * scale
    else:
        exp = tl.where(slot_mask, tl.exp(picked - tl.max(tl.where(slot_mask, picked, float("-inf")), axis=1)[:, None]),
                       0.0)
        weights = exp / tl.sum(exp, axis=1)[:, None]
    tl.store(weights_ptr + rows[:, None] * TOP_K + slots[None, :], weights, mask=row_mask[:, None] & slot_mask)


@triton.jit
def _topk_select_kernel(
    logits_ptr, stride_lt, stride_le,
    bias_ptr,
    index_ptr, chosen_ptr,  # (T, K) int64, (T, K) float32: the activated score (sigmoid or logit) of each pick
    weights_ptr,  # (T, K) float32: the routing weights (_pick_top_k)
    T, E, norm_eps, scale,
    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The k picks of each token of a block of BLOCK_T tokens and their weights (_pick_top_k)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_mask = cols < E
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=0.0)
    _pick_top_k(logits.to(tl.float32), rows, row_mask, cols, col_mask, bias_ptr, index_ptr, chosen_ptr, weights_ptr,
                norm_eps, scale, HAS_BIAS, SIGMOID, NORMALIZE, TOP_K, BLOCK_K)


def _topk_select(
    router_logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, sigmoid: bool, normalize: bool = False,
    norm_eps: float = 0.0, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> index, chosen (the picks' activated scores) and weights, each (tokens, k); see _topk_select_kernel."""
    num_tokens, num_experts = router_logits.shape
    index = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    chosen = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    if num_tokens == 0:
        return index, chosen, weights
    block_e = next_power_of_2(num_experts)
    # Keep a program's (tokens x experts) tile around 4K elements: registers on GPU, numpy size in the interpreter.
    block_t = max(1, min(64, 4096 // block_e, next_power_of_2(num_tokens)))
    _topk_select_kernel[(cdiv(num_tokens, block_t),)](
        router_logits, router_logits.stride(0), router_logits.stride(1),
        expert_bias if expert_bias is not None else router_logits,
        index, chosen, weights,
        num_tokens, num_experts, float(norm_eps), float(scale),
        HAS_BIAS=expert_bias is not None, SIGMOID=sigmoid, NORMALIZE=normalize, TOP_K=top_k,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_power_of_2(top_k),
    )
    return index, chosen, weights


def _route_sigmoid_topk_forward(
    router_logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, normalize: bool, norm_eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> weights, index and the chosen experts' sigmoid scores (tokens, k), which the backward reads."""
    index, scores, weights = _topk_select(router_logits, expert_bias, top_k, sigmoid=True, normalize=normalize,
                                          norm_eps=norm_eps, scale=scale)
    return weights, index, scores


def _route_sigmoid_topk_fake(
    router_logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, normalize: bool, norm_eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (router_logits.shape[0], top_k)
    return (router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int64),
            router_logits.new_empty(shape, dtype=torch.float32))


def _route_sigmoid_topk_setup_context(ctx, inputs, output):
    router_logits, _, _, normalize, norm_eps, scale = inputs
    _, index, scores = output
    ctx.save_for_backward(index, scores)
    ctx.normalize, ctx.norm_eps, ctx.scale = normalize, norm_eps, scale
    ctx.num_experts, ctx.logits_dtype = router_logits.shape[1], router_logits.dtype
    ctx.mark_non_differentiable(index, scores)


def _route_sigmoid_topk_gradients(ctx, _backward, grad_weights, _grad_index, _grad_scores):
    # A few elementwise ops on (tokens, k) and a scatter: plain PyTorch, which torch.compile traces and fuses.
    index, scores = ctx.saved_tensors
    grad = grad_weights.float() * ctx.scale
    if ctx.normalize:
        # w_i = s_i / (S + eps)  =>  dL/ds_j = g_j / (S + eps) - sum_i g_i s_i / (S + eps)^2
        denom = scores.sum(dim=-1, keepdim=True) + ctx.norm_eps
        grad = grad / denom - (grad * scores).sum(dim=-1, keepdim=True) / (denom * denom)
    grad = grad * scores * (1.0 - scores)  # through the sigmoid
    grad_logits = grad.new_zeros(index.shape[0], ctx.num_experts).scatter_(1, index, grad)
    return grad_logits.to(ctx.logits_dtype), None, None, None, None, None


_route_sigmoid_topk = KernelOp("route_sigmoid_topk", _route_sigmoid_topk_forward, _route_sigmoid_topk_fake,
                               _route_sigmoid_topk_setup_context, _route_sigmoid_topk_gradients)


def _route_softmax_topk_forward(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    index, _, weights = _topk_select(router_logits, None, top_k, sigmoid=False)
    return weights, index


def _route_softmax_topk_fake(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (router_logits.shape[0], top_k)
    return router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int64)


def _route_softmax_topk_setup_context(ctx, inputs, output):
    router_logits, _ = inputs
    weights, index = output
    ctx.save_for_backward(index, weights)
    ctx.num_experts, ctx.logits_dtype = router_logits.shape[1], router_logits.dtype
    ctx.mark_non_differentiable(index)


def _route_softmax_topk_gradients(ctx, _backward, grad_weights, _grad_index):
    index, weights = ctx.saved_tensors
    grad = grad_weights.float()
    grad = weights * (grad - (grad * weights).sum(dim=-1, keepdim=True))
    grad_logits = grad.new_zeros(index.shape[0], ctx.num_experts).scatter_(1, index, grad)
    return grad_logits.to(ctx.logits_dtype), None


_route_softmax_topk = KernelOp("route_softmax_topk", _route_softmax_topk_forward, _route_softmax_topk_fake,
                               _route_softmax_topk_setup_context, _route_softmax_topk_gradients)


def route_sigmoid_topk(
    router_logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    normalize: bool,
    norm_eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k routing (AFMoE, LFM2-MoE).

    router_logits: (tokens, experts); expert_bias: (experts,) or None, used only to choose experts.
    Returns (tokens, k) float32 weights (differentiable w.r.t. router_logits) and (tokens, k) int64 indices,
    ordered by decreasing biased score, ties to the lower expert index.
    """
    if use_triton(router_logits, expert_bias):
        weights, index, _ = _route_sigmoid_topk(router_logits, expert_bias, top_k, normalize, norm_eps, scale)
        return weights, index
    return reference_route_sigmoid_topk(router_logits, expert_bias, top_k, normalize, norm_eps, scale)


def route_softmax_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on logits, softmax over the k chosen (JetMoe). (tokens, experts) -> (tokens, k) fp32, (tokens, k) int64."""
    if use_triton(router_logits):
        return _route_softmax_topk(router_logits, top_k)
    return reference_route_softmax_topk(router_logits, top_k)


# ----------------------------------------------------------------------------------------------------------
# The router's linear layer and the top-k in one launch, for a decode step
# ----------------------------------------------------------------------------------------------------------
#
# At a decode step's few tokens the router's logits are a GEMV over a small weight ((experts, hidden), 128-512 KB),
# which cuBLAS runs in one or two thread blocks (5 us on an H100 for LFM2-8B-A1B's 32 x 2048, as long as an MoE
# layer's down projection), followed by the top-k launch. ``router_topk`` spreads the GEMV over the GPU (programs of
# experts x K splits, as the few-rows linears do) and the last program to arrive sums the splits in split order,
# writes the logits and picks the top k (``_pick_top_k``): one launch. Measured on an H100 (bench_generate.py
# --router-gemv-tokens 16,0, 4-bit, graph replay of the decode step): LFM2-8B-A1B 24 layers batch 1 1.811 -> 1.780 ms;
# its batch 8 and Trinity-Mini's 8 layers (128 experts, whose GEMV cuBLAS spreads wider) unchanged.

# Up to this many tokens (a decode step's batch) the router runs as ``_router_topk_kernel``; more go to the GEMM.
ROUTER_GEMV_TOKENS = 16


@triton.jit
def _router_topk_kernel(
    x_ptr, stride_xt, stride_xk, w_ptr, stride_we, stride_wk, bias_ptr,
    logits_ptr,  # (T, E) in x's dtype, as F.linear returns the logits
    partials_ptr, arrivals_ptr,  # (SPLIT_K, T, E) float32 partial logits; the arrival counters (split_k)
    index_ptr, chosen_ptr, weights_ptr,  # (T, TOP_K) each, as in _topk_select_kernel
    T, E, K, STEPS_PER_SPLIT, norm_eps, scale,
    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ALL_E: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
):
    """Program (expert block, K split): the float32 partial logits of every token for BLOCK_E experts over its K
    steps; the last of all programs to arrive sums each logit's splits in split order (deterministic), rounds the
    logits to x's dtype (F.linear's output) and picks from them."""
    e_block, split = tl.program_id(0), tl.program_id(1)
    tokens = tl.arange(0, BLOCK_T)
    t_mask = tokens < T
    experts = e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = experts < E
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    k_start = split * STEPS_PER_SPLIT * BLOCK_K
    for k0 in range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * BLOCK_K, K), BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + (k0 + offs_k)[None, :] * stride_xk,
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + experts[:, None] * stride_we + (k0 + offs_k)[None, :] * stride_wk,
                    mask=e_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(partials_ptr + (split * T + tokens[:, None]) * E + experts[None, :], acc,
             mask=t_mask[:, None] & e_mask[None, :])
    if last_to_arrive(arrivals_ptr, 0, tl.num_programs(0) * SPLIT_K):
        cols = tl.arange(0, ALL_E)
        col_mask = cols < E
        mask = t_mask[:, None] & col_mask[None, :]
        logits = tl.zeros((BLOCK_T, ALL_E), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            logits += tl.load(partials_ptr + (s * T + tokens[:, None]) * E + cols[None, :], mask=mask, other=0.0,
                              cache_modifier=".cg")
        logits = logits.to(logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + tokens[:, None] * E + cols[None, :], logits, mask=mask)
        _pick_top_k(logits.to(tl.float32), tokens, t_mask, cols, col_mask, bias_ptr, index_ptr, chosen_ptr,
                    weights_ptr, norm_eps, scale, HAS_BIAS, SIGMOID, NORMALIZE, TOP_K, BLOCK_SLOTS)


def _router_topk(hidden: torch.Tensor, weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                 sigmoid: bool, normalize: bool, norm_eps: float, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> logits (tokens, experts) in hidden's dtype, fp32 weights and int64 indices (tokens, k): one launch of
    _router_topk_kernel."""
    num_tokens, hidden_size = hidden.shape
    num_experts = weight.shape[0]
    device = hidden.device
    logits = torch.empty(num_tokens, num_experts, dtype=hidden.dtype, device=device)
    index = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    chosen = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    block_t = next_power_of_2(num_tokens)
    if device.type == "cuda":
        # A K step's products (tokens, experts, K) are summed in registers: at most 8K of them a program.
        block_e, block_k = 16, min(64, 512 // block_t)
        expert_blocks = cdiv(num_experts, block_e)
        split = gemv_split(expert_blocks, hidden_size, block_k)
    else:  # the interpreter: small blocks, and K split so that the CPU tests go through the fix-up
        block_e, block_k = 8, 32
        expert_blocks = cdiv(num_experts, block_e)
        split = interpreter_split(hidden_size, block_k)
    partials = torch.empty(split, num_tokens, num_experts, dtype=torch.float32, device=device)
    _router_topk_kernel[(expert_blocks, split)](
        hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
        expert_bias if expert_bias is not None else weight,
        logits, partials, arrival_counts(device, 1), index, chosen, weights,
        num_tokens, num_experts, hidden_size, cdiv(cdiv(hidden_size, block_k), split),
        float(norm_eps), float(scale),
        HAS_BIAS=expert_bias is not None, SIGMOID=sigmoid, NORMALIZE=normalize, TOP_K=top_k,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, SPLIT_K=split,
        ALL_E=next_power_of_2(num_experts), BLOCK_SLOTS=next_power_of_2(top_k),
    )
    return logits, weights, index


def _router_topk_fake(hidden: torch.Tensor, weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                      sigmoid: bool, normalize: bool, norm_eps: float, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (hidden.shape[0], top_k)
    return (hidden.new_empty(hidden.shape[0], weight.shape[0]), hidden.new_empty(shape, dtype=torch.float32),
            hidden.new_empty(shape, dtype=torch.int64))


_router_topk_op = GraphOp("router_topk", _router_topk, _router_topk_fake)


def reference_router_topk(hidden: torch.Tensor, weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                          sigmoid: bool, normalize: bool = False, norm_eps: float = 0.0, scale: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's logits F.linear(hidden, weight) and reference_route_sigmoid_topk (sigmoid) or
    reference_route_softmax_topk of them: -> (logits in hidden's dtype, fp32 weights, int64 indices)."""
    logits = F.linear(hidden, weight)
    if sigmoid:
        weights, index = reference_route_sigmoid_topk(logits, expert_bias, top_k, normalize, norm_eps, scale)
    else:
        weights, index = reference_route_softmax_topk(logits, top_k)
    return logits, weights, index


def router_topk(hidden: torch.Tensor, weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                sigmoid: bool, normalize: bool = False, norm_eps: float = 0.0, scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router: logits = hidden (tokens, hidden) @ weight (experts, hidden)^T, then sigmoid top-k routing (expert_bias
    used only to choose, weights normalised and scaled as route_sigmoid_topk says) or, without `sigmoid`, the softmax
    over the k largest logits (route_softmax_topk, expert_bias None). Returns (logits in hidden's dtype, (tokens, k)
    fp32 weights, (tokens, k) int64 indices).

    Up to ROUTER_GEMV_TOKENS tokens without autograd (decoding) it is one launch (_router_topk_kernel); otherwise the
    GEMM and the routing kernel, whose weights are differentiable."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if (hidden.shape[0] <= ROUTER_GEMV_TOKENS and not needs_grad and weight.dtype == hidden.dtype
            and use_triton(hidden, weight, expert_bias) and (sigmoid or expert_bias is None)):
        return _router_topk_op(hidden, weight, expert_bias, top_k, sigmoid, normalize, norm_eps, scale)
    logits = F.linear(hidden, weight)
    if sigmoid:
        weights, index = route_sigmoid_topk(logits, expert_bias, top_k, normalize, norm_eps, scale)
    else:
        weights, index = route_softmax_topk(logits.float(), top_k)
    return logits, weights, index


# ----------------------------------------------------------------------------------------------------------
# Sort by expert
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExpertSchedule:
    """(token, slot) pairs grouped by expert, and the row tiles of the grouped GEMMs over them.

    Rows of the "sorted" order are the T*K (token, slot) pairs sorted by expert (stable: by token within an
    expert). Every tensor lives on the routing device; building it never syncs with the host.
    """

    sorted_pair: torch.Tensor  # (T*K,) int32: flat token*K+slot index of each sorted row
    sorted_token: torch.Tensor  # (T*K,) int32: token of each sorted row (sorted_pair // K)
    expert_offsets: torch.Tensor  # (E+1,) int32: rows of expert e are [offsets[e], offsets[e+1])
    tile_expert: torch.Tensor  # (max_tiles,) int32: expert of each row tile, -1 for tiles past the last
    tile_row_start: torch.Tensor  # (max_tiles,) int32: first sorted row of each tile
    block_m: int  # rows per tile; a tile never spans two experts
    num_experts: int
    top_k: int

    @property
    def num_pairs(self) -> int:
        return self.sorted_pair.numel()

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()


def tile_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most row tiles num_pairs (token, slot) pairs can make over num_experts experts (tiles of block_m rows that
    never span two experts): each expert's partial tile beyond the full ones, and no tile without a row. Decoding one
    token over 128 experts: 8 tiles (not 129), so the grouped GEMMs launch no programs that would only exit."""
    return max(1, min(num_pairs, cdiv(num_pairs, block_m) + num_experts))


# (token, slot) pairs up to which one program builds the schedule. Measured on an H200 (bench_decode_ops.py, 128
# experts, graphed): 2.2 us at 8 pairs and 2.9 at 64 against PyTorch's 51-54 us, but 607 us at 512 (its pair-by-pair
# rank matrices spill) against PyTorch's 73.
ONE_PROGRAM_PAIRS = 128


@triton.jit
def _schedule_kernel(
    index_ptr, sorted_pair_ptr, sorted_token_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
    num_pairs, num_experts, max_tiles, block_m,
    TOP_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
):
    """sort_by_expert's schedule in one program: counts per expert, the stable rank of each pair within its
    expert, then each expert's tiles written at their place (a barrier orders the writes that depend on earlier
    ones: the offsets read back per pair, the tiles written over their defaults)."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    valid = offs_p < num_pairs
    expert = tl.load(index_ptr + offs_p, mask=valid, other=0).to(tl.int32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    rank = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for j0 in range(0, num_pairs, CHUNK):
        offs_j = j0 + tl.arange(0, CHUNK)
        other = tl.load(index_ptr + offs_j, mask=offs_j < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((other[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
        earlier_same = (other[None, :] == expert[:, None]) & (offs_j[None, :] < offs_p[:, None])
        rank += tl.sum(earlier_same.to(tl.int32), axis=1)
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    e_mask = offs_e < num_experts
    tl.store(expert_offsets_ptr + offs_e, starts, mask=e_mask)
    tl.store(expert_offsets_ptr + num_experts, num_pairs)
    offs_t = tl.arange(0, BLOCK_T)
    tl.store(tile_expert_ptr + offs_t, tl.full((BLOCK_T,), -1, tl.int32), mask=offs_t < max_tiles)
    tl.store(tile_row_start_ptr + offs_t, tl.zeros((BLOCK_T,), dtype=tl.int32), mask=offs_t < max_tiles)
    tl.debug_barrier()
    position = tl.load(expert_offsets_ptr + expert, mask=valid, other=0) + rank
    tl.store(sorted_pair_ptr + position, offs_p, mask=valid)
    tl.store(sorted_token_ptr + position, offs_p // TOP_K, mask=valid)
    tiles = (counts + block_m - 1) // block_m
    first_tile = tl.cumsum(tiles, axis=0) - tiles
    for j in range(0, tl.cdiv(num_pairs, block_m)):
        mine = e_mask & (j < tiles)
        tl.store(tile_expert_ptr + first_tile + j, offs_e, mask=mine)
        tl.store(tile_row_start_ptr + first_tile + j, starts + j * block_m, mask=mine)


def _schedule_one_program(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> ExpertSchedule:
    num_tokens, top_k = top_k_index.shape
    num_pairs = num_tokens * top_k
    max_tiles = tile_bound(num_pairs, num_experts, block_m)
    sorted_pair, sorted_token = (top_k_index.new_empty(num_pairs, dtype=torch.int32) for _ in range(2))
    expert_offsets = top_k_index.new_empty(num_experts + 1, dtype=torch.int32)
    tile_expert, tile_row_start = (top_k_index.new_empty(max_tiles, dtype=torch.int32) for _ in range(2))
    _schedule_kernel[(1,)](
        top_k_index.reshape(-1).contiguous(), sorted_pair, sorted_token, expert_offsets, tile_expert, tile_row_start,
        num_pairs, num_experts, max_tiles, block_m,
        TOP_K=top_k, BLOCK_P=max(16, next_power_of_2(num_pairs)),
        BLOCK_E=max(16, next_power_of_2(num_experts)), BLOCK_T=max(16, next_power_of_2(max_tiles)),
        CHUNK=64 if top_k_index.is_cuda else 16,
    )
    return ExpertSchedule(sorted_pair, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m,
                          num_experts, top_k)


# Past ONE_PROGRAM_PAIRS, three launches build the schedule: each chunk of pairs counts its experts, one program
# turns the counts into every chunk's first row per expert and the tiles, each chunk places its pairs. A chunk's
# (pairs, experts) one-hot matrix holds at most this many elements (registers, not spills).
_CHUNK_ELEMENTS = 8192
CHUNKED_SCHEDULE_MAX_EXPERTS = 512


@triton.jit
def _chunk_expert_counts_kernel(index_ptr, chunk_counts_ptr, num_pairs, BLOCK_P: tl.constexpr,
                                BLOCK_E: tl.constexpr):
    """chunk_counts[chunk, e] = how many of the chunk's pairs chose expert e."""
    chunk = tl.program_id(0)
    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    expert = tl.load(index_ptr + offs_p, mask=offs_p < num_pairs, other=-1).to(tl.int32)
    counts = tl.sum((expert[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + offs_e, counts)


@triton.jit
def _chunk_starts_and_tiles_kernel(
    chunk_counts_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
    num_chunks, num_pairs, num_experts, max_tiles, block_m,
    BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program, one pass over the chunks' counts: each chunk's first row per expert counted from the expert's
    first row (written over its counts; placement adds the expert's offset), the experts' row offsets and the row
    tiles."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_C)
    # Each chunk's rows of expert e begin after the earlier chunks' (a stable sort: by pair within an expert).
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        rows = c0 + offs_c
        pointers = chunk_counts_ptr + rows[:, None] * BLOCK_E + offs_e[None, :]
        block = tl.load(pointers, mask=rows[:, None] < num_chunks, other=0)
        tl.store(pointers, counts[None, :] + tl.cumsum(block, axis=0) - block, mask=rows[:, None] < num_chunks)
        counts += tl.sum(block, axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    tl.store(expert_offsets_ptr + offs_e, starts, mask=offs_e < num_experts)
    tl.store(expert_offsets_ptr + num_experts, num_pairs)
    tiles = (counts + block_m - 1) // block_m  # experts past num_experts count no pairs: no tiles
    tile_end = tl.cumsum(tiles, axis=0)
    first_tile = tile_end - tiles
    for t0 in range(0, max_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        # The expert whose tiles hold tile t: how many experts' tiles end at or before it (searchsorted, right).
        expert = tl.sum((tile_end[None, :] <= offs_t[:, None]).to(tl.int32), axis=1)
        mine = offs_e[None, :] == expert[:, None]
        row_start = (tl.sum(tl.where(mine, starts[None, :], 0), axis=1)
                     + (offs_t - tl.sum(tl.where(mine, first_tile[None, :], 0), axis=1)) * block_m)
        valid = expert < num_experts
        tl.store(tile_expert_ptr + offs_t, tl.where(valid, expert, -1), mask=offs_t < max_tiles)
        tl.store(tile_row_start_ptr + offs_t, tl.where(valid, row_start, 0), mask=offs_t < max_tiles)


@triton.jit
def _place_pairs_kernel(index_ptr, chunk_starts_ptr, expert_offsets_ptr, sorted_pair_ptr, sorted_token_ptr,
                        num_pairs, TOP_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each pair at its expert's first row, plus its chunk's first row within the expert, plus its rank among the
    chunk's earlier pairs of it."""
    chunk = tl.program_id(0)
    offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    valid = offs_p < num_pairs
    expert = tl.load(index_ptr + offs_p, mask=valid, other=-1).to(tl.int32)
    one_hot = (expert[:, None] == offs_e[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)
    position = (tl.load(expert_offsets_ptr + expert, mask=valid, other=0)
                + tl.load(chunk_starts_ptr + chunk * BLOCK_E + expert, mask=valid, other=0) + rank)
    tl.store(sorted_pair_ptr + position, offs_p, mask=valid)
    tl.store(sorted_token_ptr + position, offs_p // TOP_K, mask=valid)


def _schedule_in_chunks(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> ExpertSchedule:
    num_tokens, top_k = top_k_index.shape
    num_pairs = num_tokens * top_k
    max_tiles = tile_bound(num_pairs, num_experts, block_m)
    block_e = max(16, next_power_of_2(num_experts))
    block_p = min(1024, max(16, _CHUNK_ELEMENTS // block_e))
    num_chunks = cdiv(num_pairs, block_p)
    index = top_k_index.reshape(-1).contiguous()
    sorted_pair, sorted_token = (index.new_empty(num_pairs, dtype=torch.int32) for _ in range(2))
    expert_offsets = index.new_empty(num_experts + 1, dtype=torch.int32)
    tile_expert, tile_row_start = (index.new_empty(max_tiles, dtype=torch.int32) for _ in range(2))
    chunk_counts = index.new_empty(num_chunks, block_e, dtype=torch.int32)  # then each chunk's first rows
    _chunk_expert_counts_kernel[(num_chunks,)](index, chunk_counts, num_pairs, BLOCK_P=block_p, BLOCK_E=block_e)
    _chunk_starts_and_tiles_kernel[(1,)](
        chunk_counts, expert_offsets, tile_expert, tile_row_start, num_chunks, num_pairs, num_experts, max_tiles,
        block_m, BLOCK_C=min(max(16, _CHUNK_ELEMENTS // block_e), max(16, next_power_of_2(num_chunks))),
        BLOCK_E=block_e, BLOCK_T=64)
    _place_pairs_kernel[(num_chunks,)](index, chunk_counts, expert_offsets, sorted_pair, sorted_token, num_pairs,
                                       TOP_K=top_k, BLOCK_P=block_p, BLOCK_E=block_e)
    return ExpertSchedule(sorted_pair, sorted_token, expert_offsets, tile_expert, tile_row_start, block_m,
                          num_experts, top_k)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int = 64) -> ExpertSchedule:
    """(tokens, k) expert indices -> ExpertSchedule with row tiles of block_m rows.

    Each expert gets ceil(count / block_m) tiles, so experts without tokens get none and no expert is padded
    in memory. The number of tiles is only known on the device; the grid is sized by its bound
    tile_bound(T*K, E, block_m) and surplus tiles carry expert -1 and exit at once.
    """
    if not torch.compiler.is_compiling() and use_triton(top_k_index):
        if top_k_index.numel() <= ONE_PROGRAM_PAIRS:
            return _schedule_one_program(top_k_index, num_experts, block_m)
        if num_experts <= CHUNKED_SCHEDULE_MAX_EXPERTS:
            return _schedule_in_chunks(top_k_index, num_experts, block_m)
    return reference_sort_by_expert(top_k_index, num_experts, block_m)


def reference_sort_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int = 64) -> ExpertSchedule:
    """sort_by_expert in PyTorch (also what runs beyond ONE_PROGRAM_PAIRS pairs, and under torch.compile)."""
    num_tokens, top_k = top_k_index.shape
    device = top_k_index.device
    # Sorted as the narrowest integers the expert ids fit: CUDA's radix sort makes one pass per byte of the key (8 for
    # the int64 indices topk returns, 1 for uint8).
    key_dtype = torch.uint8 if num_experts <= 255 else torch.int16 if num_experts < 2**15 else torch.int32
    flat = top_k_index.reshape(-1).to(key_dtype)
    sorted_expert, sorted_pair = torch.sort(flat, stable=True)
    # searchsorted instead of bincount: bincount syncs on CUDA to size its output.
    bounds = torch.arange(num_experts + 1, device=device, dtype=key_dtype)
    expert_offsets = torch.searchsorted(sorted_expert, bounds).to(torch.int32)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)
    max_tiles = tile_bound(num_tokens * top_k, num_experts, block_m)
    tile_ids = torch.arange(max_tiles, device=device, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)
    valid = tile_expert < num_experts
    expert_clamped = tile_expert.clamp(max=num_experts - 1)
    first_tile = (tile_end - tiles_per_expert)[expert_clamped]
    tile_row_start = expert_offsets[:-1][expert_clamped] + (tile_ids - first_tile) * block_m
    return ExpertSchedule(
        sorted_pair=sorted_pair.to(torch.int32),
        sorted_token=(sorted_pair // top_k).to(torch.int32),
        expert_offsets=expert_offsets,
        tile_expert=torch.where(valid, tile_expert, -1).to(torch.int32),
        tile_row_start=torch.where(valid, tile_row_start, 0).to(torch.int32),
        block_m=block_m,
        num_experts=num_experts,
        top_k=top_k,
    )
