"""The user-facing API: `FastModel.from_pretrained`, `FastModel.get_peft_model`, `for_inference`/`for_training`.

`FastModel` reads a checkpoint's config and hands over to the family the registry (`fastmoe.models`) describes for
its model_type. The public `Fast<Family>Model` classes (`FastAfmoeModel`, ...) are built here from those
descriptions (`family_model`): `FastBaseModel` with the family's description attached. Everything else is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import types
import warnings
from typing import Any

import torch

from fastmoe import generation, models
from fastmoe.distributed import QUANTIZED_FSDP_ERROR, default_device_map, exclude_nf4_from_ddp, fsdp_launch
from fastmoe.noise import peft_checkpointing_probe
from fastmoe.patching import FIXED, SWITCHABLE, Family, ForwardPatch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_dtype() -> torch.dtype:
    """bf16 on GPUs that have it, else fp16 on a GPU, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclasses.dataclass(frozen=True)
class _LoadRequest:
    """from_pretrained's arguments, checked once (`_load_request`) before anything is read."""

    model_name: str
    max_seq_length: int
    dtype: torch.dtype
    quantization: str | None  # "4bit", "8bit" or None
    full_finetuning: bool
    device_map: Any
    attn_implementation: str | None
    token: str | None
    fast_ops: dict[str, bool]
    kwargs: dict[str, Any]


def _load_request(model_name: Any, max_seq_length: Any, dtype: Any, load_in_4bit: bool, load_in_8bit: bool,
                  full_finetuning: bool, device_map: Any, attn_implementation: str | None, token: str | None,
                  fast_ops: Any, kwargs: dict[str, Any]) -> _LoadRequest:
    """Every check of from_pretrained's arguments that needs no checkpoint: one pass, before any file is read."""
    if not isinstance(model_name, (str, os.PathLike)):
        raise ValueError(f"model_name must be a local folder or a Hugging Face Hub id, got {model_name!r}")
    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive: pick one")
    quantization = "4bit" if load_in_4bit else "8bit" if load_in_8bit else None
    if full_finetuning and quantization:
        raise ValueError("full_finetuning trains every weight, which quantized weights cannot: drop load_in_4bit/8bit")
    if quantization and fsdp_launch():
        raise ValueError(QUANTIZED_FSDP_ERROR)
    if quantization:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ImportError("4-bit and 8-bit loading need bitsandbytes: pip install bitsandbytes") from error
    _check_device_map(device_map)
    if fast_ops is not None and not isinstance(fast_ops, dict):
        raise ValueError(f"fast_ops must be a dict of op name -> True/False (e.g. {{'rms_norm': False}}), got "
                         f"{fast_ops!r}")
    return _LoadRequest(str(model_name), max_seq_length, _resolve_dtype(dtype), quantization, full_finetuning,
                        device_map, attn_implementation, token, dict(fast_ops or {}), kwargs)


def _gpu_index(device: Any) -> int | None:
    """The accelerator index a device_map entry names (an int, "cuda", "cuda:1", a cuda torch.device), else None
    ("cpu", "disk", "meta", "auto", "balanced", ...)."""
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    if isinstance(device, str) and device.startswith("cuda"):
        try:
            device = torch.device(device)
        except RuntimeError:
            return None
    if isinstance(device, torch.device) and device.type == "cuda":
        return device.index or 0
    return None


def _check_device_map(device_map: Any) -> None:
    """A device_map naming a GPU this machine does not have fails here, in one line, instead of inside torch's CUDA
    initialisation (an AssertionError on a CPU build) after the checkpoint has started loading."""
    entries = device_map.values() if isinstance(device_map, dict) else [device_map]
    indices = [index for index in map(_gpu_index, entries) if index is not None]
    if not indices:
        return
    available = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    if available == 0:
        why = "no GPU is visible" if torch.version.cuda or torch.version.hip else "this torch build has no CUDA"
        raise ValueError(f"device_map={device_map!r} places the model on a GPU, but {why}: run on a machine with a "
                         "GPU, or leave device_map out (the model then loads on the CPU)")
    if max(indices) >= available:
        raise ValueError(f"device_map={device_map!r} names GPU {max(indices)}, but this machine has {available} "
                         f"(0 to {available - 1})")


def check_lora_size(r: Any, lora_alpha: Any, r_name: str = "LoRA rank r", alpha_name: str = "lora_alpha") -> None:
    """The one rule for a LoRA adapter's rank and alpha, shared by `get_peft_model` and `fastmoe train` (which
    passes its flags' names). Raises ValueError."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{r_name} must be a positive integer, got {r!r}")
    # alpha = 0 would train an adapter whose update is always scaled to zero.
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not (
            lora_alpha > 0 and math.isfinite(lora_alpha)):
        raise ValueError(f"{alpha_name} must be a positive number (LoRA scales its update by alpha / rank), "
                         f"got {lora_alpha!r}")


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    raise ValueError(
        f"dtype={dtype!r} is not supported: use torch.bfloat16, torch.float16, torch.float32 "
        "(or their names), or None to pick the best one for this machine"
    )


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local file or folder rather than a Hugging Face Hub id (`name` or `owner/name`): an
    absolute path, one starting with . or ~, more than one slash, a .json/.jsonl suffix, or anything that exists."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or name.endswith((".json", ".jsonl")) or os.path.exists(name))


def _is_adapter_folder(name: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(name), "adapter_config.json"))


def _load_config(model_name: str, token: str | None):
    from transformers import AutoConfig

    folder = os.path.expanduser(model_name)
    if looks_like_path(model_name) and not os.path.isdir(folder):
        raise FileNotFoundError(f"model path {model_name!r} does not exist (or is not a folder)")
    if os.path.isdir(folder):
        _check_checkpoint_folder(model_name, folder)
    try:
        return AutoConfig.from_pretrained(model_name, token=token)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load a model config from {model_name!r}: it is neither a local folder with a "
            f"config.json nor a reachable Hugging Face Hub id ({error.__class__.__name__}: {error})"
        ) from error


# What a saved tokenizer leaves in a folder: tokenizer_config.json (every save in transformers 5), a fast
# tokenizer's tokenizer.json, or the vocabulary of a slow one (sentencepiece, BPE, WordPiece, tiktoken).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json")


def _check_checkpoint_folder(model_name: str, folder: str) -> None:
    """A local model folder needs a config.json and tokenizer files; say which is missing before loading weights
    (transformers' own errors guess at other causes)."""
    files = set(os.listdir(folder))
    if "config.json" not in files and "adapter_config.json" in files:
        raise ValueError(f"{model_name!r} is a LoRA adapter folder, not a model: FastModel.from_pretrained loads it "
                         "together with its base model")
    if "config.json" not in files:
        raise FileNotFoundError(
            f"model folder {model_name!r} has no config.json, so it is not a transformers checkpoint: point at the "
            "folder that holds config.json, the weights (*.safetensors) and the tokenizer files")
    if not files & set(_TOKENIZER_FILES) and not any(name.endswith(".tiktoken") for name in files):
        raise FileNotFoundError(
            f"model folder {model_name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...): copy them "
            "in from the model it was made from (tokenizer.save_pretrained(folder) writes them)")


def _bnb_config(quantization: str, dtype: torch.dtype, skip_modules: list[str]):
    """What load_in_4bit / load_in_8bit ask of bitsandbytes (and, for 4 bits, of fastmoe's NF4 experts)."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip_modules,
    )


def _load_tokenizer(model_name: str, token: str | None, max_seq_length: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, token=token)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS (or UNK) as PAD is safe.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.model_max_length = max_seq_length
    return tokenizer


class FastBaseModel:
    """What every family shares. `family_model` makes one subclass per family (`FastAfmoeModel`, ...), with the
    family's description (`fastmoe.patching.Family`) as `family` and the attributes below read from it."""

    family: Family | None = None
    model_type: str = ""
    default_target_modules: tuple[str, ...] = ()
    default_target_parameters: tuple[str, ...] = ()
    # How transformers runs the family's routed experts (fastmoe.patching.SWITCHABLE or FIXED), None for a dense family.
    routed_experts: str | None = None

    @classmethod
    def patches(cls) -> list[ForwardPatch]:
        """The forwards the family swaps, every op on (the ops shared by every family not included)."""
        return cls._family().patches()

    @classmethod
    def pre_patch(cls, **ops: bool) -> None:
        """`fastmoe.patch(model_type, **ops)`: swap transformers' forwards for fastmoe's, every op on unless switched
        off (idempotent), and make "fastmoe" an experts_implementation."""
        models.patch(cls._family().model_type, **ops)

    @classmethod
    def unpatch(cls) -> None:
        models.unpatch(cls._family().model_type)

    @classmethod
    def _family(cls) -> Family:
        if cls.family is None:
            raise TypeError(f"{cls.__name__} is not a family's class: use fastmoe.patch(model_type) or a "
                            "Fast<Family>Model")
        return cls.family

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map: Any = None,
        attn_implementation: str | None = None,
        token: str | None = None,
        fast_ops: dict[str, bool] | None = None,
        **kwargs: Any,
    ):
        """Load a causal LM and its tokenizer with this family's forwards patched. Returns (model, tokenizer).

        fast_ops: op name -> False to keep transformers' own forward for that op (e.g. {"rms_norm": False}), to
        bisect a numerical difference; every op not named is fastmoe's. `fastmoe.models.op_names(model_type)` lists a
        family's ops. Patches are per class: they apply to every model of the family in the process."""
        family = cls._family()
        request = _load_request(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, full_finetuning,
                                device_map, attn_implementation, token, fast_ops, kwargs)
        config = _load_config(request.model_name, token)
        if config.model_type != family.model_type:
            raise ValueError(
                f"{cls.__name__} loads model_type {family.model_type!r}, but {model_name!r} is {config.model_type!r}; "
                "use FastModel.from_pretrained to dispatch on the checkpoint's own type"
            )
        return _load_family(family, request, config)

    @classmethod
    def get_peft_model(
        cls,
        model,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        target_parameters: list[str] | None = None,
        bias: str = "none",
        use_rslora: bool = False,
        use_gradient_checkpointing: bool | str = True,
        cuda_graphs: bool | None = None,
        random_state: int = 3407,
        **lora_kwargs: Any,
    ):
        """Wrap `model` in a peft LoRA adapter (a `peft.PeftModel`), experts included via `target_parameters`.

        target_modules: None or "all-linear" (the default) adapts attention (an attention output gate included), dense
        and shared-expert MLPs and every routed expert, never a router: the family's default targets, modules and
        parameters (`Family.lora_target_modules`, `lora_target_parameters`), with any target_parameters of yours added
        to "all-linear"'s. A list names modules (then only target_parameters of yours adapt experts). For a model type
        fastmoe has no fast path for, the default is peft's "all-linear": every Linear layer but the output head.

        use_gradient_checkpointing: True (the default) is transformers' checkpointing, each decoder layer recomputed
        in the backward pass, its input kept on the GPU; "fastmoe" keeps those inputs in host memory meanwhile
        (`fastmoe.offloaded_checkpointing`, and with CUDA graphs `graphed_checkpointing.HostInputs`: less GPU
        memory, see README); False keeps every activation.

        cuda_graphs: with checkpointing on a CUDA GPU, each decoder layer's forward and its recompute + backward
        replay CUDA graphs captured on the second step of each input shape (`fastmoe.graphed_checkpointing`): the
        same kernels on the same data, launched without the host in the way. False runs them eagerly. None (the
        default) is the family's choice (`Family.graphed_layers`): graphs for MoE families, eager layers for dense
        Cohere, whose GPU is busy without them; graphs for a model type fastmoe has no fast path for."""
        from peft import LoraConfig, PeftModel, get_peft_model

        from fastmoe.checkpointing import set_checkpointing_mode
        from fastmoe.saving import save_pretrained_merged

        if isinstance(model, PeftModel):
            raise ValueError("model already has LoRA adapters; call get_peft_model on the base model once")
        if getattr(model, "_fastmoe_full_finetuning", False):
            raise ValueError("the model was loaded with full_finetuning=True: train it directly, without LoRA")
        check_lora_size(r, lora_alpha)
        if use_gradient_checkpointing not in (True, False, "fastmoe"):
            raise ValueError(
                f'use_gradient_checkpointing must be "fastmoe", True or False, got {use_gradient_checkpointing!r}')
        family = models.family(model.config.model_type)
        if cuda_graphs is None:
            cuda_graphs = family is None or family.graphed_layers
        target_modules, target_parameters = _resolve_targets(family, target_modules, target_parameters, model)
        _check_targets(model, target_modules, target_parameters)

        torch.manual_seed(random_state)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            target_parameters=target_parameters or None,
            bias=bias,
            use_rslora=use_rslora,
            task_type="CAUSAL_LM",
            **lora_kwargs,
        )
        if model.supports_gradient_checkpointing:
            # Also what a Trainer installs when its arguments turn checkpointing on (fastmoe.checkpointing).
            offload = use_gradient_checkpointing == "fastmoe"
            set_checkpointing_mode(model, ("graphs-offload" if offload else "graphs") if cuda_graphs
                                   else "offload" if offload else "standard")
        if use_gradient_checkpointing and not model.supports_gradient_checkpointing:
            warnings.warn(
                f"{type(model).__name__} does not support gradient checkpointing in transformers; training without it",
                stacklevel=2,
            )
        elif use_gradient_checkpointing:
            _enable_activation_checkpointing(model, {"use_reentrant": False})
            model.enable_input_require_grads()
        requested_parameters = set(target_parameters or ())
        with peft_checkpointing_probe():
            peft_model = get_peft_model(model, config)
        rewrite = _peft_rewrite(model.config.model_type, target_modules, requested_parameters,
                                peft_model.peft_config["default"])
        if rewrite:
            warnings.warn(rewrite, stacklevel=2)
        peft_model.save_pretrained_merged = types.MethodType(save_pretrained_merged, peft_model)
        exclude_nf4_from_ddp(peft_model)
        # A model made for training builds no KV cache in its forwards, with or without checkpointing (which turns it
        # off too): a cache would be discarded, and it keeps the masks from the flash paths (flash_causal_layout).
        # `generate` asks for its cache itself, and for_inference turns the config's back on.
        _base_config(peft_model).use_cache = False
        return peft_model

    @staticmethod
    def for_inference(model, use_cuda_graphs: bool = True):
        """Eval mode with the KV cache on, and `generate` on fastmoe's decode path (fastmoe.generation): after the
        prompt, a static cache and, on CUDA, each decode step replayed from a CUDA graph. Adapters stay attached
        and unmerged, so training can resume after `for_training`."""
        model.eval()
        _base_config(model).use_cache = True
        generation.install(_base_model(model), use_cuda_graphs=use_cuda_graphs)
        return model

    @staticmethod
    def for_training(model, keep_decode_graphs: bool = True):
        """Train mode; the cache is off since gradient checkpointing recomputes the forward. The decode path steps
        aside: with keep_decode_graphs its buffers, CUDA graphs and bf16 casts of the adapters stay for the next
        `for_inference` (an RL loop such as GRPO captures each batch size and cache length once; they hold the KV
        buffers of the shapes generated so far and a 16-bit copy of every LoRA factor); without, they are freed."""
        model.train()
        _base_config(model).use_cache = False
        generation.uninstall(_base_model(model), keep=keep_decode_graphs)
        return model


def _enable_activation_checkpointing(model, checkpoint_kwargs: dict) -> None:
    """transformers' per-layer checkpointing under its current name: `activation_checkpointing_enable` from 5.23 on,
    where `gradient_checkpointing_enable` warns that it is deprecated; the old name before, the only one there."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def _experts_implementation_kwargs(family: Family, kwargs: dict, load_in_4bit: bool) -> dict:
    """from_pretrained's kwargs with the experts implementation settled: fastmoe's unless the caller chose another,
    which is honoured where transformers has the switch (and said once), refused where it has none."""
    from fastmoe.models.shared import EXPERTS_IMPLEMENTATION

    choice = kwargs.get("experts_implementation")
    if family.routed_experts is None or choice == EXPERTS_IMPLEMENTATION:
        return kwargs
    if choice is None:
        switchable = family.routed_experts == SWITCHABLE
        return {**kwargs, "experts_implementation": EXPERTS_IMPLEMENTATION} if switchable else kwargs
    if family.routed_experts == FIXED:
        raise ValueError(
            f"experts_implementation={choice!r}: transformers runs {family.model_type}'s experts in its own MoE "
            "forward, "
            "without that switch, and fastmoe replaces the forward whole; drop experts_implementation (or call "
            f"fastmoe.unpatch({family.model_type!r}) to run transformers' own)"
        )
    if load_in_4bit:
        raise ValueError(
            f"experts_implementation={choice!r} cannot run 4-bit experts: load_in_4bit stores them in fastmoe's NF4 "
            "format, which only fastmoe's experts kernel reads; drop experts_implementation or load_in_4bit"
        )
    warnings.warn(
        f"experts_implementation={choice!r}: this model's routed experts run transformers' {choice} forward instead of "
        f"fastmoe's kernel (its other forwards stay fastmoe's); model.set_experts_implementation("
        f"{EXPERTS_IMPLEMENTATION!r}) switches to fastmoe's",
        stacklevel=3,
    )
    return kwargs


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_config(model):
    return _base_model(model).config


ALL_LINEAR = "all-linear"


def _resolve_targets(family: Family | None, target_modules, target_parameters,
                     model: torch.nn.Module) -> tuple[list[str] | str, list[str] | None]:
    """What get_peft_model's targets mean for `family` (None for a model type fastmoe does not patch), as peft should
    be handed them.

    peft's own "all-linear" takes every Linear layer but the head: on an MoE that adapts the routers and misses the
    experts (3D parameters), and on families peft converts from transformers v4 (AFMoE) it turns the MLP names into
    expert parameters, leaving the dense and shared MLPs and the attention gate without LoRA. The family's defaults
    are the linear layers and experts, routers excluded, named so that they survive that conversion. A default that
    this model lacks is dropped (Qwen3-30B-A3B has no dense MLP layers, which the family's defaults name for the
    Qwen3-MoE models that do); targets the caller names must all match (_check_targets)."""
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if isinstance(target_modules, str) and not all_linear:
        return [target_modules], target_parameters  # one module's name, not a regex
    if family is None:
        return (ALL_LINEAR if target_modules is None else target_modules), target_parameters
    module_names = [name for name, _ in model.named_modules()]
    param_names = [name for name, _ in model.named_parameters()]
    default_modules = [t for t in family.lora_target_modules if _matches(t, module_names)]
    defaults = [t for t in family.lora_target_parameters if _matches(t, param_names)]
    if target_modules is None:
        return default_modules, defaults if target_parameters is None else target_parameters
    if all_linear:
        return default_modules, defaults + [p for p in target_parameters or () if p not in defaults]
    return target_modules, target_parameters


def _matches(target: str, names: list[str]) -> bool:
    """Whether a LoRA target (a module or parameter name suffix) names something in `names`, as peft matches it."""
    return any(name == target or name.endswith("." + target) for name in names)


def _peft_rewrite(model_type: str, target_modules, requested_parameters: set[str], peft_config) -> str | None:
    """The warning to give when peft's transformers v4->v5 MoE conversion rewrote the targets it was handed (it edits
    the adapter's config in place: module names become expert parameters, with rank and alpha patterns), else None."""
    added = sorted(set(peft_config.target_parameters or ()) - requested_parameters)
    if not added:
        return None
    if not isinstance(target_modules, list):
        return (f"peft rewrote target_modules={target_modules!r} on this {model_type} model into expert "
                f"target_parameters {added} (its transformers v4->v5 MoE conversion; a router's gate.weight among them "
                "gets LoRA too); name target_modules and target_parameters yourself to choose")
    moved = sorted(set(target_modules) - set(peft_config.target_modules or ()))
    names = ", ".join(repr(m + ".weight") for m in moved)
    advice = f"; to adapt them, pass target_parameters=[{names}]" if moved else ""
    return (f"peft rewrote target_modules {moved} of this {model_type} model into expert target_parameters {added} "
            f"(its transformers v4->v5 MoE conversion), so Linear layers of those names get no LoRA{advice}")


def _check_targets(model, target_modules, target_parameters) -> None:
    """peft ignores a target name that matches nothing as long as another matches; we refuse it instead."""
    module_names = [name for name, _ in model.named_modules()]
    if isinstance(target_modules, list):
        for target in target_modules:
            if not _matches(target, module_names):
                raise ValueError(
                    f"target module {target!r} matches no module of this {model.config.model_type} model; "
                    f"its linear layers are named like: {_linear_suffixes(model)}"
                )
    param_names = [name for name, _ in model.named_parameters()]
    for target in target_parameters or []:
        if not _matches(target, param_names):
            raise ValueError(f"target parameter {target!r} matches no parameter of this model")


def _linear_suffixes(model) -> list[str]:
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _load_family(family: Family, request: _LoadRequest, config):
    """Patch `family` (request.fast_ops) and load the checkpoint with its forwards."""
    fast_ops = models.check_ops(family.model_type, request.fast_ops)
    kwargs = _experts_implementation_kwargs(family, request.kwargs, request.quantization == "4bit")
    models.patch(family.model_type, **fast_ops)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and request.max_seq_length > max_positions:
        warnings.warn(
            f"max_seq_length={request.max_seq_length} exceeds the model's max_position_embeddings={max_positions}; "
            "positions beyond it were never trained",
            stacklevel=3,
        )
    return _load(dataclasses.replace(request, kwargs=kwargs), config, family)


def _quant_method(config) -> str | None:
    """The quant_method of a checkpoint's own quantization_config (a dict in config.json, or a config object)."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization,
                                                                                             "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def _load(request: _LoadRequest, config, family: Family | None):
    """Load the model (and tokenizer).

    With no device_map, `fastmoe.distributed.default_device_map` decides: the current GPU when there is one (each
    process its own under torchrun), so transformers reads each tensor from the memory-mapped safetensors files
    straight onto it and host memory never holds the 16-bit model; the CPU without a GPU, or for accelerate's FSDP2.

    With load_in_4bit, bitsandbytes quantizes the Linear layers and fastmoe the 3D expert weights (NF4), each as it is
    read from the checkpoint (`fastmoe.quantized_loading`): transformers reads one parameter at a time onto the target
    device (the current CUDA device with a GPU, else the CPU), and an expert stack is quantized and its 16-bit copy
    dropped before the next is read. Peak host and device memory while loading therefore stay near the 4-bit model's
    size plus the 16-bit tensors of one expert parameter: for a fused gate_up_proj, transformers briefly holds its
    per-expert slices, the gate and up stacks and their concatenation (about twice that parameter's 16-bit size).
    The safetensors files themselves are memory-mapped, not read whole. Experts that did not come through that path
    (a checkpoint missing them, or one whose config already names a quantization) are quantized right after loading.

    With load_in_8bit, a model with MoE experts is refused before any weight is read: bitsandbytes would quantize its
    Linear layers only, leaving nearly all of its weights 16-bit. Dense models load with 8-bit Linear layers.
    Routers (the family's `routers`) and lm_head stay 16-bit either way.
    """
    from transformers import AutoModelForCausalLM

    from fastmoe.quantize import quantize_experts_
    from fastmoe.quantized_loading import fastmoe_bnb_quantizers, strip_mxfp4

    if _is_adapter_folder(request.model_name):
        raise ValueError(f"{request.model_name!r} is a LoRA adapter folder; load its base model and then the adapter")
    load_kwargs = dict(dtype=request.dtype, token=request.token, **request.kwargs)
    quantization_config = None
    mxfp4_experts = _quant_method(config) == "mxfp4"
    if request.quantization is not None and mxfp4_experts:
        # Its MXFP4 experts are dequantized and quantized to NF4 one stack at a time (quantized_loading); 8 bits are
        # refused for MoE models before any weight is read.
        config = strip_mxfp4(config)
    if request.quantization is not None:
        # Routers stay 16-bit: (experts, hidden) is tiny, and top-k choices flip on 4/8-bit rounding of the logits.
        # Naming any skip replaces transformers' default list, so lm_head is named again.
        skip = ["lm_head", *(family.routers if family is not None else ())]
        quantization_config = load_kwargs["quantization_config"] = _bnb_config(request.quantization, request.dtype,
                                                                               skip)
    dequantized_mxfp4 = "quantization_config" not in load_kwargs and mxfp4_experts
    if dequantized_mxfp4:
        # MXFP4 checkpoints (gpt-oss): transformers' MXFP4 experts cannot train (and fastmoe's kernels do not read
        # them), so their experts are dequantized to the model's dtype as they load.
        from transformers import Mxfp4Config

        load_kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    device_map = request.device_map
    if device_map is None:
        device_map = default_device_map(quantized=request.quantization is not None)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if request.attn_implementation is not None:
        load_kwargs["attn_implementation"] = request.attn_implementation
    with fastmoe_bnb_quantizers(mxfp4_experts) if request.quantization is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(request.model_name, config=config, **load_kwargs)
    if dequantized_mxfp4:
        _experts_in_model_dtype(model)
    if request.quantization == "4bit":
        quantize_experts_(model, double_quant=quantization_config.bnb_4bit_use_double_quant)
        exclude_nf4_from_ddp(model)
    if request.quantization is not None and not torch.cuda.is_available():
        # Only once the model has loaded: a load that is refused should say why, and nothing else.
        warnings.warn("bitsandbytes quantization without a CUDA GPU runs on its slow CPU backend", stacklevel=4)
    model.max_seq_length = request.max_seq_length
    model._fastmoe_full_finetuning = request.full_finetuning
    if not request.full_finetuning:
        # LoRA trains adapters only; freeze the base now so a plain trainer on the returned model cannot
        # silently update billions of weights.
        model.requires_grad_(False)
    tokenizer = _load_tokenizer(request.model_name, request.token, request.max_seq_length)
    return model, tokenizer


def _experts_in_model_dtype(model) -> None:
    """Expert stacks in the model's dtype: transformers 5.17 dequantizes MXFP4 experts to bf16 whatever the dtype asked
    for (5.23 to the parameter's). Exact: MXFP4 values (a 4-bit code times a power of two) are exact in bf16."""
    from fastmoe.quantize import expert_modules, expert_stack_names, family_of

    family = family_of(model)
    for module in expert_modules(model, family):
        for name in expert_stack_names(module, family):
            stack = getattr(module, name)
            if stack.is_floating_point() and stack.dtype != model.dtype:
                setattr(module, name, torch.nn.Parameter(stack.detach().to(model.dtype),
                                                         requires_grad=stack.requires_grad))


class FastModel(FastBaseModel):
    """Dispatches on the checkpoint's `config.model_type` to its family (`fastmoe.models`)."""

    @classmethod
    def from_pretrained(cls, model_name: str, max_seq_length: int = 2048, dtype: Any = None,
                        load_in_4bit: bool = False, load_in_8bit: bool = False, full_finetuning: bool = False,
                        device_map: Any = None, attn_implementation: str | None = None, token: str | None = None,
                        fast_ops: dict[str, bool] | None = None, **kwargs: Any):
        """Load a causal LM and its tokenizer, with the forwards of its family patched (see
        FastBaseModel.from_pretrained, fast_ops included), or a LoRA adapter folder: its base model, then the
        adapter, trainable. Returns (model, tokenizer)."""
        request = _load_request(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, full_finetuning,
                                device_map, attn_implementation, token, fast_ops, kwargs)
        if _is_adapter_folder(request.model_name):
            return _from_adapter_folder(request)
        return _load_any(request)


def _load_any(request: _LoadRequest):
    """Load request.model_name with its family's forwards, or as plain transformers for a model type without any."""
    config = _load_config(request.model_name, request.token)
    family = models.family(config.model_type)
    if family is not None:
        return _load_family(family, request, config)
    if request.fast_ops:
        raise ValueError(f"fast_ops: fastmoe has no fast path for model_type {config.model_type!r}, so it has no ops "
                         "to switch; drop fast_ops")
    warnings.warn(
        f"fastmoe has no fast path for model_type {config.model_type!r} (supported: "
        f"{', '.join(sorted(models.FAMILIES))}); loading it as plain transformers",
        stacklevel=3,
    )
    return _load(request, config, None)


def _from_adapter_folder(request: _LoadRequest):
    """An adapter folder loads its base model (adapter_config.json's base_model_name_or_path), then the adapter,
    trainable."""
    from peft import PeftModel

    from fastmoe.saving import save_pretrained_merged

    adapter_dir = request.model_name
    with open(os.path.join(os.path.expanduser(adapter_dir), "adapter_config.json")) as handle:
        base_name = json.load(handle).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    model, tokenizer = _load_any(dataclasses.replace(request, model_name=base_name, full_finetuning=False))
    with peft_checkpointing_probe():
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    peft_model.save_pretrained_merged = types.MethodType(save_pretrained_merged, peft_model)
    exclude_nf4_from_ddp(peft_model)
    return peft_model, tokenizer


@functools.cache
def _family_model(model_type: str) -> type[FastBaseModel]:
    family = models.family(model_type)
    return type(family.class_name, (FastBaseModel,), {
        "__doc__": f"FastBaseModel for {model_type} checkpoints, with fastmoe's {model_type} forwards.",
        "__module__": "fastmoe",
        "family": family,
        "model_type": family.model_type,
        "default_target_modules": family.lora_target_modules,
        "default_target_parameters": family.lora_target_parameters,
        "routed_experts": family.routed_experts,
    })


def family_model(model_type: str) -> type[FastBaseModel] | None:
    """The public class of `model_type`'s family (`FastAfmoeModel`, ...; one class per family, made on first use),
    or None for a model type fastmoe has no fast path for."""
    return _family_model(model_type) if model_type in models.FAMILIES else None
