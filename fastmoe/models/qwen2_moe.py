"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax top-k routing (renormalised over the k chosen only where
`norm_topk_prob` says; the released checkpoints do not), a shared expert scaled by a sigmoid gate beside the routed
experts, grouped-query attention with biased q/k/v projections and RoPE (no QK norm), a sliding window on every other
layer below `max_window_layers` when `use_sliding_window`, and dense MLP layers where `mlp_only_layers` /
`decoder_sparse_step` put them."""

from __future__ import annotations

import torch
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf

from fastmoe.kernels.rope import apply_rope
from fastmoe.kernels.moe import output_read
from fastmoe.linear_lora import project
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (attend, decoder_layer_patch, gated_mlp_forward, norm_attention_norm_mlp_forward,
                                   renormalised_router_forward, rms_norm_forward, swiglu_experts)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.sliding_window_attention import mask_layout_patches

_original_router_forward = hf.Qwen2MoeTopKRouter.forward
# Renormalised over the k chosen (norm_topk_prob): fastmoe's softmax top-k routing; without renormalisation (the
# released checkpoints) transformers' own forward.
router_forward = renormalised_router_forward(_original_router_forward)


def sparse_moe_forward(self: hf.Qwen2MoeSparseMoeBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    """The routed experts on fastmoe's kernel (expert LoRA fused, NF4 under load_in_4bit) plus the shared expert, a
    dense MLP, scaled per token by sigmoid(shared_expert_gate(x))."""
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    # Called as a module so the router-logits recorder (output_router_logits) still sees its output.
    _, routing_weights, selected_experts = self.gate(flat)
    routed = swiglu_experts(self.experts, flat, selected_experts, routing_weights)
    with output_read():  # the gate's gradient reads the shared expert's output
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
    return (routed + shared).view(batch_size, seq_len, hidden_dim)


def attention_forward(self: hf.Qwen2MoeAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query, key, value = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    query = apply_rope(query.view(hidden_shape).transpose(1, 2), cos, sin)
    key = apply_rope(key.view(hidden_shape).transpose(1, 2), cos, sin)
    value = value.view(hidden_shape).transpose(1, 2)

    output, attn_weights = attend(self, hf, query, key, value, attention_mask, past_key_values, **kwargs)
    return self.o_proj(output), attn_weights


_causal_lm_forward = fused_loss_forward(hf.Qwen2MoeForCausalLM.forward)


FAMILY = Family(
    model_type="qwen2_moe",
    name="Qwen2Moe",
    ops={
        "rms_norm": [ForwardPatch(hf.Qwen2MoeRMSNorm, "forward", rms_norm_forward)],
        "router": [ForwardPatch(hf.Qwen2MoeTopKRouter, "forward", router_forward)],
        "moe": [ForwardPatch(hf.Qwen2MoeSparseMoeBlock, "forward", sparse_moe_forward)],
        # The shared expert and dense MLPs: gate and up in one launch while decoding.
        "mlp": [ForwardPatch(hf.Qwen2MoeMLP, "forward", gated_mlp_forward)],
        # RoPE; the model's masks as flash layouts where flash runs the attention (sliding window, packed rows).
        "attention": [ForwardPatch(hf.Qwen2MoeAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        # The residual add after attention fused into the norm before the MLP, and the MLP in token chunks on
        # long sequences.
        "decoder_layer": [decoder_layer_patch(hf.Qwen2MoeDecoderLayer, norm_attention_norm_mlp_forward)],
        "loss": [ForwardPatch(hf.Qwen2MoeForCausalLM, "forward", _causal_lm_forward)],
    },
    # Attention, the shared experts and dense MLPs, and the routed experts; the router and the shared expert's gate
    # stay frozen. As for Qwen3-MoE, the MLPs' Linear weights are targeted as parameters: peft 0.21's MoE conversion
    # would rewrite target_modules named gate_proj/up_proj/down_proj into the experts' fused weights.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=(
        "experts.gate_up_proj", "experts.down_proj", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
    ),
    # The shared expert's gate scales a whole MLP's output per token through a sigmoid: kept 16-bit and frozen, as
    # routers are.
    routers=("mlp.gate", "mlp.shared_expert_gate"),
    routed_experts=SWITCHABLE,
    tiny_config=dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=2, mlp_only_layers=[0], decoder_sparse_step=1, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, use_sliding_window=True, sliding_window=6,
        max_window_layers=2, max_position_embeddings=512, tie_word_embeddings=False),
)
