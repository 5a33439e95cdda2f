"""Forwards that several families swap in unchanged: transformers copies these modules from family to family."""

from __future__ import annotations

import contextlib

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from fastmoe.expert_lora import unwrap_expert_lora
from fastmoe.kernels import lora_linear
from fastmoe.kernels.moe import (moe_experts, moe_experts_clamped_swiglu, moe_experts_nf4, output_is_read,
                                 output_unused, router_topk)
from fastmoe.kernels.rms_norm import rms_norm, rms_norm_add
from fastmoe.linear_lora import is_silu, swiglu
from fastmoe.patching import ForwardPatch
from fastmoe.quantize import is_quantized, nf4_weight, refuse_peft_forward_on_nf4
from fastmoe.recompute import recomputing_for_backward
from fastmoe.sliding_window_attention import FlashCausal, flash_causal_attention
from fastmoe.token_chunks import feed_forward_in_chunks

# fastmoe's experts kernel as one of transformers' experts implementations (`experts_implementation`, beside eager,
# grouped_mm, batched_mm): the one FastModel.from_pretrained picks unless told otherwise. A model whose config names
# another runs that one, through transformers' own experts forward, with fastmoe's other forwards around it; the
# choice is per model (its config), so other models in the process keep theirs.
EXPERTS_IMPLEMENTATION = "fastmoe"


def rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """For transformers' Llama-style RMSNorm modules (weight, variance_epsilon)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor,
                 norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x) for a Llama-style RMSNorm module: the decoder layer's residual add and the
    norm after it in one kernel pass. Operands of two dtypes (an fp32 residual beside an autocast output) take the
    add and the module's own forward, with the dtype promotion transformers' `residual + x` has."""
    if x.dtype != residual.dtype or x.shape != residual.shape:
        total = residual + x
        return norm(total), total
    return rms_norm_add(x, residual, norm.weight, norm.variance_epsilon)


def transformers_attention(self: torch.nn.Module, modeling, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention function of the model's configured implementation (`modeling`: the family's
    transformers module, whose eager function is the fallback), called as the family's own attention forward calls it:
    the module's scaling, and its attention dropout while training (none for a module without one). kwargs go to the
    function (sliding_window, s_aux, ...). Returns (output (batch, seq, heads, head_dim), attention weights or None)."""
    attention_interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                        modeling.eager_attention_forward)
    dropout = getattr(self, "attention_dropout", 0.0) if self.training else 0.0
    return attention_interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                               **kwargs)


def attend(self: torch.nn.Module, modeling, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask, past_key_values=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of a patched attention forward between its projections: the cache takes this call's keys and
    values, then PyTorch's flash kernel runs where the model's mask is a flash layout (no mask was built: see
    sliding_window_attention.mask_layout_patches; the layout carries any window), else transformers' attention
    function (transformers_attention; kwargs go to it). query (batch, heads, seq, head_dim), key and value (batch,
    kv_heads, seq, head_dim). Returns the (batch, seq, heads * head_dim) output, contiguous for the output projection,
    and the attention weights (None from flash)."""
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    if isinstance(attention_mask, FlashCausal):
        output, attn_weights = flash_causal_attention(query, key, value, attention_mask, self.scaling), None
    else:
        output, attn_weights = transformers_attention(self, modeling, query, key, value, attention_mask, **kwargs)
    return output.reshape(*output.shape[:2], -1).contiguous(), attn_weights


def decoder_layer_patch(layer_class: type, forward) -> ForwardPatch:
    """A ForwardPatch swapping a decoder layer's forward. transformers 5.18+ wraps the forward of every
    GradientCheckpointingLayer subclass in its checkpointing dispatch when the class is created (5.17 checkpoints in
    __call__ instead), so setting a plain function would lose checkpointing: a subclass made here receives the same
    wrapping around `forward`, and that wrapped function is what the layer class gets."""
    carrier = type(f"Fast{layer_class.__name__}", (layer_class,), {"forward": forward, "__module__": __name__})
    return ForwardPatch(layer_class, "forward", carrier.__dict__["forward"])


def norm_attention_norm_mlp_forward(self: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A Llama-shaped decoder layer (`input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`; Qwen3-MoE,
    Qwen2-MoE, Mixtral) with the residual add after attention and the norm before the MLP in one pass, and the MLP
    (MoE block or dense) in token chunks on long sequences (fastmoe.token_chunks). transformers calls these layers
    with the hidden states alone by position; every other argument goes to the attention as it was given."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states, residual = add_rms_norm(hidden_states, residual, self.post_attention_layernorm)
    return residual_plus_feed_forward(residual, self.mlp, hidden_states)


def unread_in_recompute():
    """A block for the parts of a decoder layer whose outputs only the layer's output sum takes: in checkpointing's
    recompute (graphed, or torch's through fastmoe.checkpointing) nothing reads that output's value, only its autograd
    graph, so they skip their output products (the routed experts' down projection: kernels/moe/experts.py
    output_unused; the last linear layer of an MLP or attention block: last_projection)."""
    # dynamo cannot trace the context variable; compiled layers take torch's checkpoint without fastmoe's marking.
    recomputing = not torch.compiler.is_compiling() and recomputing_for_backward()
    return output_unused() if recomputing else contextlib.nullcontext()


def residual_plus_feed_forward(residual: torch.Tensor, module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """residual + module(hidden) (the MLP or MoE block, in token chunks on long sequences) as a decoder layer's
    output, the block's output products skipped in a recompute (unread_in_recompute): the experts' down projection, a
    ninth of the expert GEMMs' work in a layer's forward, recompute and backward, and a dense MLP's."""
    with unread_in_recompute():
        return residual + feed_forward_in_chunks(module, hidden)


def last_projection(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a block's last linear layer (an MLP's down projection, attention's output projection), whose
    output's value nobody reads inside unread_in_recompute: there a fused LoRA linear skips its base product and
    LoRA's up-projection (kernels/lora_linear.py output_unused) and keeps what its backward reads."""
    if torch.compiler.is_compiling() or output_is_read():
        return layer(x)
    with lora_linear.output_unused():
        return layer(x)


def gated_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' gated MLP, down_proj(act_fn(gate_proj(x)) * up_proj(x)), with gate and up in one launch while
    decoding (fastmoe.linear_lora.swiglu)."""
    return last_projection(self.down_proj, swiglu(x, self.gate_proj, self.up_proj, self.act_fn))


def runs_fastmoe_experts(experts: torch.nn.Module) -> bool:
    """Whether the model that owns `experts` (peft's wrappers included) chose fastmoe's kernel: its config names
    "fastmoe", or no implementation at all (an experts module built outside a model)."""
    bare = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
    return getattr(getattr(bare, "config", None), "_experts_implementation", None) in (None, EXPERTS_IMPLEMENTATION)


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "fastmoe" entry of transformers' experts interface: (tokens, hidden) through a SwiGLU experts module's own
    weights. transformers calls it when its own MoE forward runs a model configured for fastmoe (after
    `fastmoe.unpatch()`), and peft's wrappers when they apply their LoRA themselves (several active adapters): the
    weights they hand over then already hold it."""
    # transformers' `@use_experts_implementation` records each experts class's layout in these flags.
    if _is_clamped_swiglu_layout(self):
        return moe_experts_clamped_swiglu(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                                          self.gate_up_proj_bias, self.down_proj, self.down_proj_bias, self.alpha,
                                          self.limit)
    layout = dict(has_gate=True, is_concatenated=True, is_transposed=False, has_bias=False, has_post_expert_norm=False)
    laid_out = all(getattr(self, flag, value) == value for flag, value in layout.items())
    if not laid_out or not is_silu(getattr(self, "act_fn", None)):
        raise NotImplementedError(
            f"experts_implementation={EXPERTS_IMPLEMENTATION!r} computes SiLU-gated experts stored as gate_up_proj "
            f"(experts, 2 * intermediate, hidden) without bias; {type(self).__name__} is laid out otherwise: pick "
            "another experts_implementation (eager, grouped_mm, batched_mm)"
        )
    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


def _is_clamped_swiglu_layout(experts: torch.nn.Module) -> bool:
    """gpt-oss's experts layout: (E, in, out) stacks with biases, gate and up interleaved (not concatenated), the
    clamped SwiGLU of `alpha` and `limit`."""
    flags = dict(has_gate=True, is_concatenated=False, is_transposed=True, has_bias=True)
    return (all(getattr(experts, flag, None) == value for flag, value in flags.items())
            and not getattr(experts, "has_post_expert_norm", False)
            and all(hasattr(experts, name) for name in ("alpha", "limit", "gate_up_proj_bias", "down_proj_bias")))


def register_experts_implementation() -> None:
    """Make "fastmoe" a valid experts_implementation for transformers (idempotent; it changes no model whose config
    names another)."""
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


def swiglu_experts(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """(tokens, hidden) through transformers' 3D SwiGLU experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)),
    with peft's expert LoRA applied unmerged by our kernels; NF4 experts (fastmoe.quantize) dequantized per tile.
    A model configured with another experts_implementation runs transformers' experts forward instead, and peft's
    wrappers apply their own LoRA."""
    if not runs_fastmoe_experts(experts):
        return experts(hidden, top_k_index, top_k_weights)
    unwrapped = unwrap_expert_lora(experts)
    # peft's wrapper applies the LoRA our kernels cannot read (several adapters active at once); an activation other
    # than SiLU (a config's hidden_act) is not the kernels' either: transformers' own forward (with the experts
    # implementation "fastmoe" that refuses with a message saying what to choose instead).
    if unwrapped is None or not is_silu(getattr(unwrapped[0], "act_fn", None)):
        refuse_peft_forward_on_nf4(experts)
        return experts(hidden, top_k_index, top_k_weights)
    bare, loras = unwrapped
    if is_quantized(bare):
        return moe_experts_nf4(hidden, top_k_index, top_k_weights, nf4_weight(bare, "gate_up_proj"),
                               nf4_weight(bare, "down_proj"), gate_up_lora=loras.get("gate_up_proj"),
                               down_lora=loras.get("down_proj"))
    return moe_experts(hidden, top_k_index, top_k_weights, bare.gate_up_proj, bare.down_proj,
                       gate_up_lora=loras.get("gate_up_proj"), down_lora=loras.get("down_proj"))


def softmax_topk_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor):
    """A router (`weight` (experts, hidden), `top_k`, `hidden_dim`) that takes the softmax over every expert, the top
    k, and renormalises over the k: the same weights as a softmax over the k chosen logits, which fastmoe's routing
    kernel computes (Qwen3-MoE with norm_topk_prob, Mixtral). Returns (logits, fp32 weights, expert indices)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    return router_topk(hidden_states, self.weight, None, self.top_k, sigmoid=False)


def renormalised_router_forward(original_forward):
    """The forward of a softmax top-k router with `norm_topk_prob` (Qwen3-MoE, Qwen2-MoE): when it renormalises over
    the k chosen, fastmoe's routing kernel, the weights in the logits' dtype as transformers gives them; without
    renormalisation the weights are the softmax over all experts, `original_forward` (transformers' own)."""

    def router_forward(self: torch.nn.Module, hidden_states: torch.Tensor):
        if not self.norm_topk_prob:
            return original_forward(self, hidden_states)
        router_logits, weights, index = softmax_topk_router_forward(self, hidden_states)
        return router_logits, weights.to(router_logits.dtype), index

    return router_forward


def routed_moe_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """An MoE block of a router `self.gate` returning (logits, weights, experts) and transformers' 3D SwiGLU experts
    `self.experts`, no shared expert (Qwen3-MoE, Mixtral)."""
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    # Called as a module so the router-logits recorder (output_router_logits) still sees its output.
    _, routing_weights, selected_experts = self.gate(flat)
    routed = swiglu_experts(self.experts, flat, selected_experts, routing_weights)
    return routed.view(batch_size, seq_len, hidden_dim)
