"""Forwards that several families swap in unchanged: transformers copies these modules from family to family."""

from __future__ import annotations

import torch

from fastmoe.expert_lora import unwrap_expert_lora
from fastmoe.kernels.moe_experts import moe_experts
from fastmoe.kernels.rms_norm import rms_norm


def rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """For transformers' Llama-style RMSNorm modules (weight, variance_epsilon)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def swiglu_experts(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """(tokens, hidden) through transformers' 3D SwiGLU experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)),
    with peft's expert LoRA applied unmerged by our kernels."""
    unwrapped = unwrap_expert_lora(experts)
    if unwrapped is None:
        return experts(hidden, top_k_index, top_k_weights)
    bare, loras = unwrapped
    return moe_experts(hidden, top_k_index, top_k_weights, bare.gate_up_proj, bare.down_proj,
                       gate_up_lora=loras.get("gate_up_proj"), down_lora=loras.get("down_proj"))
