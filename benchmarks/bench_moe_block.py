"""One MoE experts block, LoRA r=16 on both expert weights: fastmoe's Triton kernels vs transformers + peft.

GPU only. For each model shape and router (balanced: random logits; skewed: a few experts take most tokens):

* experts block forward and forward+backward, bf16, LoRA r=16 on gate_up_proj and down_proj, base weights
  frozen, gradients to hidden states, routing weights and LoRA factors;
  - fastmoe: ``fastmoe.kernels.moe.moe_experts``
  - transformers: ``AfmoeExperts`` with ``config._experts_implementation = "grouped_mm"``, wrapped by peft
    ``LoraConfig(target_parameters=["gate_up_proj", "down_proj"])`` (the same math for every family here;
    LFM2-MoE and JetMoe shapes are run through the AFMoE experts module);
* the bare grouped GEMMs (no LoRA, rows already sorted by expert): ``torch.nn.functional.grouped_mm`` vs
  fastmoe's ``grouped_mm`` at equal work, for the gate_up (N=2I, K=H) and down (N=H, K=I) shapes.

Times are medians of ``triton.testing.do_bench``; TFLOP/s count the base-weight GEMMs only (forward 6*S*H*I,
forward+backward with frozen weights 12*S*H*I, S = tokens * top_k); peak memory is the allocator's peak
above what was allocated before the measured call.

    python benchmarks/bench_moe_block.py [--tokens 4096] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import peft
import torch
import torch.nn.functional as F
import transformers
import triton
from transformers.models.afmoe.modeling_afmoe import AfmoeExperts

from fastmoe.kernels.moe import ExpertLora, gemm_block_m, grouped_mm, moe_experts, sort_by_expert

SHAPES = [  # name, hidden, intermediate, experts, top_k
    ("Trinity-Mini", 2048, 1024, 128, 8),
    ("LFM2-8B-A1B", 2048, 1792, 32, 4),
    ("JetMoe-8B", 2048, 5632, 8, 2),
]
RANK = 16


def routing(num_tokens: int, num_experts: int, top_k: int, kind: str, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen)
    if kind == "skewed":
        # Exponentially decaying preference: the first ~E/8 experts receive most of the tokens.
        logits = logits + 4.0 * torch.exp(-torch.arange(num_experts, device=device) / max(1, num_experts / 8))
    top_logits, index = logits.topk(top_k, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)
    return index, weights


class _Block(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = AfmoeExperts(config)

    def forward(self, hidden, index, weights):
        return self.experts(hidden, index, weights)


def peft_block(hidden: int, inter: int, num_experts: int, top_k: int, device: str):
    config = transformers.AfmoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts,
                                      num_experts_per_tok=top_k, hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    block = _Block(config).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(std=hidden**-0.5)
        block.experts.down_proj.normal_(std=inter**-0.5)
    lora_config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[],
                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = peft.get_peft_model(block, lora_config, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero; a trained adapter is not.
            torch.nn.init.normal_(param, std=0.02)
    return model


def _factors(wrapper, num_experts: int) -> ExpertLora:
    """peft's ParamWrapper Linear weights as (E, r, in) / (E, out, r) views (no copies; grads reach peft)."""
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    return ExpertLora(a.reshape(num_experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1),
                      wrapper.scaling["default"])


def fastmoe_fn(model, num_experts: int):
    outer = model.base_model.model.experts  # ParamWrapper(down_proj) around ParamWrapper(gate_up_proj)
    inner = outer.base_layer
    experts = inner.base_layer
    gate_up_lora, down_lora = _factors(inner, num_experts), _factors(outer, num_experts)

    def run(hidden, index, weights):
        return moe_experts(hidden, index, weights, experts.gate_up_proj, experts.down_proj, gate_up_lora, down_lora)

    return run


def measure(fn, inputs, grad_out, backward: bool):
    """(median ms, peak MiB above the starting allocation) of fn(*inputs) [+ backward]."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = fn(*inputs)
        if backward:
            out.backward(grad_out)

    step()
    torch.cuda.synchronize()
    for t in leaves:
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")
    return ms, peak


def gemm_rows(name, hidden, inter, num_experts, top_k, num_tokens, index, device):
    schedule = sort_by_expert(index, num_experts, gemm_block_m(torch.device(device), index.numel(), num_experts))
    rows = schedule.num_pairs
    identity = torch.arange(rows, dtype=torch.int32, device=device)
    offs = schedule.expert_offsets[1:].contiguous()
    out = []
    for label, n, k in (("gate_up", 2 * inter, hidden), ("down", hidden, inter)):
        a = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(num_experts, n, k, device=device, dtype=torch.bfloat16) * k**-0.5
        c = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
        flops = 2 * rows * n * k
        torch_ms = triton.testing.do_bench(lambda: F.grouped_mm(a, w.transpose(1, 2), offs=offs),
                                           warmup=10, rep=50, return_mode="median")
        ours_ms = triton.testing.do_bench(lambda: grouped_mm(a, identity, w, schedule, c, identity),
                                          warmup=10, rep=50, return_mode="median")
        ref = F.grouped_mm(a, w.transpose(1, 2), offs=offs)
        grouped_mm(a, identity, w, schedule, c, identity)
        err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
        out.append((f"{name} GEMM {label} (N={n}, K={k})", "torch grouped_mm", torch_ms, flops / torch_ms / 1e9, None, None))
        out.append((f"{name} GEMM {label} (N={n}, K={k})", "fastmoe grouped_mm", ours_ms, flops / ours_ms / 1e9, None, err))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="markdown file the table is appended to")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe_block.py needs a CUDA GPU")
    device = "cuda"
    num_tokens = args.tokens
    rows = []
    for name, hidden, inter, num_experts, top_k in SHAPES:
        model = peft_block(hidden, inter, num_experts, top_k, device)
        ours = fastmoe_fn(model, num_experts)
        for kind in ("balanced", "skewed"):
            index, weights = routing(num_tokens, num_experts, top_k, kind, device)
            load = torch.bincount(index.reshape(-1), minlength=num_experts).max().item() / index.numel()
            x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
            weights = weights.requires_grad_()
            grad_out = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                ref, got = model(x, index, weights), ours(x, index, weights)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            flops_fwd = 6 * num_tokens * top_k * hidden * inter
            label = f"{name} {kind} (max expert load {load:.1%})"
            for impl, fn in (("transformers grouped_mm + peft", model), ("fastmoe", ours)):
                inputs = (x, index, weights) + tuple(p for p in model.parameters() if p.requires_grad)
                call = (lambda f: lambda x, i, w, *_: f(x, i, w))(fn)
                fwd_ms, fwd_mem = measure(call, inputs, grad_out, backward=False)
                bwd_ms, bwd_mem = measure(call, inputs, grad_out, backward=True)
                rel = err if impl == "fastmoe" else None
                rows.append((label + " fwd", impl, fwd_ms, flops_fwd / fwd_ms / 1e9, fwd_mem, rel))
                rows.append((label + " fwd+bwd", impl, bwd_ms, 2 * flops_fwd / bwd_ms / 1e9, bwd_mem, rel))
            if kind == "balanced":
                rows += gemm_rows(name, hidden, inter, num_experts, top_k, num_tokens, index, device)
        del model
        torch.cuda.empty_cache()

    header = "| case | implementation | time (ms) | TFLOP/s | peak mem (MiB) | rel err vs baseline |\n|---|---|---:|---:|---:|---:|"
    lines = [header]
    for case, impl, ms, tflops, mem, err in rows:
        mem_s = f"{mem:.0f}" if mem is not None else ""
        err_s = f"{err:.1e}" if err is not None else ""
        lines.append(f"| {case} | {impl} | {ms:.3f} | {tflops:.1f} | {mem_s} | {err_s} |")
    table = "\n".join(lines)
    print(table)

    gpu = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = (f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
                f"peft {peft.__version__}, python {platform.python_version()}")
    with open(args.results, "a") as f:
        f.write(f"\n## bench_moe_block: {stamp}, {gpu}\n\n{versions}  \n"
                f"`python {' '.join(sys.argv)}`; T={num_tokens}, bf16, LoRA r={RANK} on both expert weights, "
                "base frozen; TFLOP/s count base GEMMs only; rel err = forward output vs the transformers + peft "
                "baseline (bf16, peft folds B@A into the bf16 weight) or, for GEMM rows, vs torch grouped_mm.\n\n"
                + table + "\n")


if __name__ == "__main__":
    main()
