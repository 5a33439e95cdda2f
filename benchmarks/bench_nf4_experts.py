"""NF4 (4-bit, QLoRA) experts against bf16 experts, both through fastmoe's Triton grouped GEMMs, at Trinity-Mini shapes.

GPU only. The bf16 weights are the NF4 weights dequantized, so both sides compute the same function:

* each expert kernel alone (no LoRA, rows sorted by expert), bf16 stack vs NF4 (tiles dequantized in registers),
  plain and double-quantized: the grouped GEMMs for gate_up (N=2I, K=H), down (N=H, K=I) and the backward's
  transposed read of gate_up (d(x): N=H, K=2I); the SwiGLU forward (gate_up GEMM, SwiGLU epilogue) and backward
  (d(h) from the transposed read of down, SwiGLU backward epilogue);
* the whole experts block, LoRA r=16 on both weights, base frozen, gradients to hidden states, routing weights and
  LoRA factors: ``moe_experts`` (bf16 stacks) vs ``moe_experts_nf4``, forward and forward+backward.

Times are medians of ``triton.testing.do_bench``; TFLOP/s count the base GEMMs (block: forward 6*S*H*I,
forward+backward 12*S*H*I, S = tokens * top_k); peak memory is the allocator's peak above what was allocated
before the measured call; "weights" is the resident size of the two expert stacks (NF4: codes + fp32 absmax;
double-quant: codes + uint8 absmax + its scales). The double-quantized stacks re-quantize the same bf16 weights,
so their rel err also holds the (small) change of absmax.

    python benchmarks/bench_nf4_experts.py [--tokens 4096] [--results benchmarks/RESULTS.md]
        [--nf4-configs 128:64:8:3,128:64:4:3,...]

--nf4-configs also times the NF4 kernels under each listed launch configuration (BLOCK_N:BLOCK_K:num_warps:
num_stages, in place of fastmoe.kernels.moe.grouped_gemm._GPU_NF4_ROW_GEMM and _GPU_NF4_SWIGLU_BWD), to choose those
defaults; the tables above it use the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys

import torch
import triton

# Shapes, routing and the fwd/fwd+bwd timer are the MoE-block benchmark's, so the two tables compare directly
# (scripts in benchmarks/ import each other from their folder, which Python puts first on sys.path).
from bench_moe_block import RANK, SHAPES, measure, routing
from fastmoe.kernels.moe import (
    ExpertLora,
    dequantize_nf4,
    gemm_block_m,
    grouped_gemm,
    grouped_mm,
    grouped_mm_swiglu,
    grouped_mm_swiglu_backward,
    moe_experts,
    moe_experts_nf4,
    quantize_nf4,
    sort_by_expert,
)

SHAPE = SHAPES[0]  # Trinity-Mini: name, hidden, intermediate, experts, top_k


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def gemm_rows(name, hidden, inter, num_experts, index, gate_up_nf4, down_nf4, gate_up, down, double_quant=None):
    """Rows of (case, implementation, ms, TFLOP/s, None, None, rel err) for each expert kernel without LoRA, bf16
    against NF4 (and NF4 with double-quantized absmax when double_quant = (gate_up, down) is given): the plain
    GEMMs (gate_up, down, and the backward's transposed read of gate_up) and the two SwiGLU kernels (forward: gate_up
    GEMM + SwiGLU; backward: d(h) from the transposed read of down + the SwiGLU backward)."""
    device = index.device
    schedule = sort_by_expert(index, num_experts, gemm_block_m(device, index.numel(), num_experts))
    rows = schedule.num_pairs
    identity = torch.arange(rows, dtype=torch.int32, device=device)
    variants = [("NF4", gate_up_nf4, down_nf4)] + ([("NF4 double-quant", *double_quant)] if double_quant else [])
    out = []

    def add(case, flops, reference, results):
        ref_ms, ref_out = reference
        out.append((case, "bf16", ref_ms, flops / ref_ms / 1e9, None, None, None))
        for label, (ms, result) in results:
            out.append((case, label, ms, flops / ms / 1e9, None, None, rel_err(result, ref_out)))

    def gemm(fn, n):  # fn(out, out_rows): one grouped GEMM into a fresh (rows, n) output
        c = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
        return bench(functools.partial(fn, c, identity)), c

    cases = (("gate_up", gate_up, 0, False), ("down", down, 1, False), ("gate_up^T (d(x))", gate_up, 0, True))
    for label, dense, which, transpose in cases:
        w = dense.transpose(1, 2) if transpose else dense
        n, k = w.shape[1], w.shape[2]
        a = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        add(f"{name} GEMM {label} (N={n}, K={k})", 2 * rows * n * k,
            gemm(functools.partial(grouped_mm, a, identity, w, schedule), n),
            [(impl, gemm(functools.partial(grouped_mm, a, identity, weights[which], schedule, transpose=transpose), n))
             for impl, *weights in variants])

    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)

    def swiglu(fn, weight):
        result = fn(x, identity, weight, schedule, store_gate_up=True)
        return bench(lambda: fn(x, identity, weight, schedule, store_gate_up=True)), result[0]

    add(f"{name} SwiGLU forward (gate_up GEMM + SwiGLU, N=2x{inter}, K={hidden})", 4 * rows * inter * hidden,
        swiglu(grouped_mm_swiglu, gate_up),
        [(impl, swiglu(grouped_mm_swiglu, gu)) for impl, gu, _ in variants])

    grad = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    stored = torch.randn(rows, 2 * inter, device=device, dtype=torch.bfloat16)
    scale = torch.rand(rows, device=device)

    def swiglu_backward(fn, weight):
        result = fn(grad, identity, weight, stored, scale, schedule)
        return bench(lambda: fn(grad, identity, weight, stored, scale, schedule)), result[0]

    add(f"{name} SwiGLU backward (d(h) GEMM + SwiGLU backward, N={inter}, K={hidden})", 2 * rows * inter * hidden,
        swiglu_backward(grouped_mm_swiglu_backward, down),
        [(impl, swiglu_backward(grouped_mm_swiglu_backward, dn)) for impl, _, dn in variants])
    return out


def _config_label(config) -> str:
    return "{}:{}:{}:{}".format(config[0], config[1], *config[2].values())


def config_sweep(configs: str, *gemm_args) -> str:
    """The NF4 kernels' times under each launch configuration, defaults first, as a markdown table. A configuration
    replaces both grouped_gemm._GPU_NF4_ROW_GEMM (plain GEMMs, SwiGLU forward) and _GPU_NF4_SWIGLU_BWD (SwiGLU
    backward), so the table chooses each."""
    defaults = grouped_gemm._GPU_NF4_ROW_GEMM, grouped_gemm._GPU_NF4_SWIGLU_BWD
    cases = [case for case, impl, *_ in gemm_rows(*gemm_args) if impl == "NF4"]
    lines = ["| NF4 launch config (BLOCK_N:BLOCK_K:warps:stages) | " + " | ".join(cases) + " |",
             "|---" * (1 + len(cases)) + "|"]
    try:
        for spec in ["default", *configs.split(",")]:
            if spec == "default":
                label = f"defaults ({_config_label(defaults[0])}; SwiGLU backward {_config_label(defaults[1])})"
            else:
                block_n, block_k, warps, stages = (int(v) for v in spec.split(":"))
                config = (block_n, block_k, {"num_warps": warps, "num_stages": stages})
                grouped_gemm._GPU_NF4_ROW_GEMM = grouped_gemm._GPU_NF4_SWIGLU_BWD = config
                label = _config_label(config)
            try:
                times = [f"{ms:.3f} ms, {tflops:.0f} TFLOP/s" for case, impl, ms, tflops, *_ in gemm_rows(*gemm_args)
                         if impl == "NF4"]
            except Exception as error:  # a configuration that does not fit (shared memory, registers) is a result
                times = [f"failed: {type(error).__name__}"] * len(cases)
            lines.append(f"| {label} | " + " | ".join(times) + " |")
    finally:
        grouped_gemm._GPU_NF4_ROW_GEMM, grouped_gemm._GPU_NF4_SWIGLU_BWD = defaults
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
    # load_in_4bit's default: the same weights with their absmax double-quantized (slightly different absmax).
    gate_up_dq, down_dq = quantize_nf4(gate_up, double_quant=True), quantize_nf4(down, double_quant=True)
    nf4_mib = (gate_up_nf4.nbytes() + down_nf4.nbytes()) / 2**20
    dq_mib = (gate_up_dq.nbytes() + down_dq.nbytes()) / 2**20
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

    def dq_block(x, weights, gu_a, gu_b, down_a, down_b):
        return moe_experts_nf4(x, index, weights, gate_up_dq, down_dq, ExpertLora(gu_a, gu_b, 2.0),
                               ExpertLora(down_a, down_b, 2.0))

    with torch.no_grad():
        reference = bf16_block(*leaves)
        block_err, dq_err = rel_err(nf4_block(*leaves), reference), rel_err(dq_block(*leaves), reference)
    flops_fwd = 6 * num_tokens * top_k * hidden * inter
    rows = []
    label = f"{name} block, LoRA r={RANK}"
    for impl, fn, weights_mib, err in (("bf16 moe_experts", bf16_block, bf16_mib, None),
                                       ("NF4 moe_experts_nf4", nf4_block, nf4_mib, block_err),
                                       ("NF4 double-quant moe_experts_nf4", dq_block, dq_mib, dq_err)):
        fwd_ms, fwd_mem = measure(fn, leaves, grad_out, backward=False)
        bwd_ms, bwd_mem = measure(fn, leaves, grad_out, backward=True)
        rows.append((label + " fwd", impl, fwd_ms, flops_fwd / fwd_ms / 1e9, fwd_mem, weights_mib, err))
        rows.append((label + " fwd+bwd", impl, bwd_ms, 2 * flops_fwd / bwd_ms / 1e9, bwd_mem, weights_mib, err))
    rows += gemm_rows(name, hidden, inter, num_experts, index, gate_up_nf4, down_nf4, gate_up, down,
                      double_quant=(gate_up_dq, down_dq))

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
                "dequantized, so rel err measures the kernels only (accumulation order), not quantization error "
                "(double-quant: plus the re-quantized absmax).\n\n"
                + table + "\n")


if __name__ == "__main__":
    main()
