"""JetMoe: a mixture of MLP experts (`JetMoeMoE`) and a mixture of attention heads (`JetMoeMoA`: each expert owns
a query and an output projection, keys and values are shared), both routed by top-k on the router logits with a
softmax over the k chosen; an output bias after each mixture; no dense MLP.

transformers groups tokens by expert on the host (`expert_size.tolist()`) and loops over experts; here routing
stays on the device and the experts run as grouped GEMMs with peft's expert LoRA applied unmerged. Under
load_in_4bit every `JetMoeParallelExperts` weight (both mixtures' input and output projections) is NF4
(fastmoe.quantize) and the same GEMMs decode it tile by tile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.models.jetmoe import modeling_jetmoe as hf

from fastmoe.expert_lora import unwrap_expert_lora
from fastmoe.kernels.moe import (
    expert_map,
    expert_map_nf4,
    expert_reduce,
    expert_reduce_nf4,
    moe_experts,
    moe_experts_nf4,
    route_softmax_topk,
    router_topk,
)
from fastmoe.kernels.rope import apply_rope, apply_rope_swapping_heads
from fastmoe.linear_lora import is_silu
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (add_rms_norm, decoder_layer_patch, residual_plus_feed_forward, rms_norm_forward,
                                   transformers_attention)
from fastmoe.patching import FIXED, Family, ForwardPatch
from fastmoe.quantize import is_quantized, nf4_weight, refuse_peft_forward_on_nf4
from fastmoe.sliding_window_attention import FlashCausal, flash_causal_attention, mask_layout_patches


class Routing(NamedTuple):
    """What the patched `JetMoeTopKGating` returns.

    transformers records router logits (for `output_router_logits` and the aux loss) as output[4] of this module
    (`JetMoePreTrainedModel._can_record_outputs`), so they stay at index 4 of a 5-tuple. transformers' fields 2 and 3
    (gates and group sizes in expert-sorted order) have no use here: the kernels sort on the device themselves.
    """

    top_k_index: torch.Tensor  # (tokens, k) int64
    top_k_weights: torch.Tensor  # (tokens, k) fp32
    sorted_gates: None
    expert_size: None
    router_logits: torch.Tensor  # (tokens, experts) fp32


def top_k_gating_forward(self: hf.JetMoeTopKGating, hidden_states: torch.Tensor) -> Routing:
    """(tokens, hidden) -> Routing."""
    if type(self.layer) is torch.nn.Linear and self.layer.bias is None:  # not wrapped by peft or bitsandbytes
        router_logits, top_k_weights, top_k_index = router_topk(hidden_states, self.layer.weight, None, self.top_k,
                                                                sigmoid=False)
        return Routing(top_k_index, top_k_weights, None, None, router_logits.float())
    router_logits = self.layer(hidden_states).float()
    top_k_weights, top_k_index = route_softmax_topk(router_logits, self.top_k)
    return Routing(top_k_index, top_k_weights, None, None, router_logits)


def _wrapped_pairs_linear(experts: torch.nn.Module, pairs: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """(tokens*k, in) rows in (token, slot) order through the experts module as transformers calls it: grouped by
    expert, with the group sizes on the host. Only for layouts our kernels cannot read the LoRA of (several
    adapters active at once); the module (peft's wrapper) then applies its own adapters."""
    refuse_peft_forward_on_nf4(experts)
    flat = top_k_index.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    expert_size = torch.bincount(flat, minlength=experts.get_base_layer().num_experts).tolist()
    grouped = experts(pairs[order], expert_size)
    return torch.empty_like(grouped).index_copy(0, order, grouped)


def experts_map(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """(tokens, H) -> (tokens, k, N) through a `JetMoeParallelExperts` (E, N, H), LoRA included."""
    unwrapped = unwrap_expert_lora(experts)
    if unwrapped is None:
        num_tokens, top_k = top_k_index.shape
        pairs = hidden.repeat_interleave(top_k, dim=0)
        return _wrapped_pairs_linear(experts, pairs, top_k_index).view(num_tokens, top_k, -1)
    bare, loras = unwrapped
    if is_quantized(bare):
        return expert_map_nf4(hidden, top_k_index, nf4_weight(bare, "weight"), loras.get("weight"))
    return expert_map(hidden, top_k_index, bare.weight, loras.get("weight"))


def experts_reduce(experts: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """(tokens, k, N) -> (tokens, H): each slot through its expert of a `JetMoeParallelExperts` (E, H, N), weighted
    and summed over slots, LoRA included."""
    unwrapped = unwrap_expert_lora(experts)
    if unwrapped is None:
        num_tokens, top_k, width = x.shape
        out = _wrapped_pairs_linear(experts, x.reshape(-1, width), top_k_index).view(num_tokens, top_k, -1)
        return (out * top_k_weights.to(out.dtype)[..., None]).sum(dim=1)
    bare, loras = unwrapped
    if is_quantized(bare):
        return expert_reduce_nf4(x, top_k_index, top_k_weights, nf4_weight(bare, "weight"), loras.get("weight"))
    return expert_reduce(x, top_k_index, top_k_weights, bare.weight, loras.get("weight"))


def moe_forward(self: hf.JetMoeMoE, layer_input: torch.Tensor) -> torch.Tensor:
    batch_size, seq_len, hidden_dim = layer_input.shape
    flat = layer_input.reshape(-1, hidden_dim)
    routing = self.router(flat)
    index, weights = routing.top_k_index, routing.top_k_weights
    gate_up = unwrap_expert_lora(self.input_linear)
    down = unwrap_expert_lora(self.output_linear)
    # input_linear's rows are [activation half; linear half], the (gate; up) layout of the fused SwiGLU experts.
    # Checked with is_silu: JetMoe's "silu" is transformers' SiLUActivation, not torch.nn.SiLU.
    fused = is_silu(self.activation) and gate_up is not None and down is not None
    if fused and is_quantized(gate_up[0]) and is_quantized(down[0]):
        out = moe_experts_nf4(flat, index, weights, nf4_weight(gate_up[0], "weight"), nf4_weight(down[0], "weight"),
                              gate_up_lora=gate_up[1].get("weight"), down_lora=down[1].get("weight"))
    elif fused and not is_quantized(gate_up[0]) and not is_quantized(down[0]):
        out = moe_experts(flat, index, weights, gate_up[0].weight, down[0].weight,
                          gate_up_lora=gate_up[1].get("weight"), down_lora=down[1].get("weight"))
    else:
        gate, up = experts_map(self.input_linear, flat, index).chunk(2, dim=-1)
        out = experts_reduce(self.output_linear, self.activation(gate) * up, index, weights)
    return (out + self.bias).view(batch_size, seq_len, hidden_dim)


def moa_map(self: hf.JetMoeMoA, layer_input: torch.Tensor):
    """(batch, seq, hidden) -> ((batch, seq, k, kv_heads * head_dim) queries, router logits, routing).

    The routing takes the place of transformers' topo_info: `moa_reduce` is its only reader."""
    batch_size, seq_len, hidden_dim = layer_input.shape
    routing = self.router(layer_input.reshape(-1, hidden_dim))
    queries = experts_map(self.input_linear, layer_input.reshape(-1, hidden_dim), routing.top_k_index)
    return queries.view(batch_size, seq_len, self.top_k, -1), routing.router_logits, routing


def moa_reduce(self: hf.JetMoeMoA, layer_input: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(batch, seq, k, kv_heads * head_dim) attention outputs -> (batch, seq, hidden)."""
    batch_size, seq_len, top_k, width = layer_input.shape
    out = experts_reduce(self.output_linear, layer_input.reshape(-1, top_k, width), routing.top_k_index,
                         routing.top_k_weights)
    return (out + self.bias).view(batch_size, seq_len, self.input_size)


def _swap_middle_axes_copy(x: torch.Tensor) -> torch.Tensor:
    """(rows, a, b, d) with a unit last stride -> (rows, b, a, d) contiguous, the same values.

    torch copies a permuted bf16 tensor element by element (2-byte accesses, about 50 us for JetMoe-8B's 4,096-token
    queries on an H100, seven such copies per layer and step); moved as 8-byte words, each row of d values is read and
    written by whole memory transactions."""
    rows, a, b, d = x.shape
    out = x.new_empty(rows, b, a, d)
    source = x.transpose(1, 2)
    ratio = 8 // x.element_size()
    if (x.stride(-1) == 1 and ratio > 1 and d % ratio == 0 and x.storage_offset() % ratio == 0
            and all(stride % ratio == 0 for stride in x.stride()[:-1])):
        out.view(torch.int64).copy_(source.view(torch.int64))
    else:
        out.copy_(source)
    return out


class _SwapMiddleAxes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _swap_middle_axes_copy(x)

    @staticmethod
    def backward(ctx, grad):
        return _swap_middle_axes_copy(grad)


def swap_middle_axes(x: torch.Tensor) -> torch.Tensor:
    """(rows, a, b, d) -> (rows, b, a, d) contiguous, differentiable: JetMoe's attention output from the (kv head, slot)
    order of grouped-query attention back to (slot, kv head)."""
    return _SwapMiddleAxes.apply(x)


def attention_forward(self: hf.JetMoeAttention, hidden_states, attention_mask=None, position_embeddings=None,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    query, router_logits, routing = self.experts.map(hidden_states)
    key, value = self.kv_proj(hidden_states).chunk(2, dim=-1)
    cos, sin = position_embeddings
    key = apply_rope(key.view(hidden_shape).transpose(1, 2), cos, sin)
    value = value.view(hidden_shape).transpose(1, 2)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    # Query heads are (slot, kv head) flattened: slot k's expert query sees kv head h as head k * kv_heads + h.
    if isinstance(attention_mask, FlashCausal):  # no mask was built: see mask_layout_patches
        # Flash reads grouped query heads, head h with kv head h // top_k: the (slot, kv head) order becomes (kv head,
        # slot) for it (in the rotation's pass) and back for the output, instead of copying keys and values top_k
        # times. Both are laid out (batch, seq, heads, head_dim), as the other families' queries and flash's tokens.
        batch, seq = input_shape
        grouped = apply_rope_swapping_heads(query.view(batch, seq, self.top_k, -1, self.head_dim), cos, sin)
        grouped = grouped.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        output = flash_causal_attention(grouped, key, value, attention_mask, self.scaling)
        output = swap_middle_axes(output.reshape(batch * seq, -1, self.top_k, self.head_dim))
        output, attn_weights = output.view(batch, seq, self.top_k, -1, self.head_dim), None
    else:
        query = apply_rope(query.view(hidden_shape).transpose(1, 2), cos, sin)
        # Tiled (repeat), not interleaved as GQA would, to match that head order; the module's
        # num_key_value_groups is 1 so the attention functions repeat nothing more.
        output, attn_weights = transformers_attention(self, hf, query, key.repeat(1, self.top_k, 1, 1),
                                                      value.repeat(1, self.top_k, 1, 1), attention_mask, **kwargs)
    output = self.experts.reduce(output.reshape(*input_shape, self.top_k, -1), routing)
    return output.view(*input_shape, -1), attn_weights, router_logits


def decoder_layer_forward(self: hf.JetMoeDecoderLayer, hidden_states, attention_mask=None, position_ids=None,
                          past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """transformers' JetMoe layer with the residual add after attention and the norm before the MLP in one pass, and
    the mixture of MLP experts in token chunks on long sequences (fastmoe.token_chunks)."""
    residual = hidden_states
    hidden_states, _, _ = self.self_attention(
        hidden_states=self.input_layernorm(hidden_states),
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states, residual = add_rms_norm(hidden_states, residual, self.post_attention_layernorm)
    return residual_plus_feed_forward(residual, self.mlp, hidden_states)


_causal_lm_forward = fused_loss_forward(hf.JetMoeForCausalLM.forward)


FAMILY = Family(
    model_type="jetmoe",
    name="JetMoe",
    ops={
        "rms_norm": [ForwardPatch(hf.JetMoeRMSNorm, "forward", rms_norm_forward)],
        # Both mixtures (MLP experts and attention heads) with the routers they share a class of: the patched router
        # returns a Routing, which transformers' own mixtures cannot read, so the four go together.
        "moe": [
            ForwardPatch(hf.JetMoeTopKGating, "forward", top_k_gating_forward),
            ForwardPatch(hf.JetMoeMoE, "forward", moe_forward),
            ForwardPatch(hf.JetMoeMoA, "map", moa_map),
            ForwardPatch(hf.JetMoeMoA, "reduce", moa_reduce),
        ],
        # RoPE on queries and keys; calls the mixture of attention heads through map and reduce, patched or not.
        # Flash layouts instead of masks.
        "attention": [ForwardPatch(hf.JetMoeAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        # The residual add after attention fused into the norm before the MLP; the MLP in token chunks on long
        # sequences.
        # transformers declares JetMoe without checkpointing support (its Trainer then refuses trl's default
        # gradient_checkpointing=True), though the layer is a GradientCheckpointingLayer whose recompute gives the same
        # gradients (tests/models/test_jetmoe.py): with the layer swapped, fastmoe checkpoints it, CUDA graphs
        # included.
        "decoder_layer": [decoder_layer_patch(hf.JetMoeDecoderLayer, decoder_layer_forward),
                          ForwardPatch(hf.JetMoePreTrainedModel, "supports_gradient_checkpointing", True)],
        "loss": [ForwardPatch(hf.JetMoeForCausalLM, "forward", _causal_lm_forward)],
    },
    # kv_proj is JetMoe's only dense linear besides the routers (frozen) and lm_head; queries, attention outputs
    # and MLPs are all experts, targeted as parameters of both mixtures (mlp.* and self_attention.experts.*).
    lora_target_modules=("kv_proj",),
    lora_target_parameters=("input_linear.weight", "output_linear.weight"),
    routers=("router.layer",),
    routed_experts=FIXED,
    # Both mixtures' input_linear and output_linear: (experts, out, in) stacks that load_in_4bit turns into NF4.
    expert_stacks={hf.JetMoeParallelExperts: ("weight",)},
    tiny_config=dict(
        hidden_size=48, num_hidden_layers=2, num_key_value_heads=2, kv_channels=12, intermediate_size=40,
        num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=512),
    # The output biases of both mixtures (JetMoeMoE, JetMoeMoA).
    random_init=("mlp.bias", "self_attention.experts.bias"),
)
