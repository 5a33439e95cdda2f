"""One trl GRPO step's generation phase without vLLM: fastmoe (its rollouts on the decode path, fastmoe.trl_generation)
against transformers + peft, as a GRPO user runs them.

The model is loaded as bench_sft.py loads it (the same random checkpoint or direct build, the same LoRA r=16 on the
family's default targets). `trl.GRPOTrainer` with `use_vllm=False`, bf16, one prompt of about --prompt tokens per step
whose --generations completions (the batch) are sampled at trl's defaults (temperature 1) to exactly --new-tokens
tokens (min_new_tokens: random weights would otherwise stop anywhere), and a reward of 0 (the step's update does not
depend on what is measured). The generation phase is timed around trl's `_generate_single_turn` (prompt and decoding),
synchronised, for --steps steps after one warm-up step (fastmoe captures its graphs there); the records give its
median, the tokens it generated per second, and the median whole step. One JSON line per case goes to
benchmarks/results.jsonl (question "grpo").

    python benchmarks/bench_grpo.py --preset trinity-mini --layers 8 --generations 8 --prompt 512 --new-tokens 256
    TRITON_INTERPRET=1 python benchmarks/bench_grpo.py --preset afmoe-tiny --generations 2 --prompt 16 \\
        --new-tokens 4 --steps 1 --no-record     # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import torch

import bench_sft
import common


def run_case(case: bench_sft.Case, args, device: str, dtype: torch.dtype, output_dir: str) -> dict:
    import datasets
    import trl

    from fastmoe import generation

    model, tokenizer = bench_sft.load(case, args, device, dtype)
    # A prompt of about args.prompt tokens of the small built-in tokenizer (one word is one token or a few).
    words = " ".join(["mixture"] * args.prompt)
    prompt_ids = tokenizer(words, add_special_tokens=False)["input_ids"][:args.prompt]
    prompt = tokenizer.decode(prompt_ids)
    dataset = datasets.Dataset.from_list([{"prompt": prompt}] * args.generations * (args.steps + 1))
    config = trl.GRPOConfig(
        output_dir=output_dir, use_cpu=device != "cuda", bf16=device == "cuda", report_to="none",
        per_device_train_batch_size=args.generations, num_generations=args.generations,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        max_steps=args.steps + 1, logging_steps=1, save_strategy="no", seed=0,
        gradient_checkpointing=True, use_vllm=False,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=config, train_dataset=dataset, processing_class=tokenizer)
    generation_s, step_s, generated, prompt_tokens = [], [], [], []
    generate = trainer._generate_single_turn

    def timed(prompt_ids, *a, **kw):
        common.synchronize(device)
        start = time.perf_counter()
        out = generate(prompt_ids, *a, **kw)
        common.synchronize(device)
        generation_s.append(time.perf_counter() - start)
        generated.append(sum(len(c) for c in out[0]))
        prompt_tokens.append(max(len(p) for p in prompt_ids))
        return out

    trainer._generate_single_turn = timed
    step = trainer.training_step

    def timed_step(*a, **kw):
        common.synchronize(device)
        start = time.perf_counter()
        out = step(*a, **kw)
        common.synchronize(device)
        step_s.append(time.perf_counter() - start)
        return out

    trainer.training_step = timed_step
    trainer.train()
    measured = slice(1, None)  # after the warm-up step
    median = statistics.median(generation_s[measured])
    tokens = statistics.median(generated[measured])
    base = model.get_base_model()
    decode = base.__dict__.get(generation._KEPT) or base.__dict__.get("forward")
    return dict(
        question="grpo", preset=case.preset, layers=case.layers, batch=args.generations, prompt=prompt_tokens[-1],
        new_tokens=args.new_tokens, implementation=case.implementation, quantization=case.quantization,
        load=case.load, targets=case.targets, steps=len(generation_s) - 1,
        generation_s=common.rounded(median), generate_tokens_per_s=common.rounded(tokens / median),
        step_s=common.rounded(statistics.median(step_s[measured])),
        decode_path_steps=decode.decode_steps if isinstance(decode, generation.DecodeForward) else None,
        peak_gb=common.rounded(torch.cuda.max_memory_allocated() / 1e9) if device == "cuda" else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="trinity-mini", choices=sorted(common.PRESETS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8, help="completions per step (GRPO's group), the batch")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="measured steps, after one warm-up step")
    parser.add_argument("--implementations", default="fastmoe,transformers")
    parser.add_argument("--quantization", choices=["4bit"], default=None)
    parser.add_argument("--load", choices=["checkpoint", "direct"], default="direct")
    parser.add_argument("--checkpoint-dir", default="/tmp/fastmoe-bench-checkpoints")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--output-dir", default="/tmp/fastmoe-bench-grpo")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL))
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()

    device = common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quantization and args.load == "direct":
        parser.error("--quantization 4bit loads a checkpoint: pass --load checkpoint")
    failures = 0
    for implementation in bench_sft.csv(args.implementations):
        case = bench_sft.Case(preset=args.preset, layers=args.layers, batch=args.generations,
                              seq=args.prompt + args.new_tokens, implementation=implementation,
                              quantization=args.quantization, load=args.load)
        try:
            record = run_case(case, args, device, dtype, args.output_dir)
        except Exception:
            traceback.print_exc()
            failures += 1
            continue
        finally:
            common.free_memory(device)
        record.update(common.environment(device))
        print(f"grpo {case.preset} {case.layers}L {args.generations} x ({record['prompt']} + {args.new_tokens}) "
              f"{implementation}{' 4bit' if case.quantization else ''}: generation {record['generation_s']} s "
              f"({record['generate_tokens_per_s']:,.1f} tok/s), step {record['step_s']} s, decode-path steps "
              f"{record['decode_path_steps']}, peak {record['peak_gb']} GB", flush=True)
        if not args.no_record:
            common.append_record(record, args.jsonl)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
