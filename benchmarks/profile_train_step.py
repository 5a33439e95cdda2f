"""Where a fastmoe training step spends host (Python) time and device time: one AFMoE step under cProfile and
torch.profiler, after warm-up. For finding launch-bound stretches, not for reporting speed.

    python benchmarks/profile_train_step.py --layers 8            # GPU
    python benchmarks/profile_train_step.py --preset tiny         # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import common


def step(model, optimizer, input_ids):
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="trinity-mini")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--variant", choices=sorted(common.TRAIN_STEP_VARIANTS), default="fastmoe")
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_kwargs = common.with_layers(common.PRESETS[args.preset], args.layers)
    seq = args.seq or (4096 if device == "cuda" else 64)
    model = common.build_lora_model(common.TRAIN_STEP_VARIANTS[args.variant], config_kwargs, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device == "cuda")  # as transformers' Trainer defaults to
    input_ids = torch.randint(0, config_kwargs["vocab_size"], (1, seq), device=device)
    model.train()
    for _ in range(3):
        step(model, optimizer, input_ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step(model, optimizer, input_ids)
    sync()
    wall = time.perf_counter() - start
    if device == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        events[0].record()
        step(model, optimizer, input_ids)
        events[1].record()
        sync()
        print(f"step wall {wall * 1e3:.1f} ms; with events {events[0].elapsed_time(events[1]):.1f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    step(model, optimizer, input_ids)
    sync()
    profiler.disable()
    print(f"step wall (no profiler) {wall * 1e3:.1f} ms")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)


if __name__ == "__main__":
    main()
