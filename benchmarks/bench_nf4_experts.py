"""NF4 (4-bit, QLoRA) experts against bf16 experts, both through fastmoe's Triton grouped GEMMs, at Trinity-Mini shapes.

GPU only. The bf16 weights are the NF4 weights dequantized, so both sides compute the same function:

* the bare grouped GEMMs (no LoRA, rows sorted by expert): ``grouped_mm`` on a bf16 stack vs ``grouped_mm_nf4``
  (tiles dequantized in registers) for gate_up (N=2I, K=H), down (N=H, K=I), and the backward's transposed read
  of gate_up (d(x): N=H, K=2I);
* the whole experts block, LoRA r=16 on both weights, base frozen, gradients to hidden states, routing weights and
  LoRA factors: ``moe_experts`` (bf16 stacks) vs ``moe_experts_nf4``, forward and forward+backward.

Times are medians of ``triton.testing.do_bench``; TFLOP/s count the base GEMMs (block: forward 6*S*H*I,
forward+backward 12*S*H*I, S = tokens * top_k); peak memory is the allocator's peak above what was allocated
before the measured call; "weights" is the resident size of the two expert stacks (NF4: codes + fp32 absmax).

    python benchmarks/bench_nf4_experts.py [--tokens 4096] [--results benchmarks/RESULTS.md]
        [--nf4-configs 128:64:8:3,128:64:4:3,...]

--nf4-configs also times the bare NF4 GEMMs under each listed launch configuration (BLOCK_N:BLOCK_K:num_warps:
num_stages, in place of grouped_gemm._GPU_NF4_ROW_GEMM), to choose that default; the tables above it use the
default.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys

import torch
import triton
from fastmoe.kernels import grouped_gemm
from fastmoe.kernels.grouped_gemm import gemm_block_m, grouped_mm, grouped_mm_nf4
from fastmoe.kernels.moe_experts import ExpertLora, moe_experts, moe_experts_nf4
from fastmoe.kernels.moe_routing import sort_by_expert
from fastmoe.kernels.nf4 import dequantize_nf4, quantize_nf4

# Shapes, routing and the fwd/fwd+bwd timer are the MoE-block benchmark's, so the two tables compare directly
# (scripts in benchmarks/ import each other from their folder, which Python puts first on sys.path).
from bench_moe_block import RANK, SHAPES, measure, routing

SHAPE = SHAPES[0]  # Trinity-Mini: name, hidden, intermediate, experts, top_k


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def gemm_rows(name, hidden, inter, num_experts, index, gate_up_nf4, down_nf4, gate_up, down):
    device = index.device
    schedule = sort_by_expert(index, num_experts, gemm_block_m(device, index.numel(), num_experts))
    rows = schedule.num_pairs
    identity = torch.arange(rows, dtype=torch.int32, device=device)
    out = []
    cases = (("gate_up", gate_up, gate_up_nf4, False), ("down", down, down_nf4, False),
             ("gate_up^T (d(x))", gate_up, gate_up_nf4, True))
    for label, dense, nf4, transpose in cases:
        w = dense.transpose(1, 2) if transpose else dense
        n, k = w.shape[1], w.shape[2]
        a = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        c_ref = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
        c = torch.empty_like(c_ref)
        flops = 2 * rows * n * k
        ref_ms = bench(functools.partial(grouped_mm, a, identity, w, schedule, c_ref, identity))
        ms = bench(functools.partial(grouped_mm_nf4, a, identity, nf4, schedule, c, identity, transpose=transpose))
        err = rel_err(c, c_ref)
        case = f"{name} GEMM {label} (N={n}, K={k})"
        out.append((case, "bf16 grouped_mm", ref_ms, flops / ref_ms / 1e9, None, None, None))
        out.append((case, "NF4 grouped_mm_nf4", ms, flops / ms / 1e9, None, None, err))
    return out


def config_sweep(configs: str, *gemm_args) -> str:
    """The bare NF4 GEMMs' times under each launch configuration, default first, as a markdown table."""
    default = grouped_gemm._GPU_NF4_ROW_GEMM
    cases = [case for case, impl, *_ in gemm_rows(*gemm_args) if impl.startswith("NF4")]
    lines = ["| NF4 launch config (BLOCK_N:BLOCK_K:warps:stages) | " + " | ".join(cases) + " |",
             "|---" * (1 + len(cases)) + "|"]
    try:
        for spec in ["default", *configs.split(",")]:
            if spec != "default":
                block_n, block_k, warps, stages = (int(v) for v in spec.split(":"))
                grouped_gemm._GPU_NF4_ROW_GEMM = (block_n, block_k, {"num_warps": warps, "num_stages": stages})
            label = "{}:{}:{}:{}".format(grouped_gemm._GPU_NF4_ROW_GEMM[0], grouped_gemm._GPU_NF4_ROW_GEMM[1],
                                         *grouped_gemm._GPU_NF4_ROW_GEMM[2].values())
            try:
                times = [f"{ms:.3f} ms, {tflops:.0f} TFLOP/s" for case, impl, ms, tflops, *_ in gemm_rows(*gemm_args)
                         if impl.startswith("NF4")]
            except Exception as error:  # a configuration that does not fit (shared memory, registers) is a result
                times = [f"failed: {type(error).__name__}"] * len(cases)
            lines.append(f"| {label}{' (default)' if spec == 'default' else ''} | " + " | ".join(times) + " |")
    finally:
        grouped_gemm._GPU_NF4_ROW_GEMM = default
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--results", default="benchmarks/RESULTS.md", help="markdown file the table is appended to")
    parser.add_argument("--nf4-configs", default="", help="comma-separated BLOCK_N:BLOCK_K:num_warps:num_stages "
                        "launch configurations to sweep for the bare NF4 GEMMs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_nf4_experts.py needs a CUDA GPU")
    device = "cuda"
    name, hidden, inter, num_experts, top_k = SHAPE
    num_tokens = args.tokens
    torch.manual_seed(0)

    gate_up_nf4 = quantize_nf4(torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16)
                               * hidden**-0.5)
    down_nf4 = quantize_nf4(torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16)
                            * inter**-0.5)
    gate_up, down = dequantize_nf4(gate_up_nf4), dequantize_nf4(down_nf4)
    nf4_mib = (gate_up_nf4.nbytes() + down_nf4.nbytes()) / 2**20
    bf16_mib = (gate_up.numel() + down.numel()) * 2 / 2**20

    index, weights = routing(num_tokens, num_experts, top_k, "balanced", device)
    weights.requires_grad_()
    x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16)
    leaves = [x, weights]
    for out_f, in_f in ((2 * inter, hidden), (hidden, inter)):
        a = (torch.randn(num_experts, RANK, in_f, device=device, dtype=torch.bfloat16) * in_f**-0.5).requires_grad_()
        b = (torch.randn(num_experts, out_f, RANK, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
        leaves += [a, b]

    def bf16_block(x, weights, gu_a, gu_b, down_a, down_b):
        return moe_experts(x, index, weights, gate_up, down, ExpertLora(gu_a, gu_b, 2.0),
                           ExpertLora(down_a, down_b, 2.0))

    def nf4_block(x, weights, gu_a, gu_b, down_a, down_b):
        return moe_experts_nf4(x, index, weights, gate_up_nf4, down_nf4, ExpertLora(gu_a, gu_b, 2.0),
                               ExpertLora(down_a, down_b, 2.0))

    with torch.no_grad():
        block_err = rel_err(nf4_block(*leaves), bf16_block(*leaves))
    flops_fwd = 6 * num_tokens * top_k * hidden * inter
    rows = []
    label = f"{name} block, LoRA r={RANK}"
    for impl, fn, weights_mib, err in (("bf16 moe_experts", bf16_block, bf16_mib, None),
                                       ("NF4 moe_experts_nf4", nf4_block, nf4_mib, block_err)):
        fwd_ms, fwd_mem = measure(fn, leaves, grad_out, backward=False)
        bwd_ms, bwd_mem = measure(fn, leaves, grad_out, backward=True)
        rows.append((label + " fwd", impl, fwd_ms, flops_fwd / fwd_ms / 1e9, fwd_mem, weights_mib, err))
        rows.append((label + " fwd+bwd", impl, bwd_ms, 2 * flops_fwd / bwd_ms / 1e9, bwd_mem, weights_mib, err))
    rows += gemm_rows(name, hidden, inter, num_experts, index, gate_up_nf4, down_nf4, gate_up, down)

    header = ("| case | implementation | time (ms) | TFLOP/s | peak mem (MiB) | expert weights (MiB) | rel err vs bf16 |\n"
              "|---|---|---:|---:|---:|---:|---:|")
    lines = [header]
    for case, impl, ms, tflops, mem, weights_mib, err in rows:
        mem_s = f"{mem:.0f}" if mem is not None else ""
        w_s = f"{weights_mib:.0f}" if weights_mib is not None else ""
        err_s = f"{err:.1e}" if err is not None else ""
        lines.append(f"| {case} | {impl} | {ms:.3f} | {tflops:.1f} | {mem_s} | {w_s} | {err_s} |")
    table = "\n".join(lines)
    if args.nf4_configs:
        table += "\n\n" + config_sweep(args.nf4_configs, name, hidden, inter, num_experts, index, gate_up_nf4,
                                       down_nf4, gate_up, down)
    print(table)

    gpu = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
    with open(args.results, "a") as f:
        f.write(f"\n## bench_nf4_experts: {stamp}, {gpu}\n\n{versions}  \n"
                f"`python {' '.join(sys.argv)}`; T={num_tokens}, bf16 activations, Trinity-Mini experts "
                f"(H={hidden}, I={inter}, E={num_experts}, k={top_k}); the bf16 weights are the NF4 weights "
                "dequantized, so rel err measures the kernels only (accumulation order), not quantization error.\n\n"
                + table + "\n")


if __name__ == "__main__":
    main()
