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

One JSON line per (case, implementation) goes to benchmarks/results.jsonl (question "nf4-experts").

    python benchmarks/bench_nf4_experts.py [--tokens 4096] [--jsonl benchmarks/results.jsonl] [--no-record]
        [--nf4-configs 128:64:8:3,128:64:4:3,...]

--nf4-configs also times the NF4 kernels under each listed launch configuration (BLOCK_N:BLOCK_K:num_warps:
num_stages, in place of fastmoe.kernels.moe.grouped_gemm._GPU_NF4_ROW_GEMM and _GPU_NF4_SWIGLU_BWD), to choose those defaults; that
table is printed, not recorded (the records use the defaults, which is what the code runs).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

# Shapes, routing and the fwd/fwd+bwd timer are the MoE-block benchmark's, so the two tables compare directly.
import common
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

SHAPE = common.MOE_SHAPES[0]  # Trinity-Mini: name, hidden, intermediate, experts, top_k
RANK = common.LORA_RANK


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
            out.append((case, label, ms, flops / ms / 1e9, None, None, common.rel_err(result, ref_out)))

    def gemm(fn, n):  # fn(out, out_rows): one grouped GEMM into a fresh (rows, n) output
        c = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
        return common.bench_ms(functools.partial(fn, c, identity)), c

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
        return common.bench_ms(lambda: fn(x, identity, weight, schedule, store_gate_up=True)), result[0]

    add(f"{name} SwiGLU forward (gate_up GEMM + SwiGLU, N=2x{inter}, K={hidden})", 4 * rows * inter * hidden,
        swiglu(grouped_mm_swiglu, gate_up),
        [(impl, swiglu(grouped_mm_swiglu, gu)) for impl, gu, _ in variants])

    grad = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    stored = torch.randn(rows, 2 * inter, device=device, dtype=torch.bfloat16)
    scale = torch.rand(rows, device=device)

    def swiglu_backward(fn, weight):
        result = fn(grad, identity, weight, stored, scale, schedule)
        return common.bench_ms(lambda: fn(grad, identity, weight, stored, scale, schedule)), result[0]

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
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
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

    index, weights = common.moe_routing(num_tokens, num_experts, top_k, "balanced", device)
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
        block_err, dq_err = common.rel_err(nf4_block(*leaves), reference), common.rel_err(dq_block(*leaves), reference)
    flops_fwd = 6 * num_tokens * top_k * hidden * inter
    shared = dict(common.environment(device), question="nf4-experts", model=name, hidden=hidden, intermediate=inter,
                  experts=num_experts, top_k=top_k, tokens=num_tokens)
    records = []
    for impl, fn, weights_mib, err in (("bf16", bf16_block, bf16_mib, None), ("NF4", nf4_block, nf4_mib, block_err),
                                       ("NF4 double-quant", dq_block, dq_mib, dq_err)):
        fwd_ms, fwd_mib = common.ms_and_peak_mib(fn, leaves, grad_out, backward=False)
        all_ms, all_mib = common.ms_and_peak_mib(fn, leaves, grad_out, backward=True)
        records.append(dict(shared, kind="block", case=f"{name} experts block, LoRA r={RANK}", implementation=impl,
                            fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(all_ms, 4),
                            fwd_tflops=round(flops_fwd / fwd_ms / 1e9, 1),
                            fwd_bwd_tflops=round(2 * flops_fwd / all_ms / 1e9, 1), fwd_peak_mib=round(fwd_mib),
                            fwd_bwd_peak_mib=round(all_mib), weights_mib=round(weights_mib),
                            rel_err=None if err is None else float(f"{err:.2e}")))
    for case, impl, ms, tflops, _, _, err in gemm_rows(name, hidden, inter, num_experts, index, gate_up_nf4,
                                                       down_nf4, gate_up, down, double_quant=(gate_up_dq, down_dq)):
        records.append(dict(shared, kind="kernel", case=case, implementation=impl, ms=round(ms, 4),
                            tflops=round(tflops, 1), rel_err=None if err is None else float(f"{err:.2e}")))

    print(f"T={num_tokens}, bf16 activations, {name} experts (H={hidden}, I={inter}, E={num_experts}, k={top_k}); "
          f"the bf16 weights are the NF4 weights dequantized; {shared['gpu']}")
    print("| case | implementation | fwd ms | fwd+bwd ms (kernel: ms) | TFLOP/s | expert weights MiB | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['case']} | {r['implementation']} | {r.get('fwd_ms', '')} | {r.get('fwd_bwd_ms', r.get('ms'))} "
              f"| {r.get('fwd_bwd_tflops', r.get('tflops'))} | {r.get('weights_mib', '')} | {r.get('rel_err') or ''} |")
    if args.nf4_configs:
        print(config_sweep(args.nf4_configs, name, hidden, inter, num_experts, index, gate_up_nf4, down_nf4, gate_up,
                           down))
    if not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    main()
