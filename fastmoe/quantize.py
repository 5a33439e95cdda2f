"""4-bit (NF4) expert weights: what `load_in_4bit=True` does to the 3D expert tensors bitsandbytes leaves alone.

transformers + bitsandbytes quantize nn.Linear layers only; an MoE's experts are 3D Parameters (AFMoE and
LFM2-MoE: `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I)), almost all of its weights, and
would stay 16-bit. `quantize_experts_` turns each into NF4 (kernels/nf4.py, bitsandbytes' format and blocksize 64):

* the codes and absmax become non-persistent buffers of the experts module (`<name>_nf4_packed`,
  `<name>_nf4_absmax`): they follow `.to(device)` but stay out of state_dict, as nothing outside fastmoe reads them;
* the Parameter itself becomes a zero-storage placeholder of the same shape, dtype and device (a 0-d zero expanded
  to (E, N, K)), so peft's `target_parameters` still wraps it and creates LoRA factors of the right shapes;
* `experts._fastmoe_nf4` names the quantized parameters; `fastmoe.models.shared.swiglu_experts` then runs
  `moe_experts_nf4`, which dequantizes tiles inside the grouped GEMMs.

DDP cannot broadcast into the placeholders: `fastmoe.distributed.exclude_nf4_from_ddp` lists them for it to skip.

The placeholder reads as zeros: transformers' own experts forward (after `fastmoe.unpatch()`) would silently compute
with zero experts, so a quantized experts module's own forward raises, and `swiglu_experts` refuses every path
that would call it. Casting the model (`model.to(dtype)`)
materialises the placeholders at full size; moving it between devices is fine.
"""

from __future__ import annotations

import torch

from fastmoe.kernels.nf4 import Nf4Weight, check_nf4_shape, quantize_nf4

SWIGLU_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_UNSUPPORTED_EXPERTS = {"JetMoeParallelExperts": "jetmoe"}


def is_quantized(experts: torch.nn.Module) -> bool:
    """Whether quantize_experts_ turned this (bare) experts module's weights into NF4."""
    return bool(getattr(experts, "_fastmoe_nf4", None))


def nf4_weight(experts: torch.nn.Module, name: str) -> Nf4Weight:
    """The NF4 stack that replaced parameter `name` of a quantized experts module."""
    placeholder = getattr(experts, name)
    return Nf4Weight(getattr(experts, f"{name}_nf4_packed"), getattr(experts, f"{name}_nf4_absmax"),
                     tuple(placeholder.shape), placeholder.dtype)


def _is_swiglu_experts(module: torch.nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), torch.nn.Parameter) and getattr(module, name).dim() == 3
               for name in SWIGLU_EXPERT_PARAMETERS)


@torch.no_grad()
def quantize_module_(experts: torch.nn.Module) -> int:
    """Quantize one SwiGLU experts module's gate_up_proj and down_proj to NF4 in place; returns bytes saved."""
    if is_quantized(experts):
        return 0
    for name in SWIGLU_EXPERT_PARAMETERS:
        check_nf4_shape(getattr(experts, name).shape)
    saved = 0
    for name in SWIGLU_EXPERT_PARAMETERS:
        weight = getattr(experts, name)
        nf4 = quantize_nf4(weight)
        experts.register_buffer(f"{name}_nf4_packed", nf4.packed, persistent=False)
        experts.register_buffer(f"{name}_nf4_absmax", nf4.absmax, persistent=False)
        placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        setattr(experts, name, torch.nn.Parameter(placeholder, requires_grad=False))
        saved += weight.numel() * weight.element_size() - nf4.nbytes()
    experts._fastmoe_nf4 = SWIGLU_EXPERT_PARAMETERS
    # An instance attribute shadows the class's forward: only fastmoe's patched MoE block can run NF4 experts.
    experts.forward = _refuse_unpatched_forward
    return saved


def _refuse_unpatched_forward(*args, **kwargs):
    raise RuntimeError(
        "these experts hold fastmoe NF4 weights, which only fastmoe's patched MoE forward can run; "
        "re-apply the patches (Fast<Family>Model.pre_patch()) instead of calling fastmoe.unpatch() on a 4-bit model, "
        "or save with save_pretrained_merged and load that checkpoint with plain transformers"
    )


def quantize_experts_(model: torch.nn.Module) -> int:
    """Quantize every SwiGLU experts module of `model` to NF4 in place, layer by layer (on a GPU the 16-bit stack of
    each layer is freed before the next is quantized). Returns the bytes saved.

    Raises ValueError for expert layouts without an NF4 path (JetMoe) rather than leaving them 16-bit
    under a flag that promises 4 bits."""
    for module in model.modules():
        family = _UNSUPPORTED_EXPERTS.get(type(module).__name__)
        if family is not None:
            raise ValueError(
                f"4-bit experts are not supported for {family} yet: load without load_in_4bit, or with "
                "load_in_8bit=True (its Linear layers in 8 bits, experts in 16 bits)"
            )
    saved = 0
    for module in list(model.modules()):
        if _is_swiglu_experts(module):
            saved += quantize_module_(module)
            if module.gate_up_proj.is_cuda:
                torch.cuda.empty_cache()
    return saved
