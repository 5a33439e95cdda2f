"""Quantization while a checkpoint loads: what `load_in_4bit` / `load_in_8bit` hand to transformers' loader.

transformers 5.17-5.23 loads a checkpoint one target parameter at a time (`convert_and_load_state_dict_in_model` in
core_model_loading.py): it reads that parameter's tensors from the safetensors files onto its target device, runs the
family's conversion (AFMoE and LFM2-MoE checkpoints, those save_pretrained writes included, hold per-expert
`experts.<e>.gate_proj.weight`, ... that a WeightConverter stacks and concatenates into `experts.gate_up_proj`
(E, 2I, H)), and, when the HfQuantizer's `param_needs_quantization` claims the parameter, passes the result through
`get_quantize_ops()` before setting it on the model and reading the next one. bitsandbytes' quantizer claims Linear4bit
weights only, so the experts, nearly all of an MoE's weights, used to arrive 16-bit: the whole 16-bit expert set existed
before fastmoe could quantize it.

`Nf4ExpertsBnb4BitHfQuantizer` subclasses bitsandbytes' 4-bit quantizer and also claims the expert stacks (SwiGLU
stacks, and the layouts a family names in `Family.expert_stacks`, e.g. JetMoe's `input_linear.weight`): each
is quantized to NF4 (kernels/moe/nf4.py) on its target device the moment transformers has fused it, and its 16-bit
tensors are dropped before the next parameter is read. The config's bnb_4bit_use_double_quant applies to the experts too
(their absmax double-quantized as bitsandbytes does for Linear4bit). A subclass of the quantizer rather than reading the
experts ourselves from the safetensors files, or a hook on the model: the quantizer methods used here are the same in
5.17 and 5.23, transformers keeps doing the per-expert fusion, renaming, sharded files, device placement and dtype
casting (a reader of our own would have to follow each family's on-disk layout as transformers changes it), experts
skipped at load would come back as missing keys that transformers materialises at full size, and claimed parameters
count at 4 bits in transformers' allocator warm-up and device-map sizing. The model keeps bitsandbytes' config and
quantizer type, so peft, trl and saving see an ordinary bitsandbytes 4-bit model.

Two transformers behaviours shape the details:

* with on-the-fly quantization it loads synchronously (no reader threads), so the 16-bit tensors of one parameter exist
  at a time: for gate_up_proj, its per-expert slices, the gate and up stacks and their concatenation, briefly;
* after loading it replaces every non-persistent buffer with `torch.empty_like`
  (`_move_missing_keys_from_meta_to_device`), so the NF4 codes wait in a plain attribute of the experts module and
  become its buffers in `_process_model_after_weight_loading`, which runs after that.

gpt-oss checkpoints ship their expert stacks in MXFP4 (`<stack>_blocks` and `<stack>_scales`). For load_in_4bit,
`Mxfp4ExpertsNf4Quantizer` adds one conversion per stack that dequantizes its blocks to the parameter's dtype with
transformers' own MXFP4 decode, and the NF4 quantize op above takes the result: one stack exists in 16 bits at a time,
never the model's whole expert set. The checkpoint's own MXFP4 quantization_config is dropped from the config
transformers loads with (`strip_mxfp4`): transformers refuses a second quantization over a quantized checkpoint, and
the model becomes an ordinary bitsandbytes 4-bit one.

`fastmoe_bnb_quantizers()` puts these classes in transformers' quantizer table for the duration of one load.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.integrations.bitsandbytes import Bnb4bitQuantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.quantizers import auto as auto_quantizers
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from fastmoe import models
from fastmoe.kernels.moe import check_nf4_shape, quantize_nf4
from fastmoe.quantize import expert_modules, expert_stack_names, family_of, install_nf4_, placeholder_parameter

# NF4 stacks quantized during loading, by parameter name, until they can become buffers (see the module docstring).
_STREAMED_NF4 = "_fastmoe_streamed_nf4"


def _owner(model: torch.nn.Module, param_name: str) -> tuple[torch.nn.Module, str]:
    module_name, _, name = param_name.rpartition(".")
    return model.get_submodule(module_name), name


def _is_expert_stack(model: torch.nn.Module, param_name: str) -> bool:
    module, name = _owner(model, param_name)
    return name in expert_stack_names(module, family_of(model))


class Nf4ExpertsQuantize(Bnb4bitQuantize):
    """bitsandbytes' quantize op for Linear4bit weights; expert stacks go to NF4 instead."""

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        linear_weights, result = {}, {}
        for param_name, value in input_dict.items():
            if not _is_expert_stack(model, param_name):
                linear_weights[param_name] = value
                continue
            weight = value[0] if isinstance(value, list) else value
            experts, name = _owner(model, param_name)
            double_quant = self.hf_quantizer.quantization_config.bnb_4bit_use_double_quant
            experts.__dict__.setdefault(_STREAMED_NF4, {})[name] = quantize_nf4(weight, double_quant)
            result[param_name] = placeholder_parameter(weight)
        if linear_weights:
            result.update(super().convert(linear_weights, full_layer_name=full_layer_name, model=model, **kwargs))
        return result


class Nf4ExpertsBnb4BitHfQuantizer(Bnb4BitHfQuantizer):
    """bitsandbytes' 4-bit quantizer that also quantizes expert stacks to NF4 as they load."""

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        # The model is still on the meta device: refusing a shape here costs no read of the checkpoint.
        family = family_of(model)
        for module in model.modules():
            for name in expert_stack_names(module, family):
                check_nf4_shape(getattr(module, name).shape)
        return super()._process_model_before_weight_loading(model, device_map, **kwargs)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return _is_expert_stack(model, param_name) or super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return Nf4ExpertsQuantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        family = family_of(model)
        for module in model.modules():
            for name, nf4 in module.__dict__.pop(_STREAMED_NF4, {}).items():
                install_nf4_(module, name, nf4, expert_stack_names(module, family))
        return super()._process_model_after_weight_loading(model, **kwargs)


class Mxfp4ExpertsDequantize(ConversionOps):
    """An MXFP4 expert stack of a gpt-oss checkpoint (`<stack>_blocks`, `<stack>_scales`) -> the stack in its
    parameter's dtype and layout, as transformers' dequantizing MXFP4 load gives it."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        module, name = _owner(model, full_layer_name)
        blocks, scales = (input_dict[f"{name}_{part}"] for part in ("blocks", "scales"))
        blocks, scales = (t[0] if isinstance(t, list) else t for t in (blocks, scales))
        # The loader casts every tensor to the model's dtype first: blocks and scales are bytes, exact in any float
        # dtype, and the decode takes them back to integers.
        return {full_layer_name: convert_moe_packed_tensors(blocks, scales, dtype=getattr(module, name).dtype)}

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("fastmoe saves NF4 experts dequantized (save_pretrained_merged), never as MXFP4")


class Mxfp4ExpertsNf4Quantizer(Nf4ExpertsBnb4BitHfQuantizer):
    """The 4-bit quantizer for a checkpoint whose experts are MXFP4 (gpt-oss): each stack's blocks and scales are
    dequantized, then quantized to NF4, as they load."""

    def get_weight_conversions(self):
        return [*super().get_weight_conversions(), *(
            WeightConverter(source_patterns=[f"{stack}_blocks", f"{stack}_scales"], target_patterns=stack,
                            operations=[Mxfp4ExpertsDequantize()])
            for stack in ("gate_up_proj", "down_proj"))]

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers keeps the conversions a load used and reverses them when the model is saved: the experts, saved
        # dense (save_pretrained_merged dequantizes them), must keep their names rather than go back to MXFP4's.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions is not None:
            model._weight_conversions = [
                conversion for conversion in conversions
                if not any(isinstance(op, Mxfp4ExpertsDequantize) for op in getattr(conversion, "operations", ()))]
        return super()._process_model_after_weight_loading(model, **kwargs)


def strip_mxfp4(config):
    """A copy of `config` without its MXFP4 quantization_config, for a bitsandbytes load of an MXFP4 checkpoint."""
    config = copy.deepcopy(config)
    del config.quantization_config
    return config


def nf4_expert_families() -> str:
    """The model types whose experts load_in_4bit turns into NF4, for messages: "afmoe, lfm2_moe"."""
    described = [models.family(model_type) for model_type in models.FAMILIES]
    return ", ".join(f.model_type for f in described if f.routed_experts)


class ExpertsIn8BitError(ValueError):
    """load_in_8bit on a model with MoE experts, which would stay 16-bit. The message speaks in from_pretrained's
    arguments; `fastmoe train` words it in its flags from `expert_share` (the experts' fraction of all weights)."""

    def __init__(self, expert_share: float) -> None:
        self.expert_share = expert_share
        super().__init__(
            f"load_in_8bit quantizes Linear layers only, and this model's experts ({expert_share:.0%} of its weights) "
            f"would stay 16-bit: fastmoe has no 8-bit experts yet. Use load_in_4bit=True (NF4 experts; "
            f"{nf4_expert_families()}) or 16-bit weights; to load 8-bit Linear layers with 16-bit experts anyway, pass "
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True) instead of load_in_8bit=True"
        )


class ExpertsRefusingBnb8BitHfQuantizer(Bnb8BitHfQuantizer):
    """bitsandbytes' 8-bit quantizer, refusing MoE models: it would quantize their Linear layers only."""

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        experts = expert_modules(model, family_of(model))
        if experts:
            expert_params = sum(p.numel() for m in experts for p in m.parameters())
            raise ExpertsIn8BitError(expert_params / sum(p.numel() for p in model.parameters()))
        return super()._process_model_before_weight_loading(model, device_map, **kwargs)


@contextlib.contextmanager
def fastmoe_bnb_quantizers(mxfp4_experts: bool = False) -> Iterator[None]:
    """Within this block, a BitsAndBytesConfig given to from_pretrained gets fastmoe's quantizers above (for a
    checkpoint whose experts are MXFP4 with `mxfp4_experts`, loaded with strip_mxfp4's config). transformers picks the
    quantizer class from this module-level table by quant_method and offers no other way to pass one."""
    table = auto_quantizers.AUTO_QUANTIZER_MAPPING
    saved = {key: table[key] for key in ("bitsandbytes_4bit", "bitsandbytes_8bit")}
    table["bitsandbytes_4bit"] = Mxfp4ExpertsNf4Quantizer if mxfp4_experts else Nf4ExpertsBnb4BitHfQuantizer
    table["bitsandbytes_8bit"] = ExpertsRefusingBnb8BitHfQuantizer
    try:
        yield
    finally:
        table.update(saved)
