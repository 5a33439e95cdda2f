"""Saving a LoRA-trained model: the adapter alone, or a plain transformers checkpoint with every adapter merged.

`save_pretrained_merged` is bound to the `PeftModel` that `FastModel.get_peft_model` returns. The merged checkpoint
loads with `AutoModelForCausalLM.from_pretrained` and nothing else: no peft, no fastmoe, no bitsandbytes.

Merging never touches the live model, since users keep training after a save: each merged weight is a new tensor,
built one layer (one expert stack) at a time on the weight's device and moved to the CPU at once, so the accelerator
holds at most about one extra layer while the merged copy collects in host memory for transformers' writer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

from fastmoe.expert_lora import expert_lora_factors
from fastmoe.kernels.moe import dequantize_nf4
from fastmoe.quantize import is_quantized, nf4_weight

SAVE_METHODS = ("lora", "merged_16bit")


def save_pretrained_merged(self, save_directory: str | os.PathLike, tokenizer=None,
                           save_method: str = "merged_16bit", **kwargs: Any) -> None:
    """Save this LoRA model to `save_directory`.

    save_method "lora": the adapter only (peft's `save_pretrained`); "merged_16bit": the base model with every
    adapter merged into its weights and 4/8-bit weights (bitsandbytes Linear layers, fastmoe's NF4 experts)
    dequantized, in the model's compute dtype, as a plain transformers checkpoint without quantization_config.
    `tokenizer`, when given, is saved beside it. Other keyword arguments go to `save_pretrained`
    (`max_shard_size`, ...).
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r} is not one of {', '.join(map(repr, SAVE_METHODS))}")
    if save_method == "lora":
        self.save_pretrained(save_directory, **kwargs)
    else:
        base = self.get_base_model()
        state_dict, untied = merged_state_dict(base)
        with _plain_checkpoint_view(base, untied):
            base.save_pretrained(save_directory, state_dict=state_dict, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict `model` (a base model with peft's LoRA layers injected) would have with its adapters merged,
    under the plain model's keys (no `.base_layer`, no `lora_*`).

    Returns (state dict, untied): untied is True when merging made weights that the model ties (input and output
    embeddings) differ, so the checkpoint must store both and say they are no longer tied."""
    dtype = model.dtype
    merged: dict[str, torch.Tensor] = {}
    sources: dict[str, int] = {}
    for prefix, module in _leaf_owners(model):
        originals = dict(_own_tensors(module))
        for name, tensor in _merged_tensors(module, originals, dtype).items():
            merged[prefix + name] = tensor
            sources[prefix + name] = id(originals.get(name, tensor))
    groups: dict[int, list[str]] = {}
    for key, source in sources.items():
        groups.setdefault(source, []).append(key)
    untied = any(len({merged[key].data_ptr() for key in keys}) > 1 for keys in groups.values() if len(keys) > 1)
    return merged, untied


def _leaf_owners(model: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.nn.Module]]:
    """(key prefix, module) for every module that owns tensors in the plain model's state dict, with peft's wrappers
    passed through: a LoRA layer yields itself (it stands for its innermost base layer)."""
    if isinstance(model, ModulesToSaveWrapper):
        active = model.active_adapter
        chosen = model.original_module if model.disable_adapters or active not in model.modules_to_save else \
            model.modules_to_save[active]
        yield from _leaf_owners(chosen, prefix)
        return
    if isinstance(model, LoraLayer):
        yield prefix, model
        base = model.get_base_layer()
        for name, child in base.named_children():
            yield from _leaf_owners(child, f"{prefix}{name}.")
        return
    if isinstance(model, BaseTunerLayer):
        raise TypeError(f"cannot merge {type(model).__name__}: merged saving handles LoRA adapters only")
    yield prefix, model
    for name, child in model.named_children():
        yield from _leaf_owners(child, f"{prefix}{name}.")


def _own_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a module itself contributes to a plain state dict (params and persistent buffers, children not
    included). A LoRA layer contributes its innermost base layer's; bitsandbytes layers contribute their packed
    weight, which `_merged_tensors` dequantizes."""
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    if _bnb_kind(module) is not None:
        yield "weight", module.weight
        if module.bias is not None:
            yield "bias", module.bias
        return
    local: dict[str, Any] = {}
    module._save_to_state_dict(local, "", keep_vars=True)
    for name, value in local.items():
        if isinstance(value, torch.Tensor):
            yield name, value


def _merged_tensors(module: torch.nn.Module, originals: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`originals` with the module's adapters merged and quantized weights dequantized; untouched tensors are
    returned as they are (detached views of the live parameters)."""
    wrappers = []
    while isinstance(module, LoraLayer):
        wrappers.append(module)
        module = module.base_layer
    out = {name: tensor.detach() for name, tensor in originals.items()}
    if _bnb_kind(module) is not None:
        out["weight"] = _dequantize(module).to(dtype)
    if is_quantized(module):
        # fastmoe's NF4 experts (load_in_4bit): the parameters are zero placeholders, the weights live in buffers.
        for name in module._fastmoe_nf4:
            out[name] = dequantize_nf4(nf4_weight(module, name), dtype)
    for wrapper in wrappers:
        for adapter in _unmerged_active_adapters(wrapper):
            if isinstance(wrapper, ParamWrapper):
                name = wrapper.parameter_name
                out[name] = _merge_param_lora(wrapper, adapter, out[name])
            else:
                out["weight"] = _merge_module_lora(wrapper, adapter, out["weight"])
                if wrapper.lora_bias.get(adapter, False):
                    bias = wrapper.lora_B[adapter].bias * wrapper.scaling[adapter]
                    out["bias"] = (out["bias"].float() + bias.float()).to(out["bias"].dtype)
    return {name: tensor.cpu() if _is_new(tensor, originals.get(name)) else tensor for name, tensor in out.items()}


def _is_new(tensor: torch.Tensor, original: torch.Tensor | None) -> bool:
    return original is None or tensor.data_ptr() != original.data_ptr()


def _unmerged_active_adapters(layer: LoraLayer) -> list[str]:
    """The adapters whose delta the layer's forward adds to its base weight right now."""
    if layer.disable_adapters:
        return []
    adapters = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    for adapter in adapters:
        if adapter in getattr(layer, "lora_variant", {}):
            raise ValueError(
                f"adapter {adapter!r} is a LoRA variant ({type(layer.lora_variant[adapter]).__name__}); merged "
                "saving merges plain LoRA only: save it with save_method='lora'"
            )
    return adapters


def _merge_module_lora(layer: LoraLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """W + delta for a module-level LoRA layer (Linear, Embedding, bitsandbytes Linear): peft's own delta, which
    knows each layer type's layout, added in fp32."""
    delta = layer.get_delta_weight(adapter)
    return (weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype)


def _merge_param_lora(wrapper: ParamWrapper, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """W_e + s B_e A_e for each expert of a parameter LoRA, one expert at a time into a new CPU tensor.

    A 2D parameter is one expert. A 3D parameter stored (experts, in, out) (peft's `_did_swap_in_out_features` False)
    takes the transposed delta."""
    num_experts = wrapper.num_experts
    scaling = float(wrapper.scaling[adapter])
    a, b = expert_lora_factors(wrapper, adapter)
    transposed = weight.dim() == 3 and not wrapper._did_swap_in_out_features
    stack = weight if weight.dim() == 3 else weight.unsqueeze(0)
    merged = torch.empty(stack.shape, dtype=weight.dtype, device="cpu")
    for expert in range(num_experts):
        delta = b[expert].float() @ a[expert].float()
        if transposed:
            delta = delta.T
        merged[expert] = (stack[expert].float() + scaling * delta.to(stack.device)).to(weight.dtype).cpu()
    return merged if weight.dim() == 3 else merged.squeeze(0)


def _bnb_kind(module: torch.nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__ if weight is not None else ""
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def _dequantize(module: torch.nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear's weight as a dense (out, in) tensor."""
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if _bnb_kind(module) == "4bit":
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    if scales is None:
        # Not yet quantized (still on the host before its first move to a device): the data is the dense weight.
        return weight.data
    return bnb_functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


@contextlib.contextmanager
def _plain_checkpoint_view(model, untied: bool) -> Iterator[None]:
    """While saving, make `model` describe a plain checkpoint: no quantizer (transformers would otherwise save the
    quantized state dict in place of ours) and no quantization_config in config.json, and embeddings untied when
    merging made them differ. Everything is put back afterwards: the live model stays as it was."""
    config = model.config
    text_config = config.get_text_config()
    saved_quantizer = model.__dict__.get("hf_quantizer", _MISSING)
    saved_quantization = config.__dict__.get("quantization_config", _MISSING)
    tie_configs = [c for c in {id(config): config, id(text_config): text_config}.values()
                   if "tie_word_embeddings" in c.__dict__]
    saved_ties = [c.tie_word_embeddings for c in tie_configs]
    try:
        if saved_quantizer is not _MISSING:
            model.hf_quantizer = None
        if saved_quantization is not _MISSING:
            del config.quantization_config
        if untied:
            for c in tie_configs:
                c.tie_word_embeddings = False
        yield
    finally:
        if saved_quantizer is not _MISSING:
            model.hf_quantizer = saved_quantizer
        if saved_quantization is not _MISSING:
            config.quantization_config = saved_quantization
        for c, tie in zip(tie_configs, saved_ties):
            c.tie_word_embeddings = tie


_MISSING = object()
