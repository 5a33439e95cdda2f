"""peft's LoRA on Linear layers, computed by fastmoe's fused LoRA linear (kernels/lora_linear.py).

The shared op `lora_linear` (fastmoe.models.SHARED_OPS, patched with any family) swaps the forwards of peft's three
Linear-LoRA wrappers: `lora.Linear` (a `target_modules` entry),
`ParamWrapper` around an nn.Linear's `weight` (a `target_parameters` entry such as AFMoE's `gate_proj.weight`,
which peft would otherwise fold into a full-size W + B A on every call) and bitsandbytes' `lora.Linear4bit`
(QLoRA). The parameters stay peft's, so adapters save, load and merge exactly as with plain peft; anything the
fused op does not cover (several active adapters, dropout, DoRA and other variants, LoRA bias, merged or disabled
adapters, a trainable base weight, mixed-adapter batches) goes through peft's own forward unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import ParamWrapper

from fastmoe.kernels.lora_linear import lora_linear
from fastmoe.patching import ForwardPatch

try:  # peft defines its bitsandbytes wrappers only when bitsandbytes is installed
    import bitsandbytes
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
except ImportError:
    bitsandbytes = PeftLoraLinear4bit = None

_peft_linear_forward = PeftLoraLinear.forward
_peft_param_wrapper_forward = ParamWrapper.forward
_peft_linear4bit_forward = PeftLoraLinear4bit.forward if PeftLoraLinear4bit is not None else None


def _single_adapter(layer, args: tuple, kwargs: dict) -> str | None:
    """The one active, unmerged, plain adapter of a peft LoRA layer when the fused op computes exactly what peft
    would; None otherwise."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _fused(layer, base: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """The fused op on a plain Linear or a bitsandbytes 4-bit Linear base; None for any other base."""
    a, b, scaling = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
    if type(base) is torch.nn.Linear:
        if base.weight.requires_grad or base.weight.dtype != x.dtype:
            return None
        return lora_linear(x, base.weight, base.bias, a, b, scaling)
    if bitsandbytes is not None and isinstance(base, bitsandbytes.nn.Linear4bit):
        weight = base.weight
        if weight.quant_state is None:
            return None
        # As bitsandbytes' Linear4bit: compute in its compute dtype, return in the input's.
        compute_dtype = base.compute_dtype or x.dtype

        def dequantized() -> torch.Tensor:
            return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state).to(compute_dtype)

        bias = base.bias.to(compute_dtype) if base.bias is not None else None
        return lora_linear(x.to(compute_dtype), dequantized, bias, a, b, scaling).to(x.dtype)
    return None


def linear_forward(self: PeftLoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # peft wraps a bitsandbytes Linear4bit in this class too when it does not pick its bnb wrapper (no CUDA).
    name = _single_adapter(self, args, kwargs)
    out = _fused(self, self.get_base_layer(), name, x) if name is not None else None
    return out if out is not None else _peft_linear_forward(self, x, *args, **kwargs)


def param_wrapper_forward(self: ParamWrapper, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Only LoRA on a Linear's weight; expert stacks (3D) are read by fastmoe.expert_lora instead.
    name = _single_adapter(self, args, kwargs)
    out = None
    if name is not None and self.parameter_name == "weight" and self.num_experts == 1:
        out = _fused(self, self.base_layer, name, x)
    return out if out is not None else _peft_param_wrapper_forward(self, x, *args, **kwargs)


def linear4bit_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _single_adapter(self, args, kwargs)
    out = _fused(self, self.get_base_layer(), name, x) if name is not None else None
    return out if out is not None else _peft_linear4bit_forward(self, x, *args, **kwargs)


def lora_linear_patches() -> list[ForwardPatch]:
    """The peft forwards the shared op `lora_linear` swaps."""
    patches = [ForwardPatch(PeftLoraLinear, "forward", linear_forward),
               ForwardPatch(ParamWrapper, "forward", param_wrapper_forward)]
    if PeftLoraLinear4bit is not None:
        patches.append(ForwardPatch(PeftLoraLinear4bit, "forward", linear4bit_forward))
    return patches
