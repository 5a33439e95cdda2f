"""LFM2's gated short convolution (kernels/short_conv.py) against the transformers code it replaces (issue #5).

At LFM2-8B-A1B's shapes (hidden 2048, conv kernel L_cache 3, batch x sequence 1x4096 and 4x2048, bf16), two
comparisons:

* the conv op alone, from the in_proj output (batch, seq, 3 * hidden) to what out_proj takes (batch, seq,
  hidden): fastmoe's Triton kernel vs the lines of transformers' `Lfm2MoeShortConv.forward` between the two
  projections (transpose, chunk into B, C, x, B * x, `causal_conv1d_fn`, C * conv, transpose back). Without the
  `causal_conv1d` package, that function is a depthwise `F.conv1d` padded by L - 1 and cut back to the sequence;
  the implementation column says which of the two transformers found;
* the whole ShortConv block (in_proj, gated conv, out_proj; no LoRA on the projections): fastmoe's patched
  forward vs transformers' own, on one `Lfm2MoeShortConv` built from a tiny random `Lfm2MoeConfig` with the real
  hidden size.

Weights are frozen, as in LoRA training (the conv is never adapted), so backward computes the input gradient only.
Both columns are launched eagerly (triton's do_bench, which flushes L2): transformers' conv path cannot be captured in
a CUDA graph (its backward syncs with the legacy stream; H100, torch 2.11). Peak memory: allocated above the inputs
during one forward + backward. GB/s: see conv_bytes. One JSON line per (case, implementation) goes to
benchmarks/results.jsonl (question "short-conv"), with the relative error against transformers.

    python benchmarks/bench_short_conv.py        # GPU
    TRITON_INTERPRET=1 python benchmarks/bench_short_conv.py --cpu --jsonl R.jsonl   # tiny fp32 CPU smoke run,
                                                        # untimed; recorded only where --jsonl says
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf

import common
from fastmoe import patching
from fastmoe.kernels.dispatch import use_triton
from fastmoe.kernels.short_conv import short_conv
from fastmoe import FastLfm2MoeModel

SHAPES = {"cuda": "1x4096,4x2048", "cpu": "1x32,2x16"}
HIDDEN = {"cuda": common.PRESETS["lfm2-8b-a1b"]["hidden_size"], "cpu": common.PRESETS["lfm2-tiny"]["hidden_size"]}


def conv_bytes(tokens: int, hidden: int, conv_params: int, element_size: int) -> tuple[int, int]:
    """(forward, forward + backward) bytes the conv op must move at least, every tensor read or written once.

    Forward reads the in_proj output bcx (3 T H elements) and the conv's weight and bias (P), and writes y (T H):
    4 T H + P. Backward with a frozen weight reads bcx, dy and the weight again and writes dbcx: 7 T H + P. Forward +
    backward: (11 T H + 2 P) * element size. Both implementations are charged the same count, so the ratio of their
    GB/s is the speedup."""
    fwd = 4 * tokens * hidden + conv_params
    bwd = 7 * tokens * hidden + conv_params
    return fwd * element_size, (fwd + bwd) * element_size


def hbm_peak_gbs() -> float | None:
    """The device's theoretical memory bandwidth: bus width x memory clock (kHz in cudaDeviceProp) x 2 (double
    data rate); None where torch does not report them."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    bus_bits, clock_khz = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    return 2 * bus_bits / 8 * clock_khz * 1e3 / 1e9 if bus_bits and clock_khz else None


def transformers_conv(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Lfm2MoeShortConv.forward between in_proj and out_proj, without a cache, as transformers writes it:
    bcx (batch, seq, 3 * hidden) -> (batch, seq, hidden)."""
    b, c, x = bcx.transpose(-1, -2).chunk(3, dim=-2)
    conv = hf.causal_conv1d_fn(b * x, weight.squeeze(1), bias)
    return (c * conv).transpose(-1, -2).contiguous()


class ConvOp(torch.nn.Module):
    """op(bcx, conv.weight, conv.bias) as a module, so that the conv alone is measured as the block is."""

    def __init__(self, conv: torch.nn.Conv1d, op):
        super().__init__()
        self.conv, self.op = conv, op

    def forward(self, bcx: torch.Tensor) -> torch.Tensor:
        return self.op(bcx, self.conv.weight, self.conv.bias)


def run(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: str) -> dict:
    """Output and input gradient of module(x), and its timings (None on the CPU)."""
    out = module(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    timings = dict(fwd_ms=None, fwd_bwd_ms=None, peak_mib=None)
    if device == "cuda":
        step = common.fwd_bwd(module, [x], [grad])
        with torch.no_grad():
            timings["fwd_ms"] = common.bench_ms(lambda: module(x), warmup=25, rep=200)
        timings.update(fwd_bwd_ms=common.bench_ms(step, warmup=25, rep=200), peak_mib=common.peak_mib_above(step))
    return dict(out=out.detach(), dx=dx, **timings)


def records_of(case: str, results: list[tuple[str, str, dict]], moved: tuple[int, int] | None,
               hbm: float | None) -> list[dict]:
    """One record per implementation; the first is transformers, the reference for relative errors."""
    base = results[0][2]
    records = []
    for impl, detail, r in results:
        record = dict(case=case, implementation=impl, detail=detail, fwd_ms=common.rounded(r["fwd_ms"], 4),
                      fwd_bwd_ms=common.rounded(r["fwd_bwd_ms"], 4), peak_mib=common.rounded(r["peak_mib"], 0))
        if r is not base:
            record.update(rel_err_out=float(f"{common.rel_err(r['out'], base['out']):.2e}"),
                          rel_err_dx=float(f"{common.rel_err(r['dx'], base['dx']):.2e}"))
        if moved and r["fwd_ms"] is not None:
            record.update(fwd_gbs=round(moved[0] / r["fwd_ms"] / 1e6),
                          fwd_bwd_gbs=round(moved[1] / r["fwd_bwd_ms"] / 1e6))
            if hbm:
                record.update(fwd_hbm_pct=round(100 * record["fwd_gbs"] / hbm),
                              fwd_bwd_hbm_pct=round(100 * record["fwd_bwd_gbs"] / hbm))
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 shapes on the CPU, untimed")
    parser.add_argument("--shapes", default=None, help="batch x sequence length, comma-separated "
                        f"(default {SHAPES['cuda']} on a GPU, {SHAPES['cpu']} on the CPU)")
    parser.add_argument("--jsonl", default=None, help="JSON-lines file the records go to (default on a GPU: "
                        "benchmarks/results.jsonl; on the CPU nothing is recorded unless given)")
    args = parser.parse_args()
    device = "cpu" if args.cpu else common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    jsonl = args.jsonl or (str(common.RESULTS_JSONL) if device == "cuda" else None)
    torch.manual_seed(0)

    # Only one ShortConv layer is built, so the tiny preset's other sizes do not matter; L_cache (3) and
    # conv_bias (False) are Lfm2MoeConfig's defaults, which LFM2-8B-A1B uses.
    config = common.make_config(dict(common.PRESETS["lfm2-tiny"], hidden_size=HIDDEN[device]))
    module = hf.Lfm2MoeShortConv(config, layer_idx=0).to(device, dtype).requires_grad_(False)
    hidden, taps = config.hidden_size, config.conv_L_cache
    conv_params = sum(p.numel() for p in module.conv.parameters())
    patches = [p for p in FastLfm2MoeModel.patches() if p.owner is hf.Lfm2MoeShortConv]
    hf_conv = "causal_conv1d" if importlib.util.find_spec("causal_conv1d") else "torch conv1d"
    hbm = hbm_peak_gbs() if device == "cuda" else None
    shared = dict(common.environment(device), question="short-conv", hidden=hidden, L_cache=taps,
                  dtype=str(dtype).removeprefix("torch."), hbm_peak_gbs=common.rounded(hbm, 0))

    was_patched = patching.is_patched(patches)
    records = []
    try:
        for batch, seq in common.parse_shapes(args.shapes or SHAPES[device]):
            bcx = torch.randn(batch, seq, 3 * hidden, device=device, dtype=dtype, requires_grad=True)
            h = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
            ours = "Triton" if use_triton(bcx) else "PyTorch reference"
            moved = conv_bytes(batch * seq, hidden, conv_params, bcx.element_size())
            # (case, input, bytes for GB/s, [(implementation, detail, module, with fastmoe's patch)]),
            # transformers first
            for case, x, case_bytes, impls in (
                (f"conv op {batch}x{seq}", bcx, moved,
                 [("transformers", hf_conv, ConvOp(module.conv, transformers_conv), False),
                  ("fastmoe", ours, ConvOp(module.conv, short_conv), False)]),
                (f"ShortConv block {batch}x{seq}", h, None,
                 [("transformers", "", module, False), ("fastmoe", ours, module, True)]),
            ):
                results = []
                for impl, detail, layer, patched in impls:
                    (patching.apply_patches if patched else patching.remove_patches)(patches)
                    results.append((impl, detail, run(layer, x, dy, device)))
                records += [dict(shared, **r) for r in records_of(case, results, case_bytes, hbm)]
    finally:
        (patching.apply_patches if was_patched else patching.remove_patches)(patches)

    print(f"{shared['gpu']}; {shared['dtype']}, hidden {hidden}, L_cache {taps}, weights frozen; HBM peak "
          f"{shared['hbm_peak_gbs']} GB/s")
    print("| case | implementation | fwd ms | fwd+bwd ms | GB/s fwd / fwd+bwd | peak MiB | rel err out / dx |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in records:
        detail = f" ({r['detail']})" if r["detail"] else ""
        print(f"| {r['case']} | {r['implementation']}{detail} | {r['fwd_ms']} | {r['fwd_bwd_ms']} "
              f"| {r.get('fwd_gbs', '')} / {r.get('fwd_bwd_gbs', '')} | {r['peak_mib']} "
              f"| {r.get('rel_err_out', '')} / {r.get('rel_err_dx', '')} |")
    if jsonl is not None:
        for record in records:
            common.append_record(record, jsonl)


if __name__ == "__main__":
    main()
