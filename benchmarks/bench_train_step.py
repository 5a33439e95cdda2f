"""One LoRA SFT training step of a whole model of each family: fastmoe against transformers + peft, same run,
same shapes, same adapters.

Families and presets (real shapes, random weights): AFMoE `trinity-mini`, LFM2-MoE `lfm2-8b-a1b`, JetMoe
`jetmoe-8b`, Cohere `command-r-layers` (Command R's layer shapes and vocabulary, fewer layers so it fits one GPU);
each has a `*-tiny` counterpart for CPU smoke runs (`tiny` is `afmoe-tiny`).

Variants: `hf-eager` (transformers + peft, eager experts), `hf-grouped_mm` (transformers' `grouped_mm` experts +
peft; AFMoE and LFM2-MoE only, the families with transformers' experts switch), `hf` (the faster of the two that the
family has), `fastmoe` (patched forwards, same peft adapter), `fastmoe-no-ckpt` (the same without gradient
checkpointing: reported as "OOM" where its activations do not fit), `fastmoe-offload` (checkpointing with each
layer's input in host memory), `fastmoe-4bit` (QLoRA: NF4 Linear layers and experts; AFMoE), and a `-flex` suffix on
any variant runs attention through transformers' FlexAttention instead of SDPA; a `-dense-mask` suffix on a fastmoe
variant runs AFMoE's sliding-window layers through SDPA over the dense mask instead of the flash kernel; a last
`-adamw8bit` suffix trains with bitsandbytes' 8-bit AdamW (transformers' optim="adamw_8bit") instead. LoRA r=16
on the family's default targets (`Fast*Model.default_target_modules/default_target_parameters`) in every variant,
experts via peft's `target_parameters`. Each step is forward, backward and AdamW (fused on the GPU, Trainer's
default) on the adapters, with gradient checkpointing (except JetMoe: transformers has none for it). `--skewed` adds
a selection bias that decays over the expert index (the first ~E/8 experts take most tokens: the worst case for load
balance).

Reports tokens/s (median of the timed steps), peak memory, model TFLOP/s and its share of the bf16 matmul peak
measured in the same run, and the loss of the last step (it should agree across variants up to bf16 noise).
FLOPs: the usual 6 x parameters x tokens would overstate LoRA work, whose frozen weights get no weight gradient.
We count 4 x active parameters x tokens (forward 2N + input gradient 2N), active meaning the weights a token is
multiplied by (experts at top_k / num_experts, the lm_head once, the input embedding lookup not at all), plus
attention's score and value products over the (query, key) pairs a causal or sliding-window mask keeps: 4 x
head_dim FLOPs per pair and head forward, twice that backward. Gradient checkpointing's recomputation and the
adapters' own FLOPs are not counted: this is model FLOPs utilisation, not hardware utilisation.

Every measurement is appended as one JSON line to benchmarks/results.jsonl (plot with
benchmarks/plot_results.py) and every run as a table to benchmarks/RESULTS.md.

    python benchmarks/bench_train_step.py --preset trinity-mini --shapes 1x4096,4x2048 --variants hf,fastmoe  # GPU
    python benchmarks/bench_train_step.py --preset lfm2-tiny --no-record        # CPU smoke run (TRITON_INTERPRET=1
                                                                                 # to run the kernels themselves)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

import fastmoe
from fastmoe import FastModel, patching
from fastmoe.models import afmoe
from fastmoe.models.shared import EXPERTS_IMPLEMENTATION
from fastmoe.sliding_window_attention import can_use_flash_sliding_window

# LFM2-8B-A1B interleaves 18 gated short-convolution layers with 6 attention layers.
_LFM2_ATTENTION_LAYERS = {2, 6, 10, 14, 18, 21}

PRESETS = {
    # Trinity-Mini: 26B total, 128 experts top-8, 1 shared expert, 2 dense layers, vocab 200,192.
    "trinity-mini": dict(model_type="afmoe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=1024,
                         num_hidden_layers=32, num_dense_layers=2, num_attention_heads=32, num_key_value_heads=4,
                         head_dim=128, num_experts=128, num_experts_per_tok=8, num_shared_experts=1,
                         vocab_size=200192, global_attn_every_n_layers=4, sliding_window=2048,
                         max_position_embeddings=8192, tie_word_embeddings=False),
    # LFM2-8B-A1B (config.json): 8.3B total, 1.5B active; 32 experts top-4, 2 dense layers, tied embeddings.
    "lfm2-8b-a1b": dict(model_type="lfm2_moe", hidden_size=2048, intermediate_size=7168, moe_intermediate_size=1792,
                        num_hidden_layers=24, num_dense_layers=2, num_attention_heads=32, num_key_value_heads=8,
                        num_experts=32, num_experts_per_tok=4, vocab_size=65536, max_position_embeddings=128000,
                        layer_types=["full_attention" if i in _LFM2_ATTENTION_LAYERS else "conv" for i in range(24)],
                        tie_word_embeddings=True),
    # JetMoe-8B (config.json): 8B total, 2.2B active; 8 attention experts and 8 MLP experts per layer, top-2;
    # 16 kv heads of 128, so 32 query heads per token.
    "jetmoe-8b": dict(model_type="jetmoe", hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16,
                      kv_channels=128, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Command R (c4ai-command-r-v01): 40 layers of hidden 8192, 64 heads (no GQA), MLP 22528, vocab 256,000, tied
    # embeddings, logit_scale 0.0625. 8 of the 40 layers: 8.7B parameters, the whole model would not fit with LoRA.
    "command-r-layers": dict(model_type="cohere", hidden_size=8192, intermediate_size=22528, num_hidden_layers=8,
                             num_attention_heads=64, num_key_value_heads=64, vocab_size=256000, logit_scale=0.0625,
                             use_qk_norm=False, max_position_embeddings=8192, tie_word_embeddings=True),
    "afmoe-tiny": dict(model_type="afmoe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                       num_hidden_layers=3, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, vocab_size=500,
                       global_attn_every_n_layers=2, sliding_window=16, max_position_embeddings=512,
                       tie_word_embeddings=False),
    "lfm2-tiny": dict(model_type="lfm2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=3, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=8, num_experts_per_tok=2, vocab_size=500, max_position_embeddings=512,
                      layer_types=["conv", "full_attention", "conv"], tie_word_embeddings=True),
    "jetmoe-tiny": dict(model_type="jetmoe", hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                        kv_channels=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                        vocab_size=500, max_position_embeddings=512, tie_word_embeddings=True),
    "cohere-tiny": dict(model_type="cohere", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=500, logit_scale=0.0625,
                        use_qk_norm=False, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                        eos_token_id=2),
}
PRESETS["tiny"] = PRESETS["afmoe-tiny"]

# Families whose transformers experts module has the `experts_implementation` switch (eager / grouped_mm). JetMoe
# loops over its experts in its own modules, Cohere is dense.
GROUPED_MM_FAMILIES = {"afmoe", "lfm2_moe"}
LORA_RANK = 16
LORA_SEED = 3407


def make_config(config_kwargs: dict) -> transformers.PretrainedConfig:
    """A preset (model_type plus config fields) as its transformers config."""
    kwargs = dict(config_kwargs)
    return transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def with_layers(config_kwargs: dict, layers: int) -> dict:
    """The preset with `layers` layers; a layer_types pattern is cut short or repeated to match."""
    kwargs = dict(config_kwargs, num_hidden_layers=layers)
    if "layer_types" in kwargs:
        pattern = kwargs["layer_types"]
        kwargs["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    return kwargs


def lora_targets(model_type: str) -> dict:
    """The family's default LoRA targets, which every variant trains."""
    family = patching.family_class(model_type)
    return dict(target_modules=list(family.default_target_modules),
                target_parameters=list(family.default_target_parameters) or None)


EIGHT_BIT_ADAM = "-adamw8bit"  # a variant suffix, always last: the same model, AdamW with 8-bit states


def resolve_variant(variant: str, model_type: str) -> str | None:
    """`hf` as the fastest transformers path the family has; None for a variant the family does not have."""
    if variant == "hf":
        return "hf-grouped_mm" if model_type in GROUPED_MM_FAMILIES else "hf-eager"
    if variant == "hf-grouped_mm" and model_type not in GROUPED_MM_FAMILIES:
        return None
    return variant


def _is_router_weight(name: str) -> bool:
    # AFMoE mlp.router.gate, LFM2-MoE feed_forward.gate, JetMoe (mlp and attention) router.layer.
    return name.endswith(("router.gate.weight", "router.layer.weight", "feed_forward.gate.weight"))


def _skew(num_experts: int, device) -> torch.Tensor:
    """A selection preference decaying over the expert index: the first ~E/8 experts take most tokens."""
    return torch.exp(-torch.arange(num_experts, device=device, dtype=torch.float32) / max(1.0, num_experts / 8))


@torch.no_grad()
def initialise(model: torch.nn.Module, skewed: bool, seed: int, config=None) -> None:
    """Random weights drawn on the device (to_empty leaves memory uninitialised); routers random (transformers
    zero-initialises some), scaled so that router logits are O(1) as in a trained model. `config`: the model's, for
    a part of a model (a decoder layer) that has none of its own."""
    config = config or model.config
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    hidden = config.hidden_size
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("inv_freq", "original_inv_freq")):
            continue
        if name.endswith("expert_bias"):
            # AFMoE and LFM2-MoE add it to the sigmoid scores for choosing experts only: a bias of order one
            # outweighs the scores' spread.
            tensor.copy_(_skew(tensor.numel(), tensor.device) if skewed else torch.zeros_like(tensor))
        elif "norm" in name:
            tensor.fill_(1.0)
        elif name.endswith("bias"):
            tensor.zero_()
        elif _is_router_weight(name):
            tensor.normal_(0.0, hidden**-0.5, generator=generator)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
    if skewed and config.model_type == "jetmoe":
        # JetMoe's routers have no expert bias: give their linear layer a logit bias (both transformers' gating
        # and fastmoe's call that layer as a module, so both see it).
        for module in model.modules():
            if type(module).__name__ == "JetMoeTopKGating":
                layer = module.layer
                layer.bias = torch.nn.Parameter(4.0 * _skew(layer.out_features, layer.weight.device).to(
                    layer.weight.dtype), requires_grad=False)
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
    NF4, both with double-quantized absmax), so memory holds the 4-bit layers so far plus one 16-bit layer.
    Embeddings, lm_head, norms and routers stay 16-bit. With LoRA r=16 on the same targets as the other variants. On
    the CPU (the tiny smoke run) bitsandbytes uses its CPU backend (bitsandbytes >= 0.46)."""
    from fastmoe.quantize import quantize_experts_

    model_type = config_kwargs["model_type"]
    if model_type != "afmoe":  # the layer-by-layer build below names AFMoE's modules outside the decoder layers
        raise ValueError(f"the fastmoe-4bit variant is built for AFMoE presets, not {model_type}")
    patching.family_class(model_type).pre_patch()
    config = make_config(config_kwargs)
    config._experts_implementation = EXPERTS_IMPLEMENTATION  # NF4 experts run in fastmoe's kernel only
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    for index, layer in enumerate(model.model.layers):
        layer.to_empty(device=device)
        initialise(layer, skewed, seed=index + 1, config=config)
        linear_layers_to_4bit_(layer, dtype)
        quantize_experts_(layer, double_quant=True)  # as load_in_4bit (bnb_4bit_use_double_quant=True) does
    outside_layers = torch.nn.ModuleList([model.model.embed_tokens, model.model.norm, model.model.rotary_emb,
                                          model.lm_head])
    outside_layers.to_empty(device=device)
    initialise(outside_layers, skewed, seed=0, config=config)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its 4-bit LoRA
    model.max_seq_length = 1 << 20
    return FastModel.get_peft_model(model, use_gradient_checkpointing=True, r=LORA_RANK, lora_alpha=LORA_RANK,
                                    random_state=LORA_SEED, **lora_targets(model_type))


def build(variant: str, config_kwargs: dict, device: str, dtype: torch.dtype, skewed: bool):
    """The preset's model on `device`, randomly initialised, wrapped in the family's default LoRA adapter."""
    fastmoe.unpatch()
    variant = variant.removesuffix(EIGHT_BIT_ADAM)  # the optimizer's choice (make_optimizer), not the model's
    # -dense-mask: AFMoE's sliding layers through SDPA over transformers' dense mask, as before fastmoe gave them
    # the flash kernel with the window (the A/B of that change within one run); set for every variant, so the
    # previous variant's choice never carries over
    afmoe.can_use_flash_sliding_window = (
        (lambda query, key: False) if variant.endswith("-dense-mask") else can_use_flash_sliding_window)
    model_type = config_kwargs["model_type"]
    if variant == "fastmoe-4bit":
        return build_fastmoe_4bit(config_kwargs, device, dtype, skewed)
    fast = variant.startswith("fastmoe")
    if fast:
        patching.family_class(model_type).pre_patch()
    config = make_config(config_kwargs)
    # fastmoe's experts kernel is an experts implementation of its own; a fastmoe variant configured with another
    # would run transformers' experts inside fastmoe's MoE forward.
    config._experts_implementation = (EXPERTS_IMPLEMENTATION if fast else "grouped_mm" if variant == "hf-grouped_mm"
                                      else "eager")
    if variant.endswith("-flex"):
        # transformers' FlexAttention path: block-sparse causal and sliding-window masks (compiled on first use)
        config._attn_implementation = "flex_attention"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    initialise(model, skewed, seed=0)
    model.requires_grad_(False)
    lora = dict(r=LORA_RANK, lora_alpha=LORA_RANK, **lora_targets(model_type))
    if fast:
        model.max_seq_length = 1 << 20
        # fastmoe-no-ckpt: the same model without recomputation, where activations fit beside the weights;
        # fastmoe-offload: checkpointing with each layer's input kept in host memory
        checkpointing = False if "no-ckpt" in variant else "fastmoe" if "offload" in variant else True
        return FastModel.get_peft_model(model, use_gradient_checkpointing=checkpointing, random_state=LORA_SEED,
                                        **lora)
    if model.supports_gradient_checkpointing:  # as FastModel.get_peft_model decides (JetMoe has none)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(LORA_SEED)  # the LoRA A matrices as FastModel.get_peft_model draws them
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def active_params(model: torch.nn.Module) -> int:
    """Weights one token is multiplied by: dense weights, experts at top_k / num_experts, the lm_head once (tied
    or not); the input embedding is a lookup. Works on a meta-device model."""
    top_k = getattr(model.config, "num_experts_per_tok", None)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = head.numel()
    for module in model.modules():
        is_experts = "Experts" in type(module).__name__  # AfmoeExperts, Lfm2MoeExperts, JetMoeParallelExperts
        for param in module.parameters(recurse=False):
            if param is embedding or param is head or param.dim() < 2:
                continue
            total += param.numel() * top_k // param.shape[0] if is_experts else param.numel()
    return total


def attention_flops(config, batch: int, seq: int) -> float:
    """Forward + backward FLOPs of QK^T and PV over the (query, key) pairs the masks keep, all layers."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "kv_channels", None) or config.hidden_size // heads
    window = min(getattr(config, "sliding_window", None) or seq, seq)
    pairs_per_type = {"full_attention": seq * (seq + 1) / 2,
                      "sliding_attention": window * (window + 1) / 2 + (seq - window) * window}
    pairs = sum(pairs_per_type.get(kind, 0) for kind in layer_types)  # conv layers have none
    return 12 * heads * head_dim * pairs * batch


def step_flops(config_kwargs: dict, batch: int, seq: int) -> float:
    config = make_config(config_kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return 4 * active_params(model) * batch * seq + attention_flops(config, batch, seq)


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


def make_optimizer(model: torch.nn.Module, variant: str, device: str) -> torch.optim.Optimizer:
    """AdamW on the adapters: fused on the GPU, transformers Trainer's default (optim="adamw_torch_fused"); with the
    -adamw8bit suffix, bitsandbytes' AdamW with 8-bit states, what optim="adamw_8bit" gives (the usual QLoRA choice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if variant.endswith(EIGHT_BIT_ADAM):
        import bitsandbytes as bnb

        return bnb.optim.AdamW(params, lr=1e-4, optim_bits=8)
    return torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")


def measure(variant, config_kwargs, batch, seq, steps, device, dtype, skewed, profile=False, trace=None, warmup=2):
    """(median seconds per step, peak GiB, loss of the last step) of `steps` timed steps after `warmup` untimed ones."""
    model = build(variant, config_kwargs, device, dtype, skewed)
    optimizer = make_optimizer(model, variant, device)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config_kwargs["vocab_size"], (batch, seq), generator=generator).to(device)
    model.train()
    times, loss = [], None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + warmup):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        loss = out.loss.item()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if profile and device == "cuda":
        print(f"--- profile of one {variant} step")
        print_host_syncs(model, optimizer, input_ids)
        print_profile(model, optimizer, input_ids, trace=trace and f"{trace}.{variant}.json.gz")
    del model, optimizer, out
    _free(device)
    return statistics.median(times), peak, loss


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def matmul_peak_tflops(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    import triton.testing

    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x4096,4x2048" -> [(1, 4096), (4, 2048)] as (batch, sequence length)."""
    shapes = []
    for item in text.split(","):
        batch, _, seq = item.strip().lower().partition("x")
        shapes.append((int(batch), int(seq)))
    return shapes


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


def run_environment(device: str, argv: list[str]) -> dict:
    """What every JSON line of this process shares."""
    return {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        # gpu_session.sh names one id for all its processes, so its summary can pick this session's lines.
        "run": os.environ.get("FASTMOE_BENCH_RUN") or f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "versions": versions(),
        "command": "python benchmarks/bench_train_step.py " + " ".join(argv),
    }


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--shapes", default=None, help="batch x sequence length, comma-separated: 1x4096,4x2048 "
                        "(default 1x4096 on a GPU, 1x64 on the CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (2 leave a fresh process's first 4-bit run ~10%% slow while the "
                             "CUDA caching allocator still grows)")
    parser.add_argument("--variants", default="hf-eager,hf-grouped_mm,fastmoe",
                        help="comma-separated, from hf-eager, hf-grouped_mm, hf (the faster of those the family has), "
                             "fastmoe, fastmoe-no-ckpt, fastmoe-offload, fastmoe-4bit; -flex suffix: FlexAttention; "
                             "-dense-mask suffix: AFMoE sliding layers without the flash window; -adamw8bit suffix "
                             "(last): bitsandbytes' 8-bit AdamW")
    parser.add_argument("--skewed", action="store_true", help="route most tokens to a few experts")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")),
                        help="markdown file the table is appended to")
    parser.add_argument("--jsonl", default=str(Path(__file__).with_name("results.jsonl")),
                        help="JSON-lines file every measurement is appended to")
    parser.add_argument("--profile", action="store_true", help="print a kernel-level profile of one step per variant")
    parser.add_argument("--trace", default=None, help="with --profile: also write each variant's step timeline to "
                        "TRACE.<variant>.json.gz")
    parser.add_argument("--no-record", action="store_true", help="print only; append nothing")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_kwargs = dict(PRESETS[args.preset])
    if args.layers:
        config_kwargs = with_layers(config_kwargs, args.layers)
    model_type = config_kwargs["model_type"]
    layers = config_kwargs["num_hidden_layers"]
    shapes = parse_shapes(args.shapes or ("1x4096" if device == "cuda" else "1x64"))
    peak_tflops = matmul_peak_tflops(device)
    shared = run_environment(device, sys.argv[1:])
    routing = "skewed" if args.skewed else "random"

    variants = []
    for requested in args.variants.split(","):
        variant = resolve_variant(requested.strip(), model_type)
        if variant is None:
            print(f"skipping {requested}: transformers has no grouped_mm experts for {model_type}")
        elif variant not in variants:
            variants.append(variant)

    rows, failed = [], False
    for batch, seq in shapes:
        flops = step_flops(config_kwargs, batch, seq)
        for variant in variants:
            record = dict(shared, family=model_type, preset=args.preset, layers=layers, batch=batch, seq=seq,
                          shape=f"{batch}x{seq}", routing=routing, variant=variant, steps=args.steps,
                          flops_per_step=flops, peak_tflops=None if device != "cuda" else round(peak_tflops, 1))
            try:
                seconds, peak, loss = measure(variant, config_kwargs, batch, seq, args.steps, device, dtype,
                                              args.skewed, args.profile, args.trace, args.warmup)
                tflops = flops / seconds / 1e12
                mfu = 100 * tflops / peak_tflops if device == "cuda" else None
                record.update(status="ok", tokens_per_s=round(batch * seq / seconds, 1),
                              peak_gb=None if device != "cuda" else round(peak, 2), tflops=round(tflops, 2),
                              mfu_pct=None if mfu is None else round(mfu, 2), loss=round(loss, 4))
                rows.append((f"{batch}x{seq}", variant, f"{batch * seq / seconds:,.0f}", f"{peak:.1f}",
                             f"{tflops:.1f}", "-" if mfu is None else f"{mfu:.1f}", f"{loss:.4f}"))
            except torch.OutOfMemoryError:
                total = torch.cuda.get_device_properties(0).total_memory / 2**30
                record.update(status="oom", device_gb=round(total, 1))
                rows.append((f"{batch}x{seq}", variant, f"OOM at {total:.0f} GB", "-", "-", "-", "-"))
            except Exception as error:  # one broken variant must not cost the others their measurement
                traceback.print_exc()
                failed = True
                record.update(status="error", error=f"{type(error).__name__}: {error}"[:300])
                rows.append((f"{batch}x{seq}", variant, f"error: {type(error).__name__}", "-", "-", "-", "-"))
            _free(device)  # here, not in the except blocks: their traceback still holds the failed model
            row = rows[-1]
            print(f"{args.preset} {row[0]} {variant}: {row[2]} tokens/s, {row[3]} GB, loss {row[6]}", flush=True)
            if not args.no_record:
                append_jsonl(args.jsonl, record)
    fastmoe.unpatch()

    header = ("shape", "variant", "tokens/s", "peak GB", "TFLOP/s", "% of peak", "loss")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    v = shared["versions"]
    meta = (f"- date: {shared['date']}; {shared['gpu']}; torch {v['torch']}; transformers {v['transformers']}; "
            f"peft {v['peft']}; triton {v.get('triton', '-')}; measured bf16 matmul peak {peak_tflops:.0f} TFLOP/s\n"
            f"- model: preset {args.preset} ({model_type}), {layers} layers; LoRA r={LORA_RANK} on the family's "
            f"default targets; gradient checkpointing where transformers has it; routing {routing}; median of "
            f"{args.steps} steps after {args.warmup} warm-up\n"
            f"- TFLOP/s: 4 x active parameters x tokens + attention over the (query, key) pairs the masks keep "
            f"(backward counted as twice the forward)\n"
            f"- command: `{shared['command']}`")
    table = "\n".join(lines)
    print(meta)
    print(table)
    if not args.no_record:
        with open(args.results, "a") as handle:
            handle.write(f"\n## Training step: {model_type} {args.preset}\n\n{meta}\n\n{table}\n")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
