"""Running under torchrun or `accelerate launch`: which GPU a process loads onto, what DDP and FSDP2 need from
fastmoe's models, and the FSDP2 settings `fastmoe train --fsdp` hands to the trainer.

fastmoe has no distributed engine of its own: transformers' Trainer (through accelerate) wraps the model in PyTorch
DDP or FSDP2. FSDP2 all-gathers a decoder layer's weights before that layer's forward (and again before its
backward), so fastmoe's forwards, which read weights such as `experts.gate_up_proj` and peft's LoRA factors directly,
see whole local tensors, exactly as on one GPU.
"""

from __future__ import annotations

import os

import torch


def fsdp2_config() -> dict:
    """What configs/accelerate_fsdp2.yaml says, as TrainingArguments(fsdp=True, fsdp_config=...) takes it (a fresh
    dict each call: TrainingArguments edits the one it is given)."""
    return {
        "version": 2,
        # One FSDP unit per decoder layer: with no class named, accelerate reads the model's _no_split_modules,
        # which names the decoder layer of every transformers family.
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        # peft's save_pretrained turns a full state dict (gathered on rank 0) into a plain adapter; a sharded one
        # would leave no adapter_model.safetensors behind.
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        # fastmoe turns gradient checkpointing on itself (get_peft_model); FSDP's own would wrap the layers twice.
        "activation_checkpointing": False,
    }


QUANTIZED_FSDP_ERROR = (
    "load_in_4bit/load_in_8bit cannot be combined with FSDP: fastmoe trains quantized models with DDP only. Its NF4 "
    "experts are buffers FSDP does not shard, behind placeholders FSDP would materialise at 16-bit size on every GPU. "
    "Train a quantized model with DDP (each GPU holds the whole quantized model: configs/accelerate_ddp.yaml, or "
    "torchrun without --fsdp), or shard 16-bit weights with FSDP2"
)


def local_rank() -> int | None:
    """This process's GPU index on its machine under torchrun or `accelerate launch` (LOCAL_RANK, with WORLD_SIZE
    above 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"])


def fsdp_launch() -> bool:
    """Whether `accelerate launch` was given an FSDP config: it tells every process through this variable."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def default_device_map(quantized: bool) -> dict[str, int] | None:
    """Where a model's weights go when the caller names no device_map.

    With a GPU, onto it: transformers then reads each tensor from the memory-mapped safetensors files straight onto
    the GPU, so host memory holds a few tensors in flight, never the model (a 16 GB model loads on a 12 GB Colab
    runtime), and the model is ready to generate. One process loads onto the current GPU; under torchrun /
    `accelerate launch` every process loads its own copy onto its own GPU (LOCAL_RANK), as DDP expects, and that GPU
    also becomes the current device, because Triton launches kernels on the current device whatever device their
    tensors are on. Under an accelerate FSDP launch, 16-bit weights stay on the CPU: accelerate's FSDP2 shards them and
    moves each GPU's shard only (loading onto the GPUs first would put a whole copy on every one). Without a GPU,
    None: transformers loads on the CPU.
    """
    if not torch.cuda.is_available():
        return None
    rank = local_rank()
    if rank is not None:
        torch.cuda.set_device(rank)
    # (Quantized weights under FSDP never get here: FastModel.from_pretrained refuses them.)
    if fsdp_launch() and not quantized:
        return None
    return {"": torch.cuda.current_device() if rank is None else rank}


def exclude_nf4_from_ddp(model: torch.nn.Module) -> None:
    """Tell DDP to leave the NF4 placeholders and buffers of `model` (fastmoe.quantize) alone.

    DistributedDataParallel broadcasts rank 0's parameters and buffers when it is built, and its buffers before every
    forward: writing into a zero-stride placeholder fails, and the NF4 codes are equal on every rank anyway (each
    quantized the same checkpoint). DDP skips the names in `_ddp_params_and_buffers_to_ignore` of the module it
    wraps, relative to that module, so they are listed on the model the trainer will wrap: the base model after
    loading, and the PeftModel after `get_peft_model` (whose names carry peft's prefixes).
    """
    from fastmoe.quantize import is_quantized

    names = []
    for module_name, module in model.named_modules():
        if is_quantized(module):
            prefix = f"{module_name}." if module_name else ""
            for name in module._fastmoe_nf4:
                # The codes, absmax and, when double-quantized, absmax's scale and offset.
                buffers = [b for b, _ in module.named_buffers(recurse=False) if b.startswith(f"{name}_nf4_")]
                names += [prefix + name, *(prefix + b for b in buffers)]
    if names:
        model._ddp_params_and_buffers_to_ignore = names
