"""The ops of a decode step at a handful of rows, with their launch configurations swept: the few-rows LoRA linear
(kernels/lora_linear.py) against cuBLAS's base GEMM + two LoRA GEMMs, its GEMV form at one row against its tl.dot
form, several linear layers of one input in one few-rows launch against one launch each (attention's q, k, v and
gate; a gated MLP's gate and up), the MoE experts block (kernels/moe) at 1, 8 and 64 tokens of top-8 over 128
experts, in 16 bits and in NF4 (double-quantized absmax, as load_in_4bit stores them), the experts block of one
token in its GEMV form against the grouped GEMMs (also at LFM2-8B-A1B's experts), LFM2's short convolution of a
decode step in one launch against PyTorch's eight, a router's linear layer and top-k in one launch against the GEMM and
the routing kernel, and the expert schedule (one program at decoding sizes, three launches at training
sizes) against PyTorch's.
Trinity-Mini's shapes, bf16 activations, float32 LoRA factors (r=16) cast once as decoding does
(kernels/reused_casts.py). Times: device time of the op replayed from a CUDA graph (as the decode step runs it;
triton's do_bench_cudagraph medians); GB/s: the bytes the op must read (the weights it touches) over the time.
Printed only: the chosen configurations go into the kernels' constants.

    python benchmarks/bench_decode_ops.py
"""

from __future__ import annotations

import itertools
import sys

import torch

import common
from fastmoe.kernels import lora_linear as lora_module
from fastmoe.kernels.moe import (
    Nf4Weight,
    dequantize_absmax,
    experts,
    grouped_gemm,
    moe_experts,
    moe_experts_nf4,
    quantize_nf4,
)
from fastmoe.kernels.moe import one_token as one_token_module
from fastmoe.kernels.moe import routing as routing_module
from fastmoe.kernels.moe.routing import reference_router_topk, reference_sort_by_expert, router_topk, sort_by_expert
from fastmoe.kernels.reused_casts import CastCache, reused_casts
from fastmoe.kernels.short_conv import reference_short_conv_decode, short_conv_decode
from fastmoe.kernels.split_k import GEMV_BLOCK_K, gemv_split

PROJECTIONS = [("q_proj", 2048, 4096), ("k_proj", 2048, 512), ("o_proj", 4096, 2048), ("shared up", 2048, 1024),
               ("shared down", 1024, 2048)]
ROWS = (1, 8, 64)
RANK = 16


def few_rows(device: str) -> None:
    configs = [dict(BLOCK_N=n, BLOCK_K=k, SPLIT_K=split, num_warps=w, num_stages=st)
               for n, k, split, w, st in itertools.product((16, 32, 64), (64, 128), (1, 2, 4, 8), (4,), (3,))]
    for (name, d_in, d_out), rows in itertools.product(PROJECTIONS, (1, 8)):
        x = torch.randn(rows, d_in, device=device, dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16) * d_in ** -0.5
        a = torch.randn(RANK, d_in, device=device) * d_in ** -0.5
        b = torch.randn(d_out, RANK, device=device)
        a16, b16 = a.bfloat16(), b.bfloat16()
        gbytes = (w.numel() * 2 + a.numel() * 4 + b.numel() * 4) / 1e9
        cublas = common.bench_graph_ms(lambda: torch.addmm(torch.nn.functional.linear(x, w), x @ a16.t(), b16.t()))
        results = []
        default = lora_module._few_rows_config(rows, d_out, d_in)
        for config in configs:
            try:
                layer = [lora_module.Projection(w, None, a16, b16, 2.0)]
                out = lora_module._launch_few_rows(x, layer, config)[0]
                ms = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layer, config))
            except Exception as error:  # a configuration that does not compile (shared memory)
                print(f"  {config}: {type(error).__name__}")
                continue
            results.append((ms, config))
        ref = torch.nn.functional.linear(x.double(), w.double()) + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
        err = common.rel_err(out.double(), ref)
        layer = [lora_module.Projection(w, None, a16, b16, 2.0)]
        chosen = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layer, default))
        best = sorted(results, key=lambda r: r[0])[:3]
        print(f"few-rows {name} {d_in}->{d_out} rows {rows}: cuBLAS 3 GEMMs {cublas * 1e3:.1f} us; default "
              f"{chosen * 1e3:.1f} us {default}; best "
              + "; ".join(f"{ms * 1e3:.1f} us ({gbytes / ms * 1e3:.0f} GB/s) {c}" for ms, c in best)
              + f"; rel err {err:.1e}", flush=True)


# Layers of one input: (name, in, outs, SwiGLU pair). Trinity-Mini's attention (q, k, v, output gate), its shared
# expert's and dense MLPs' gate and up.
ONE_INPUT = [("attention q k v gate", 2048, (4096, 512, 512, 4096), False),
             ("shared expert gate up", 2048, (1024, 1024), True), ("dense MLP gate up", 2048, (6144, 6144), True)]


def projections(device: str) -> None:
    configs = [dict(BLOCK_N=n, BLOCK_K=128, SPLIT_K=split, num_warps=w, num_stages=3)
               for n, split, w in itertools.product((32, 64, 128), (1, 2, 4, 8), (4,))]
    for (name, d_in, outs, swiglu), rows in itertools.product(ONE_INPUT, (1, 8)):
        x = torch.randn(rows, d_in, device=device, dtype=torch.bfloat16)
        layers = [lora_module.Projection(torch.randn(n, d_in, device=device, dtype=torch.bfloat16) * d_in ** -0.5,
                                         None, (torch.randn(RANK, d_in, device=device) * d_in ** -0.5).bfloat16(),
                                         torch.randn(n, RANK, device=device).bfloat16(), 2.0) for n in outs]
        gbytes = sum(layer.weight.numel() * 2 for layer in layers) / 1e9
        n_all = outs[0] if swiglu else sum(outs)

        def separate():
            ys = [lora_module.lora_linears_few_rows(x, [layer])[0] for layer in layers]
            return torch.nn.functional.silu(ys[0]) * ys[1] if swiglu else ys

        alone = common.bench_graph_ms(separate)
        default = lora_module._few_rows_config(rows, n_all, d_in)
        chosen = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layers, default, swiglu))
        results = []
        for config in configs:
            try:
                ms = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layers, config, swiglu))
            except Exception as error:  # a configuration that does not compile (shared memory)
                print(f"  {config}: {type(error).__name__}")
                continue
            results.append((ms, config))
        fused = lora_module._launch_few_rows(x, layers, default, swiglu)
        expected = separate()
        err = max(common.rel_err(a.double(), b.double()) for a, b in zip(fused, expected if not swiglu else [expected]))
        best = sorted(results, key=lambda r: r[0])[:3]
        print(f"projections {name} rows {rows} ({gbytes * 1e3:.0f} MB): one launch each {alone * 1e3:.1f} us; one "
              f"launch {chosen * 1e3:.1f} us ({gbytes / chosen * 1e3:.0f} GB/s) {default}; best "
              + "; ".join(f"{ms * 1e3:.1f} us ({gbytes / ms * 1e3:.0f} GB/s) {c}" for ms, c in best)
              + f"; rel err to one launch each {err:.1e}", flush=True)


# The linear layers of a Trinity-Mini decode step as one few-rows launch takes them: (name, in, outs, SwiGLU pair).
NF4_LAUNCHES = [("attention q k v gate", 2048, (4096, 512, 512, 4096), False), ("o_proj", 4096, (2048,), False),
                ("shared expert gate up", 2048, (1024, 1024), True), ("shared expert down", 1024, (2048,), False),
                ("dense MLP gate up", 2048, (6144, 6144), True), ("dense MLP down", 6144, (2048,), False)]


def _launch_layers(device: str, d_in: int, outs: tuple[int, ...], nf4: bool) -> list:
    """One few-rows launch's layers with LoRA (r=16, bf16 factors): bf16 weights, or NF4 with double-quantized absmax
    as bitsandbytes stores them."""
    layers = []
    for n in outs:
        w = torch.randn(1, n, d_in, device=device, dtype=torch.bfloat16) * d_in ** -0.5
        a = (torch.randn(RANK, d_in, device=device) * d_in ** -0.5).bfloat16()
        b = torch.randn(n, RANK, device=device).bfloat16()
        layers.append(lora_module.Projection(quantize_nf4(w, double_quant=True) if nf4 else w[0], None, a, b, 2.0))
    return layers


def few_rows_nf4(device: str) -> None:
    """The few-rows launches of load_in_4bit's linear layers (NF4, double-quantized absmax, as bitsandbytes stores
    them) over splits, blocks and warps; rows 1 (the sweep) and 8 (the chosen configuration)."""
    configs = [dict(BLOCK_N=n, BLOCK_K=k, SPLIT_K=split, num_warps=w, num_stages=3)
               for n, k, split, w in itertools.product((32, 64), (128, 256), (1, 2, 4, 8), (4, 8))
               if w == 4 or (n, k) == (64, 256)]
    for name, d_in, outs, swiglu in NF4_LAUNCHES:
        layers = _launch_layers(device, d_in, outs, nf4=True)
        gbytes = sum(layer.weight.nbytes() for layer in layers) / 1e9
        n_all = outs[0] if swiglu else sum(outs)
        for rows in (1, 8):
            x = torch.randn(rows, d_in, device=device, dtype=torch.bfloat16)
            with reused_casts(CastCache()):
                default = lora_module._few_rows_config(rows, n_all, d_in, nf4=True)
                expected = lora_module._launch_few_rows(x, layers, default, swiglu)
                chosen = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layers, default, swiglu))
                results = []
                for config in configs if rows == 1 else []:
                    try:
                        out = lora_module._launch_few_rows(x, layers, config, swiglu)
                        ms = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layers, config, swiglu))
                    except Exception as error:  # a configuration that does not compile (shared memory)
                        print(f"  {config}: {type(error).__name__}")
                        continue
                    err = max(common.rel_err(a.double(), b.double()) for a, b in zip(out, expected))
                    results.append((ms, config, err))
            swept = ""
            if results:  # rows 1
                best = sorted(results, key=lambda r: r[0])[:4]
                swept = ("; best " + "; ".join(f"{ms * 1e3:.1f} us ({gbytes / ms * 1e3:.0f} GB/s) {c} err {e:.1e}"
                                               for ms, c, e in best)
                         + f"; largest err to the default {max(r[2] for r in results):.1e}")
            print(f"few-rows nf4 {name} rows {rows} ({gbytes * 1e3:.1f} MB): default {chosen * 1e3:.1f} us "
                  f"({gbytes / chosen * 1e3:.0f} GB/s) {default}{swept}", flush=True)


def few_rows_gemv(device: str) -> None:
    """One row (batch-1 decoding): the few-rows kernel's GEMV form against its tl.dot form, NF4 (double-quantized
    absmax) and bf16 layers, Trinity-Mini's six launches of a layer; the GEMV form with the default configuration,
    with other K steps and splits, with its K loop unpipelined or pipelined 2-4 steps deep (GEMV_LOOP_STAGES), and for
    NF4 with the portable decode instead of the PTX register decode and with GEMV_MMA the other way. Each output is
    checked against the tl.dot form's."""
    totals: dict[str, float] = {}
    for nf4, (name, d_in, outs, swiglu) in itertools.product((True, False), NF4_LAUNCHES):
        layers = _launch_layers(device, d_in, outs, nf4)
        n_all = outs[0] if swiglu else sum(outs)
        x = torch.randn(1, d_in, device=device, dtype=torch.bfloat16)
        gemv = lora_module._few_rows_config(1, n_all, d_in, nf4=nf4)
        variants = {"dot": lora_module._few_rows_config(2, n_all, d_in, nf4=nf4), "gemv": gemv}
        for block_k, split in itertools.product((64, 128), (2, 4, 8, 16)):
            if (block_k, split) != (gemv["BLOCK_K"], gemv["SPLIT_K"]) and split * block_k * 2 <= d_in:
                variants[f"gemv k{block_k} split {split}"] = {**gemv, "BLOCK_K": block_k, "SPLIT_K": split}
        for loop_stages, split_scale in itertools.product((1, 2, 3, 4), (0.5, 1, 2)):  # the K loop (un)pipelined
            split = max(1, int(gemv["SPLIT_K"] * split_scale))
            default = loop_stages == one_token_module.GEMV_LOOP_STAGES and split == gemv["SPLIT_K"]
            if split * gemv["BLOCK_K"] * 2 <= d_in and not default:
                variants[f"gemv loop stages {loop_stages} split {split}"] = {**gemv, "SPLIT_K": split,
                                                                             "LOOP_STAGES": loop_stages}
        register_decode, mma = one_token_module.GEMV_REGISTER_DECODE, one_token_module.GEMV_MMA
        if nf4:  # NF4 tiles through the portable decode (a code lookup per weight) instead of the PTX one
            variants["gemv portable decode"] = gemv
            # and their products on the tensor cores or not (GEMV_MMA: 64-row blocks, 128-column steps)
            variants.update({f"gemv mma {not mma} split {split}": {**gemv, "SPLIT_K": split}
                             for split in (gemv["SPLIT_K"] // 2, gemv["SPLIT_K"], 2 * gemv["SPLIT_K"]) if split})
        results, expected = [], None
        with reused_casts(CastCache()):
            for label, config in variants.items():
                one_token_module.GEMV_REGISTER_DECODE = register_decode and label != "gemv portable decode"
                one_token_module.GEMV_MMA = mma != label.startswith("gemv mma")
                out = lora_module._launch_few_rows(x, layers, config, swiglu)
                ms = common.bench_graph_ms(lambda: lora_module._launch_few_rows(x, layers, config, swiglu))
                expected = expected or out
                err = max(common.rel_err(a.double(), b.double()) for a, b in zip(out, expected))
                results.append((ms, label, err))
        one_token_module.GEMV_REGISTER_DECODE, one_token_module.GEMV_MMA = register_decode, mma
        kind = "nf4" if nf4 else "bf16"
        for ms, label, _ in results:
            if label in ("dot", "gemv") or (label.endswith(f" split {gemv['SPLIT_K']}")
                                            and ("loop stages" in label or label.startswith("gemv mma"))):
                label = label.split(" split")[0]
                totals[f"{kind} {label}"] = totals.get(f"{kind} {label}", 0.0) + ms
        portable = [f"; portable decode {ms * 1e3:.1f} us" for ms, label, _ in results
                    if label == "gemv portable decode"]
        portable += [f"; {label} {ms * 1e3:.1f} us (err {err:.0e})" for ms, label, err in results
                     if label.startswith("gemv mma")]
        best = sorted(r for r in results[2:] if r[1] != "gemv portable decode" and not r[1].startswith("gemv mma"))[:3]
        print(f"few-rows {kind} {name} 1 row: tl.dot form {results[0][0] * 1e3:.1f} us {variants['dot']}; "
              f"GEMV {results[1][0] * 1e3:.1f} us {gemv} (err {results[1][2]:.0e}){''.join(portable)}; other GEMV "
              "configurations " + "; ".join(f"{label} {ms * 1e3:.1f} us (err {err:.0e})" for ms, label, err in best),
              flush=True)
    print("few-rows one row, the six launches together: "
          + ", ".join(f"{label} {ms * 1e3:.1f} us" for label, ms in totals.items()))


def _experts(device: str, hidden: int, inter: int, num_experts: int, nf4: bool) -> tuple:
    """(gate_up, down, their LoRAs, bytes per weight, the experts block taking them): bf16 stacks, or NF4 as
    load_in_4bit stores them (NF4 codes, double-quantized absmax) (common.random_expert_stacks)."""
    stacks = common.random_expert_stacks(device, hidden, inter, num_experts, nf4, RANK)
    if nf4:
        return *stacks, 0.5 + 1 / 64, moe_experts_nf4
    return *stacks, 2, moe_experts


def moe(device: str, nf4: bool = False) -> None:
    hidden, inter, num_experts, top_k = 2048, 1024, 128, 8
    gate_up, down, gu_lora, dn_lora, bytes_per_weight, block = _experts(device, hidden, inter, num_experts, nf4)
    original_config, original_block_m = grouped_gemm._config, experts.gemm_block_m
    # NF4 tiles decode in registers, so narrower column blocks (more programs), more warps and longer K steps are worth
    # trying there.
    sweeps = list(itertools.product((16,), (16, 32, 64) if nf4 else (32, 64, 128), (128, 256) if nf4 else (64, 128),
                                    (4, 8) if nf4 else (4,), (3, 4)))
    for tokens in ROWS:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        index = torch.stack([torch.randperm(num_experts, device=device)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, device=device)
        touched = index.unique().numel()
        gbytes = touched * (2 * inter * hidden + hidden * inter) * bytes_per_weight / 1e9
        results, expected, largest_err = [], None, 0.0
        with reused_casts(CastCache()), torch.no_grad():
            for sweep in [None, *sweeps]:
                bm, n, k, w, st = sweep or (None,) * 5
                if bm is None:
                    grouped_gemm._config, experts.gemm_block_m = original_config, original_block_m
                else:
                    def config(*args, _c=(n, k, w, st), **kwargs):
                        return _c[0], _c[1], {"num_warps": _c[2], "num_stages": _c[3]}
                    grouped_gemm._config = config
                    experts.gemm_block_m = lambda device, pairs, num_experts, _bm=bm: _bm
                try:
                    out = block(x, index, weights, gate_up, down, gu_lora, dn_lora)
                    ms = common.bench_graph_ms(lambda: block(x, index, weights, gate_up, down, gu_lora, dn_lora))
                except Exception as error:
                    print(f"  {sweep}: {type(error).__name__}")
                    continue
                if expected is None:
                    expected = out.double()
                largest_err = max(largest_err, common.rel_err(out.double(), expected))
                results.append((ms, "current" if bm is None else sweep))
        grouped_gemm._config, experts.gemm_block_m = original_config, original_block_m
        current = results[0]
        best = sorted(results, key=lambda r: r[0])[:4]
        print(f"moe{' nf4' if nf4 else ''} {tokens} tokens ({touched} experts, {gbytes * 1e3:.0f} MB): current {current[0] * 1e3:.1f} us "
              f"({gbytes / current[0] * 1e3:.0f} GB/s); best (block_m, BLOCK_N, BLOCK_K, warps, stages) "
              + "; ".join(f"{ms * 1e3:.1f} us ({gbytes / ms * 1e3:.0f} GB/s) {c}" for ms, c in best)
            + f"; largest rel err to the current configuration {largest_err:.1e}", flush=True)


def scaled_gemv_split(scale: float):
    """split_k.gemv_split with its count of splits scaled by `scale`, same signature, for the one-token sweep. The K
    step goes through: a two-argument stand-in once took one_token's block_k (128 for its MMA steps) for the scale and
    asked for hundreds of splits, whose unrolled fix-ups then kept the compiler busy for many minutes."""
    def split(programs: int, k: int, block_k: int = GEMV_BLOCK_K) -> int:
        return max(1, int(gemv_split(programs, k, block_k) * scale))
    return split


def one_token(device: str, mma_only: bool = False) -> None:
    """The experts block of one token (batch-1 decoding): the one-token GEMV form (kernels/moe/one_token.py) against
    the grouped GEMMs' decode path, with its column blocks and splits swept, its K loop pipelined 1-4 steps deep
    (GEMV_LOOP_STAGES) and NF4 products on the tensor cores or not (GEMV_MMA), Trinity-Mini's and LFM2-8B-A1B's
    experts, bf16 and NF4, also NF4 with its absmax in fp32 instead of double-quantized, and without LoRA. With
    mma_only (section one-token-mma, a few minutes where the whole sweep takes many), NF4 only: the default
    configuration against GEMV_MMA's other setting, fp32 absmax and no LoRA."""
    shapes = {"trinity-mini": (2048, 1024, 128, 8), "lfm2-8b-a1b": (2048, 1792, 32, 4)}
    original_form, original_split, original_block_n = experts._one_token_form, one_token_module.gemv_split, \
        one_token_module._GPU_BLOCK_N
    original_register_decode = one_token_module.GEMV_REGISTER_DECODE
    original_stages, original_mma = one_token_module.GEMV_LOOP_STAGES, one_token_module.GEMV_MMA
    original_down_xa = one_token_module.DOWN_XA_IN_GATE_UP

    for (name, (hidden, inter, num_experts, top_k)), nf4 in itertools.product(shapes.items(),
                                                                             (True,) if mma_only else (False, True)):
        gate_up, down, gu_lora, dn_lora, bytes_per_weight, block = _experts(device, hidden, inter, num_experts, nf4)
        x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
        index = torch.randperm(num_experts, device=device)[:top_k][None]
        weights = torch.rand(1, top_k, device=device)
        gbytes = top_k * 3 * inter * hidden * bytes_per_weight / 1e9
        stages, mma = original_stages, original_mma
        # The same NF4 codes with their absmax as fp32 instead of double-quantized (1 byte a block plus the decode of
        # a dependent gather from the 256-entry dynamic code in every K step): whether that gather bounds the GEMVs.
        fp32_absmax = (tuple(Nf4Weight(w.packed, dequantize_absmax(w), w.shape, w.dtype) for w in (gate_up, down))
                       if nf4 else None)
        variants = {"grouped": (False, 64, 1.0, True, stages, mma)}
        variants.update({f"one-token BLOCK_N {n} splits x{scale}": (True, n, scale, True, stages, mma)
                         for n, scale in itertools.product((32, 64, 128), (0.5, 1.0, 2.0))})
        # The K loop as it is (1) and pipelined (GEMV_LOOP_STAGES): loads issued 2-4 steps ahead
        variants.update({f"one-token BLOCK_N {n} splits x{scale} loop stages {s}": (True, n, scale, True, s, mma)
                         for n, scale, s in itertools.product((64, 128), (0.5, 1.0, 2.0), (1, 2, 3, 4)) if s != stages})
        if nf4:  # NF4 tiles through the portable decode (a code lookup per weight) instead of the PTX one
            variants.update({f"one-token BLOCK_N 64 splits x{scale} portable decode":
                             (True, 64, scale, False, stages, mma) for scale in (0.5, 1.0, 2.0)})
            # and their products on the tensor cores or not (GEMV_MMA; 64-row tiles only)
            variants.update({f"one-token BLOCK_N 64 splits x{scale} mma {not mma}": (True, 64, scale, True, s, not mma)
                             for scale, s in itertools.product((0.5, 1.0, 2.0), (1, 3))})
            variants.update({f"one-token BLOCK_N 64 splits x{scale} fp32 absmax": (True, 64, scale, True, stages, mma)
                             for scale in (0.5, 1.0, 2.0)})
        # Without the experts' LoRA: what x A^T (each column block's programs compute it over their K range again)
        # and the B term cost the block.
        variants[f"one-token BLOCK_N {original_block_n} splits x1.0 no LoRA"] = (True, original_block_n, 1.0, True,
                                                                                  stages, mma)
        # The down LoRA's h A^T once, from gate_up's per-block partials (DOWN_XA_IN_GATE_UP), not in every down program
        variants[f"one-token BLOCK_N {original_block_n} splits x1.0 down xa in gate_up"] = (
            True, original_block_n, 1.0, True, stages, mma)
        if mma_only:
            variants = {label: v for label, v in variants.items()
                        if label in ("grouped", f"one-token BLOCK_N {original_block_n} splits x1.0") or " mma " in label
                        or label.endswith(("fp32 absmax", "no LoRA", "down xa in gate_up"))}
        results, expected, largest_err = {}, None, 0.0
        with reused_casts(CastCache()), torch.no_grad():
            for label, (form, block_n, scale, register_decode, loop_stages, mma) in variants.items():
                experts._one_token_form = (lambda weights, _form=form: _form and original_form(weights))
                one_token_module.GEMV_REGISTER_DECODE = original_register_decode and register_decode
                one_token_module.GEMV_LOOP_STAGES = loop_stages
                one_token_module.GEMV_MMA = mma
                one_token_module._GPU_BLOCK_N = block_n
                one_token_module.gemv_split = scaled_gemv_split(scale)
                gu, dn = fp32_absmax if label.endswith("fp32 absmax") else (gate_up, down)
                gu_l, dn_l = (None, None) if label.endswith("no LoRA") else (gu_lora, dn_lora)
                one_token_module.DOWN_XA_IN_GATE_UP = label.endswith("down xa in gate_up")
                try:
                    out = block(x, index, weights, gu, dn, gu_l, dn_l)
                    ms = common.bench_graph_ms(lambda: block(x, index, weights, gu, dn, gu_l, dn_l))
                except Exception as error:
                    # A Triton compile error's text is the kernel's source; its cause says what failed.
                    cause = f" ({error.__cause__!r})" if error.__cause__ is not None else ""
                    print(f"  {label}: {type(error).__name__}: {str(error).strip().splitlines()[0]}{cause}")
                    continue
                if expected is None:
                    expected = out.double()
                if gu_l is not None:  # a block without LoRA computes another function
                    largest_err = max(largest_err, common.rel_err(out.double(), expected))
                results[label] = ms
                # Each variant as it is timed: compiling the sweep's kernels takes minutes, and a time limit that
                # stops it still leaves these lines.
                print(f"  {name} {'nf4' if nf4 else 'bf16'} {label}: {ms * 1e3:.1f} us", flush=True)
        experts._one_token_form, one_token_module.gemv_split = original_form, original_split
        one_token_module._GPU_BLOCK_N = original_block_n
        one_token_module.GEMV_REGISTER_DECODE = original_register_decode
        one_token_module.GEMV_LOOP_STAGES, one_token_module.GEMV_MMA = original_stages, original_mma
        one_token_module.DOWN_XA_IN_GATE_UP = original_down_xa
        current = results.get(f"one-token BLOCK_N {original_block_n} splits x1.0")
        if current is None or "grouped" not in results:
            print(f"one-token {name} {'nf4' if nf4 else 'bf16'}: the default configuration or the grouped path failed "
                  "(above)", flush=True)
            continue
        best = sorted(results.items(), key=lambda r: r[1])[:4]
        print(f"one-token {name} {'nf4' if nf4 else 'bf16'} ({top_k} experts, {gbytes * 1e3:.1f} MB): grouped "
              f"{results['grouped'] * 1e3:.1f} us, one-token {current * 1e3:.1f} us ({gbytes / current * 1e3:.0f} "
              "GB/s); best " + "; ".join(f"{label} {ms * 1e3:.1f} us" for label, ms in best)
              + f"; largest rel err to the grouped path {largest_err:.1e}", flush=True)


def short_conv_step(device: str) -> None:
    """LFM2's gated short convolution of one decode step (kernels/short_conv.py short_conv_decode) against PyTorch's
    path, LFM2-8B-A1B's 2048 channels and 3 taps, bf16."""
    hidden, taps = 2048, 3
    weight = torch.randn(hidden, 1, taps, device=device, dtype=torch.bfloat16)
    bias = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    for batch in (1, 8, 64):
        bcx = torch.randn(batch, 1, 3 * hidden, device=device, dtype=torch.bfloat16)
        state = torch.randn(batch, hidden, taps, device=device, dtype=torch.bfloat16)
        expected_state = state.clone()
        expected = reference_short_conv_decode(bcx, expected_state, weight, bias)
        out = short_conv_decode(bcx, state, weight, bias)
        same_state = torch.equal(state, expected_state)
        fused = common.bench_graph_ms(lambda: short_conv_decode(bcx, state, weight, bias))
        eager = common.bench_graph_ms(lambda: reference_short_conv_decode(bcx, state, weight, bias))
        print(f"short-conv decode step, batch {batch}: one launch {fused * 1e3:.1f} us, PyTorch {eager * 1e3:.1f} us; "
              f"rel err {common.rel_err(out.double(), expected.double()):.1e}, same state {same_state}", flush=True)


def router(device: str) -> None:
    """A router at a decode step's rows: its linear layer and top-k in one launch (kernels/moe/routing.py
    router_topk) against cuBLAS's GEMM and the routing kernel (the path at more rows or with autograd), at
    Trinity-Mini's (128 experts, top-8, sigmoid), LFM2-8B-A1B's (32, top-4, sigmoid), Qwen3-30B-A3B's (128, top-8,
    softmax) and Mixtral-8x7B's (8 experts of 4096, top-2, softmax) routers, bf16."""
    routers = {"trinity-mini": (2048, 128, 8, True), "lfm2-8b-a1b": (2048, 32, 4, True),
               "qwen3-30b-a3b": (2048, 128, 8, False), "mixtral-8x7b": (4096, 8, 2, False)}
    for (name, (hidden_size, num_experts, top_k, sigmoid)), rows in itertools.product(routers.items(), (1, 8)):
        hidden = torch.randn(rows, hidden_size, device=device, dtype=torch.bfloat16)
        weight = torch.randn(num_experts, hidden_size, device=device, dtype=torch.bfloat16) / hidden_size**0.5
        bias = torch.randn(num_experts, device=device) * 0.01 if sigmoid else None
        args = (hidden, weight, bias, top_k, sigmoid, sigmoid, 1e-20, 1.0)
        with torch.no_grad():
            logits, _, index = router_topk(*args)
            ref_logits, _, ref_index = reference_router_topk(*args)
            fused = common.bench_graph_ms(lambda: router_topk(*args))
            routing_module.ROUTER_GEMV_TOKENS, original = 0, routing_module.ROUTER_GEMV_TOKENS
            try:
                unfused = common.bench_graph_ms(lambda: router_topk(*args))
            finally:
                routing_module.ROUTER_GEMV_TOKENS = original
        print(f"router {name}, {rows} rows: one launch {fused * 1e3:.1f} us, GEMM + routing kernel "
              f"{unfused * 1e3:.1f} us; logits rel err {common.rel_err(logits.double(), ref_logits.double()):.1e}, "
              f"same experts {torch.equal(index, ref_index)}", flush=True)


def schedule(device: str) -> None:
    # Decoding (Trinity-Mini's 128 experts, top-8, one program) and training sizes (4,096 tokens of Trinity-Mini's,
    # LFM2-8B-A1B's and JetMoe-8B's routing, three launches), as the grouped GEMMs ask for them.
    cases = [(tokens, 128, 8) for tokens in (1, 8, 16, 64)] + [(4096, 128, 8), (4096, 32, 4), (4096, 8, 2)]
    for tokens, num_experts, top_k in cases:
        index = torch.rand(tokens, num_experts, device=device).topk(top_k, dim=1).indices
        block_m = grouped_gemm.gemm_block_m(index.device, index.numel(), num_experts)
        builder = "one program" if index.numel() <= routing_module.ONE_PROGRAM_PAIRS else "three launches"
        kernel = common.bench_ms(lambda: sort_by_expert(index, num_experts, block_m))
        reference = common.bench_ms(lambda: reference_sort_by_expert(index, num_experts, block_m))
        graph_kernel = common.bench_graph_ms(lambda: sort_by_expert(index, num_experts, block_m))
        graph_reference = common.bench_graph_ms(lambda: reference_sort_by_expert(index, num_experts, block_m))
        print(f"schedule {tokens * top_k} pairs over {num_experts} experts: {builder} {kernel * 1e3:.1f} us (graphed "
              f"{graph_kernel * 1e3:.1f}), PyTorch {reference * 1e3:.1f} us (graphed {graph_reference * 1e3:.1f})",
              flush=True)


if __name__ == "__main__":
    sections = {"schedule": schedule, "moe": moe, "moe-nf4": lambda device: moe(device, nf4=True),
                "few-rows": few_rows, "few-rows-nf4": few_rows_nf4, "few-rows-gemv": few_rows_gemv,
                "one-token": one_token,
                "one-token-mma": lambda device: one_token(device, mma_only=True), "router": router,
                "short-conv": short_conv_step, "projections": projections}
    for name in sys.argv[1:] or sections:  # e.g. `bench_decode_ops.py few-rows`; all of them without arguments
        sections[name]("cuda")
