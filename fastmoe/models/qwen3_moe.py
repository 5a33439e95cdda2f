"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): softmax top-k routing, no shared experts, QK RMSNorm + RoPE,
grouped-query attention, dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` put them."""

from __future__ import annotations

from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.linear_lora import project
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (attend, decoder_layer_patch, gated_mlp_forward, norm_attention_norm_mlp_forward,
                                   renormalised_router_forward, rms_norm_forward, routed_moe_forward)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.sliding_window_attention import mask_layout_patches

_original_router_forward = hf.Qwen3MoeTopKRouter.forward
# Renormalised over the k chosen (norm_topk_prob, what Qwen3-MoE checkpoints set): fastmoe's softmax top-k routing;
# otherwise transformers' own forward.
router_forward = renormalised_router_forward(_original_router_forward)


def attention_forward(self: hf.Qwen3MoeAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query, key, value = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    query = qk_norm_rope(query.view(hidden_shape), self.q_norm.weight, cos, sin, self.q_norm.variance_epsilon,
                         norm="rms")
    key = qk_norm_rope(key.view(hidden_shape), self.k_norm.weight, cos, sin, self.k_norm.variance_epsilon, norm="rms")
    value = value.view(hidden_shape).transpose(1, 2)

    output, attn_weights = attend(self, hf, query, key, value, attention_mask, past_key_values,
                                  sliding_window=self.sliding_window, **kwargs)
    return self.o_proj(output), attn_weights


_causal_lm_forward = fused_loss_forward(hf.Qwen3MoeForCausalLM.forward)


FAMILY = Family(
    model_type="qwen3_moe",
    name="Qwen3Moe",
    ops={
        "rms_norm": [ForwardPatch(hf.Qwen3MoeRMSNorm, "forward", rms_norm_forward)],
        "router": [ForwardPatch(hf.Qwen3MoeTopKRouter, "forward", router_forward)],
        "moe": [ForwardPatch(hf.Qwen3MoeSparseMoeBlock, "forward", routed_moe_forward)],
        # The dense MLPs (mlp_only_layers): gate and up in one launch while decoding.
        "mlp": [ForwardPatch(hf.Qwen3MoeMLP, "forward", gated_mlp_forward)],
        # QK RMSNorm + RoPE; the model's masks as flash layouts where flash runs the attention (packed rows as
        # flash's variable-length form, no seq^2 mask).
        "attention": [ForwardPatch(hf.Qwen3MoeAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        # The residual add after attention fused into the norm before the MLP, and the MLP in token chunks on
        # long sequences.
        "decoder_layer": [decoder_layer_patch(hf.Qwen3MoeDecoderLayer, norm_attention_norm_mlp_forward)],
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
