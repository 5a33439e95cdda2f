"""Launch configurations of fastmoe's 16-bit expert kernels, timed at real MoE shapes, to choose the defaults in
fastmoe/kernels/moe/grouped_gemm.py (`_GPU_ROW_GEMM`, `_GPU_ROW_GEMM_TRANSPOSED`, `_GPU_SWIGLU`, `_GPU_SWIGLU_BWD`,
`_GPU_WGRAD`, `_GPU_EPILOGUE`, `_GPU_SWIGLU_BWD_EPILOGUE`).

GPU only. For each model's expert shapes (bf16, LoRA r=16 fused as in training, balanced random routing) and each
kernel of a training step's MoE layer:

* `swiglu`: the gate_up GEMM with its SwiGLU epilogue, storing the pre-activation (the recompute's form);
* `swiglu_backward`: d(h) from the transposed read of down, with the SwiGLU backward epilogue;
* `row_gemm`: the down projection (N=H, K=I), and LoRA's rank-r products (x A^T of the gathered hidden states,
  h A^T, d(gate_up) B);
* `row_gemm_transposed`: the backward's transposed read of gate_up (d(x): N=H, K=2I);
* `wgrad`: LoRA's factor gradients, per-expert reductions over rows (d(A): N=r, d(B): K=r);
* `epilogue` and `swiglu_backward_epilogue`: the SwiGLU forward, the down projection and d(x), and the SwiGLU
  backward, given their base products (the form they take where torch's grouped GEMM computes those,
  `grouped_gemm.base_product`), with torch's product itself timed beside them (`torch product`, not swept) so that
  product + epilogue can be set against the fused kernel;

every listed configuration (BLOCK_N:BLOCK_K:num_warps:num_stages; the SwiGLU kernels' BLOCK_N counts h's
columns) is timed (median of triton.testing.do_bench) and checked against the default's output. The table is
printed, not recorded: the records of what the code runs come from bench_moe_block.py and bench_sft.py.

    python benchmarks/sweep_expert_configs.py [--tokens 4096] [--models trinity-mini,lfm2-8b-a1b]
        [--swiglu 128:64:8:4,...] [--swiglu-backward 64:64:4:4,...] [--row-gemm 128:64:8:3,...]
        [--row-gemm-transposed 256:64:8:3,...] [--wgrad ...] [--epilogue 128:64:8:2,...]
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import common
from fastmoe.kernels.moe import (gemm_block_m, grouped_gemm, grouped_mm, grouped_mm_swiglu, grouped_mm_swiglu_backward,
                                 grouped_wgrad, sort_by_expert)

RANK = common.LORA_RANK
# name: hidden, intermediate, experts, top-k, gate and up interleaved (gpt-oss)
MODELS = {
    "trinity-mini": (2048, 1024, 128, 8, False),
    "lfm2-8b-a1b": (2048, 1792, 32, 4, False),
    "jetmoe-8b": (2048, 5632, 8, 2, False),
    "qwen3-30b-a3b": (2048, 768, 128, 8, False),
    "mixtral-8x7b": (4096, 14336, 8, 2, False),
    "gpt-oss-20b": (2880, 2880, 32, 4, True),
}
# Configurations timed besides the default (which is always timed first).
SWEEP = {
    "swiglu": "64:64:8:3,128:64:8:3,128:64:8:5,128:32:8:5,64:64:4:4",
    "swiglu_backward": "128:64:8:3,64:64:4:3,64:64:4:5,32:64:4:4,64:32:4:5,32:128:4:3",
    "row_gemm": "128:64:4:3,256:64:8:3,128:64:8:4,128:128:8:3",
    "row_gemm_transposed": "128:64:8:3,256:64:8:4,256:32:8:4,256:64:4:3",
    "wgrad": "64:128:4:4,128:64:4:3,128:128:8:3,256:64:8:3,64:64:4:4",
    "epilogue": "64:64:4:2,128:64:4:1,128:64:8:1,128:64:8:2,256:64:8:1,64:64:8:1",
    "swiglu_backward_epilogue": "64:64:4:1,64:64:8:2,128:64:8:1,32:64:4:1,32:64:8:1,64:32:8:1",
}
ATTRIBUTE = {"swiglu": "_GPU_SWIGLU", "swiglu_backward": "_GPU_SWIGLU_BWD", "row_gemm": "_GPU_ROW_GEMM",
             "row_gemm_transposed": "_GPU_ROW_GEMM_TRANSPOSED", "wgrad": "_GPU_WGRAD", "epilogue": "_GPU_EPILOGUE",
             "swiglu_backward_epilogue": "_GPU_SWIGLU_BWD_EPILOGUE"}


def parse(spec: str) -> tuple[int, int, dict]:
    block_n, block_k, warps, stages = (int(v) for v in spec.split(":"))
    return block_n, block_k, {"num_warps": warps, "num_stages": stages}


def label(config: tuple[int, int, dict]) -> str:
    return "{}:{}:{}:{}".format(config[0], config[1], *config[2].values())


def kernel_cases(hidden: int, inter: int, num_experts: int, top_k: int, interleaved: bool, tokens: int,
                 device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """(kernel, case name, FLOPs, fn, check) for one model's shapes: fn() launches the kernel and returns its output;
    check() does the same on fresh inputs where fn overwrites its own (an epilogue writes over its product), else
    None."""
    index, _ = common.moe_routing(tokens, num_experts, top_k, "balanced", device)
    schedule = sort_by_expert(index, num_experts, gemm_block_m(torch.device(device), index.numel(), num_experts))
    rows = schedule.num_pairs
    identity = torch.arange(rows, dtype=torch.int32, device=device)
    token_rows = schedule.sorted_token  # the forward's gathered reads of the (tokens, H) hidden states

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    gate_up, down = randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5), randn(num_experts, hidden, inter,
                                                                                       scale=inter**-0.5)
    x, grad = randn(tokens, hidden), randn(tokens, hidden)
    lora_l, scale = randn(rows, RANK), torch.rand(rows, device=device)
    gate_up_b = randn(num_experts, 2 * inter, RANK, scale=0.02)
    down_b, down_a = randn(num_experts, hidden, RANK, scale=0.02), randn(num_experts, inter, RANK, scale=0.02)
    stored = randn(rows, 2 * inter)
    h = randn(rows, inter)
    out = torch.empty(rows, hidden, device=device, dtype=dtype)
    dgu = randn(rows, 2 * inter)
    gate_up_a = randn(num_experts, RANK, hidden, scale=hidden**-0.5)
    thin = torch.empty(rows, RANK, device=device, dtype=dtype)
    grad_a = torch.empty(num_experts, RANK, hidden, device=device, dtype=torch.float32)
    grad_b = torch.empty(num_experts, 2 * inter, RANK, device=device, dtype=torch.float32)
    cases = [
        ("swiglu", f"SwiGLU fwd N=2x{inter} K={hidden}", 4 * rows * inter * hidden,
         lambda: grouped_mm_swiglu(x, token_rows, gate_up, schedule, lora_l, gate_up_b, store_gate_up=True,
                                   interleaved=interleaved)[1]),
        ("swiglu_backward", f"SwiGLU bwd N={inter} K={hidden}", 2 * rows * inter * hidden,
         lambda: grouped_mm_swiglu_backward(grad, token_rows, down, stored, scale, schedule, lora_l, down_a,
                                            interleaved=interleaved)[0]),
        ("row_gemm", f"down N={hidden} K={inter}", 2 * rows * inter * hidden,
         lambda: grouped_mm(h, identity, down, schedule, out, identity, lora_l, down_b, row_scale=scale)),
        ("row_gemm_transposed", f"d(x) N={hidden} K={2 * inter}", 4 * rows * inter * hidden,
         lambda: grouped_mm(dgu, identity, gate_up, schedule, out, identity, transpose=True)),
        ("row_gemm", f"x A^T N={RANK} K={hidden} gathered", 2 * rows * RANK * hidden,
         lambda: grouped_mm(x, token_rows, gate_up_a, schedule, thin, identity, out_scale=2.0)),
        ("row_gemm", f"h A^T N={RANK} K={inter}", 2 * rows * RANK * inter,
         lambda: grouped_mm(h, identity, down_a.transpose(1, 2), schedule, thin, identity, out_scale=2.0)),
        ("row_gemm", f"d(gate_up) B N={RANK} K={2 * inter}", 4 * rows * RANK * inter,
         lambda: grouped_mm(dgu, identity, gate_up_b.transpose(1, 2), schedule, thin, identity)),
        ("wgrad", f"d(A) N={RANK} K={hidden}", 2 * rows * RANK * hidden,
         lambda: grouped_wgrad(lora_l, identity, x, token_rows, schedule, grad_a)),
        ("wgrad", f"d(B) N={2 * inter} K={RANK}", 4 * rows * RANK * inter,
         lambda: grouped_wgrad(dgu, identity, lora_l, identity, schedule, grad_b)),
    ]
    cases = [(kernel, name, flops, fn, None) for kernel, name, flops, fn in cases]
    # torch's products of each epilogue's rows (gathered into expert order where the kernel reads them gathered).
    gathered = {"gate_up": (x, token_rows, gate_up, False), "d(h)": (grad, token_rows, down, True),
                "down": (h, None, down, False), "d(x)": (dgu, None, gate_up, True)}

    def torch_product(a, a_rows, weight, transpose):
        rows_in_order = a if a_rows is None else a.index_select(0, a_rows)
        return grouped_gemm.expert_product(rows_in_order, weight, schedule, transpose)

    torch_products = {name: functools.partial(torch_product, *operands) for name, operands in gathered.items()}
    # The epilogues given those products (the SwiGLU kernels write over theirs).
    epilogues = {
        "gate_up": (f"SwiGLU fwd epilogue N=2x{inter}", lambda p: grouped_mm_swiglu(
            x, token_rows, gate_up, schedule, lora_l, gate_up_b, store_gate_up=True, interleaved=interleaved,
            product=p)[0]),
        "d(h)": (f"SwiGLU bwd epilogue N={inter}", lambda p: grouped_mm_swiglu_backward(
            grad, token_rows, down, stored, scale, schedule, lora_l, down_a, interleaved=interleaved,
            product=p)[0]),
        "down": (f"down epilogue N={hidden}", lambda p: grouped_mm(
            h, identity, down, schedule, out, identity, lora_l, down_b, row_scale=scale, product=p)),
        "d(x)": (f"d(x) epilogue N={hidden}", lambda p: grouped_mm(
            dgu, identity, gate_up, schedule, out, identity, transpose=True, product=p)),
    }
    product_flops = {"gate_up": 4 * rows * inter * hidden, "d(h)": 2 * rows * inter * hidden,
                     "down": 2 * rows * inter * hidden, "d(x)": 4 * rows * inter * hidden}
    for name, (case, epilogue) in epilogues.items():
        product = torch_products[name]()
        # fn writes over a working copy again and again; check reads a fresh copy of the untouched product.
        kernel = "swiglu_backward_epilogue" if name == "d(h)" else "epilogue"
        cases.append((kernel, case, product_flops[name], (lambda e, p: lambda: e(p))(epilogue, product.clone()),
                      (lambda e, p: lambda: e(p.clone()).clone())(epilogue, product)))
    for name, fn in torch_products.items():
        cases.append(("torch product", f"{name} product by torch", product_flops[name], fn, None))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kernels", default=",".join([*SWEEP, "torch product"]), help="which kernels to time")
    for kernel, configs in SWEEP.items():
        parser.add_argument(f"--{kernel.replace('_', '-')}", dest=kernel, default=configs,
                            help=f"comma-separated BLOCK_N:BLOCK_K:num_warps:num_stages for {kernel}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_expert_configs.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, bf16, LoRA r={RANK}")
    print("| model | kernel | case | config | ms | TFLOP/s | rel err vs default |")
    print("|---|---|---|---|---:|---:|---:|")
    for model in args.models.split(","):
        for kernel, case, flops, fn, check in kernel_cases(*MODELS[model], args.tokens):
            if kernel not in args.kernels.split(","):
                continue
            if kernel not in ATTRIBUTE:  # timed as it is, beside the kernels it feeds
                ms = common.bench_ms(fn)
                print(f"| {model} | {kernel} | {case} | - | {ms:.3f} | {flops / ms / 1e9:.0f} | |", flush=True)
                continue
            check = check or fn
            attribute = ATTRIBUTE[kernel]
            default = getattr(grouped_gemm, attribute)
            reference = check().float().clone()
            variants = [(label(default) + " (default)", default)]
            variants += [(spec, parse(spec)) for spec in getattr(args, kernel).split(",") if parse(spec) != default]
            for name, config in variants:
                setattr(grouped_gemm, attribute, config)
                try:
                    result = check().float()
                    err = ((result - reference).norm() / reference.norm()).item()
                    ms = common.bench_ms(fn)
                    print(f"| {model} | {kernel} | {case} | {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.1e} |",
                          flush=True)
                except Exception as error:  # a configuration that does not fit (shared memory, registers) is a result
                    print(f"| {model} | {kernel} | {case} | {name} | failed: {type(error).__name__} | | |", flush=True)
                finally:
                    setattr(grouped_gemm, attribute, default)


if __name__ == "__main__":
    main()
