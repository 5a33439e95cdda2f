"""One LoRA training step of a whole model of each family in a plain loop (forward with labels, backward, AdamW):
fastmoe against transformers + peft, same run, same shapes, same adapters. The harness for ablations; the headline
numbers go through the user's path (bench_sft.py: from_pretrained, get_peft_model, trl's SFTTrainer).

Presets (real shapes, random weights; benchmarks/common.py): AFMoE `trinity-mini`, LFM2-MoE `lfm2-8b-a1b`, JetMoe
`jetmoe-8b`, Cohere `command-r-layers` (8 of Command R's 40 layers) and `aya-expanse-8b`; each family has a `*-tiny`
counterpart for CPU smoke runs (`tiny` is `afmoe-tiny`).

Variants are data (common.TrainStepVariant; the names below are entries of common.TRAIN_STEP_VARIANTS): `hf-eager`
(transformers + peft, eager experts), `hf-grouped_mm` (transformers' `grouped_mm` experts + peft; AFMoE and LFM2-MoE,
the families with transformers' experts switch), `hf` (the faster of the two that the family has), `fastmoe`
(patched forwards, same peft adapter), `fastmoe-no-ckpt` (without gradient checkpointing: "OOM" where its
activations do not fit), `fastmoe-offload` (checkpointing with each layer's input in host memory), `fastmoe-flex`
(transformers' FlexAttention instead of SDPA), `fastmoe-dense-mask` (AFMoE's sliding-window layers through SDPA over
the dense mask instead of the flash kernel), `fastmoe-4bit` (QLoRA: NF4 Linear layers and experts; AFMoE) and
`fastmoe-4bit-adamw8bit` (the same with bitsandbytes' 8-bit AdamW). --optim, --attention and --checkpointing set that
field in every listed variant; the record carries every field. LoRA r=16 on the family's default targets
(`Fast*Model.default_target_modules/default_target_parameters`) in every variant, experts via peft's
`target_parameters`. Each step is forward, backward and AdamW (fused on the GPU, Trainer's default) on the adapters,
with gradient checkpointing (except JetMoe: transformers has none for it). `--skewed` adds a selection bias that
decays over the expert index (the first ~E/8 experts take most tokens: the worst case for load balance).

Records tokens/s (median of the timed steps), peak memory, model TFLOP/s and its share of the bf16 matmul peak
measured in the same run (FLOPs: common.step_flops), and the loss of the last step (it should agree across variants up
to bf16 noise), one JSON line per measurement in benchmarks/results.jsonl (question "train-step"; RESULTS.md is
generated from them by report.py).

    python benchmarks/bench_train_step.py --preset trinity-mini --shapes 1x4096,4x2048 --variants hf,fastmoe  # GPU
    python benchmarks/bench_train_step.py --preset lfm2-tiny --no-record        # CPU smoke run (TRITON_INTERPRET=1
                                                                                 # to run the kernels themselves)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import sys
import time
import traceback

import torch

import common


def print_host_syncs(model, optimizer, input_ids) -> None:
    """One more step with CUDA's sync debug mode on: every operation that makes the host wait for the GPU (each
    one drains the launch queue, and the GPU then idles while Python catches up), counted by where it is called."""
    import warnings

    sites = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            sites[f"{warning.filename}:{warning.lineno}"] += 1
    print(f"--- host syncs in one step: {sum(sites.values())}")
    for site, count in sites.most_common(15):
        print(f"{count:5d}  {site}")


def print_profile(model, optimizer, input_ids, rows: int = 35, trace: str | None = None) -> None:
    """One more step under torch.profiler: where the step's GPU time goes, kernel by kernel; with `trace`, the
    step's timeline is also written there (gzipped Chrome trace: GPU idle gaps and the host work beside them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    if trace:
        prof.export_chrome_trace(trace)  # gzipped by the profiler: the name ends in .gz
        print(f"wrote {trace}")


def measure(label: str, variant: common.TrainStepVariant, config_kwargs: dict, batch: int, seq: int, steps: int,
            device: str, dtype: torch.dtype, skewed: bool, profile: bool = False, trace: str | None = None,
            warmup: int = 2) -> tuple[float, float | None, float]:
    """(median seconds per step, peak GiB or None on the CPU, loss of the last step) of `steps` timed steps after
    `warmup` untimed ones."""
    model = common.build_lora_model(variant, config_kwargs, device, dtype, skewed)
    optimizer = common.make_optimizer(model, variant, device)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config_kwargs["vocab_size"], (batch, seq), generator=generator).to(device)
    model.train()
    times, loss = [], None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + warmup):
        common.synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        loss = out.loss.item()
        # Not alive during the next forward: a live autograd graph there makes fastmoe's graph capture fail, and
        # its layers run eagerly (fastmoe.graphed_checkpointing.capture_failure_reason).
        del out
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if profile and device == "cuda":
        print(f"--- profile of one {label} step")
        print_host_syncs(model, optimizer, input_ids)
        print_profile(model, optimizer, input_ids, trace=trace and f"{trace}.{label.split()[0]}.json.gz")
    del model, optimizer
    common.free_memory(device)
    return statistics.median(times), peak, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--shapes", default=None, help="batch x sequence length, comma-separated: 1x4096,4x2048 "
                        "(default 1x4096 on a GPU, 1x64 on the CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (2 leave a fresh process's first 4-bit run ~10%% slow while the "
                             "CUDA caching allocator still grows)")
    parser.add_argument("--variants", default="hf-eager,hf-grouped_mm,fastmoe",
                        help="comma-separated names: hf, " + ", ".join(common.TRAIN_STEP_VARIANTS))
    parser.add_argument("--optim", choices=["adamw_torch_fused", "adamw_8bit"], default=None,
                        help="the optimizer of every listed variant")
    parser.add_argument("--attention", choices=["sdpa", "flex_attention"], default=None,
                        help="transformers' attention implementation of every listed variant")
    parser.add_argument("--checkpointing", choices=["standard", "off", "offload"], default=None,
                        help="gradient checkpointing of every listed variant")
    parser.add_argument("--skewed", action="store_true", help="route most tokens to a few experts")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL),
                        help="JSON-lines file every measurement is appended to")
    parser.add_argument("--profile", action="store_true", help="print a kernel-level profile of one step per variant")
    parser.add_argument("--trace", default=None, help="with --profile: also write each variant's step timeline to "
                        "TRACE.<variant>.json.gz")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()

    device = common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_kwargs = common.with_layers(common.PRESETS[args.preset], args.layers)
    model_type = config_kwargs["model_type"]
    layers = config_kwargs["num_hidden_layers"]
    try:
        shapes = common.parse_shapes(args.shapes or ("1x4096" if device == "cuda" else "1x64"))
        names = [common.resolve_variant_name(name.strip(), model_type) for name in args.variants.split(",")]
    except ValueError as error:
        parser.error(str(error))
    overrides = {field: value for field, value in (("optimizer", args.optim), ("attention", args.attention),
                                                    ("checkpointing", args.checkpointing)) if value is not None}
    variants: dict[str, common.TrainStepVariant] = {}
    for requested, name in zip(args.variants.split(","), names):
        if name is None:
            print(f"skipping {requested.strip()}: transformers has no grouped_mm experts for {model_type}")
            continue
        variant = dataclasses.replace(common.TRAIN_STEP_VARIANTS[name], **overrides)
        variants.setdefault(common.variant_label(variant), variant)
    peak_tflops = common.matmul_peak_tflops(device)
    shared = common.environment(device)
    routing = "skewed" if args.skewed else "random"

    rows, failed = [], False
    for batch, seq in shapes:
        flops = common.step_flops(config_kwargs, batch, seq)
        for label, variant in variants.items():
            record = dict(shared, question="train-step", family=model_type, preset=args.preset, layers=layers,
                          batch=batch, seq=seq, shape=f"{batch}x{seq}", routing=routing, variant=label,
                          options=dataclasses.asdict(variant), steps=args.steps, warmup=args.warmup,
                          flops_per_step=flops, peak_tflops=common.rounded(peak_tflops, 1))
            try:
                seconds, peak, loss = measure(label, variant, config_kwargs, batch, seq, args.steps, device, dtype,
                                              args.skewed, args.profile, args.trace, args.warmup)
                tflops = flops / seconds / 1e12
                mfu = 100 * tflops / peak_tflops if peak_tflops else None
                record.update(status="ok", tokens_per_s=round(batch * seq / seconds, 1),
                              peak_gb=common.rounded(peak, 2), tflops=round(tflops, 2),
                              mfu_pct=common.rounded(mfu, 2), loss=round(loss, 4))
                rows.append((f"{batch}x{seq}", label, f"{batch * seq / seconds:,.0f}",
                             "-" if peak is None else f"{peak:.1f}", f"{tflops:.1f}",
                             "-" if mfu is None else f"{mfu:.1f}", f"{loss:.4f}"))
            except torch.OutOfMemoryError:
                total = torch.cuda.get_device_properties(0).total_memory / 2**30
                record.update(status="oom", device_gb=round(total, 1))
                rows.append((f"{batch}x{seq}", label, f"OOM at {total:.0f} GB", "-", "-", "-", "-"))
            except Exception as error:  # one broken variant must not cost the others their measurement
                traceback.print_exc()
                failed = True
                record.update(status="error", error=f"{type(error).__name__}: {error}"[:300])
                rows.append((f"{batch}x{seq}", label, f"error: {type(error).__name__}", "-", "-", "-", "-"))
            common.free_memory(device)  # here, not in the except blocks: their traceback still holds the failed model
            row = rows[-1]
            print(f"{args.preset} {row[0]} {label}: {row[2]} tokens/s, {row[3]} GB, loss {row[6]}", flush=True)
            if not args.no_record:
                common.append_record(record, args.jsonl)
    import fastmoe

    fastmoe.unpatch()

    header = ("shape", "variant", "tokens/s", "peak GB", "TFLOP/s", "% of peak", "loss")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print(f"{args.preset} ({model_type}), {layers} layers; {shared['gpu']}; bf16 matmul peak "
          f"{'-' if peak_tflops is None else f'{peak_tflops:.0f}'} TFLOP/s; routing {routing}; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print("\n".join(lines))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
