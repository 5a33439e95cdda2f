"""Does fastmoe train as well as transformers + peft? 200 LoRA SFT steps of a small AFMoE with real layer shapes,
both ways, from the same weights, the same adapter initialisation and the same batches; every step's loss goes
to a JSON (benchmarks/quality_run.json, drawn by plot_results.py) and a summary per variant (first loss, mean of the
last 10, seconds) to benchmarks/results.jsonl (question "quality").

Model: Trinity-Mini's layer shapes (hidden 2048, 32 query / 4 kv heads of 128, dense MLP 6144, experts 1024 wide,
one shared expert, sliding-window and global attention) with 4 layers (1 dense) and 32 experts top-4; random frozen
weights and LoRA r=16 on the family's default targets, built as bench_train_step.py builds its models
(common.build_lora_model).

Data: a deterministic synthetic language that a LoRA on a random network can learn: a fixed Markov chain over the
vocabulary in which every token has 4 possible successors with fixed random probabilities. Fresh sequences every
step (nothing to memorise); the chain's conditional entropy is the loss a perfect model reaches, so the JSON
records it as `loss_floor`. Loss on every next token; AdamW on the adapters, constant learning rate after a short
warm-up, gradient clipping at 1.

    python benchmarks/quality_run.py                     # GPU, bf16: well under 3 minutes
    python benchmarks/quality_run.py --steps 5 --tiny    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import common
import fastmoe

HERE = Path(__file__).parent
SUCCESSORS = 4
IMPLEMENTATIONS = {"hf-grouped_mm": "transformers grouped_mm + peft", "hf-eager": "transformers + peft"}

QUALITY_MODEL = dict(common.PRESETS["trinity-mini"], num_hidden_layers=4, num_dense_layers=1, num_experts=32,
                     num_experts_per_tok=4, vocab_size=512, max_position_embeddings=4096)
QUALITY_TINY = dict(common.PRESETS["afmoe-tiny"], vocab_size=128)


def markov_chain(vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocab, SUCCESSORS) successor tokens and their probabilities, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(vocab_size, generator=generator)[:SUCCESSORS] for _ in range(vocab_size)])
    # Normalised exponentials are Dirichlet(1, ..., 1) draws, here from our own generator.
    probs = -torch.log(torch.rand(vocab_size, SUCCESSORS, generator=generator))
    return successors, probs / probs.sum(-1, keepdim=True)


def entropy_floor(probs: torch.Tensor) -> float:
    """The loss of the true chain: mean over tokens of the successor entropy (tokens are nearly uniform)."""
    return float(-(probs * probs.log()).sum(-1).mean())


def sample_batches(successors, probs, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq) token ids walked along the chain from uniform random starts."""
    generator = torch.Generator().manual_seed(seed)
    rows = steps * batch
    tokens = torch.empty(rows, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, successors.shape[0], (rows,), generator=generator)
    for position in range(1, seq):
        current = tokens[:, position - 1]
        choice = torch.multinomial(probs[current], 1, generator=generator).squeeze(1)
        tokens[:, position] = successors[current, choice]
    return tokens.view(steps, batch, seq)


def train(name: str, config_kwargs: dict, batches: torch.Tensor, device: str, dtype: torch.dtype,
          lr: float, warmup: int) -> tuple[list[float], float]:
    """Per-step losses and wall-clock seconds of the training loop (model building excluded)."""
    model = common.build_lora_model(common.TRAIN_STEP_VARIANTS[name], config_kwargs, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device == "cuda")  # as Trainer's default
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    losses = []
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step, input_ids in enumerate(batches):
        input_ids = input_ids.to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # one sync per step: a fair cost for both variants
        del loss  # alive during the next forward it would turn fastmoe's CUDA graphs off (capture_failure_reason)
        if step % 25 == 0 or step == len(batches) - 1:
            print(f"{name} step {step + 1}/{len(batches)}: loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    del model, optimizer
    fastmoe.unpatch()
    if device == "cuda":
        torch.cuda.empty_cache()
    return losses, seconds


def summary(result: dict) -> str:
    lines = [f"quality run: {result['model']}, {result['steps']} steps ({result['gpu']}, {result['dtype']})"]
    for variant, losses in result["losses"].items():
        tail = losses[-10:]
        lines.append(f"  {variant}: first loss {losses[0]:.4f}, mean of last 10 {sum(tail) / len(tail):.4f}, "
                     f"{result['seconds'][variant]:.1f} s")
    if "max_abs_diff" in result:
        lines.append(f"  largest per-step loss difference {result['max_abs_diff']:.4f}")
    return "\n".join(lines + [f"  loss floor (the chain's entropy) {result['loss_floor']:.4f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (GPU), 2 (--tiny)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (GPU), 32 (--tiny)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tiny", action="store_true", help="the tiny AFMoE (CPU smoke runs)")
    parser.add_argument("--variants", default="hf-grouped_mm,fastmoe",
                        help="comma-separated, from " + ", ".join(common.TRAIN_STEP_VARIANTS))
    parser.add_argument("--out", default=str(HERE / "quality_run.json"), help="JSON of the per-step losses")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the summary goes to")
    parser.add_argument("--no-record", action="store_true", help="write the JSON but append nothing to --jsonl")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in names if name not in common.TRAIN_STEP_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(common.TRAIN_STEP_VARIANTS)}")

    device = common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_kwargs = QUALITY_TINY if args.tiny else QUALITY_MODEL
    batch = args.batch or (2 if args.tiny else 8)
    seq = args.seq or (32 if args.tiny else 512)
    successors, probs = markov_chain(config_kwargs["vocab_size"], seed=0)
    batches = sample_batches(successors, probs, args.steps, batch, seq, seed=1)

    losses, seconds = {}, {}
    for name in names:
        losses[name], seconds[name] = train(name, config_kwargs, batches, device, dtype, args.lr,
                                            warmup=max(1, min(10, args.steps // 10)))
    c = config_kwargs
    model = (f"AFMoE {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_experts']} experts "
             f"top-{c['num_experts_per_tok']}")
    shared = common.environment(device)
    result = dict(shared, model=model, config=config_kwargs, steps=args.steps, batch=batch, seq=seq, lr=args.lr,
                  dtype=str(dtype).split(".")[-1], loss_floor=round(entropy_floor(probs), 4), losses=losses,
                  seconds=seconds)
    if len(losses) == 2:
        first, second = losses.values()
        diffs = [abs(a - b) for a, b in zip(first, second)]
        result["max_abs_diff"] = max(diffs)
        result["mean_abs_diff_last_50"] = sum(diffs[-50:]) / len(diffs[-50:])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(summary(result))
    if args.no_record:
        return
    for name in names:
        tail = losses[name][-10:]
        common.append_record(dict(
            shared, question="quality", case=f"{model}, {args.steps} steps of {batch} x {seq}", variant=name,
            implementation=IMPLEMENTATIONS.get(name, name), steps=args.steps, batch=batch, seq=seq, lr=args.lr,
            dtype=result["dtype"], loss_floor=result["loss_floor"], first_loss=round(losses[name][0], 4),
            last10_mean=round(sum(tail) / len(tail), 4), seconds=round(seconds[name], 1),
            max_abs_diff=common.rounded(result.get("max_abs_diff"), 4), losses_json=Path(args.out).name), args.jsonl)


if __name__ == "__main__":
    main()
