"""Mixtral (Mixtral-8x7B, 8x22B): softmax top-2 routing renormalised over the chosen experts, SwiGLU experts,
grouped-query attention with RoPE (no QK norm), an optional sliding window."""

from __future__ import annotations

import torch
from transformers.models.mixtral import modeling_mixtral as hf

from fastmoe.kernels.rope import apply_rope
from fastmoe.linear_lora import project
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (attend, decoder_layer_patch, norm_attention_norm_mlp_forward, rms_norm_forward,
                                   routed_moe_forward, softmax_topk_router_forward)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.sliding_window_attention import mask_layout_patches

_original_sparse_moe_forward = hf.MixtralSparseMoeBlock.forward


def sparse_moe_forward(self: hf.MixtralSparseMoeBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.training and self.jitter_noise > 0:  # random input scaling: transformers' own forward draws it
        return _original_sparse_moe_forward(self, hidden_states)
    return routed_moe_forward(self, hidden_states)


def attention_forward(self: hf.MixtralAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query, key, value = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    query = apply_rope(query.view(hidden_shape).transpose(1, 2), cos, sin)
    key = apply_rope(key.view(hidden_shape).transpose(1, 2), cos, sin)
    value = value.view(hidden_shape).transpose(1, 2)

    output, attn_weights = attend(self, hf, query, key, value, attention_mask, past_key_values,
                                  sliding_window=getattr(self.config, "sliding_window", None), **kwargs)
    return self.o_proj(output), attn_weights


_causal_lm_forward = fused_loss_forward(hf.MixtralForCausalLM.forward)


FAMILY = Family(
    model_type="mixtral",
    name="Mixtral",
    ops={
        "rms_norm": [ForwardPatch(hf.MixtralRMSNorm, "forward", rms_norm_forward)],
        # Softmax top-2 renormalised; the weights stay fp32, as transformers' do.
        "router": [ForwardPatch(hf.MixtralTopKRouter, "forward", softmax_topk_router_forward)],
        "moe": [ForwardPatch(hf.MixtralSparseMoeBlock, "forward", sparse_moe_forward)],
        # RoPE; the model's masks as flash layouts where flash runs the attention (sliding window, packed rows).
        "attention": [ForwardPatch(hf.MixtralAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        # The residual add after attention fused into the norm before the MoE block, and the MoE block in token
        # chunks on long sequences.
        "decoder_layer": [decoder_layer_patch(hf.MixtralDecoderLayer, norm_attention_norm_mlp_forward)],
        "loss": [ForwardPatch(hf.MixtralForCausalLM, "forward", _causal_lm_forward)],
    },
    # Attention and every expert (Mixtral has no dense MLP); routers stay frozen.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=("experts.gate_up_proj", "experts.down_proj"),
    routers=("mlp.gate",),
    routed_experts=SWITCHABLE,
    tiny_config=dict(
        hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, num_local_experts=8, num_experts_per_tok=2, sliding_window=6, max_position_embeddings=512,
        tie_word_embeddings=False),
)
