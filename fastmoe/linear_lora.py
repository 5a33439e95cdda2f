"""peft's LoRA on Linear layers, computed by fastmoe's fused LoRA linear (kernels/lora_linear.py).

The shared op `lora_linear` (fastmoe.models.SHARED_OPS, patched with any family) swaps the forwards of peft's three
Linear-LoRA wrappers: `lora.Linear` (a `target_modules` entry),
`ParamWrapper` around an nn.Linear's `weight` (a `target_parameters` entry such as AFMoE's `gate_proj.weight`,
which peft would otherwise fold into a full-size W + B A on every call) and bitsandbytes' `lora.Linear4bit`
(QLoRA). The parameters stay peft's, so adapters save, load and merge exactly as with plain peft; anything the
fused op does not cover (several active adapters, dropout, DoRA and other variants, LoRA bias, merged or disabled
adapters, a trainable base weight, mixed-adapter batches) goes through peft's own forward unchanged.

Decoding reads each layer's weight for a token or a few: a launch per layer is then mostly fixed cost (ramping up
and draining the GPU's memory pipes for a few megabytes). `project` and `swiglu` serve the model forwards' linear
layers of one input (attention's q, k, v and gate; an MLP's gate and up) in one few-rows launch where every one of
them would take the few-rows kernel alone, and call the layers one by one otherwise.
"""

from __future__ import annotations

import torch
import transformers.activations
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import ParamWrapper

from fastmoe.kernels.lora_linear import (MAX_PROJECTIONS, Projection, lora_linear, lora_linears_few_rows,
                                         takes_few_rows)
from fastmoe.kernels.moe.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE, Nf4Weight
from fastmoe.kernels.reused_casts import cast, scope_active
from fastmoe.kernels.swiglu import swiglu as fused_swiglu
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

        x_compute = x.to(compute_dtype)
        projections = _few_rows_projections(x_compute, (layer,))
        if projections is not None:  # decoding: the NF4 weight decoded in the kernel's tiles, never as a whole
            return lora_linears_few_rows(x_compute, projections)[0].to(x.dtype)
        bias = base.bias.to(compute_dtype) if base.bias is not None else None
        return lora_linear(x_compute, dequantized, bias, a, b, scaling).to(x.dtype)
    return None


def _nf4_view(weight) -> Nf4Weight | None:
    """A bitsandbytes 4-bit weight (Params4bit) as a one-expert Nf4Weight over the same storage, when it is NF4 as
    fastmoe's kernels read it (kernels/moe/nf4.py: bitsandbytes' layout with blocks of 64, its double quantization
    over blocks of 256 absmax); None otherwise (FP4, other block sizes). bitsandbytes' NF4 and signed dynamic codes
    are constants, which fastmoe's kernels hold too. On the CPU, only rows of a multiple of 64 values: bitsandbytes'
    CPU kernels decode other rows unlike its storage (blocks that span two rows; a quantize-dequantize round trip
    there is 18-38% off the weight against NF4's 9%), and fastmoe must compute what bitsandbytes computes."""
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or state.blocksize != BLOCKSIZE or len(state.shape) != 2:
        return None
    n, k = state.shape
    if (n * k) % BLOCKSIZE or weight.data.dtype != torch.uint8 or (not weight.data.is_cuda and k % BLOCKSIZE):
        return None
    packed, absmax = weight.data.view(1, -1), state.absmax.view(1, -1)
    if not state.nested:
        return Nf4Weight(packed, absmax, (1, n, k), state.dtype)
    if state.state2.blocksize != ABSMAX_BLOCKSIZE:
        return None
    return Nf4Weight(packed, absmax, (1, n, k), state.dtype, state.state2.absmax.view(1, -1),
                     state.offset.view(1).float())


def _projection_weight(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | Nf4Weight | None:
    """The weight of a frozen Linear base as a few-rows launch reads it: 16-bit in x's dtype, or bitsandbytes' NF4
    computing in x's dtype; None for anything else."""
    if type(base) is torch.nn.Linear:
        weight = base.weight
        return weight if not weight.requires_grad and weight.dtype == x.dtype else None
    if (bitsandbytes is not None and type(base) is bitsandbytes.nn.Linear4bit
            and (base.compute_dtype or x.dtype) == x.dtype):
        return _nf4_view(base.weight)
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


def _projection(layer: torch.nn.Module, x: torch.Tensor) -> Projection | None:
    """`layer` as one projection of a few-rows launch, when its forward would compute exactly that: a plain 16-bit
    Linear or bitsandbytes NF4 Linear, or peft's LoRA on one (lora.Linear, its 4-bit Linear, ParamWrapper on a
    Linear's weight) that the patched forwards above serve with the fused op. None otherwise (hooks, trainable or
    other bases, what _single_adapter refuses, the op off)."""
    if layer._forward_hooks or layer._forward_pre_hooks or "forward" in vars(layer):
        return None
    if type(layer) is torch.nn.Linear or (bitsandbytes is not None and type(layer) is bitsandbytes.nn.Linear4bit):
        base, name = layer, None
    elif ((type(layer) is PeftLoraLinear and PeftLoraLinear.forward is linear_forward)
          or (PeftLoraLinear4bit is not None and type(layer) is PeftLoraLinear4bit
              and PeftLoraLinear4bit.forward is linear4bit_forward)):
        base, name = layer.get_base_layer(), _single_adapter(layer, (), {})
        if name is None:
            return None
    elif (type(layer) is ParamWrapper and ParamWrapper.forward is param_wrapper_forward
          and layer.parameter_name == "weight" and layer.num_experts == 1):
        base, name = layer.base_layer, _single_adapter(layer, (), {})
        if name is None:
            return None
    else:
        return None
    weight = _projection_weight(base, x)
    if weight is None or base._forward_hooks or base._forward_pre_hooks:
        return None
    if name is None:
        return Projection(weight, base.bias, None, None, 0.0)
    return Projection(weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                      float(layer.scaling[name]))


def _few_rows_projections(x: torch.Tensor, layers) -> list[Projection] | None:
    """The layers as projections of few-rows launches over x, or None where any one would not take that kernel."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or not takes_few_rows(x):
        return None  # training sizes leave here, before any layer is looked at
    projections = []
    for layer in layers:
        projection = _projection(layer, x)
        if projection is None:
            return None
        projections.append(projection)
    kinds = {p.weight.dtype if isinstance(p.weight, Nf4Weight) else None for p in projections}
    tensors = [t for p in projections
               for t in (p.weight.packed if isinstance(p.weight, Nf4Weight) else p.weight, p.bias, p.lora_a, p.lora_b)]
    if len({p.bias is None for p in projections}) != 1 or len(kinds) != 1 or not takes_few_rows(x, *tensors):
        return None
    # Decoding: the factors' reused casts, half the bytes each program reads.
    factor = cast if scope_active() else (lambda t, dtype: t)
    return [p._replace(bias=None if p.bias is None else cast(p.bias, x.dtype),
                       lora_a=None if p.lora_a is None else factor(p.lora_a, x.dtype),
                       lora_b=None if p.lora_b is None else factor(p.lora_b, x.dtype)) for p in projections]


def project(x: torch.Tensor, *layers: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers): linear layers of one input. While decoding, in launches of up to
    MAX_PROJECTIONS layers when each layer alone would take the few-rows kernel (kernels/lora_linear.py), with the same
    result; one call per layer otherwise."""
    projections = _few_rows_projections(x, layers)
    if projections is None:
        return tuple(layer(x) for layer in layers)
    return tuple(out for i in range(0, len(projections), MAX_PROJECTIONS)
                 for out in lora_linears_few_rows(x, projections[i:i + MAX_PROJECTIONS]))


# transformers' SiLU modules (ACT2FN's "silu" and "swish"); SiLUActivation is absent from older releases.
_SILU = tuple(t for t in (torch.nn.SiLU, getattr(transformers.activations, "SiLUActivation", None)) if t is not None)


def is_silu(act) -> bool:
    """Whether the activation a model calls, a function or a module, computes exactly SiLU: F.silu, or one of
    transformers' SiLU modules with no forward of its own (a kernel from the hub swapped in) and no hooks."""
    if act is torch.nn.functional.silu:
        return True
    return (type(act) in _SILU and not act._forward_hooks and not act._forward_pre_hooks
            and "forward" not in vars(act))


def swiglu(x: torch.Tensor, gate: torch.nn.Module, up: torch.nn.Module,
           act: torch.nn.Module | None = None) -> torch.Tensor:
    """act(gate(x)) * up(x) (act None: SiLU), a gated MLP's hidden activations: while decoding, with a SiLU, in one
    launch when each layer alone would take the few-rows kernel, rounded as PyTorch rounds the three ops; otherwise
    the two layers, then a SiLU's product in one pass forward and one backward (kernels/swiglu.py), any other
    activation as PyTorch's ops."""
    silu = act is None or is_silu(act)
    projections = _few_rows_projections(x, (gate, up)) if silu else None
    if projections is None or tuple(projections[0].weight.shape) != tuple(projections[1].weight.shape):
        if not silu:
            return act(gate(x)) * up(x)
        gated, upped = gate(x), up(x)
        if gated.shape != upped.shape or gated.dtype != upped.dtype:
            return torch.nn.functional.silu(gated) * upped
        return fused_swiglu(gated, upped)
    return lora_linears_few_rows(x, projections, swiglu=True)[0]


def lora_linear_patches() -> list[ForwardPatch]:
    """The peft forwards the shared op `lora_linear` swaps."""
    patches = [ForwardPatch(PeftLoraLinear, "forward", linear_forward),
               ForwardPatch(ParamWrapper, "forward", param_wrapper_forward)]
    if PeftLoraLinear4bit is not None:
        patches.append(ForwardPatch(PeftLoraLinear4bit, "forward", linear4bit_forward))
    return patches
