"""The run of `fastmoe train`: load a model with `FastModel`, add LoRA adapters (experts included), build trl's
`SFTTrainer` on the data (fastmoe.training.data), train, and save the adapter, the tokenizer and the trainer state
(every step's loss) to one folder.

Under torchrun or `accelerate launch` every process runs all of this; the trainer (accelerate underneath) wraps the
model in DDP, or FSDP2 with `fsdp=True` or an accelerate FSDP config, and shards each global batch across the
processes. Only the main process writes the adapter and the trainer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from fastmoe.builtin import builtin_model_path
from fastmoe.training.data import load_records, record_format, to_sft_dataset
from fastmoe.training.options import BUILTIN_LR, CHECKPOINTING_MODES, DEFAULT_LR, TrainOptions


@dataclass
class TrainSummary:
    """What a run did: the figures of the summary line `fastmoe train` prints."""

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


class SessionStart(TrainerCallback):
    """Where this `train()` call starts: a run resumed from a checkpoint holds the steps and logs before it, which
    the summary leaves out."""

    step = 0
    logs = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # Called once the checkpoint's state is loaded.
        self.step, self.logs = state.global_step, len(state.log_history)


def _peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "CUDA"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"


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
    from fastmoe.training.progress import LossProgressBar

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
    trainer.add_callback(LossProgressBar())
    trainer.add_callback(SessionStart())
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
    from fastmoe.quantized_loading import ExpertsIn8BitError, nf4_expert_families

    try:
        return FastModel.from_pretrained(model_name, max_seq_length=options.max_seq_length,
                                         load_in_4bit=options.load_in_4bit, load_in_8bit=options.load_in_8bit)
    except ExpertsIn8BitError as error:
        raise ValueError(
            f"--load-in-8bit quantizes Linear layers only, and this model's experts ({error.expert_share:.0%} of its "
            f"weights) would stay 16-bit: fastmoe has no 8-bit experts yet. Use --load-in-4bit instead (NF4 experts; "
            f"{nf4_expert_families()}), or neither flag for 16-bit weights"
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

    start = next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, SessionStart))
    logs = trainer.state.log_history[start.logs:]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    return TrainSummary(
        steps=trainer.state.global_step - start.step,
        seconds=seconds,
        # trl's own count of this call's non-padding tokens, all processes', as its logs carry it
        tokens=int(max((entry["num_tokens"] for entry in logs if "num_tokens" in entry), default=0)),
        peak_memory_bytes=peak,
        memory_kind=kind,
        first_loss=losses[0] if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        output_dir=output,
        processes=trainer.args.world_size,
    )
