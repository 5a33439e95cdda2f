"""Kernels of fastmoe's hot paths, each launched once inside a profiler range, for Nsight Compute's hardware counters
(which instruction pipe, stall reason, occupancy or memory level bounds a kernel), where timings alone cannot say.

Sets (the first argument; decode without one):

* decode: the 4-bit decode step's kernels at LFM2-8B-A1B's shapes (hidden 2048, 32 experts of 1792 top-4; its
  convolution in_proj 2048 -> 6144), NF4 with a double-quantized absmax as load_in_4bit stores it, LoRA r=16, bf16:
  1. one token's experts block (one_token: _gate_up_kernel, _down_kernel), with LoRA; 2. the same without LoRA;
  3. the same with bf16 experts (the 16-bit GEMVs, near HBM's bandwidth: the yardstick); 4. a few-rows NF4 linear at
  one row (_few_rows_kernel, GEMV form), with LoRA; 5. eight tokens' experts block through the grouped NF4 GEMMs
  (batch-8 decoding), with LoRA.
* train-moe: one experts block of training, forward and backward (moe_experts: the grouped SwiGLU and row GEMMs,
  the SwiGLU backward, the LoRA factors' gradients), Trinity-Mini's experts (hidden 2048, 128 experts of 1024 top-8)
  at 4,096 tokens with random routing, bf16, LoRA r=16 on both expert weights.

The cases run in order, so their kernels appear in ncu's report in that order:

    ncu --clock-control none --profile-from-start off -k regex:"gate_up|down_kernel|few_rows|grouped_mm" \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \\
        python benchmarks/ncu_kernels.py [decode | train-moe]

(benchmarks/gpu_session.sh's ncu-decode and ncu-train-moe steps). Without ncu it prints each case's time (CUDA-graph
replay) and weights per second. Printed only.
"""

from __future__ import annotations

import sys

import torch

import common
from fastmoe.kernels import lora_linear as lora_module
from fastmoe.kernels.moe import moe_experts, moe_experts_nf4, quantize_nf4
from fastmoe.kernels.reused_casts import CastCache, reused_casts

HIDDEN, INTER, EXPERTS, TOP_K, RANK = 2048, 1792, 32, 4, 16
CONV_OUT = 6144


def decode_cases(device: str) -> list[tuple[str, float, callable]]:
    """(name, weights read, the launch) of each decode case."""
    nf4_stacks, bf16_stacks = (common.random_expert_stacks(device, HIDDEN, INTER, EXPERTS, nf4, RANK)
                               for nf4 in (True, False))
    one = torch.randn(1, HIDDEN, device=device, dtype=torch.bfloat16)
    eight = torch.randn(8, HIDDEN, device=device, dtype=torch.bfloat16)
    index_one = torch.randperm(EXPERTS, device=device)[:TOP_K][None]
    index_eight = torch.stack([torch.randperm(EXPERTS, device=device)[:TOP_K] for _ in range(8)])
    weights_one, weights_eight = torch.rand(1, TOP_K, device=device), torch.rand(8, TOP_K, device=device)
    per_expert = 3 * INTER * HIDDEN
    conv = quantize_nf4(torch.randn(1, CONV_OUT, HIDDEN, device=device, dtype=torch.bfloat16) * HIDDEN ** -0.5,
                        double_quant=True)
    conv_layer = lora_module.Projection(conv, None, (torch.randn(RANK, HIDDEN, device=device) * 0.01).bfloat16(),
                                        torch.randn(CONV_OUT, RANK, device=device).bfloat16(), 2.0)
    gu, dn, gu_l, dn_l = nf4_stacks
    bgu, bdn, bgu_l, bdn_l = bf16_stacks
    touched = len(set(index_eight.flatten().tolist()))
    return [
        ("one token, NF4 experts, LoRA", TOP_K * per_expert,
         lambda: moe_experts_nf4(one, index_one, weights_one, gu, dn, gu_l, dn_l)),
        ("one token, NF4 experts, no LoRA", TOP_K * per_expert,
         lambda: moe_experts_nf4(one, index_one, weights_one, gu, dn, None, None)),
        ("one token, bf16 experts, LoRA", TOP_K * per_expert,
         lambda: moe_experts(one, index_one, weights_one, bgu, bdn, bgu_l, bdn_l)),
        ("few-rows NF4 linear, one row, 2048 -> 6144, LoRA", CONV_OUT * HIDDEN,
         lambda: lora_module.lora_linears_few_rows(one, [conv_layer])),
        (f"eight tokens, NF4 experts ({touched} touched), LoRA", touched * per_expert,
         lambda: moe_experts_nf4(eight, index_eight, weights_eight, gu, dn, gu_l, dn_l)),
    ]


def train_moe_cases(device: str) -> list[tuple[str, float, callable]]:
    """(name, weights read once, the launch) of the training experts block: forward and backward."""
    hidden, inter, num_experts, top_k, tokens = 2048, 1024, 128, 8, 4096
    gate_up, down, gu_lora, dn_lora = common.random_expert_stacks(device, hidden, inter, num_experts, rank=RANK)
    for factor in (gu_lora.A, gu_lora.B, dn_lora.A, dn_lora.B):
        factor.requires_grad_()  # float32, as peft keeps adapters of a bf16 model
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    index, weights = common.moe_routing(tokens, num_experts, top_k, "balanced", device)
    weights = weights.requires_grad_()
    grad = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)

    def forward_backward():
        out = moe_experts(x, index, weights, gate_up, down, gu_lora, dn_lora)
        out.backward(grad)

    return [(f"experts block forward + backward, {tokens} tokens", 3 * num_experts * inter * hidden, forward_backward)]


def main() -> None:
    device = "cuda"
    torch.manual_seed(0)
    which = sys.argv[1] if len(sys.argv) > 1 else "decode"
    training = which == "train-moe"
    with reused_casts(CastCache()), torch.set_grad_enabled(training):
        found = {"decode": decode_cases, "train-moe": train_moe_cases}[which](device)
        for name, _, launch in found:  # compiled and cast before the profiled range
            launch()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for index, (name, _, launch) in enumerate(found, 1):
            with torch.cuda.nvtx.range(f"case {index}"):
                launch()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        for index, (name, weights, launch) in enumerate(found, 1):
            ms = common.bench_ms(launch) if training else common.bench_graph_ms(launch)
            print(f"case {index}: {name}: {ms * 1e3:.1f} us, {weights / 1e6:.1f}M weights, "
                  f"{weights / ms * 1e3:.2e} weights/s", flush=True)


if __name__ == "__main__":
    main()
