"""LFM2-MoE (Liquid LFM2-8B-A1B): a hybrid of gated short-convolution and attention layers (QK RMSNorm per head,
RoPE), dense SwiGLU MLPs in the first layers, then sigmoid top-k routed experts with an expert bias used only
for choosing experts."""

from __future__ import annotations

import inspect

import torch
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf

from fastmoe.generation import DecodeCache
from fastmoe.kernels.moe import router_topk
from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.kernels.short_conv import document_offsets, short_conv, short_conv_decode
from fastmoe.linear_lora import project, swiglu
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (add_rms_norm, attend, decoder_layer_patch, last_projection,
                                   residual_plus_feed_forward, rms_norm_forward, swiglu_experts)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.sliding_window_attention import mask_layout_patches

# transformers' own short-conv forward, kept for what our op does not cover: continuing from a conv state
# (decoding) and packed sequences.
_original_short_conv_forward = hf.Lfm2MoeShortConv.forward


def router_forward(self: hf.Lfm2MoeTopKRouter, hidden_states: torch.Tensor, expert_bias: torch.Tensor | None = None):
    # Logits stay in the model dtype, as transformers returns them (and records them for output_router_logits).
    return router_topk(hidden_states, self.weight, expert_bias if self.use_expert_bias else None, self.top_k,
                       sigmoid=True, normalize=self.norm_topk_prob, norm_eps=1e-6, scale=self.routed_scaling_factor)


def sparse_moe_forward(self: hf.Lfm2MoeSparseMoeBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    expert_bias = self.expert_bias if self.use_expert_bias else None
    # Called as a module so the router-logits recorder (output_router_logits) still sees its output.
    _, routing_weights, selected_experts = self.gate(flat, expert_bias)
    routed = swiglu_experts(self.experts, flat, selected_experts, routing_weights)
    return routed.view(batch_size, seq_len, hidden_dim)


def mlp_forward(self: hf.Lfm2MoeMLP, x: torch.Tensor) -> torch.Tensor:
    return last_projection(self.w2, swiglu(x, self.w1, self.w3))


def attention_forward(self: hf.Lfm2MoeAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query, key, value = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    query = qk_norm_rope(query.view(hidden_shape), self.q_layernorm.weight, cos, sin, self.q_layernorm.variance_epsilon,
                         norm="rms")
    key = qk_norm_rope(key.view(hidden_shape), self.k_layernorm.weight, cos, sin, self.k_layernorm.variance_epsilon,
                       norm="rms")
    value = value.view(hidden_shape).transpose(1, 2)

    # Lfm2MoeAttention has no attention dropout: transformers passes 0.0, as transformers_attention does for it.
    output, attn_weights = attend(self, hf, query, key, value, attention_mask, past_key_values, **kwargs)
    return self.out_proj(output), attn_weights


def _starts_conv_state(self: hf.Lfm2MoeShortConv, cache) -> bool:
    """Whether this forward is the first on `cache` for this layer (a prefill): the conv state it leaves is then
    just the last L positions of B * x, and nothing earlier feeds the convolution."""
    # has_previous_state(layer, state) and the layer's record_past flag exist from transformers 5.17 on;
    # get_conv_state / is_recording_past arrived later.
    if self.layer_idx >= len(cache.layers):
        return True
    recording = getattr(cache.layers[self.layer_idx], "record_past", False)
    return not cache.has_previous_state(self.layer_idx, 0) and not recording


# The conv weight is read directly, not through self.conv's forward: accelerate's offload hooks must be fired
# by hand, as transformers does for its own forward.
@force_accelerate_hooks("conv")
def _short_conv_from_start(self: hf.Lfm2MoeShortConv, hidden_states: torch.Tensor, past_key_values,
                           attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
    # A 2D padding mask zeroes padded positions before in_proj, so they feed nothing into later positions.
    hidden_states = hf.apply_mask_to_padding_states(hidden_states, attention_mask)
    bcx = self.in_proj(hidden_states)
    if past_key_values is not None:
        # What transformers caches after a prefill: B * x at the last L positions, (batch, hidden, L), which the
        # cache left-pads with zeros when the prompt is shorter.
        b, _, x = bcx[:, -self.conv_kernel_size:].transpose(-1, -2).chunk(3, dim=-2)
        past_key_values.update_conv_state(b * x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    # Packed rows (position_ids restarting at each document, no cache): the convolution restarts at each document.
    offsets = None
    if position_ids is not None and past_key_values is None:
        offsets = document_offsets(position_ids, bcx.shape[0])
    return self.out_proj(short_conv(bcx, self.conv.weight, self.conv.bias, offsets))


@force_accelerate_hooks("conv")
def _short_conv_decode(self: hf.Lfm2MoeShortConv, hidden_states: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One new token per row against fastmoe's decode cache: the state (batch, hidden, L) of the last L values of
    B * x shifts left and takes the new one, and the output is C * (state . w + bias), transformers'
    causal_conv1d_update, in one launch (kernels/short_conv.py). No padding mask: a decode step's tokens are never
    padding."""
    return self.out_proj(short_conv_decode(self.in_proj(hidden_states), state, self.conv.weight, self.conv.bias))


def short_conv_forward(self: hf.Lfm2MoeShortConv, hidden_states: torch.Tensor, past_key_values=None,
                       attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       **kwargs):
    """transformers' short conv on fastmoe's kernel. `position_ids` (passed by fastmoe's decoder layer) mark packed
    documents, each convolved from its own start."""
    if isinstance(past_key_values, DecodeCache):
        return _short_conv_decode(self, hidden_states, past_key_values.layers[self.layer_idx].conv_state)
    # Continuing from a conv state (decode, chunked prefill, speculative rollback), and packing described only by
    # flash-attention's cu_seqlens / seq_idx (trl's padding-free batches carry position_ids too), take transformers'
    # own path.
    packed = kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None
    if (packed and position_ids is None) or (past_key_values is not None
                                              and not _starts_conv_state(self, past_key_values)):
        return _original_short_conv_forward(self, hidden_states, past_key_values=past_key_values,
                                            attention_mask=attention_mask, **kwargs)
    return _short_conv_from_start(self, hidden_states, past_key_values, attention_mask, position_ids)


# transformers 5.17's ShortConv takes `seq_idx` and nothing else; later releases take **kwargs. fastmoe's patched
# forward takes both, so the layer passes what transformers' own would be given.
_CONV_TAKES_KWARGS = any(p.kind is p.VAR_KEYWORD
                         for p in inspect.signature(_original_short_conv_forward).parameters.values())


def decoder_layer_forward(self: hf.Lfm2MoeDecoderLayer, hidden_states, position_embeddings=None, attention_mask=None,
                          position_ids=None, past_key_values=None, **kwargs):
    """transformers' LFM2-MoE layer with the residual add after the operator (attention or short conv) and the norm
    before the feed-forward in one pass, and the feed-forward in token chunks on long sequences
    (fastmoe.token_chunks)."""
    residual = hidden_states
    if self.is_attention_layer:
        hidden_states, _ = self.self_attn(
            hidden_states=self.operator_norm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            **kwargs,
        )
    else:
        conv_kwargs = kwargs if _CONV_TAKES_KWARGS else {"seq_idx": kwargs.get("seq_idx")}
        if type(self.conv).forward is short_conv_forward:  # fastmoe's conv restarts at packed documents
            conv_kwargs = {**conv_kwargs, "position_ids": position_ids}
        hidden_states = self.conv(hidden_states=self.operator_norm(hidden_states), past_key_values=past_key_values,
                                  attention_mask=attention_mask, **conv_kwargs)
    normed, hidden_states = add_rms_norm(hidden_states, residual, self.ffn_norm)
    return residual_plus_feed_forward(hidden_states, self.feed_forward, normed)


_causal_lm_forward = fused_loss_forward(hf.Lfm2MoeForCausalLM.forward)


FAMILY = Family(
    model_type="lfm2_moe",
    name="Lfm2Moe",
    ops={
        "rms_norm": [ForwardPatch(hf.Lfm2MoeRMSNorm, "forward", rms_norm_forward)],
        "router": [ForwardPatch(hf.Lfm2MoeTopKRouter, "forward", router_forward)],
        "moe": [ForwardPatch(hf.Lfm2MoeSparseMoeBlock, "forward", sparse_moe_forward)],
        # The dense SwiGLU MLPs of the first layers: w1 and w3 in one launch while decoding.
        "mlp": [ForwardPatch(hf.Lfm2MoeMLP, "forward", mlp_forward)],
        # QK RMSNorm + RoPE; the model's masks as flash layouts where flash runs the attention (packed rows as
        # flash's variable-length form, no seq^2 mask).
        "attention": [ForwardPatch(hf.Lfm2MoeAttention, "forward", attention_forward), *mask_layout_patches(hf)],
        "short_conv": [ForwardPatch(hf.Lfm2MoeShortConv, "forward", short_conv_forward)],
        # The residual add after the operator fused into the norm before the feed-forward.
        "decoder_layer": [decoder_layer_patch(hf.Lfm2MoeDecoderLayer, decoder_layer_forward)],
        "loss": [ForwardPatch(hf.Lfm2MoeForCausalLM, "forward", _causal_lm_forward)],
    },
    # Attention (q/k/v, out_proj), short-conv in_proj/out_proj (out_proj names both) and the dense SwiGLU MLPs
    # (w1 gate, w3 up, w2 down); routers and the depthwise conv stay frozen.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"),
    lora_target_parameters=("experts.gate_up_proj", "experts.down_proj"),
    routers=("feed_forward.gate",),
    routed_experts=SWITCHABLE,
    # transformers' short convolution runs across packed documents; fastmoe's restarts at each, given the
    # position_ids that fastmoe's decoder layer passes it.
    packed_row_ops=("attention", "short_conv", "decoder_layer"),
    tiny_config=dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_dense_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
        layer_types=["full_attention", "conv", "full_attention"], routed_scaling_factor=1.5,
        max_position_embeddings=512),
)
