"""Does fastmoe train as well as transformers + peft? 200 LoRA SFT steps of a small AFMoE with real layer shapes,
both ways, from the same weights, the same adapter initialisation and the same batches; every step's loss goes
to a JSON (benchmarks/quality_run.json) and both curves onto one chart (benchmarks/plots/quality_loss.png, or
later with plot_results.py where matplotlib is missing).

Model: Trinity-Mini's layer shapes (hidden 2048, 32 query / 4 kv heads of 128, dense MLP 6144, experts 1024 wide,
one shared expert, sliding-window and global attention) with 4 layers (1 dense) and 32 experts top-4; random frozen
weights (bench_train_step.initialise), LoRA r=16 on the family's default targets, as bench_train_step builds it.

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
import sys
import time
from pathlib import Path

import torch

import fastmoe

# The model is built exactly as the training-step benchmark builds it (scripts in benchmarks/ import each other
# from their folder: Python puts it first on sys.path, gpu_session.sh names it in PYTHONPATH).
from bench_train_step import PRESETS, build, run_environment

HERE = Path(__file__).parent
SUCCESSORS = 4

QUALITY_MODEL = dict(PRESETS["trinity-mini"], num_hidden_layers=4, num_dense_layers=1, num_experts=32,
                     num_experts_per_tok=4, vocab_size=512, max_position_embeddings=4096)
QUALITY_TINY = dict(PRESETS["afmoe-tiny"], vocab_size=128)


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


def train(variant: str, config_kwargs: dict, batches: torch.Tensor, device: str, dtype: torch.dtype,
          lr: float, warmup: int) -> tuple[list[float], float]:
    """Per-step losses and wall-clock seconds of the training loop (model building excluded)."""
    model = build(variant, config_kwargs, device, dtype, skewed=False)
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
        if step % 25 == 0 or step == len(batches) - 1:
            print(f"{variant} step {step + 1}/{len(batches)}: loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    del model, optimizer
    fastmoe.unpatch()
    if device == "cuda":
        torch.cuda.empty_cache()
    return losses, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (GPU), 2 (--tiny)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (GPU), 32 (--tiny)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tiny", action="store_true", help="the tiny AFMoE (CPU smoke runs)")
    parser.add_argument("--variants", default="hf-grouped_mm,fastmoe")
    parser.add_argument("--out", default=str(HERE / "quality_run.json"), help="JSON of the per-step losses")
    parser.add_argument("--plot", default=str(HERE / "plots" / "quality_loss.png"),
                        help="chart of the curves (skipped without matplotlib)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file a summary is appended to")
    parser.add_argument("--no-record", action="store_true", help="write the JSON but append nothing to RESULTS.md")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_kwargs = QUALITY_TINY if args.tiny else QUALITY_MODEL
    batch = args.batch or (2 if args.tiny else 8)
    seq = args.seq or (32 if args.tiny else 512)
    successors, probs = markov_chain(config_kwargs["vocab_size"], seed=0)
    batches = sample_batches(successors, probs, args.steps, batch, seq, seed=1)

    losses, seconds = {}, {}
    for variant in args.variants.split(","):
        losses[variant], seconds[variant] = train(variant, config_kwargs, batches, device, dtype, args.lr,
                                                  warmup=max(1, min(10, args.steps // 10)))
    c = config_kwargs
    shared = run_environment(device, sys.argv[1:])
    result = dict(
        shared, command="python benchmarks/quality_run.py " + " ".join(sys.argv[1:]),
        model=(f"AFMoE {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_experts']} experts "
               f"top-{c['num_experts_per_tok']}"),
        config=config_kwargs, steps=args.steps, batch=batch, seq=seq, lr=args.lr, dtype=str(dtype).split(".")[-1],
        loss_floor=round(entropy_floor(probs), 4), losses=losses, seconds=seconds,
    )
    if len(losses) == 2:
        first, second = losses.values()
        diffs = [abs(a - b) for a, b in zip(first, second)]
        result["max_abs_diff"] = max(diffs)
        result["mean_abs_diff_last_50"] = sum(diffs[-50:]) / len(diffs[-50:])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")

    from plot_results import quality_summary

    summary = quality_summary(result) + f"\n  loss floor (the chain's entropy) {result['loss_floor']:.4f}"
    print(summary)
    try:
        from plot_results import plot_quality

        plot_quality(result, Path(args.plot))
        print(f"wrote {args.plot}")
    except ImportError:
        print("matplotlib is not installed: plot later with python benchmarks/plot_results.py --quality " + args.out)
    if not args.no_record:
        with open(args.results, "a") as handle:
            handle.write(f"\n## Quality run: LoRA SFT, transformers + peft vs fastmoe\n\n"
                         f"- date: {result['date']}; {result['gpu']}; {result['dtype']}; "
                         f"{args.steps} steps of {batch} x {seq} tokens, lr {args.lr}\n"
                         f"- command: `{result['command']}`\n\n```\n{summary}\n```\n")


if __name__ == "__main__":
    main()
