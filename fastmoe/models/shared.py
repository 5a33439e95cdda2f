"""Forwards that several families swap in unchanged: transformers copies these modules from family to family."""

from __future__ import annotations

import torch

from fastmoe.expert_lora import unwrap_expert_lora
from fastmoe.kernels.moe import moe_experts, moe_experts_nf4
from fastmoe.kernels.rms_norm import rms_norm
from fastmoe.quantize import is_quantized, nf4_weight


def rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """For transformers' Llama-style RMSNorm modules (weight, variance_epsilon)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def swiglu_experts(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """(tokens, hidden) through transformers' 3D SwiGLU experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)),
    with peft's expert LoRA applied unmerged by our kernels; NF4 experts (fastmoe.quantize) dequantized per tile."""
    unwrapped = unwrap_expert_lora(experts)
    if unwrapped is None:
        if is_quantized(experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts):
            # peft's own forward would compute with the zero placeholders that replaced the 4-bit weights.
            raise NotImplementedError(
                "these experts are quantized to 4 bits and their LoRA layout cannot be read by fastmoe (several "
                "active adapters on one expert weight?): activate a single adapter, or load without load_in_4bit"
            )
        return experts(hidden, top_k_index, top_k_weights)
    bare, loras = unwrapped
    if is_quantized(bare):
        return moe_experts_nf4(hidden, top_k_index, top_k_weights, nf4_weight(bare, "gate_up_proj"),
                               nf4_weight(bare, "down_proj"), gate_up_lora=loras.get("gate_up_proj"),
                               down_lora=loras.get("down_proj"))
    return moe_experts(hidden, top_k_index, top_k_weights, bare.gate_up_proj, bare.down_proj,
                       gate_up_lora=loras.get("gate_up_proj"), down_lora=loras.get("down_proj"))
