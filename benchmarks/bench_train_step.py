"""One LoRA SFT training step of a whole AFMoE model: fastmoe against transformers + peft, same run, same shapes.

Variants: transformers eager experts + peft, transformers `grouped_mm` experts + peft (experts via
`target_parameters` in both), fastmoe (patched forwards, same peft adapter), fastmoe-no-ckpt (the same without
gradient checkpointing: reported as "OOM" where its activations do not fit); a `-flex` suffix runs attention through
transformers' FlexAttention instead of SDPA; fastmoe-offload checkpoints with the layer inputs in host memory;
fastmoe-4bit is QLoRA (NF4 Linear layers and experts). Each step is forward, backward
and AdamW on the adapters, with gradient checkpointing. Reports tokens/s (median of the timed steps), peak
memory and model TFLOP/s. The usual 6 x parameters x tokens would overstate LoRA work, whose frozen weights get
no weight gradient: we count 4 x active parameters x tokens (forward 2N + input gradient 2N) plus causal
attention, and divide by the measured bf16 matmul peak.

    python benchmarks/bench_train_step.py --preset trinity-mini --layers 32   # GPU; the bar in the brief
    python benchmarks/bench_train_step.py --preset tiny                       # CPU smoke run
    python benchmarks/bench_train_step.py --preset trinity-mini --variants fastmoe-4bit  # 4-bit, build_fastmoe_4bit
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

import fastmoe
from fastmoe import FastModel
from fastmoe.models.afmoe import FastAfmoeModel

PRESETS = {
    # Trinity-Mini shapes: 26B total, 128 experts top-8, 1 shared expert, 2 dense layers, vocab 200,192.
    "trinity-mini": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=1024, num_hidden_layers=32,
                         num_dense_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, num_shared_experts=1, vocab_size=200192,
                         global_attn_every_n_layers=4, sliding_window=2048, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                 num_experts_per_tok=2, num_shared_experts=1, vocab_size=500, global_attn_every_n_layers=2,
                 sliding_window=16, max_position_embeddings=512),
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


@torch.no_grad()
def initialise(model: torch.nn.Module, skewed: bool, seed: int) -> None:
    """Random weights drawn on the device (to_empty leaves memory uninitialised). Routers random: HF zero-inits them."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("expert_bias"):
            param.zero_()
            if skewed:
                # A biased selection sends most tokens to the first experts: the worst case for load balance.
                param[: max(1, param.numel() // 8)] = 1.0
        elif param.dim() == 1:
            param.fill_(1.0)  # norms
        elif "router" in name:
            param.normal_(0.0, 0.5, generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            fresh = type(module)(config=module.config)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)


def linear_layers_to_4bit_(layer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace the layer's nn.Linear modules, routers aside, by bitsandbytes NF4 Linear4bit quantized where they are
    (on the GPU), with load_in_4bit's settings (double quantization, compute in the model's dtype)."""
    import bitsandbytes as bnb

    for name, linear in list(layer.named_modules()):
        if type(linear) is not torch.nn.Linear or "router" in name:
            continue
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=quantized).to(linear.weight.device)
        if linear.bias is not None:
            quantized.bias = linear.bias
        layer.set_submodule(name, quantized)


def build_fastmoe_4bit(config_kwargs: dict, device: str, dtype: torch.dtype, skewed: bool):
    """The model as load_in_4bit leaves it, without its 16-bit self ever existing: built on the meta device, then
    materialised one decoder layer at a time (random weights, Linear layers to bitsandbytes NF4, experts to fastmoe's
    NF4), so memory holds the 4-bit layers so far plus one 16-bit layer. Embeddings, lm_head, norms and routers stay
    16-bit. With LoRA r=16 on the same targets as the other variants. On the CPU (the tiny smoke run) bitsandbytes
    uses its CPU backend (bitsandbytes >= 0.46)."""
    from fastmoe.quantize import quantize_experts_

    FastAfmoeModel.pre_patch()
    config = transformers.AfmoeConfig(**config_kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    for index, layer in enumerate(model.model.layers):
        layer.to_empty(device=device)
        initialise(layer, skewed, seed=index + 1)
        linear_layers_to_4bit_(layer, dtype)
        quantize_experts_(layer)
    outside_layers = torch.nn.ModuleList([model.model.embed_tokens, model.model.norm, model.model.rotary_emb,
                                          model.lm_head])
    outside_layers.to_empty(device=device)
    initialise(outside_layers, skewed, seed=0)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its 4-bit LoRA
    model.max_seq_length = 1 << 20
    return FastModel.get_peft_model(model, use_gradient_checkpointing=True, r=16, lora_alpha=16,
                                    target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS)


def build(variant: str, config_kwargs: dict, device: str, dtype: torch.dtype, skewed: bool):
    fastmoe.unpatch()
    if variant == "fastmoe-4bit":
        return build_fastmoe_4bit(config_kwargs, device, dtype, skewed)
    fast = variant.startswith("fastmoe")
    if fast:
        FastAfmoeModel.pre_patch()
    config = transformers.AfmoeConfig(**config_kwargs)
    config._experts_implementation = "grouped_mm" if variant == "hf-grouped_mm" else "eager"
    if variant.endswith("-flex"):
        # transformers' FlexAttention path: block-sparse causal and sliding-window masks (compiled on first use)
        config._attn_implementation = "flex_attention"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    initialise(model, skewed, seed=0)
    model.requires_grad_(False)
    lora = dict(r=16, lora_alpha=16, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS)
    if fast:
        model.max_seq_length = 1 << 20
        # fastmoe-no-ckpt: the same model without recomputation, where activations fit beside the weights
        # fastmoe-offload: checkpointing with each layer's input kept in host memory (fastmoe's default mode)
        checkpointing = False if "no-ckpt" in variant else "fastmoe" if "offload" in variant else True
        return FastModel.get_peft_model(model, use_gradient_checkpointing=checkpointing, **lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def active_params(config_kwargs: dict) -> int:
    c = config_kwargs
    h, layers, dense = c["hidden_size"], c["num_hidden_layers"], c["num_dense_layers"]
    attn = h * c["head_dim"] * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + h * c["head_dim"] * c["num_attention_heads"]
    dense_mlp = 3 * h * c["intermediate_size"]
    moe = 3 * h * c["moe_intermediate_size"] * (c["num_experts_per_tok"] + c["num_shared_experts"]) + h * c["num_experts"]
    return layers * attn + dense * dense_mlp + (layers - dense) * moe + h * c["vocab_size"]


def print_profile(model, optimizer, input_ids, rows: int = 35) -> None:
    """One more step under torch.profiler: where the step's GPU time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def measure(variant, config_kwargs, batch, seq, steps, device, dtype, skewed, profile=False):
    model = build(variant, config_kwargs, device, dtype, skewed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config_kwargs["vocab_size"], (batch, seq), generator=generator).to(device)
    model.train()
    times, loss = [], None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 2):  # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
        loss = out.loss.item()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if profile and device == "cuda":
        print(f"--- profile of one {variant} step")
        print_profile(model, optimizer, input_ids)
    del model, optimizer, out
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak, loss


def matmul_peak_tflops(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    import triton.testing

    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="hf-eager,hf-grouped_mm,fastmoe",
                        help="comma-separated, from hf-eager, hf-grouped_mm, fastmoe, fastmoe-4bit")
    parser.add_argument("--skewed", action="store_true", help="route most tokens to a few experts")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")),
                        help="markdown file the table is appended to")
    parser.add_argument("--profile", action="store_true", help="print a kernel-level profile of one step per variant")
    parser.add_argument("--no-record", action="store_true", help="print only; append nothing")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_kwargs = dict(PRESETS[args.preset])
    if args.layers:
        config_kwargs["num_hidden_layers"] = args.layers
    seq = args.seq or (4096 if device == "cuda" else 64)
    tokens = args.batch * seq
    peak_tflops = matmul_peak_tflops(device)
    c = config_kwargs
    attention_flops = 4 * 2 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * seq * seq / 2 * args.batch
    step_flops = 4 * active_params(config_kwargs) * tokens + attention_flops

    rows = []
    for variant in args.variants.split(","):
        try:
            seconds, peak, loss = measure(variant, config_kwargs, args.batch, seq, args.steps, device, dtype, args.skewed,
                                         args.profile)
            tflops = step_flops / seconds / 1e12
            rows.append((variant, f"{tokens / seconds:,.0f}", f"{peak:.1f}", f"{tflops:.1f}",
                         f"{100 * tflops / peak_tflops:.1f}" if device == "cuda" else "-", f"{loss:.4f}"))
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            rows.append((variant, f"OOM at {total:.0f} GB", "-", "-", "-", "-"))
            gc.collect()
            torch.cuda.empty_cache()
    fastmoe.unpatch()

    header = ("variant", "tokens/s", "peak GB", "TFLOP/s", "% of peak", "loss")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    meta = (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {gpu}; torch {torch.__version__}; "
            f"transformers {transformers.__version__}; measured bf16 matmul peak {peak_tflops:.0f} TFLOP/s\n"
            f"- shape: preset {args.preset}, {c['num_hidden_layers']} layers, batch {args.batch} x {seq} tokens, "
            f"LoRA r=16 on attention, MLPs and experts, gradient checkpointing, routing {'skewed' if args.skewed else 'random'}\n"
            f"- command: `python benchmarks/bench_train_step.py {' '.join(_argv())}`")
    table = "\n".join(lines)
    print(meta)
    print(table)
    if not args.no_record:
        with open(args.results, "a") as handle:
            handle.write(f"\n## Training step: AFMoE {args.preset}\n\n{meta}\n\n{table}\n")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
