"""4-bit (NF4) expert weights: what `load_in_4bit=True` does to the 3D expert tensors bitsandbytes leaves alone.

transformers + bitsandbytes quantize nn.Linear layers only; an MoE's experts are 3D Parameters, almost all of its
weights, and would stay 16-bit: SwiGLU experts (`experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I)),
recognised by that layout, and the layouts a family names in `Family.expert_stacks` (JetMoe's `JetMoeParallelExperts`,
one `weight` (E, out, in) per module, in its MLP and its mixture of attention heads). fastmoe turns each into NF4
(kernels/moe/nf4.py, bitsandbytes' format and blocksize 64), while the checkpoint loads (fastmoe.quantized_loading,
through `install_nf4_`) or on a loaded model (`quantize_experts_`):

* the codes and absmax become non-persistent buffers of the experts module (`<name>_nf4_packed`,
  `<name>_nf4_absmax`, and with double quantization of absmax `<name>_nf4_absmax_scale` and
  `<name>_nf4_absmax_offset`): they follow `.to(device)` but stay out of state_dict, as nothing outside fastmoe reads
  them;
* the Parameter itself becomes a zero-storage placeholder of the same shape, dtype and device (a 0-d zero expanded
  to (E, N, K)), so peft's `target_parameters` still wraps it and creates LoRA factors of the right shapes;
* `experts._fastmoe_nf4` names the quantized parameters; the family's patched MoE forward then runs the NF4 kernels
  (`moe_experts_nf4`, `expert_map_nf4`, `expert_reduce_nf4`), which dequantize tiles inside the grouped GEMMs (or a
  stack whole for one product by torch's grouped GEMM, where each expert has rows enough).

DDP cannot broadcast into the placeholders: `fastmoe.distributed.exclude_nf4_from_ddp` lists them for it to skip.

The placeholder reads as zeros: transformers' own experts forward (after `fastmoe.unpatch()`) would silently compute
with zero experts, so a quantized experts module's own forward raises, and `swiglu_experts` refuses every path
that would call it. Casting the model (`model.to(dtype)`)
materialises the placeholders at full size; moving it between devices is fine.
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


def expert_stack_names(module: torch.nn.Module, family: Family | None) -> tuple[str, ...]:
    """The names of `module`'s 3D expert Parameters that NF4 holds under load_in_4bit: SwiGLU stacks, or those
    `family` (None for a model type fastmoe has no fast path for) names for the module's class; () for any other
    module."""
    if is_swiglu_experts(module):
        return SWIGLU_EXPERT_PARAMETERS
    if family is not None:
        for module_class, names in family.expert_stacks.items():
            if isinstance(module, module_class):
                return names
    return ()


def family_of(model: torch.nn.Module) -> Family | None:
    """The family of a (bare) transformers model, from its config; None for a model type without a fast path."""
    from fastmoe import models  # models' forwards import this module

    return models.family(getattr(getattr(model, "config", None), "model_type", None))


def expert_modules(model: torch.nn.Module, family: Family | None) -> list[torch.nn.Module]:
    """The modules of `model` (of `family`) that hold a layer's routed experts as 3D stacks."""
    return [m for m in model.modules() if expert_stack_names(m, family)]


def placeholder_parameter(weight: torch.Tensor) -> torch.nn.Parameter:
    """A zero-storage stand-in of `weight`'s shape, dtype and device: a 0-d zero expanded to the full shape."""
    placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
    return torch.nn.Parameter(placeholder, requires_grad=False)


def install_nf4_(experts: torch.nn.Module, name: str, nf4: Nf4Weight, stack_names: tuple[str, ...]) -> None:
    """Make `nf4` the storage of expert parameter `name`: its NF4 buffers plus a placeholder Parameter. Once every
    parameter of `stack_names` (the module's expert stacks) has one, the module counts as quantized and its own
    forward refuses to run."""
    experts.register_buffer(f"{name}_nf4_packed", nf4.packed, persistent=False)
    experts.register_buffer(f"{name}_nf4_absmax", nf4.absmax, persistent=False)
    if nf4.double_quant:
        experts.register_buffer(f"{name}_nf4_absmax_scale", nf4.absmax_scale, persistent=False)
        experts.register_buffer(f"{name}_nf4_absmax_offset", nf4.absmax_offset, persistent=False)
    setattr(experts, name, placeholder_parameter(getattr(experts, name)))
    if all(hasattr(experts, f"{n}_nf4_packed") for n in stack_names):
        experts._fastmoe_nf4 = stack_names
        # An instance attribute shadows the class's forward: only fastmoe's patched MoE block can run NF4 experts.
        experts.forward = _refuse_unpatched_forward


@torch.no_grad()
def quantize_module_(experts: torch.nn.Module, stack_names: tuple[str, ...] = SWIGLU_EXPERT_PARAMETERS,
                     double_quant: bool = False) -> int:
    """Quantize one experts module's stacks (`stack_names`: SwiGLU experts' gate_up_proj and down_proj unless told)
    to NF4 in place (those not quantized yet), with absmax double-quantized if double_quant; returns bytes saved."""
    pending = [name for name in stack_names if not hasattr(experts, f"{name}_nf4_packed")]
    for name in pending:
        check_nf4_shape(getattr(experts, name).shape)
    saved = 0
    for name in pending:
        weight = getattr(experts, name)
        nf4 = quantize_nf4(weight, double_quant)
        install_nf4_(experts, name, nf4, stack_names)
        saved += weight.numel() * weight.element_size() - nf4.nbytes()
    return saved


# What a patched MoE forward raises when peft's wrappers would have to apply LoRA themselves on NF4 experts.
UNREADABLE_LORA_ON_NF4 = (
    "these experts are quantized to 4 bits and their LoRA layout cannot be read by fastmoe (several active adapters "
    "on one expert weight?): activate a single adapter, or load without load_in_4bit"
)


def refuse_peft_forward_on_nf4(experts: torch.nn.Module) -> None:
    """Raise UNREADABLE_LORA_ON_NF4 where a patched MoE forward is about to hand `experts` (peft's wrapper, or the
    bare module) to its own forward while they are quantized: that forward would compute with the zero placeholders
    that replaced the 4-bit weights."""
    if is_quantized(experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts):
        raise NotImplementedError(UNREADABLE_LORA_ON_NF4)


def _refuse_unpatched_forward(*args, **kwargs):
    raise RuntimeError(
        "these experts hold fastmoe NF4 weights, which only fastmoe's patched MoE forward with its own experts kernel "
        "can run: keep the patches applied (fastmoe.patch(model_type) after fastmoe.unpatch()) and the experts "
        "implementation fastmoe's (model.set_experts_implementation('fastmoe')), or save with save_pretrained_merged "
        "and load that checkpoint with plain transformers"
    )


def quantize_experts_(model: torch.nn.Module, double_quant: bool = False, family: Family | None = None) -> int:
    """Quantize every experts module of `model` (SwiGLU stacks, and those its family names) to NF4 in place, layer by
    layer (on a GPU the 16-bit stacks of each module are freed before the next is quantized), with absmax
    double-quantized if double_quant (what BitsAndBytesConfig's bnb_4bit_use_double_quant asks of Linear layers).
    `family`: the model's, for a part of a model (a decoder layer) without the config it is read from otherwise.
    Returns the bytes saved."""
    family = family or family_of(model)
    saved = 0
    for module in list(model.modules()):
        names = expert_stack_names(module, family)
        if names:
            saved += quantize_module_(module, names, double_quant)
            if getattr(module, names[0]).is_cuda:
                torch.cuda.empty_cache()
    return saved
