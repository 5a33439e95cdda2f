"""AFMoE (Arcee Trinity): sigmoid token-choice routing with expert bias, a shared expert, QK RMSNorm,
RoPE on sliding-window layers only, sigmoid-gated attention output, four norms per layer, dense first layers."""

from __future__ import annotations

import torch
from transformers.models.afmoe import modeling_afmoe as hf

from fastmoe.kernels.attention_gate import attention_gate
from fastmoe.kernels.moe import route_sigmoid_topk, router_topk
from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.linear_lora import project
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (add_rms_norm, decoder_layer_patch, gated_mlp_forward, rms_norm_forward,
                                   swiglu_experts, transformers_attention)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.sliding_window_attention import (
    FlashCausal,
    can_use_flash_sliding_window,
    flash_causal_attention,
    flash_causal_layout,
    flash_sliding_window_attention,
    is_plain_sliding_window_mask,
)
from fastmoe.token_chunks import feed_forward_in_chunks


def router_forward(self: hf.AfmoeTokenChoiceRouter, hidden_states: torch.Tensor, expert_bias: torch.Tensor):
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    if type(self.gate) is torch.nn.Linear and self.gate.bias is None:  # not wrapped by peft or bitsandbytes
        router_logits, top_scores, selected_experts = router_topk(
            flat, self.gate.weight, expert_bias, self.top_k, sigmoid=True, normalize=True, norm_eps=1e-20,
            scale=self.route_scale)
        return router_logits.to(torch.float32), top_scores, selected_experts
    router_logits = self.gate(flat).to(torch.float32)
    top_scores, selected_experts = route_sigmoid_topk(
        router_logits, expert_bias, self.top_k, normalize=True, norm_eps=1e-20, scale=self.route_scale
    )
    return router_logits, top_scores, selected_experts


def sparse_moe_forward(self: hf.AfmoeSparseMoeBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    _, top_scores, selected_experts = self.router(hidden_states, self.expert_bias)
    shared = self.shared_experts(flat)
    routed = swiglu_experts(self.experts, flat, selected_experts, top_scores)
    return (shared + routed).view(batch_size, seq_len, hidden_dim)


def _takes_flash_sliding_window(self: hf.AfmoeAttention, query, key, attention_mask, past_key_values,
                                dropout: float) -> bool:
    """Sliding layers under SDPA, training or scoring a whole unpadded sequence: PyTorch's flash kernel with the
    window instead of SDPA over the dense mask (fastmoe.sliding_window_attention says why)."""
    return (
        self.sliding_window is not None
        and self.config._attn_implementation == "sdpa"
        and past_key_values is None
        and dropout == 0.0
        and can_use_flash_sliding_window(query, key)
        and is_plain_sliding_window_mask(attention_mask, query.shape[2], self.sliding_window)
    )


def attention_forward(self: hf.AfmoeAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    # Full-attention layers of AFMoE take no RoPE at all.
    cos, sin = position_embeddings if self.is_local_attention else (None, None)
    query, key, value, gate = project(hidden_states, self.q_proj, self.k_proj, self.v_proj, self.gate_proj)
    query = qk_norm_rope(query.view(hidden_shape), self.q_norm.weight, cos, sin, self.q_norm.variance_epsilon,
                         norm="rms")
    key = qk_norm_rope(key.view(hidden_shape), self.k_norm.weight, cos, sin, self.k_norm.variance_epsilon, norm="rms")
    value = value.view(hidden_shape).transpose(1, 2)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    dropout = 0.0 if not self.training else self.attention_dropout
    if isinstance(attention_mask, FlashCausal):  # fastmoe's model forward built no mask: see model_forward
        output, attn_weights = flash_causal_attention(query, key, value, attention_mask, self.scaling), None
    elif _takes_flash_sliding_window(self, query, key, attention_mask, past_key_values, dropout):
        output, attn_weights = flash_sliding_window_attention(query, key, value, self.sliding_window,
                                                              self.scaling), None
    else:
        output, attn_weights = transformers_attention(self, hf, query, key, value, attention_mask,
                                                      sliding_window=self.sliding_window, **kwargs)
    output = attention_gate(output.reshape(*input_shape, -1), gate)
    return self.o_proj(output), attn_weights


def decoder_layer_forward(self: hf.AfmoeDecoderLayer, hidden_states, attention_mask=None, position_ids=None,
                          past_key_values=None, use_cache=None, position_embeddings=None, **kwargs):
    """transformers' AFMoE layer (norms before and after attention and MLP) with the residual add after attention
    and the norm before the MLP in one pass, and the MLP in token chunks on long sequences (fastmoe.token_chunks)."""
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
    hidden_states, residual = add_rms_norm(self.post_attention_layernorm(hidden_states), residual,
                                           self.pre_mlp_layernorm)
    return residual + self.post_mlp_layernorm(feed_forward_in_chunks(self.mlp, hidden_states))


@hf.merge_with_config_defaults
@hf.capture_outputs
def model_forward(self: hf.AfmoeModel, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None,
                  past_key_values=None, use_cache=None, **kwargs):
    """transformers' AfmoeModel.forward, with position_ids handed to the mask functions as the other families' models
    hand them: without them the masks cannot see packed documents (position_ids restarting, no attention mask), and
    every document attends to the ones before it. Where flash can run the attention without masks
    (fastmoe.sliding_window_attention.flash_causal_layout), no mask is built at all."""
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if use_cache and past_key_values is None:
        past_key_values = hf.DynamicCache(config=self.config)
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    # No padding and no cache: the layers take the flash kernel's own causal (windowed, per-document) form, and the
    # seq^2 masks are never built. Read before position_ids defaults (without them no row is packed), and only
    # while fastmoe's attention forward, the one that reads layouts, is patched in (the `attention` op may be off).
    layouts = None
    if not isinstance(attention_mask, dict) and hf.AfmoeAttention.forward is attention_forward:
        layouts = flash_causal_layout(self.config, inputs_embeds, attention_mask, position_ids, past_key_values,
                                      self.training)
    if position_ids is None:
        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
        position_ids = position_ids.unsqueeze(0)
    if layouts is not None:
        causal_mask_mapping = dict(zip(("full_attention", "sliding_attention"), layouts))
    # It may already have been prepared by e.g. `generate`
    elif not isinstance(causal_mask_mapping := attention_mask, dict):
        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           past_key_values=past_key_values, position_ids=position_ids)
        causal_mask_mapping = {
            "full_attention": hf.create_causal_mask(**mask_kwargs),
            "sliding_attention": hf.create_sliding_window_causal_mask(**mask_kwargs),
        }
    hidden_states = inputs_embeds
    if self.config.mup_enabled:  # muP input scaling
        hidden_states = hidden_states * (self.config.hidden_size**0.5)
    position_embeddings = self.rotary_emb(hidden_states, position_ids)
    for i, decoder_layer in enumerate(self.layers):
        hidden_states = decoder_layer(
            hidden_states,
            attention_mask=causal_mask_mapping[self.config.layer_types[i]],
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    hidden_states = self.norm(hidden_states)
    return hf.MoeModelOutputWithPast(last_hidden_state=hidden_states,
                                     past_key_values=past_key_values if use_cache else None)


_causal_lm_forward = fused_loss_forward(hf.AfmoeForCausalLM.forward)


FAMILY = Family(
    model_type="afmoe",
    name="Afmoe",
    ops={
        "rms_norm": [ForwardPatch(hf.AfmoeRMSNorm, "forward", rms_norm_forward)],
        "router": [ForwardPatch(hf.AfmoeTokenChoiceRouter, "forward", router_forward)],
        "moe": [ForwardPatch(hf.AfmoeSparseMoeBlock, "forward", sparse_moe_forward)],
        # The gated MLPs (dense layers and shared experts): gate and up in one launch while decoding.
        "mlp": [ForwardPatch(hf.AfmoeMLP, "forward", gated_mlp_forward)],
        # QK RMSNorm + RoPE, the sliding-window flash path and the sigmoid output gate.
        "attention": [ForwardPatch(hf.AfmoeAttention, "forward", attention_forward)],
        # The residual add after attention fused into the norm before the MLP.
        "decoder_layer": [decoder_layer_patch(hf.AfmoeDecoderLayer, decoder_layer_forward)],
        # The model's forward, its masks built from position_ids too (packed documents), or none built where the
        # flash kernel needs none.
        "model": [ForwardPatch(hf.AfmoeModel, "forward", model_forward)],
        "loss": [ForwardPatch(hf.AfmoeForCausalLM, "forward", _causal_lm_forward)],
    },
    # Attention, the attention output gate, dense and shared-expert MLPs, and the routed experts; routers stay
    # frozen. peft 0.21 rewrites target_modules named gate_proj/up_proj/down_proj on AFMoE into the experts'
    # fused weights (its transformers v4->v5 MoE conversion, applied again whenever an adapter is loaded), which
    # would leave the dense and shared MLPs and the attention gate without LoRA. Targeting those Linear weights as
    # parameters survives that conversion, and plain peft loads the adapter the same way.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=(
        "experts.gate_up_proj", "experts.down_proj", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
    ),
    routers=("router.gate",),
    routed_experts=SWITCHABLE,
    # transformers' AfmoeModel gives its masks no position_ids: packed documents need fastmoe's model forward.
    packed_row_ops=("attention", "model"),
    tiny_config=dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_dense_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8, num_experts_per_tok=3,
        num_shared_experts=1, route_scale=1.5, global_attn_every_n_layers=2, sliding_window=6,
        max_position_embeddings=512, tie_word_embeddings=False),
)
