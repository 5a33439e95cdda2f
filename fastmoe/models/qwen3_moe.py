"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): softmax top-k routing, no shared experts, QK RMSNorm + RoPE,
grouped-query attention, dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` put them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (add_rms_norm, decoder_layer_patch, rms_norm_forward, routed_moe_forward,
                                   softmax_topk_router_forward)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.sliding_window_attention import FlashCausal, flash_causal_attention, mask_layout_patches
from fastmoe.token_chunks import feed_forward_in_chunks

_original_router_forward = hf.Qwen3MoeTopKRouter.forward


def router_forward(self: hf.Qwen3MoeTopKRouter, hidden_states: torch.Tensor):
    """Renormalised over the k chosen (norm_topk_prob, what Qwen3-MoE checkpoints set): fastmoe's softmax top-k
    routing, the weights in the logits' dtype as transformers gives them. Without renormalisation the weights are
    the softmax over all experts: transformers' own forward."""
    if not self.norm_topk_prob:
        return _original_router_forward(self, hidden_states)
    router_logits, weights, index = softmax_topk_router_forward(self, hidden_states)
    return router_logits, weights.to(router_logits.dtype), index


def attention_forward(self: hf.Qwen3MoeAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query = qk_norm_rope(self.q_proj(hidden_states).view(hidden_shape), self.q_norm.weight, cos, sin,
                         self.q_norm.variance_epsilon, norm="rms")
    key = qk_norm_rope(self.k_proj(hidden_states).view(hidden_shape), self.k_norm.weight, cos, sin,
                       self.k_norm.variance_epsilon, norm="rms")
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    if isinstance(attention_mask, FlashCausal):  # no mask was built: see mask_layout_patches
        output = flash_causal_attention(query, key, value, attention_mask, self.scaling)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), None
    attention_interface: Callable = hf.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, hf.eager_attention_forward
    )
    output, attn_weights = attention_interface(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=self.sliding_window,
        **kwargs,
    )
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), attn_weights


def decoder_layer_forward(self: hf.Qwen3MoeDecoderLayer, hidden_states, attention_mask=None, position_ids=None,
                          past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """transformers' Qwen3-MoE layer with the residual add after attention and the norm before the MLP in one pass,
    and the MLP (MoE block or dense) in token chunks on long sequences (fastmoe.token_chunks)."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states),
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states, residual = add_rms_norm(hidden_states, residual, self.post_attention_layernorm)
    return residual + feed_forward_in_chunks(self.mlp, hidden_states)


_causal_lm_forward = fused_loss_forward(hf.Qwen3MoeForCausalLM.forward)


FAMILY = Family(
    model_type="qwen3_moe",
    name="Qwen3Moe",
    ops={
        "rms_norm": [ForwardPatch(hf.Qwen3MoeRMSNorm, "forward", rms_norm_forward)],
        "router": [ForwardPatch(hf.Qwen3MoeTopKRouter, "forward", router_forward)],
        "moe": [ForwardPatch(hf.Qwen3MoeSparseMoeBlock, "forward", routed_moe_forward)],
        # QK RMSNorm + RoPE; the model's masks as flash layouts where flash runs the attention (packed rows as
        # flash's variable-length form, no seq^2 mask).
        "attention": [ForwardPatch(hf.Qwen3MoeAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        # The residual add after attention fused into the norm before the MLP.
        "decoder_layer": [decoder_layer_patch(hf.Qwen3MoeDecoderLayer, decoder_layer_forward)],
        "loss": [ForwardPatch(hf.Qwen3MoeForCausalLM, "forward", _causal_lm_forward)],
    },
    # Attention, the dense MLPs (mlp_only_layers) and the routed experts; routers stay frozen. As for AFMoE, the
    # dense MLPs' Linear weights are targeted as parameters: peft 0.21's MoE conversion would rewrite
    # target_modules named gate_proj/up_proj/down_proj into the experts' fused weights.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=(
        "experts.gate_up_proj", "experts.down_proj", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
    ),
    routers=("mlp.gate",),
    routed_experts=SWITCHABLE,
    tiny_config=dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, mlp_only_layers=[0],
        decoder_sparse_step=1, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False),
)
