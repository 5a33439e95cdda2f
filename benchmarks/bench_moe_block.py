"""One MoE experts block, LoRA r=16 on both expert weights: fastmoe's Triton kernels vs transformers + peft.

GPU only. For each model shape and router (balanced: random logits; skewed: a few experts take most tokens):

* experts block forward and forward+backward, bf16, LoRA r=16 on gate_up_proj and down_proj, base weights
  frozen, gradients to hidden states, routing weights and LoRA factors;
  - fastmoe: ``fastmoe.kernels.moe.moe_experts``, its base products in its own Triton kernels, and again with the
    row GEMMs' base products by torch's grouped GEMM (``base_products("torch")``: the kernels then add LoRA, the
    routing weights and SwiGLU as an epilogue), the measurement that sets where ``auto`` takes torch's;
  - transformers: ``AfmoeExperts`` with ``config._experts_implementation = "grouped_mm"``, wrapped by peft
    ``LoraConfig(target_parameters=["gate_up_proj", "down_proj"])`` (the same math for every family here;
    LFM2-MoE and JetMoe shapes are run through the AFMoE experts module);
* the bare grouped GEMMs (no LoRA, rows already sorted by expert): ``torch.nn.functional.grouped_mm`` vs
  fastmoe's ``grouped_mm`` at equal work, for the gate_up (N=2I, K=H) and down (N=H, K=I) shapes.

Times are medians of ``triton.testing.do_bench`` (wall time, the host's launches included) and, for the block
forward + backward, the sum of its GPU kernels' times (torch.profiler): what a CUDA graph replay of the block costs,
as the training step runs it (where fastmoe's ``auto`` base products are chosen from). TFLOP/s count the base-weight
GEMMs only (forward 6*S*H*I, forward+backward with frozen weights 12*S*H*I, S = tokens * top_k); peak memory is the
allocator's peak above what was allocated before the measured call. One JSON line per (case, implementation) goes
to benchmarks/results.jsonl (question "moe-block").

    python benchmarks/bench_moe_block.py [--tokens 4096,16384] [--shapes Mixtral-8x7B,JetMoe-8B]
        [--jsonl benchmarks/results.jsonl] [--no-record] [--profile]
"""

from __future__ import annotations

import argparse
import sys

import peft
import torch
import torch.nn.functional as F
import transformers
from transformers.models.afmoe.modeling_afmoe import AfmoeExperts

import common
from fastmoe.kernels.moe import ExpertLora, gemm_block_m, grouped_mm, moe_experts, sort_by_expert
from fastmoe.kernels.moe.grouped_gemm import base_products

RANK = common.LORA_RANK
BASELINE = "transformers grouped_mm + peft"
TORCH_PRODUCTS = "fastmoe, base products by torch"


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


def gemm_records(name, hidden, inter, num_experts, top_k, num_tokens, index, device) -> list[dict]:
    """The bare grouped GEMMs at equal work, torch's against fastmoe's: one record per (GEMM, implementation)."""
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
        torch_ms = common.bench_ms(lambda: F.grouped_mm(a, w.transpose(1, 2), offs=offs))
        ours_ms = common.bench_ms(lambda: grouped_mm(a, identity, w, schedule, c, identity))
        ref = F.grouped_mm(a, w.transpose(1, 2), offs=offs)
        grouped_mm(a, identity, w, schedule, c, identity)
        shared = dict(kind="gemm", model=name, case=f"{name} GEMM {label} (N={n}, K={k})", gemm=label, n=n, k=k)
        out.append(dict(shared, implementation="torch grouped_mm", ms=round(torch_ms, 4),
                        tflops=round(flops / torch_ms / 1e9, 1)))
        out.append(dict(shared, implementation="fastmoe grouped_mm", ms=round(ours_ms, 4),
                        tflops=round(flops / ours_ms / 1e9, 1), rel_err=float(f"{common.rel_err(c, ref):.2e}")))
    return out


def block_records(model, name, hidden, inter, num_experts, top_k, num_tokens, kind, device,
                  profile: bool = False) -> tuple[list[dict], torch.Tensor]:
    """Forward and forward+backward of the experts block, transformers + peft against fastmoe; (records, index).
    profile: also print each implementation's kernels, longest first."""
    ours = fastmoe_fn(model, num_experts)
    # (implementation, forward, where the expert GEMMs' base products come from, forward and backward)
    implementations = ((BASELINE, model, "auto"), ("fastmoe", ours, "triton"), (TORCH_PRODUCTS, ours, "torch"))
    index, weights = common.moe_routing(num_tokens, num_experts, top_k, kind, device)
    load = torch.bincount(index.reshape(-1), minlength=num_experts).max().item() / index.numel()
    x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    weights = weights.requires_grad_()
    grad_out = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = model(x, index, weights)
        errors = {}
        for impl, fn, products in implementations[1:]:
            with base_products(products):
                errors[impl] = common.rel_err(fn(x, index, weights), reference)
    flops_fwd = 6 * num_tokens * top_k * hidden * inter
    records = []
    for impl, fn, products in implementations:
        inputs = (x, index, weights) + tuple(p for p in model.parameters() if p.requires_grad)
        call = (lambda f: lambda x, i, w, *_: f(x, i, w))(fn)
        with base_products(products):
            fwd_ms, fwd_mib = common.ms_and_peak_mib(call, inputs, grad_out, backward=False)
            all_ms, all_mib = common.ms_and_peak_mib(call, inputs, grad_out, backward=True)
            kernels = profile_kernels(call, inputs, grad_out)
        record = dict(kind="block", model=name, case=f"{name} {kind}", tokens=num_tokens, routing=kind,
                      max_expert_load=round(load, 4),
                      implementation=impl, fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(all_ms, 4),
                      fwd_bwd_kernel_ms=round(sum(ns for _, ns in kernels) / 1e6 / PROFILED_CALLS, 4),
                      fwd_tflops=round(flops_fwd / fwd_ms / 1e9, 1),
                      fwd_bwd_tflops=round(2 * flops_fwd / all_ms / 1e9, 1),
                      fwd_peak_mib=round(fwd_mib), fwd_bwd_peak_mib=round(all_mib))
        if impl in errors:
            record["rel_err"] = float(f"{errors[impl]:.2e}")
        records.append(record)
        if profile:
            print(f"kernels of {name} {kind}, {num_tokens} tokens, {impl} (forward + backward; ms and launches per "
                  f"call; {record['fwd_bwd_kernel_ms']:.3f} ms in all):")
            for kernel, ms, launches in common.top_kernels(kernels, PROFILED_CALLS, rows=16):
                print(f"  {ms:8.3f} ms  {launches:5.1f}x  {kernel}")
    return records, index


PROFILED_CALLS = 5


def profile_kernels(call, inputs: tuple, grad_out: torch.Tensor) -> list[tuple[str, int]]:
    """(name, ns) of the GPU kernels of PROFILED_CALLS forward + backward calls (torch.profiler). Their sum is what the
    block costs where the training step replays it as a CUDA graph (fastmoe's default): do_bench's wall time adds the
    host's launch time, which a graph removes."""
    def step():
        out = call(*inputs)
        torch.autograd.backward(out, grad_out)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(PROFILED_CALLS):
            step()
        torch.cuda.synchronize()
    return common.profiler_kernels(profiler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="4096", help="comma-separated token counts (e.g. 4096,16384)")
    parser.add_argument("--shapes", default=",".join(name for name, *_ in common.MOE_SHAPES),
                        help="comma-separated model shapes, of " + ", ".join(name for name, *_ in common.MOE_SHAPES))
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    parser.add_argument("--profile", action="store_true", help="also print each implementation's kernels in one "
                        "forward + backward of the balanced block (torch.profiler; not recorded)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe_block.py needs a CUDA GPU")
    device = "cuda"
    token_counts = [int(t) for t in args.tokens.split(",")]
    known = {name: shape for name, *shape in common.MOE_SHAPES}
    unknown = sorted(set(args.shapes.split(",")) - set(known))
    if unknown:
        sys.exit(f"unknown --shapes {', '.join(unknown)}; choose from {', '.join(known)}")
    shared = dict(common.environment(device), question="moe-block", rank=RANK)
    records = []
    for name in args.shapes.split(","):
        hidden, inter, num_experts, top_k = known[name]
        model = peft_block(hidden, inter, num_experts, top_k, device)
        shape = dict(hidden=hidden, intermediate=inter, experts=num_experts, top_k=top_k)
        for num_tokens in token_counts:
            for kind in ("balanced", "skewed"):
                block, index = block_records(model, name, hidden, inter, num_experts, top_k, num_tokens, kind, device,
                                             profile=args.profile and kind == "balanced")
                records += [dict(shared, **shape, **r) for r in block]
                if kind == "balanced":
                    gemms = gemm_records(name, hidden, inter, num_experts, top_k, num_tokens, index, device)
                    records += [dict(shared, **shape, tokens=num_tokens, **r) for r in gemms]
        del model
        common.free_memory(device)

    print(f"T={args.tokens}, bf16, LoRA r={RANK} on both expert weights, base frozen; {shared['gpu']}")
    print("| case | tokens | implementation | fwd ms | fwd+bwd ms (GEMM: ms) | fwd+bwd GPU kernel ms | TFLOP/s "
          "| peak MiB fwd+bwd | rel err |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['case']} | {r['tokens']} | {r['implementation']} | {r.get('fwd_ms', '')} "
              f"| {r.get('fwd_bwd_ms', r.get('ms'))} | {r.get('fwd_bwd_kernel_ms', '')} "
              f"| {r.get('fwd_bwd_tflops', r.get('tflops'))} "
              f"| {r.get('fwd_bwd_peak_mib', '')} "
              f"| {r.get('rel_err', '')} |")
    if not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    main()
