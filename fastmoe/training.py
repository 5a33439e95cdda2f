"""What `fastmoe train` does, without the argument parsing: load a model with `FastModel`, add LoRA adapters
(experts included), turn a data set into one of the formats trl's `SFTTrainer` knows, train, and save the
adapter, the tokenizer and the trainer state (every step's loss) to one folder.

With no model, a small AFMoE model with random weights is built once into a cache folder; with no data set, the
instruction data shipped in the package is used. Both together make a run that learns visibly on a CPU in well
under a minute, which is what the CLI's defaults are tuned for.

Under torchrun or `accelerate launch` every process runs all of this; the trainer (accelerate underneath) wraps the
model in DDP, or FSDP2 with `fsdp=True` or an accelerate FSDP config, and shards each global batch across the
processes. Only the main process writes the adapter and the trainer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import hashlib
import json
import os
import re
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmoe.api import check_lora_size

# The tiny test config is a little narrow to fit the built-in data visibly within a minute of CPU time; this one
# keeps the architecture (every AFMoE feature exercised) and widens it. The larger init matters most: LoRA leaves
# the embeddings and the LM head frozen, and at transformers' 0.02 the head's logits span about +-1, so no adapter
# could make any token much likelier than the rest.
BUILTIN_OVERRIDES: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=2048, initializer_range=0.1,
)
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
        if self.model is not None and _looks_like_path(self.model) and not Path(self.model).expanduser().is_dir():
            raise FileNotFoundError(f"model path {self.model!r} does not exist (or is not a folder)")
        if self.dataset is not None and _looks_like_path(self.dataset) and not Path(self.dataset).expanduser().exists():
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


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    tokens: int
    peak_memory_bytes: int
    memory_kind: str  # "CUDA" (max_memory_allocated) or "RSS" (the process's peak resident set)
    first_loss: float
    final_loss: float
    output_dir: Path
    # Training processes (GPUs) together: `tokens` counts all of theirs, the peak memory is this process's own.
    processes: int = 1

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        throughput = f"{rate:,.0f} tokens/s"
        if self.processes > 1:
            throughput += f" over {self.processes} processes ({rate / self.processes:,.0f} per process)"
        return (f"fastmoe train: {self.steps} steps in {self.seconds:.1f}s, {throughput}, "
                f"peak memory {self.peak_memory_bytes / 2**20:,.0f} MiB ({self.memory_kind}), "
                f"loss {self.first_loss:.4f} -> {self.final_loss:.4f}; adapter saved to {self.output_dir}")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything with a file suffix, a leading ./ ~ / or more slashes is a path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or name.endswith((".json", ".jsonl")) or os.path.exists(name))


def cache_dir() -> Path:
    """Where the built-in model lives: $FASTMOE_CACHE, else ~/.cache/fastmoe (or $XDG_CACHE_HOME/fastmoe)."""
    if os.environ.get("FASTMOE_CACHE"):
        return Path(os.environ["FASTMOE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmoe"


def builtin_model_path() -> Path:
    """The built-in AFMoE checkpoint (random weights, tokenizer trained on the built-in data), built on first use.

    It is kept in a cache rather than a temporary folder because the saved adapter names it as its base model:
    `PeftModel.from_pretrained` and `FastModel.from_pretrained(output_dir)` find it there later.
    """
    from fastmoe.builtin import build_tiny_checkpoint, build_tokenizer

    # Named after its recipe, so changing BUILTIN_OVERRIDES never reuses a stale cached checkpoint.
    recipe = hashlib.sha256(json.dumps(BUILTIN_OVERRIDES, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"builtin-afmoe-{recipe}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: two runs starting at once must never see a half-written checkpoint.
    staging = target.parent / f".{target.name}.{os.getpid()}"
    build_tiny_checkpoint("afmoe", staging, seed=0, tokenizer=build_tokenizer(), **BUILTIN_OVERRIDES)
    try:
        staging.rename(target)
    except OSError:
        # Another run finished first; its checkpoint is the same.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_records(dataset: str | None):
    """The data set as a `datasets.Dataset`: the built-in records, a local .json/.jsonl file or a hub data set."""
    from datasets import Dataset

    if dataset is None:
        from fastmoe.builtin import builtin_records

        return Dataset.from_list(builtin_records())
    path = Path(dataset).expanduser()
    if path.is_file():
        return Dataset.from_list(_read_json_records(path))
    if path.is_dir() or not _looks_like_path(dataset):
        return _load_hub_dataset(dataset)
    raise FileNotFoundError(f"dataset file {dataset!r} does not exist")


def _read_json_records(path: Path) -> list[dict]:
    """A .jsonl file (one object per line) or a .json file holding a list of objects. Errors name the file's line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        records = []
        # Split on newlines only: str.splitlines() also splits at U+2028 and U+0085, which JSON strings may hold.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"dataset file {str(path)!r}, line {number}: not valid JSON ({error.msg}, "
                                 f"column {error.colno}); a .jsonl file holds one JSON object per line") from error
            if not isinstance(record, dict):
                raise ValueError(f"dataset file {str(path)!r}, line {number}: a JSON {type(record).__name__}, where "
                                 "each line must be one JSON object")
            records.append(record)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"dataset file {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"dataset file {str(path)!r} must hold JSON objects (a list of them, or one per line)")
    if not records:
        raise ValueError(f"dataset file {str(path)!r} holds no records")
    return records


def _load_hub_dataset(name: str):
    import datasets

    try:
        loaded = datasets.load_dataset(name, split="train")
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"could not load the data set {name!r}: it is neither a local .json/.jsonl file nor a reachable "
            f"Hugging Face Hub data set with a train split ({error.__class__.__name__}: {error})"
        ) from error
    if len(loaded) == 0:
        raise ValueError(f"data set {name!r} has no records in its train split")
    return loaded


def record_format(columns) -> str:
    """Which of the accepted record shapes a data set has, in order of preference: "messages" (chat turns),
    "prompt_completion", "instruction" ("instruction"/"response", or Alpaca's "instruction"/"input"/"output"),
    or "text". Raises ValueError for anything else."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "instruction" in columns and ({"response", "output"} & columns):
        return "instruction"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"the data set's records have no field to train on (found {sorted(columns)}); give each record "
        '"messages", "prompt" and "completion", "instruction" and "response", or "text"'
    )


def to_sft_dataset(dataset, tokenizer):
    """Keep or convert the columns trl's SFTTrainer trains on, and say whether the loss is on assistant turns only.

    Returns (dataset, assistant_only_loss). Prompt/completion data trains on the completion only (trl's default);
    instruction data becomes prompt/completion, in chat form when the tokenizer has a chat template, so the model is
    tuned in the format it will be prompted with and the loss is on the response alone.
    """
    kind = record_format(dataset.column_names)
    chat_template = getattr(tokenizer, "chat_template", None)
    if kind == "messages":
        if not chat_template:
            raise ValueError('the data set has chat "messages" but the tokenizer has no chat template to render them')
        # Loss on the assistant's turns only where the template marks them ({% generation %}); otherwise trl cannot
        # find them, and the whole conversation is trained on.
        assistant_only = re.search(r"{%-?\s*generation\s*-?%}", chat_template) is not None
        return dataset.select_columns(["messages"]), assistant_only
    if kind == "prompt_completion":
        return dataset.select_columns(["prompt", "completion"]), False
    if kind == "text":
        return dataset.select_columns(["text"]), False

    response_column = "response" if "response" in dataset.column_names else "output"
    has_input = "input" in dataset.column_names

    def convert(record: dict) -> dict:
        instruction = record["instruction"]
        if has_input and record["input"]:
            instruction = f"{instruction}\n\n{record['input']}"
        if chat_template:
            return {"prompt": [{"role": "user", "content": instruction}],
                    "completion": [{"role": "assistant", "content": record[response_column]}]}
        return {"prompt": f"{instruction}\n", "completion": record[response_column]}

    return dataset.map(convert, remove_columns=dataset.column_names), False


def _peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "CUDA"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"


def _progress_callback():
    """A progress bar that shows the latest loss beside it, instead of printing one dict per logged step."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class LossProgressBar(TrainerCallback):
        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return LossProgressBar()


def _no_trainer_checkpointing(config_class) -> dict[str, bool]:
    # transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns); trl's SFTConfig
    # defaults the old one to True, so say False under whichever name this release has.
    names = {field.name for field in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def prepare(options: TrainOptions):
    """Load the model, its LoRA adapters and the data, and build the trainer. Every user error (bad paths, bad
    values, unusable data) surfaces here as ValueError, FileNotFoundError or ImportError, before training starts.
    """
    options.validate()
    import datasets
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from fastmoe import FastModel
    from fastmoe.distributed import fsdp2_config

    # The training bar is the one progress bar worth watching; trl's data preparation would add five more.
    datasets.disable_progress_bars()
    # The data first: a bad data set should fail fast, not after loading a large model.
    records = load_records(options.dataset)
    record_format(records.column_names)
    model_name = str(options.model) if options.model is not None else str(builtin_model_path())
    learning_rate = options.lr if options.lr is not None else BUILTIN_LR if options.model is None else DEFAULT_LR
    model, tokenizer = _load_model(model_name, options)
    train_dataset, assistant_only_loss = to_sft_dataset(records, tokenizer)
    eval_dataset = None
    if options.eval_fraction > 0:
        split = train_dataset.train_test_split(test_size=options.eval_fraction, seed=options.seed)
        train_dataset, eval_dataset = split["train"], split["test"]

    on_gpu = torch.cuda.is_available()
    checkpointing = options.gradient_checkpointing or ("standard" if on_gpu else "off")
    model = FastModel.get_peft_model(model, r=options.lora_r, lora_alpha=options.lora_alpha,
                                     target_modules=options.lora_target_modules(),
                                     use_gradient_checkpointing=CHECKPOINTING_MODES[checkpointing],
                                     random_state=options.seed)
    dtype = model.get_base_model().dtype
    fsdp = dict(fsdp=True, fsdp_config=fsdp2_config()) if options.fsdp else {}
    config = SFTConfig(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        report_to=options.report_to,
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=max(1, options.max_steps // 5),
        packing=options.packing,
        max_length=options.max_seq_length,
        assistant_only_loss=assistant_only_loss,
        # Mixed precision follows the weights the model was loaded in (fp32 on the CPU).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_gpu,
        # get_peft_model has already set checkpointing up (or not); the trainer must not redo or undo it.
        **_no_trainer_checkpointing(SFTConfig),
        include_num_input_tokens_seen="non_padding",
        **({"optim": options.optim} if options.optim is not None else {}),
        seed=options.seed,
        data_seed=options.seed,
        dataloader_num_workers=0,
        # Our own bar, added below, shows the loss beside the progress.
        disable_tqdm=True,
        # transformers asks DDP to look for unused parameters whenever the model is not a bare PreTrainedModel (ours
        # is a PeftModel), an extra autograd traversal per step; every LoRA factor is used in every step (the expert
        # factors are whole (experts * r, in) tensors, whichever experts the tokens chose).
        ddp_find_unused_parameters=False,
        **fsdp,
    )
    output = Path(options.output_dir).expanduser()
    output_existed = output.exists()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, args=config)
    # Our bar replaces transformers' (and the printer it falls back to), which print one dict per logged step.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback())
    try:
        _check_examples_left(trainer, options, len(train_dataset))
        _check_distributed_setup(trainer)
    except ValueError:
        # The trainer has made output_dir; a run refused before training leaves nothing behind.
        if not output_existed:
            with contextlib.suppress(OSError):  # not empty, or another process removed it first
                output.rmdir()
        raise
    return trainer, model, tokenizer


def _load_model(model_name: str, options: TrainOptions):
    from fastmoe import FastModel
    from fastmoe.quantized_loading import ExpertsIn8BitError

    try:
        return FastModel.from_pretrained(model_name, max_seq_length=options.max_seq_length,
                                         load_in_4bit=options.load_in_4bit, load_in_8bit=options.load_in_8bit)
    except ExpertsIn8BitError as error:
        raise ValueError(
            f"--load-in-8bit quantizes Linear layers only, and this model's experts ({error.expert_share:.0%} of its "
            "weights) would stay 16-bit: fastmoe has no 8-bit experts yet. Use --load-in-4bit instead (NF4 experts; "
            "AFMoE and LFM2-MoE), or neither flag for 16-bit weights"
        ) from error


def _check_examples_left(trainer, options: TrainOptions, examples: int) -> None:
    """trl drops the examples that keep no token to learn from once truncated to max_length (the loss is on the
    answers only, and a prompt can fill it); refuse a run with none left, rather than fail in the data loader."""
    why = (f"the loss is on the answers only, and the prompts fill the first {options.max_seq_length} tokens; "
           "raise --max-seq-length")
    left = len(trainer.train_dataset)
    if left == 0:
        raise ValueError(f"no training example is left: truncated to --max-seq-length {options.max_seq_length} "
                         f"tokens, none of the {examples} keeps a token to learn from ({why})")
    if trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0:
        raise ValueError(f"no held-out example is left to evaluate: truncated to --max-seq-length "
                         f"{options.max_seq_length} tokens, none keeps a token to learn from ({why})")
    if not options.packing and left < examples:
        warnings.warn(f"{examples - left} of {examples} training examples keep no token to learn from within "
                      f"--max-seq-length {options.max_seq_length} tokens and are left out", stacklevel=2)


def _check_distributed_setup(trainer) -> None:
    """Refuse FSDP setups that would not do what was asked, before training."""
    from fastmoe.distributed import fsdp_launch

    if fsdp_launch() and not trainer.is_fsdp_enabled:
        raise ValueError("accelerate was launched with an FSDP config, but accelerate runs FSDP on GPUs only and would "
                         "train with DDP here; launch with configs/accelerate_ddp.yaml (or torchrun) instead")
    if trainer.is_fsdp_enabled:
        state_dict_type = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in state_dict_type:
            raise ValueError(f"FSDP with state_dict_type {state_dict_type} saves no adapter file: set "
                             "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config (as configs/"
                             "accelerate_fsdp2.yaml does)")


def train(options: TrainOptions) -> TrainSummary:
    """`prepare`, then `run`."""
    trainer, _, _ = prepare(options)
    return run(options, trainer)


def run(options: TrainOptions, trainer) -> TrainSummary:
    """Train what `prepare` built, save adapter + tokenizer + trainer_state.json (from the main process only), and
    summarise the run. Under torchrun every process calls this: gathering FSDP's shards for the adapter takes all."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    resume = options.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    seconds = time.perf_counter() - start
    peak, kind = _peak_memory()

    output = Path(options.output_dir).expanduser()
    # The trainer's save gathers FSDP shards into a full state dict and writes (adapter, tokenizer) on the main
    # process only; model.save_pretrained would have every process write the same files at once.
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output / "trainer_state.json"))

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return TrainSummary(
        steps=trainer.state.global_step,
        seconds=seconds,
        tokens=int(trainer.state.num_input_tokens_seen),
        peak_memory_bytes=peak,
        memory_kind=kind,
        first_loss=losses[0] if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        output_dir=output,
        processes=trainer.args.world_size,
    )
