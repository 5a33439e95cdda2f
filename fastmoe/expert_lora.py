"""Reading peft's LoRA factors for 3D expert weights, so fastmoe's kernels can apply them unmerged.

peft targets expert tensors with `target_parameters`, wrapping the experts module in one `ParamWrapper` per
targeted parameter (nested). Its own forward adds `B @ A` to the whole (experts, out, in) weight on every call;
fastmoe reads the same A and B and computes `x W_e^T + s (x A_e^T) B_e^T` per expert instead. The parameters stay
peft's, so adapters save and load exactly as plain peft's.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import ParamWrapper

from fastmoe.kernels.moe import ExpertLora


def expert_lora_factors(wrapper: ParamWrapper, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's LoRA factors on an expert parameter, per expert: A (experts, r, in) and B (experts, out, r), as
    views of peft's own weights (gradients reach them). A 2D parameter counts as one expert.

    peft's layout: lora_A.weight (experts * r, in) with rows grouped by expert, lora_B.weight (out, r * experts) with
    columns interleaved as (r, experts)."""
    num_experts = wrapper.num_experts
    weight_a = wrapper.lora_A[adapter].weight
    weight_b = wrapper.lora_B[adapter].weight
    a = weight_a.view(num_experts, -1, weight_a.shape[-1])
    b = weight_b.view(weight_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def unwrap_expert_lora(module: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, ExpertLora]] | None:
    """Peel peft's ParamWrappers off an experts module.

    Returns the bare experts module and, for each parameter with one active unmerged adapter, its factors:
    A (experts, r, in) and B (experts, out, r) as views of peft's own weights, so gradients reach them. For a 3D
    stack stored (experts, in, out) (transformers' `is_transposed` experts, gpt-oss's) in and out are those
    dimensions: the factors mean the same, the caller reads the stack in its layout.
    Returns None when only peft's own forward can be right (several active adapters on one parameter, or a 2D
    parameter, which peft stores unswapped); the caller then calls the wrapped module as transformers would.
    """
    loras: dict[str, ExpertLora] = {}
    while isinstance(module, ParamWrapper):
        wrapper = module
        module = wrapper.base_layer
        if wrapper.disable_adapters or wrapper.merged:
            # merged: the base weight already holds the delta; disabled: the base weight alone is the answer.
            continue
        active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
        if not active:
            continue
        stored_in_out = getattr(wrapper.get_base_layer(), "is_transposed", False) and wrapper.get_param().dim() == 3
        if len(active) > 1 or not (wrapper._did_swap_in_out_features or stored_in_out):
            return None
        name = active[0]
        a, b = expert_lora_factors(wrapper, name)
        loras[wrapper.parameter_name] = ExpertLora(A=a, B=b, scaling=float(wrapper.scaling[name]))
    return module, loras
