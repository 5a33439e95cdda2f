"""4-bit (NF4) expert weights: what `load_in_4bit=True` does to the 3D expert tensors bitsandbytes leaves alone.

transformers + bitsandbytes quantize nn.Linear layers only; an MoE's experts are 3D Parameters (SwiGLU experts:
`experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I)), almost all of its weights, and
would stay 16-bit. fastmoe turns each into NF4 (kernels/moe/nf4.py, bitsandbytes' format and blocksize 64), while the
checkpoint loads (fastmoe.quantized_loading, through `install_nf4_`) or on a loaded model (`quantize_experts_`):

* the codes and absmax become non-persistent buffers of the experts module (`<name>_nf4_packed`,
  `<name>_nf4_absmax`, and with double quantization of absmax `<name>_nf4_absmax_scale` and
  `<name>_nf4_absmax_offset`): they follow `.to(device)` but stay out of state_dict, as nothing outside fastmoe reads
  them;
* the Parameter itself becomes a zero-storage placeholder of the same shape, dtype and device (a 0-d zero expanded
  to (E, N, K)), so peft's `target_parameters` still wraps it and creates LoRA factors of the right shapes;
* `experts._fastmoe_nf4` names the quantized parameters; `fastmoe.models.shared.swiglu_experts` then runs
  `moe_experts_nf4`, which dequantizes tiles inside the grouped GEMMs.

DDP cannot broadcast into the placeholders: `fastmoe.distributed.exclude_nf4_from_ddp` lists them for it to skip.

The placeholder reads as zeros: transformers' own experts forward (after `fastmoe.unpatch()`) would silently compute
with zero experts, so a quantized experts module's own forward raises, and `swiglu_experts` refuses every path
that would call it. Casting the model (`model.to(dtype)`)
materialises the placeholders at full size; moving it between devices is fine.

Experts in another layout have no NF4 path; a family names their module classes in its description
(`Family.experts_without_nf4`), and 4-bit loading refuses such a model rather than leave them 16-bit.
"""

from __future__ import annotations

import torch

from fastmoe.kernels.moe import Nf4Weight, check_nf4_shape, quantize_nf4
from fastmoe.patching import Family

SWIGLU_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def is_quantized(experts: torch.nn.Module) -> bool:
    """Whether quantize_experts_ turned this (bare) experts module's weights into NF4."""
    return bool(getattr(experts, "_fastmoe_nf4", None))


def nf4_weight(experts: torch.nn.Module, name: str) -> Nf4Weight:
    """The NF4 stack that replaced parameter `name` of a quantized experts module."""
    placeholder = getattr(experts, name)
    return Nf4Weight(getattr(experts, f"{name}_nf4_packed"), getattr(experts, f"{name}_nf4_absmax"),
                     tuple(placeholder.shape), placeholder.dtype,
                     getattr(experts, f"{name}_nf4_absmax_scale", None),
                     getattr(experts, f"{name}_nf4_absmax_offset", None))


def is_swiglu_experts(module: torch.nn.Module) -> bool:
    """Whether `module` holds SwiGLU expert stacks quantize_experts_ can turn into NF4: gate_up_proj (E, 2I, H) and
    down_proj (E, H, I) Parameters."""
    return all(isinstance(getattr(module, name, None), torch.nn.Parameter) and getattr(module, name).dim() == 3
               for name in SWIGLU_EXPERT_PARAMETERS)


def expert_modules(model: torch.nn.Module, family: Family | None) -> list[torch.nn.Module]:
    """The modules of `model` (of `family`; None for a model type fastmoe has no fast path for) that hold a layer's
    routed experts: SwiGLU stacks, or the family's layouts without an NF4 path."""
    others = family.experts_without_nf4 if family is not None else ()
    return [m for m in model.modules() if is_swiglu_experts(m) or isinstance(m, others)]


def placeholder_parameter(weight: torch.Tensor) -> torch.nn.Parameter:
    """A zero-storage stand-in of `weight`'s shape, dtype and device: a 0-d zero expanded to the full shape."""
    placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
    return torch.nn.Parameter(placeholder, requires_grad=False)


def install_nf4_(experts: torch.nn.Module, name: str, nf4: Nf4Weight) -> None:
    """Make `nf4` the storage of expert parameter `name`: its NF4 buffers plus a placeholder Parameter. Once every
    SwiGLU parameter of the module has one, the module counts as quantized and its own forward refuses to run."""
    experts.register_buffer(f"{name}_nf4_packed", nf4.packed, persistent=False)
    experts.register_buffer(f"{name}_nf4_absmax", nf4.absmax, persistent=False)
    if nf4.double_quant:
        experts.register_buffer(f"{name}_nf4_absmax_scale", nf4.absmax_scale, persistent=False)
        experts.register_buffer(f"{name}_nf4_absmax_offset", nf4.absmax_offset, persistent=False)
    setattr(experts, name, placeholder_parameter(getattr(experts, name)))
    if all(hasattr(experts, f"{n}_nf4_packed") for n in SWIGLU_EXPERT_PARAMETERS):
        experts._fastmoe_nf4 = SWIGLU_EXPERT_PARAMETERS
        # An instance attribute shadows the class's forward: only fastmoe's patched MoE block can run NF4 experts.
        experts.forward = _refuse_unpatched_forward


@torch.no_grad()
def quantize_module_(experts: torch.nn.Module, double_quant: bool = False) -> int:
    """Quantize one SwiGLU experts module's gate_up_proj and down_proj to NF4 in place (those not quantized yet),
    with absmax double-quantized if double_quant; returns bytes saved."""
    pending = [name for name in SWIGLU_EXPERT_PARAMETERS if not hasattr(experts, f"{name}_nf4_packed")]
    for name in pending:
        check_nf4_shape(getattr(experts, name).shape)
    saved = 0
    for name in pending:
        weight = getattr(experts, name)
        nf4 = quantize_nf4(weight, double_quant)
        install_nf4_(experts, name, nf4)
        saved += weight.numel() * weight.element_size() - nf4.nbytes()
    return saved


def _refuse_unpatched_forward(*args, **kwargs):
    raise RuntimeError(
        "these experts hold fastmoe NF4 weights, which only fastmoe's patched MoE forward with its own experts kernel "
        "can run: keep the patches applied (fastmoe.patch(model_type) after fastmoe.unpatch()) and the experts "
        "implementation fastmoe's (model.set_experts_implementation('fastmoe')), or save with save_pretrained_merged "
        "and load that checkpoint with plain transformers"
    )


def refuse_experts_without_nf4(model: torch.nn.Module, family: Family | None) -> None:
    """Raise ValueError when `model` holds experts of a layout without an NF4 path (the family's
    `experts_without_nf4`), rather than leave them 16-bit under a flag that promises 4 bits."""
    if family is not None and any(isinstance(m, family.experts_without_nf4) for m in model.modules()):
        raise ValueError(
            f"4-bit experts are not supported for {family.model_type} yet: load without load_in_4bit, or pass "
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True) for 8-bit Linear layers and 16-bit experts"
        )


def quantize_experts_(model: torch.nn.Module, double_quant: bool = False) -> int:
    """Quantize every SwiGLU experts module of `model` to NF4 in place, layer by layer (on a GPU the 16-bit stack of
    each layer is freed before the next is quantized), with absmax double-quantized if double_quant (what
    BitsAndBytesConfig's bnb_4bit_use_double_quant asks of Linear layers). Returns the bytes saved. Experts of other
    layouts are left alone: the load path refuses them first (refuse_experts_without_nf4)."""
    saved = 0
    for module in list(model.modules()):
        if is_swiglu_experts(module):
            saved += quantize_module_(module, double_quant)
            if module.gate_up_proj.is_cuda:
                torch.cuda.empty_cache()
    return saved
