"""`fastmoe train`'s options: one field per command-line flag, and every check of their values that needs no model or
data (`TrainOptions.validate`), so that a bad value fails before anything slow happens."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmoe.api import check_lora_size, looks_like_path

# LoRA on a pretrained model wants a small step; the built-in model has random weights and 60 steps to show it learns.
DEFAULT_LR = 2e-4
BUILTIN_LR = 1e-2
# --gradient-checkpointing's choices, as FastModel.get_peft_model's use_gradient_checkpointing.
CHECKPOINTING_MODES: dict[str, bool | str] = {"standard": True, "fastmoe": "fastmoe", "off": False}


def _check_optimizer(name: str) -> None:
    """An optimizer transformers knows, and the package it needs: bitsandbytes for the 8-bit ones."""
    from transformers.training_args import OptimizerNames

    known = [option.value for option in OptimizerNames]
    if name not in known:
        raise ValueError(f"--optim {name!r} is not an optimizer transformers knows; e.g. adamw_torch_fused, "
                         f"adamw_torch, adamw_8bit, paged_adamw_8bit (all: {', '.join(known)})")
    if "8bit" in name and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"--optim {name} needs the bitsandbytes package: pip install bitsandbytes")


@dataclass
class TrainOptions:
    """Everything one `fastmoe train` run needs; the CLI's flags map one to one onto these fields."""

    output_dir: str
    model: str | None = None
    dataset: str | None = None
    max_steps: int = 60
    max_seq_length: int = 1024
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # None: BUILTIN_LR for the built-in model, DEFAULT_LR for any other.
    lr: float | None = None
    lora_r: int = 16
    lora_alpha: int = 16
    # Comma-separated names of the modules to put LoRA on, or "all-linear"; None: the family's defaults (the same as
    # all-linear: attention, MLPs and every expert), or peft's all-linear for a model type fastmoe has no fast path for.
    target_modules: str | None = None
    seed: int = 3407
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # "standard" (transformers' own: each layer recomputed, its input kept on the GPU), "fastmoe" (the input waits in
    # host memory) or "off". None: "standard" with CUDA, "off" on the CPU (where it only costs time).
    gradient_checkpointing: str | None = None
    # Pack several short examples into each max_seq_length row (trl's packing, documents kept apart by position ids).
    packing: bool = False
    # Hold out this fraction of the data and report its loss (eval_loss) five times over the run; 0 = no evaluation.
    eval_fraction: float = 0.0
    # Write a resumable checkpoint (adapter, optimizer, scheduler, RNG) every this many steps; 0 = none.
    save_steps: int = 0
    # A checkpoint folder to resume from, or "latest" for the newest checkpoint-* in output_dir.
    resume_from_checkpoint: str | None = None
    report_to: str = "none"
    # Shard 16-bit weights, gradients and optimizer state across the GPUs with FSDP2 (fastmoe.distributed.fsdp2_config)
    # instead of giving every GPU a whole copy (DDP).
    fsdp: bool = False
    # transformers' optimizer name (TrainingArguments.optim); None: the Trainer's default (adamw_torch_fused on a GPU).
    # adamw_8bit / paged_adamw_8bit (bitsandbytes) keep AdamW's two states in 8 bits: QLoRA runs use them to fit the
    # adapters' optimizer state in a quarter of the memory.
    optim: str | None = None

    def lora_target_modules(self) -> list[str] | str | None:
        """target_modules as FastModel.get_peft_model takes it."""
        if self.target_modules is None or self.target_modules.strip().lower() == "all-linear":
            return None if self.target_modules is None else "all-linear"
        names = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        if not names:
            raise ValueError(f"--target-modules {self.target_modules!r} names no module: give comma-separated module "
                             "names (e.g. q_proj,v_proj) or all-linear")
        return names

    def validate(self) -> None:
        """Refuse bad values before anything slow happens."""
        positive = dict(max_steps=self.max_steps, max_seq_length=self.max_seq_length, batch_size=self.batch_size,
                        gradient_accumulation_steps=self.gradient_accumulation_steps)
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        check_lora_size(self.lora_r, self.lora_alpha, r_name="--lora-r", alpha_name="--lora-alpha")
        self.lora_target_modules()
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit are exclusive: pick one")
        if self.model is not None and looks_like_path(self.model) and not Path(self.model).expanduser().is_dir():
            raise FileNotFoundError(f"model path {self.model!r} does not exist (or is not a folder)")
        if self.dataset is not None and looks_like_path(self.dataset) and not Path(self.dataset).expanduser().exists():
            raise FileNotFoundError(f"dataset file {self.dataset!r} does not exist")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.save_steps < 0:
            raise ValueError(f"--save-steps must be 0 (no checkpoints) or positive, got {self.save_steps}")
        if self.gradient_checkpointing not in (None, *CHECKPOINTING_MODES):
            raise ValueError(f"--gradient-checkpointing must be one of {', '.join(CHECKPOINTING_MODES)}, "
                             f"got {self.gradient_checkpointing!r}")
        if self.optim is not None:
            _check_optimizer(self.optim)
        if self.report_to not in ("none", "tensorboard"):
            raise ValueError(f"--report-to must be none or tensorboard, got {self.report_to!r}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ImportError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        resume = self.resume_from_checkpoint
        if resume is not None and resume != "latest" and not Path(resume).expanduser().is_dir():
            raise FileNotFoundError(f"checkpoint {resume!r} to resume from does not exist")
        output = Path(self.output_dir).expanduser()
        if resume == "latest" and not any(output.glob("checkpoint-*")):
            raise FileNotFoundError(f"--resume-from-checkpoint latest: no checkpoint-* folder in {self.output_dir!r}")
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output-dir {self.output_dir!r} exists and is not a folder")
        if self.fsdp:
            self._validate_fsdp()

    def _validate_fsdp(self) -> None:
        from fastmoe.distributed import QUANTIZED_FSDP_ERROR, local_rank

        if self.load_in_4bit or self.load_in_8bit:
            raise ValueError(f"--fsdp: {QUANTIZED_FSDP_ERROR}")
        if local_rank() is None:
            raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc-per-node N "
                             "(or accelerate launch --config_file configs/accelerate_fsdp2.yaml, without --fsdp)")
        if not torch.cuda.is_available():
            # accelerate would quietly train with DDP instead: it runs FSDP on GPUs only.
            raise ValueError("--fsdp needs CUDA GPUs: accelerate runs FSDP on GPUs only")
