"""Cohere (Command R, Aya Expanse): bias-free LayerNorm with fp32 statistics, optional per-head QK LayerNorm,
interleaved RoPE computed in fp32, a parallel attention + MLP block under one input norm, dense SwiGLU MLP and
`logit_scale` on the logits. A dense model: LoRA targets linear layers only."""

from __future__ import annotations

import torch
from transformers.models.cohere import modeling_cohere as hf

from fastmoe.kernels.layer_norm import layer_norm
from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.kernels.rope import apply_rope
from fastmoe.linear_lora import project
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (attend, decoder_layer_patch, gated_mlp_forward, last_projection,
                                   unread_in_recompute)
from fastmoe.patching import Family, ForwardPatch
from fastmoe.sliding_window_attention import mask_layout_patches
from fastmoe.token_chunks import feed_forward_in_chunks


def layer_norm_forward(self: hf.CohereLayerNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    # One module class serves the (hidden,) block norms and the (heads, head_dim) QK norms; layer_norm takes both.
    return layer_norm(hidden_states, self.weight, self.variance_epsilon)


def _heads_with_rope(states: torch.Tensor, norm: hf.CohereLayerNorm | None, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, head_dim) projection -> (batch, heads, seq, head_dim), QK-normed when the model has it.

    transformers normalises before the transpose and rotates in fp32 with neighbour pairs (interleaved)."""
    if norm is None:
        return apply_rope(states.transpose(1, 2), cos, sin, interleaved=True)
    return qk_norm_rope(states, norm.weight, cos, sin, norm.variance_epsilon, norm="layer", interleaved=True)


def attention_forward(self: hf.CohereAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    q_norm = self.q_norm if self.use_qk_norm else None
    k_norm = self.k_norm if self.use_qk_norm else None
    query, key, value = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    query = _heads_with_rope(query.view(hidden_shape), q_norm, cos, sin)
    key = _heads_with_rope(key.view(hidden_shape), k_norm, cos, sin)
    value = value.view(hidden_shape).transpose(1, 2)

    output, attn_weights = attend(self, hf, query, key, value, attention_mask, past_key_values, **kwargs)
    return last_projection(self.o_proj, output), attn_weights


def decoder_layer_forward(self: hf.CohereDecoderLayer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' parallel block, residual + attention(norm(x)) + mlp(norm(x)) added in its order, with the MLP in
    token chunks on long sequences (fastmoe.token_chunks): at Command R's 22,528-wide MLP its gate, up and SwiGLU
    outputs and their gradients are over 200 KB a token. Only the sum reads the attention's and the MLP's outputs:
    in a recompute their last projections are skipped (unread_in_recompute), Command R's down projection, the
    layer's largest GEMM, and its output projection. transformers calls the layer with the hidden states alone by
    position; every other argument goes to the attention as it was given."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    with unread_in_recompute():
        attention, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        return residual + attention + feed_forward_in_chunks(self.mlp, hidden_states)


# CohereForCausalLM keeps config.logit_scale as `self.logit_scale`, which fused_loss_forward applies to the fused
# loss's logits, exactly where transformers multiplies them.
_causal_lm_forward = fused_loss_forward(hf.CohereForCausalLM.forward)


FAMILY = Family(
    model_type="cohere",
    name="Cohere",
    ops={
        # The block norms and the per-head QK norms (one module class).
        "layer_norm": [ForwardPatch(hf.CohereLayerNorm, "forward", layer_norm_forward)],
        # QK LayerNorm + interleaved RoPE, reading the norms' weights (not calling them); flash layouts instead of
        # masks.
        "attention": [ForwardPatch(hf.CohereAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        # The MLP: gate and up in one launch while decoding.
        "mlp": [ForwardPatch(hf.CohereMLP, "forward", gated_mlp_forward)],
        # The MLP in token chunks on long sequences.
        "decoder_layer": [decoder_layer_patch(hf.CohereDecoderLayer, decoder_layer_forward)],
        "loss": [ForwardPatch(hf.CohereForCausalLM, "forward", _causal_lm_forward)],
    },
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # Dense layers keep the GPU busy without graphs (93-97%); graphed, their pool and kept attention put the step
    # 1.5-2 GB above transformers' peak for at most 1.6% more tokens/s (Aya Expanse 8B 9,759 vs 9,601 tokens/s, 19.4
    # vs 17.3 GB, transformers 17.9; Command-R's shapes at 8 layers 11,623 vs 11,620, 20.2 vs 18.4 GB, transformers
    # 19.3; H100, 1 x 4,096 tokens through SFTTrainer, benchmarks/results.jsonl).
    graphed_layers=False,
    tiny_config=dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        use_qk_norm=True, logit_scale=0.5, max_position_embeddings=512),
)
