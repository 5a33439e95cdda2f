"""Training on several GPUs with DDP and FSDP2: a random-weight LFM2-8B-A1B-shaped model (8.3B parameters, 32 experts
top-4), fastmoe's forwards, transformers' Trainer with accelerate underneath (the engine `fastmoe train` drives through
trl's SFTTrainer, a Trainer subclass), random tokens. Prints the loss of every step and tokens/s per GPU, checks that
the requested strategy really wrapped the model, and appends one JSON line to benchmarks/results.jsonl (or --jsonl;
question "multi-gpu").

One configuration per launch (run from the repository root, on a 2-GPU machine):

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multi_gpu.py --strategy ddp
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multi_gpu.py --strategy fsdp2
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multi_gpu.py --strategy fsdp2 --full-finetuning
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multi_gpu.py --strategy ddp --nf4-experts
    torchrun --standalone --nproc-per-node 1 benchmarks/bench_multi_gpu.py --strategy ddp --batch 4

The last is one GPU with the same global batch as the first (2 GPUs x batch 2): every example is drawn from its
global index, and the trainer's seeded sampler orders them the same way in both runs, so their losses must agree
within bf16 noise. `bash benchmarks/gpu_session.sh OUT multi-gpu` runs all five.

Each process builds the model on the meta device and materialises it on its own GPU (`to_empty`, then random
weights from the same seed on every rank; routers random, since transformers zero-initialises some). LoRA: r=16 on
attention, short-conv projections, dense MLPs and every expert weight, gradient checkpointing. Tokens/s per GPU: the
median step time over the steps after --warmup, tokens per GPU per step = batch x seq (no padding). Peak memory:
the largest `max_memory_allocated` over the ranks while training (after the trainer wrapped or sharded the model).

CPU smoke run (gloo; accelerate runs FSDP on GPUs only, so DDP):

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_multi_gpu.py --tiny --strategy ddp --steps 4 --no-record
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import common
from fastmoe import FastModel
from fastmoe.builtin import tiny_config
from fastmoe.distributed import fsdp2_config
from fastmoe import FastLfm2MoeModel
from fastmoe.models.shared import EXPERTS_IMPLEMENTATION
from fastmoe.quantize import quantize_experts_

# LiquidAI/LFM2-8B-A1B's config.json: 24 layers (18 short-conv, 6 attention), the first 2 with dense MLPs.
LFM2_8B_A1B = dict(
    vocab_size=65536, hidden_size=2048, intermediate_size=7168, moe_intermediate_size=1792, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=8, num_dense_layers=2, num_experts=32, num_experts_per_tok=4,
    use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, tie_word_embeddings=True,
    max_position_embeddings=128000, conv_L_cache=3, conv_bias=False,
    layer_types=["conv", "conv", "full_attention", "conv", "conv", "conv", "full_attention", "conv", "conv", "conv",
                 "full_attention", "conv", "conv", "conv", "full_attention", "conv", "conv", "conv", "full_attention",
                 "conv", "conv", "full_attention", "conv", "conv"],
)


def model_config(tiny: bool) -> transformers.Lfm2MoeConfig:
    if tiny:
        return tiny_config("lfm2_moe", vocab_size=512)
    return transformers.Lfm2MoeConfig(**LFM2_8B_A1B)


@torch.no_grad()
def initialise(model: torch.nn.Module, seed: int) -> None:
    """Random weights drawn on the device, the same on every rank (to_empty leaves memory uninitialised)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:
            param.fill_(1.0)  # norms
        else:
            # Routers too: at 0.02 their logits over RMS-normalised inputs spread about +-1, so tokens pick varied
            # experts.
            param.normal_(0.0, 0.02, generator=generator)
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            buffer.zero_()
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            fresh = type(module)(config=module.config)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)


def build_model(config, device: torch.device, dtype: torch.dtype, full_finetuning: bool, nf4_experts: bool,
                max_seq_length: int):
    FastLfm2MoeModel.pre_patch()
    config._experts_implementation = EXPERTS_IMPLEMENTATION  # as FastModel.from_pretrained loads it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    initialise(model, seed=0)
    # What FastModel.from_pretrained sets on the models it loads.
    model.max_seq_length = max_seq_length
    if full_finetuning:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    model.requires_grad_(False)
    if nf4_experts:
        quantize_experts_(model, double_quant=True)  # as load_in_4bit does
    return FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)


class RandomTokens(torch.utils.data.Dataset):
    """(seq,) random token ids per example, drawn from the example's own index: any split of the data across
    processes sees the same examples."""

    def __init__(self, size: int, seq: int, vocab_size: int, seed: int = 1) -> None:
        self.size, self.seq, self.vocab_size, self.seed = size, seq, vocab_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        input_ids = torch.randint(0, self.vocab_size, (self.seq,), generator=generator)
        return {"input_ids": input_ids, "labels": input_ids.clone()}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, data loading included (GPU work finished before each clock read). Also
    restarts the GPU's peak-memory count when training starts: the trainer has wrapped (FSDP2: sharded) the model by
    then, so the whole unsharded model each rank built first does not count."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.ends = [self._now()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def check_wrapping(trainer: Trainer, strategy: str) -> str:
    """What the trainer wrapped the model in; exits when it is not what was asked (accelerate falls back quietly)."""
    from torch.distributed.fsdp import FSDPModule

    wrapped = trainer.model_wrapped
    if strategy == "fsdp2":
        layers = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
        if not trainer.is_fsdp_enabled or not layers:
            sys.exit("bench_multi_gpu: FSDP2 was asked for, but the trainer did not shard the model")
        return f"FSDP2, {len(layers)} units"
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return "DDP"
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return "one process"
    sys.exit(f"bench_multi_gpu: DDP was asked for, but the trainer wrapped the model in {type(wrapped).__name__}")


def save_adapter(trainer: Trainer) -> str:
    """Save the adapter as `fastmoe train` does (every rank takes part in gathering FSDP shards, the main process
    writes) and say what was written; "" on the other ranks."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        trainer.save_model(folder)
        seconds = time.perf_counter() - start
        if not trainer.is_world_process_zero():
            return ""
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as handle:
            names = list(handle.keys())
    experts = sum(".experts." in name for name in names)
    return f"adapter saved in {seconds:.1f}s: {len(names)} tensors, {experts} of them on experts"


def gather(value) -> list:
    """`value` from every rank, in rank order (a one-item list without a process group)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--full-finetuning", action="store_true", help="train every weight instead of LoRA")
    parser.add_argument("--nf4-experts", action="store_true", help="LoRA over NF4 (4-bit) experts; DDP only")
    parser.add_argument("--tiny", action="store_true", help="a tiny LFM2-MoE (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (Triton autotuning)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; 64 with --tiny)")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 for LoRA, 1e-5 for full fine-tuning")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the record goes to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()
    if args.nf4_experts and (args.full_finetuning or args.strategy != "ddp"):
        parser.error("--nf4-experts trains LoRA with DDP (fastmoe refuses quantized models under FSDP)")
    on_gpu = torch.cuda.is_available()
    if args.strategy == "fsdp2" and not on_gpu:
        parser.error("accelerate runs FSDP on GPUs only (on the CPU it would quietly train with DDP)")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        # Triton launches kernels on the current device: it must be this rank's GPU before the first kernel.
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    seq = args.seq or (64 if args.tiny else 4096)
    config = model_config(args.tiny)
    model = build_model(config, device, dtype, args.full_finetuning, args.nf4_experts, max_seq_length=seq)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = dict(fsdp=True, fsdp_config=fsdp2_config()) if args.strategy == "fsdp2" else {}
    learning_rate = args.lr or (1e-5 if args.full_finetuning else 1e-4)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=learning_rate, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to="none", bf16=on_gpu, use_cpu=not on_gpu, dataloader_num_workers=0, seed=0, data_seed=0,
            ddp_find_unused_parameters=False, disable_tqdm=True, **fsdp)
        dataset = RandomTokens(args.steps * args.batch * world_size, seq, config.vocab_size)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
        trainer.train()
        wrapping = check_wrapping(trainer, args.strategy)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
        saved = "" if args.full_finetuning else save_adapter(trainer)

    step_seconds = statistics.median(timer.step_seconds()[args.warmup:])
    tokens_per_gpu = args.batch * seq / step_seconds
    per_rank = gather((tokens_per_gpu, peak_gb))
    if not trainer.is_world_process_zero():
        return
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"wrapped as: {wrapping}; {saved}")
    print("loss per step: " + " ".join(f"{loss:.4f}" for loss in losses))
    peaks = [peak for _, peak in per_rank if peak is not None]
    for rank, (rate, peak) in enumerate(per_rank):
        print(f"rank {rank}: {rate:,.0f} tokens/s" + (f", peak {peak:.1f} GB" if peak is not None else ""))

    training = ("full fine-tuning" if args.full_finetuning
                else "LoRA r=16" + (", NF4 experts" if args.nf4_experts else ""))
    header = ("strategy", "training", "GPUs", "per GPU batch x seq", "step s (median)", "tokens/s per GPU",
              "tokens/s total", "peak GB per GPU (max)", "loss first -> last")
    row = (args.strategy.upper(), training, str(world_size), f"{args.batch} x {seq}", f"{step_seconds:.3f}",
           f"{statistics.mean(rate for rate, _ in per_rank):,.0f}", f"{sum(rate for rate, _ in per_rank):,.0f}",
           f"{max(peaks):.1f}" if peaks else "-", f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    print("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]))
    device = "cuda" if on_gpu else "cpu"
    command = shlex.join(["torchrun", "--standalone", "--nproc-per-node", str(world_size),
                          "benchmarks/bench_multi_gpu.py", *sys.argv[1:]])
    record = dict(common.environment(device, command=command), question="multi-gpu",
                  model="tiny LFM2-MoE" if args.tiny else "LFM2-8B-A1B", strategy=args.strategy.upper(),
                  training=training, gpus=world_size, case=f"{args.strategy.upper()}, {training}, {world_size} GPUs",
                  implementation="fastmoe", batch=args.batch, seq=seq, steps=args.steps, warmup=args.warmup,
                  wrapped_as=wrapping, adapter=saved or None, step_s=round(step_seconds, 4),
                  tokens_per_s_per_gpu=round(statistics.mean(rate for rate, _ in per_rank), 1),
                  tokens_per_s=round(sum(rate for rate, _ in per_rank), 1),
                  peak_gb=round(max(peaks), 2) if peaks else None, loss_first=round(losses[0], 4),
                  loss_last=round(losses[-1], 4), losses=[round(loss, 4) for loss in losses])
    if on_gpu:
        record["gpu"] = f"{world_size} x {record['gpu']}"
    if not args.no_record:
        common.append_record(record, args.jsonl)


if __name__ == "__main__":
    main()
