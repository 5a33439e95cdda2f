"""Generation with an adapter attached: fastmoe's decode path (`FastModel.for_inference`) against transformers + peft.

One case is one (preset, layers, batch, prompt length, implementation, weights). The model is loaded as
bench_sft.py loads it (the same random checkpoint or direct build, the same LoRA r=16 on the family's default
targets, attention and experts included), then:

* fastmoe: `FastModel.for_inference(model)` (with --fastmoe-without-graphs: `use_cuda_graphs=False`);
* transformers: `model.eval()` with the KV cache on (transformers switches its experts to `batched_mm` for decoding).

A batch of random prompt tokens (no padding) is greedily decoded with `model.generate(max_new_tokens=N,
min_new_tokens=N)`. Times are medians over --repeats calls after a warm-up call (which captures fastmoe's graphs):
the prefill alone (`max_new_tokens=1`), a short call (S = min(8, N // 2) decode steps) and the whole call; decode
tokens/s = batch x (N - 1 - S) / (whole - short): both calls prefill and start decoding alike, so that their
difference is decode steps alone.

The roofline beside it: the bytes one decode step must read from HBM at least (every non-expert weight and adapter,
the routed experts a batch of that size selects on average with uniform routing, E(1 - (1 - k/E)^batch) per layer,
their adapters, the LM head, and the KV cache at the middle of the decode) over the copy bandwidth measured in the same
process. One JSON line per case goes to benchmarks/results.jsonl (question "generate").

    python benchmarks/bench_generate.py --preset trinity-mini --layers 8 --batches 1,8 --prompt 512 --new-tokens 256
    TRITON_INTERPRET=1 python benchmarks/bench_generate.py --preset afmoe-tiny --batches 1 --prompt 16 --new-tokens 8 \
        --repeats 1 --no-record      # CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import traceback

import torch

import bench_sft
import common


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory: 0 for a zero-storage placeholder (a 0-d value expanded to a shape, as
    fastmoe leaves in place of each expert stack it quantized to NF4: the codes are the experts module's buffers)."""
    if tensor.numel() > 1 and all(stride == 0 for stride in tensor.stride()):
        return 0
    return tensor.numel() * tensor.element_size()


def decode_bytes(model, config, batch: int, context: int) -> int:
    """Bytes one decode step reads at least (see the module docstring): the weights as they are stored, parameters
    and buffers (fastmoe's NF4 expert codes and absmax are buffers), and bitsandbytes' 4-bit quantization statistics."""
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
    touched = num_experts * (1 - (1 - top_k / num_experts) ** batch) if num_experts else None
    from fastmoe import models

    family = models.family(config.model_type)
    routers = tuple(f"{router}." for router in family.routers) if family is not None else ()
    total = 0
    seen = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = stored_bytes(tensor)
        if "embed_tokens" in name:
            size = batch * tensor.shape[-1] * tensor.element_size()  # only the batch's rows are read
        elif (num_experts and tensor.shape and tensor.shape[0] == num_experts and not _belongs_to(name, routers)
              and (tensor.dim() >= 2 or name.endswith("_nf4_absmax_offset"))):
            # a stack of experts (its NF4 codes and scales), or an expert-indexed LoRA factor; routers read whole
            size = size * touched / num_experts
        quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes Params4bit: absmax beside the codes
        if quant_state is not None:
            size += sum(stored_bytes(t) for t in _quant_state_tensors(quant_state))
        total += size
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    for kind in layer_types:
        keys = min(context, window) if kind == "sliding_attention" and window else context
        if kind in ("full_attention", "sliding_attention"):
            total += 2 * batch * kv_heads * keys * head_dim * 2
    return int(total)


def _belongs_to(name: str, modules: tuple[str, ...]) -> bool:
    """Whether parameter `name` belongs to a module whose path ends with one of `modules` (each ending in ".")."""
    return any(f".{module}" in f".{name}" for module in modules)


def _quant_state_tensors(quant_state) -> list[torch.Tensor]:
    """A bitsandbytes QuantState's per-block scales: absmax, and with nested quantization the absmax of those."""
    nested = getattr(quant_state, "state2", None)
    return [quant_state.absmax] + ([nested.absmax] if nested is not None else [])


def print_profile(fn, rows: int, what: str) -> None:
    """The kernels `fn` runs by device time, with their counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    print(f"profile: {len(kernels)} device events, {busy_ms:.2f} ms device time over {what}")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=90))


def captured_step(model):
    """The decode buffers whose captured graph the last generate call replayed, or None (eager, or transformers)."""
    from fastmoe.generation import DecodeForward

    decode = model.get_base_model().forward
    graphed = [b for b in decode.buffers.values() if b.graph is not None] if isinstance(decode, DecodeForward) else []
    return max(graphed, key=lambda b: b.capacity) if graphed else None


def replay_ms_per_step(model) -> float | None:
    """Device time of one decode step alone: the captured graph of the last generate call replayed back to back
    (what the step costs without generate's host work between steps). Replays rewrite the same slot with the
    same values."""
    buffers = captured_step(model)
    if buffers is None:
        return None
    buffers.index.fill_(buffers.length - 1)
    # Back to back as generate runs them (do_bench would flush L2 between replays, which a decode loop does not: a
    # step finds what the last one left there, 5-11% faster on an H100 for the 4-bit batch-1 steps).
    for _ in range(5):
        buffers.graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            buffers.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return statistics.median(times)


def run_case(case: bench_sft.Case, args, device: str, dtype: torch.dtype,
             bandwidth_gbs: float | None) -> list[dict]:
    """The case's records: one, or for fastmoe one per combination of the decode settings' values (decode_settings;
    the model loaded once, its decode graphs captured again for each)."""
    from fastmoe import FastModel

    model, _ = bench_sft.load(case, args, device, dtype)
    if case.implementation != "fastmoe":
        model.eval()
        model.get_base_model().config.use_cache = True
        return [measure(model, case, args, device, bandwidth_gbs)]
    settings = decode_settings()
    defaults = {key: getattr(module, name) for key, (module, name, _, _) in settings.items()}
    values = {key: [parse(v) for v in bench_sft.csv(getattr(args, key))] or [defaults[key]]
              for key, (_, _, parse, _) in settings.items()}
    records = []
    try:
        for combination in itertools.product(*values.values()):
            chosen = dict(zip(values, combination))
            for key, (module, name, _, _) in settings.items():
                setattr(module, name, chosen[key])
            FastModel.for_inference(model, use_cuda_graphs=case.cuda_graphs)
            record = measure(model, case, args, device, bandwidth_gbs)
            # An ablation is marked, and the report's table leaves it out.
            record.update({key: value for key, value in chosen.items() if value != defaults[key]})
            records.append(record)
            FastModel.for_training(model, keep_decode_graphs=False)
    finally:
        for key, (module, name, _, _) in settings.items():
            setattr(module, name, defaults[key])
    return records


def decode_settings() -> dict:
    """The decode path's switches an ablation flips: record key (also the argument's name) -> (module, its
    constant, how to read a value from the command line, what the values choose)."""
    from fastmoe.kernels.moe import one_token, routing

    def flag(value: str) -> bool:
        return bool(int(value))

    return {
        "gemv_loop_stages": (one_token, "GEMV_LOOP_STAGES", int,
                             "e.g. 1,3: the GEMV kernels' K loops as they are and pipelined 3 steps deep"),
        "gemv_mma": (one_token, "GEMV_MMA", flag, "0,1: NF4 GEMV products in fp32 FMAs and on the tensor cores"),
        "router_gemv_tokens": (routing, "ROUTER_GEMV_TOKENS", int,
                               "0,16: the router as cuBLAS's GEMV and the top-k launch, or both in one launch"),
        "gemv_predecoded_absmax": (one_token, "GEMV_PREDECODED_ABSMAX", flag,
                                   "0,1: a double-quantized absmax decoded in the one-token GEMVs' tiles, or for the "
                                   "chosen experts by a launch first"),
        "down_xa_in_gate_up": (one_token, "DOWN_XA_IN_GATE_UP", flag,
                               "0,1: the down LoRA's x A^T in every down program, or once from gate_up's partials"),
    }


def measure(model, case: bench_sft.Case, args, device: str, bandwidth_gbs: float | None) -> dict:
    config = model.get_base_model().config
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (case.batch, args.prompt), generator=generator).to(device)
    inputs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                  pad_token_id=0, eos_token_id=None)

    def generate(new_tokens: int) -> tuple[float, torch.Tensor]:
        common.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        common.synchronize(device)
        return time.perf_counter() - start, out[:, args.prompt:]

    generate(min(8, args.new_tokens))  # warm-up: Triton compiles, fastmoe captures its graphs
    if args.profile_rows and device == "cuda":
        buffers = captured_step(model)
        if buffers is None:
            print_profile(lambda: generate(17), args.profile_rows, "a prefill and 16 decode steps")
        else:  # the kernels of the captured step alone, replayed 10 times (a count of 10 is one launch per step)
            buffers.index.fill_(buffers.length - 1)
            print_profile(lambda: [buffers.graph.replay() for _ in range(10)], args.profile_rows,
                          "10 replays of the captured decode step")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill = statistics.median(generate(1)[0] for _ in range(args.repeats))
    # A decode step's time: the difference of two generations that both decode (a prefill and `short` steps, and
    # the same with new_tokens - 1 steps), so that what only a prefill-only call does (or skips) cancels out.
    short = min(8, args.new_tokens // 2)
    base = statistics.median(generate(short + 1)[0] for _ in range(args.repeats))
    runs = [generate(args.new_tokens) for _ in range(args.repeats)]
    whole = statistics.median(t for t, _ in runs)
    steps = args.new_tokens - 1 - short
    decode_s = max(whole - base, 1e-9)
    tokens_per_s = case.batch * steps / decode_s
    ms_per_step = 1e3 * decode_s / steps
    replay_ms = replay_ms_per_step(model) if case.implementation == "fastmoe" and device == "cuda" else None
    if replay_ms is not None and ms_per_step < 0.97 * replay_ms:
        # A step cannot take less than its graph's replay: the host's time varied more than the decode took.
        print(f"warning: decode measured at {ms_per_step:.3f} ms a step, below the graph's replay alone "
              f"({replay_ms:.3f} ms): too few --new-tokens for this machine's noise", flush=True)
    step_bytes = decode_bytes(model, config, case.batch, args.prompt + args.new_tokens // 2)
    roofline = case.batch * bandwidth_gbs * 1e9 / step_bytes if bandwidth_gbs else None
    record = dict(
        question="generate", preset=case.preset, layers=case.layers, batch=case.batch, prompt=args.prompt,
        new_tokens=args.new_tokens, implementation=case.implementation, quantization=case.quantization,
        load=case.load, cuda_graphs=case.cuda_graphs, targets=case.targets,
        decode_tokens_per_s=common.rounded(tokens_per_s), ms_per_step=common.rounded(ms_per_step),
        replay_ms_per_step=common.rounded(replay_ms), prefill_s=common.rounded(prefill), generate_s=common.rounded(whole),
        step_bytes=step_bytes, bandwidth_gbs=common.rounded(bandwidth_gbs), roofline_tokens_per_s=common.rounded(
            roofline), roofline_share=common.rounded(tokens_per_s / roofline) if roofline else None,
        peak_gb=common.rounded(torch.cuda.max_memory_allocated() / 1e9) if device == "cuda" else None,
        tokens=runs[-1][1][0, :16].tolist(),
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="trinity-mini", choices=sorted(common.PRESETS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementations", default="fastmoe,transformers")
    parser.add_argument("--quantization", choices=["4bit"], default=None)
    parser.add_argument("--targets", default="default", choices=common.LORA_TARGET_SETS,
                        help="the adapter's LoRA targets (default-without-experts: to see what the experts' LoRA "
                        "costs a step); records of other than the default stay out of the report's table")
    parser.add_argument("--load", choices=["checkpoint", "direct"], default="direct")
    parser.add_argument("--fastmoe-without-graphs", action="store_true",
                        help="fastmoe decodes eagerly (for_inference(use_cuda_graphs=False))")
    parser.add_argument("--profile-rows", type=int, default=0,
                        help="print the top kernels (torch.profiler) of 10 replays of the captured decode step, or of "
                        "a prefill and 16 eager decode steps, after the warm-up")
    for key, (module, name, _, effect) in decode_settings().items():
        parser.add_argument(f"--{key.replace('_', '-')}", default="",
                            help=f"fastmoe: decode once per value of {module.__name__}.{name} ({effect}), each "
                            "combination of these settings' values in turn; records of a value other than the default "
                            f"are marked ({key}) and stay out of the report's table")
    parser.add_argument("--checkpoint-dir", default="/tmp/fastmoe-bench-checkpoints")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL))
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()

    device = common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quantization and args.load == "direct":
        parser.error("--quantization 4bit loads a checkpoint: pass --load checkpoint")
    if args.new_tokens < 4:
        parser.error("--new-tokens must be at least 4 (a decode step is timed as the difference of two generations)")
    bandwidth = common.copy_bandwidth_gbs() if device == "cuda" else None
    failures = 0
    for implementation in bench_sft.csv(args.implementations):
        for batch in (int(b) for b in bench_sft.csv(args.batches)):
            case = bench_sft.Case(preset=args.preset, layers=args.layers, batch=batch,
                                  seq=args.prompt + args.new_tokens, implementation=implementation,
                                  quantization=args.quantization, load=args.load, targets=args.targets,
                                  cuda_graphs=not (args.fastmoe_without_graphs and implementation == "fastmoe"))
            try:
                records = run_case(case, args, device, dtype, bandwidth)
            except Exception:
                traceback.print_exc()
                failures += 1
                continue
            finally:
                common.free_memory(device)
            for record in records:
                record.update(common.environment(device))
                share = f" ({100 * record['roofline_share']:.1f}% of the roofline)" if record["roofline_share"] else ""
                ablation = "".join(f" {key} {record[key]}" for key in decode_settings() if key in record)
                print(f"{case.preset} {case.layers}L batch {batch} prompt {args.prompt} {implementation}"
                      f"{' 4bit' if case.quantization else ''}{'' if case.cuda_graphs else ' eager'}{ablation}: "
                      f"{record['decode_tokens_per_s']:,.1f} decode tok/s, {record['ms_per_step']} ms/step{share} "
                      f"(graph replay alone {record['replay_ms_per_step']} ms), "
                      f"prefill {record['prefill_s']} s, peak {record['peak_gb']} GB, tokens {record['tokens'][:8]}",
                      flush=True)
                if not args.no_record:
                    common.append_record(record, args.jsonl)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
