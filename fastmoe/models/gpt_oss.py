"""gpt-oss (gpt-oss-20b, gpt-oss-120b): a router with a bias, softmax over the top-k logits; experts with biases on
both projections, gate and up interleaved in gate_up_proj stored (experts, hidden, 2 x intermediate), the clamped
SwiGLU; attention with learned per-head sinks, q/k/v/o biases, grouped-query heads, YaRN RoPE, sliding-window and
full layers alternating."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.gpt_oss import modeling_gpt_oss as hf

from fastmoe.expert_lora import unwrap_expert_lora
from fastmoe.kernels.moe import moe_experts_clamped_swiglu, moe_experts_clamped_swiglu_nf4, route_softmax_topk
from fastmoe.kernels.rope import apply_rope
from fastmoe.linear_lora import project
from fastmoe.models.causal_lm import fused_loss_forward
from fastmoe.models.shared import (decoder_layer_patch, norm_attention_norm_mlp_forward, rms_norm_forward,
                                   runs_fastmoe_experts, transformers_attention)
from fastmoe.patching import SWITCHABLE, Family, ForwardPatch
from fastmoe.quantize import is_quantized, nf4_weight, refuse_peft_forward_on_nf4
from fastmoe.sliding_window_attention import FlashCausal, flash_causal_attention_with_sinks, mask_layout_patches


def router_forward(self: hf.GptOssTopKRouter, hidden_states: torch.Tensor):
    """Logits with the router's bias, top k, softmax over the k chosen: fastmoe's routing kernel, the weights in the
    logits' dtype as transformers gives them."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, index = route_softmax_topk(router_logits.float(), self.top_k)
    return router_logits, weights.to(router_logits.dtype), index


# The expert parameters fastmoe's kernel applies LoRA to; LoRA on any other (a bias) leaves the experts to peft.
_EXPERT_STACKS = frozenset({"gate_up_proj", "down_proj"})


def experts_forward(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """(tokens, hidden) through GptOssExperts on fastmoe's grouped GEMMs, with peft's expert LoRA applied unmerged.
    A model configured with another experts_implementation runs transformers' experts forward instead, and peft's
    wrappers apply their own LoRA."""
    if not runs_fastmoe_experts(experts):
        return experts(hidden, top_k_index, top_k_weights)
    unwrapped = unwrap_expert_lora(experts)
    if unwrapped is None or not _EXPERT_STACKS.issuperset(unwrapped[1]):
        refuse_peft_forward_on_nf4(experts)
        return experts(hidden, top_k_index, top_k_weights)
    bare, loras = unwrapped
    if is_quantized(bare):
        # load_in_4bit: each stored stack in NF4, read transposed by the kernels.
        return moe_experts_clamped_swiglu_nf4(hidden, top_k_index, top_k_weights, nf4_weight(bare, "gate_up_proj"),
                                              bare.gate_up_proj_bias, nf4_weight(bare, "down_proj"),
                                              bare.down_proj_bias, bare.alpha, bare.limit,
                                              loras.get("gate_up_proj"), loras.get("down_proj"))
    if not bare.gate_up_proj.is_floating_point():
        raise NotImplementedError(
            "these gpt-oss experts hold MXFP4 blocks, which fastmoe's kernels do not read and transformers cannot "
            "train: load the checkpoint with FastModel.from_pretrained and no quantization_config "
            "(it dequantizes them)")
    return moe_experts_clamped_swiglu(hidden, top_k_index, top_k_weights, bare.gate_up_proj, bare.gate_up_proj_bias,
                                      bare.down_proj, bare.down_proj_bias, bare.alpha, bare.limit,
                                      loras.get("gate_up_proj"), loras.get("down_proj"))


def mlp_forward(self: hf.GptOssMLP, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden_dim)
    # Called as a module so the router-logits recorder (output_router_logits) still sees its output.
    _, router_scores, router_indices = self.router(flat)
    routed = experts_forward(self.experts, flat, router_indices, router_scores)
    return routed.view(batch_size, seq_len, hidden_dim), router_scores


def attention_forward(self: hf.GptOssAttention, hidden_states, position_embeddings, attention_mask,
                      past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    # gpt-oss's rotary embedding gives cos and sin for one half of head_dim (it rotates halves): the same for both.
    cos, sin = (torch.cat((t, t), dim=-1) for t in position_embeddings)
    query, key, value = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    query = apply_rope(query.view(hidden_shape).transpose(1, 2), cos, sin)
    key = apply_rope(key.view(hidden_shape).transpose(1, 2), cos, sin)
    value = value.view(hidden_shape).transpose(1, 2)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    if isinstance(attention_mask, FlashCausal):  # no mask was built: see mask_layout_patches
        output = flash_causal_attention_with_sinks(query, key, value, self.sinks, attention_mask, self.scaling)
        return self.o_proj(output.reshape(*input_shape, -1)), None
    # Otherwise the sinks go to transformers' attention function of the model's implementation (eager, or a flash
    # kernel that takes them; SDPA cannot: gpt-oss refuses it) and to fastmoe's decode step, never a path that drops
    # them.
    output, attn_weights = transformers_attention(self, hf, query, key, value, attention_mask,
                                                  sliding_window=self.sliding_window, s_aux=self.sinks, **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), attn_weights


_original_model_forward = hf.GptOssModel.forward


def model_forward(self: hf.GptOssModel, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, use_cache=None, **kwargs):
    """transformers' GptOssModel.forward, with position_ids handed to the mask functions, as the other families'
    models hand them: without them the masks cannot see packed documents (position_ids restarting, no attention
    mask), and every document attends to the ones before it. The masks are built here and passed on as the
    prepared mapping transformers' forward accepts (as `generate` passes them), so its own forward, output
    recording included, runs the rest."""
    if position_ids is None or isinstance(attention_mask, dict) or (input_ids is None) == (inputs_embeds is None):
        return _original_model_forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, past_key_values=past_key_values,
                                       inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    # use_cache as transformers' forward settles it (config default; off while training with gradient checkpointing),
    # before a cache is made: with one, the mask functions no longer read documents from position_ids.
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if getattr(self, "gradient_checkpointing", False) and self.training:
        use_cache = False
    if use_cache and past_key_values is None:
        past_key_values = hf.DynamicCache(config=self.config)
    mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       past_key_values=past_key_values, position_ids=position_ids)
    masks = {"full_attention": hf.create_causal_mask(**mask_kwargs),
             "sliding_attention": hf.create_sliding_window_causal_mask(**mask_kwargs)}
    return _original_model_forward(self, attention_mask=masks, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   **kwargs)


_causal_lm_forward = fused_loss_forward(hf.GptOssForCausalLM.forward)

# Eager is gpt-oss's default attention (SDPA cannot take the sinks): the flash layouts stand in for it.
LAYOUT_IMPLEMENTATIONS = ("eager",)


FAMILY = Family(
    model_type="gpt_oss",
    name="GptOss",
    ops={
        "rms_norm": [ForwardPatch(hf.GptOssRMSNorm, "forward", rms_norm_forward)],
        "router": [ForwardPatch(hf.GptOssTopKRouter, "forward", router_forward)],
        # Experts on the grouped GEMMs: biases, interleaved gate/up and the clamped SwiGLU in the kernels.
        "moe": [ForwardPatch(hf.GptOssMLP, "forward", mlp_forward)],
        # Projections and RoPE; on a GPU without a cache (padding on the right only), PyTorch's flash kernel with
        # the sinks applied to its output, in place of the eager attention (gpt-oss's default, its dense masks never
        # built); otherwise the model's attention function.
        "attention": [ForwardPatch(hf.GptOssAttention, "forward", attention_forward),
                      *mask_layout_patches(hf, implementations=LAYOUT_IMPLEMENTATIONS)],
        # The residual add after attention fused into the norm before the MoE block, and the MoE block in token
        # chunks on long sequences.
        "decoder_layer": [decoder_layer_patch(hf.GptOssDecoderLayer, norm_attention_norm_mlp_forward)],
        # The model's forward, its masks built from position_ids too (packed documents).
        "model": [ForwardPatch(hf.GptOssModel, "forward", model_forward)],
        "loss": [ForwardPatch(hf.GptOssForCausalLM, "forward", _causal_lm_forward)],
    },
    # Attention and every expert (gpt-oss has no dense MLP); routers, sinks and biases stay frozen. peft 0.21 has no
    # MoE conversion for gpt_oss: these names reach it as they are.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=("experts.gate_up_proj", "experts.down_proj"),
    routers=("mlp.router",),
    routed_experts=SWITCHABLE,
    # transformers' GptOssModel gives its masks no position_ids: packed documents need fastmoe's model forward.
    packed_row_ops=("attention", "model"),
    layout_implementations=LAYOUT_IMPLEMENTATIONS,
    tiny_config=dict(
        hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, num_local_experts=4, num_experts_per_tok=2, sliding_window=6, max_position_embeddings=512,
        # YaRN as the checkpoints have it, scaled to the tiny context (factor = 512 / 64, as transformers checks).
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=64),
        # A limit within the tiny model's pre-activations (the checkpoints' 7.0 is out of reach of random weights of
        # std 0.02), so that the clamps act in the tests.
        swiglu_limit=0.15, tie_word_embeddings=False),
    # transformers zero-initialises the expert and attention biases.
    random_init=("gate_up_proj_bias", "down_proj_bias", "q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"),
)
