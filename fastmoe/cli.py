"""`fastmoe train`: LoRA fine-tuning (SFT) from the command line.

    fastmoe train                                   # built-in tiny AFMoE model + built-in data, CPU-friendly
    fastmoe train --model PATH_OR_HUB_ID --dataset data.jsonl --max-steps 200 --output-dir out
    torchrun --nproc-per-node 2 -m fastmoe train ...            # DDP: every GPU a whole copy (16-bit or 4-bit)
    torchrun --nproc-per-node 2 -m fastmoe train --fsdp ...     # FSDP2: 16-bit weights sharded per decoder layer

User errors (a missing path, an unusable data set, a bad value) print one line, `fastmoe: error: ...`, and exit
with status 2; a failure during training itself is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from fastmoe.training import sft
from fastmoe.training.options import BUILTIN_LR, CHECKPOINTING_MODES, DEFAULT_LR, TrainOptions

EXIT_USAGE = 2


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help text does not already say it and the default means something:
    a None default stands for "decided later" (the help says how), a False one for a switch that is off."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help is None or "(default" in action.help or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import fastmoe

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "trl"))
    return f"fastmoe {fastmoe.__version__} ({libraries})"


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; one line that names the problem is easier to read."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str) -> NoReturn:
    # Errors from deeper libraries can span lines; the contract is one line.
    print(f"fastmoe: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainOptions(output_dir="fastmoe-output")
    parser = _OneLineErrorParser(prog="fastmoe", description="Fast LoRA fine-tuning of Mixture-of-Experts models.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)
    train = commands.add_parser(
        "train", help="LoRA fine-tune (SFT) a model on an instruction or chat data set",
        description="LoRA fine-tune (SFT, trl's SFTTrainer) a causal LM loaded with fastmoe.FastModel. With no "
                    "--model, a small built-in AFMoE model with random weights is used; with no --dataset, the "
                    "instruction data shipped with fastmoe.",
        formatter_class=_DefaultsHelpFormatter)
    train.add_argument("--model", default=None,
                       help="local checkpoint folder or Hugging Face Hub id (default: the built-in tiny AFMoE model)")
    train.add_argument("--dataset", default=None,
                       help='local .json/.jsonl file or Hub data set; records with "messages", "prompt"/"completion", '
                            '"instruction"/"response" or "text" (default: the built-in instruction data)')
    train.add_argument("--output-dir", default=defaults.output_dir,
                       help="where the adapter, tokenizer and trainer_state.json are written")
    train.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps")
    train.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length,
                       help="longer examples are truncated")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per device per step")
    train.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps,
                       help="batches whose gradients are summed before each optimizer step")
    train.add_argument("--lr", type=float, default=None,
                       help=f"peak learning rate, decaying linearly (default: {BUILTIN_LR} for the built-in "
                            f"model, whose weights are random; {DEFAULT_LR} for any other)")
    train.add_argument("--lora-r", type=int, default=defaults.lora_r, help="LoRA rank")
    train.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha, help="LoRA scaling numerator")
    train.add_argument("--target-modules", default=None,
                       help="modules to put LoRA on: comma-separated names (e.g. q_proj,v_proj; no expert gets LoRA "
                            "then) or all-linear: attention, MLPs and every expert, never a router "
                            "(default: all-linear; "
                            "for a model type fastmoe has no fast path for, peft's: every Linear layer but the head)")
    train.add_argument("--seed", type=int, default=defaults.seed,
                       help="seed of the LoRA initialisation, the data order and the held-out split")
    train.add_argument("--load-in-4bit", action="store_true",
                       help="QLoRA: NF4 base weights, experts included, quantized as they load")
    train.add_argument("--load-in-8bit", action="store_true",
                       help="8-bit Linear layers (bitsandbytes); dense models only, MoE models are refused")
    train.add_argument("--gradient-checkpointing", nargs="?", const="standard", default=None,
                       choices=list(CHECKPOINTING_MODES),
                       help="recompute each layer in the backward pass to save activation memory: standard (the flag "
                            "alone) keeps each layer's input on the GPU meanwhile; fastmoe keeps it in host memory "
                            "(less GPU memory on long sequences and deep models, slower); off keeps every activation "
                            "(default: standard with a CUDA GPU, off on the CPU)")
    train.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const",
                       const="off", help="same as --gradient-checkpointing off")
    train.add_argument("--packing", action="store_true",
                       help="pack several short examples into each max-seq-length row")
    train.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                       help="hold out this fraction of the data and log its loss (eval_loss) during training")
    train.add_argument("--save-steps", type=int, default=defaults.save_steps,
                       help="write a resumable checkpoint every N steps (0: none)")
    train.add_argument("--resume-from-checkpoint", default=None,
                       help='a checkpoint folder, or "latest" for the newest checkpoint-* in --output-dir')
    train.add_argument("--report-to", default=defaults.report_to, choices=["none", "tensorboard"],
                       help="where metrics go besides trainer_state.json")
    train.add_argument("--optim", default=None,
                       help="transformers' optimizer name, e.g. adamw_8bit (bitsandbytes, AdamW states in 8 bits: the "
                            "usual QLoRA choice) or adamw_torch_fused (default: the Trainer's, adamw_torch_fused)")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard 16-bit weights across the GPUs with FSDP2 instead of a whole copy "
                            "per GPU (DDP, the default); not with --load-in-4bit/8bit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = TrainOptions(
        output_dir=args.output_dir, model=args.model, dataset=args.dataset, max_steps=args.max_steps,
        max_seq_length=args.max_seq_length, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, lr=args.lr, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, target_modules=args.target_modules, seed=args.seed,
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
        gradient_checkpointing=args.gradient_checkpointing, packing=args.packing, eval_fraction=args.eval_fraction,
        save_steps=args.save_steps, resume_from_checkpoint=args.resume_from_checkpoint, report_to=args.report_to,
        fsdp=args.fsdp, optim=args.optim)

    try:
        trainer, _, _ = sft.prepare(options)
    except (ValueError, FileNotFoundError, ImportError) as error:
        _fail(str(error))
    if options.model is None and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # The built-in model's matmuls, about (200 tokens, 64), are too small to split across threads, and
        # OpenMP's barriers made steps up to 50x slower whenever another process held one of the cores.
        torch.set_num_threads(1)
    summary = sft.run(options, trainer)
    if trainer.is_world_process_zero():
        print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
