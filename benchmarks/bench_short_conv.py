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
The fwd and fwd+bwd columns are launched eagerly (bench_norm_rope.bench_eager): transformers' conv path cannot be
captured in a CUDA graph (its backward syncs with the legacy stream; H100, torch 2.11). The eager column and the
peak memory come from bench_lora_linear.measure (triton's do_bench, which flushes L2; peak = allocated above the
inputs during one step). GB/s: see conv_bytes.

    python benchmarks/bench_short_conv.py        # GPU; appends its table to benchmarks/RESULTS.md (or --results)
    TRITON_INTERPRET=1 python benchmarks/bench_short_conv.py --cpu   # tiny fp32 CPU smoke run, untimed;
                                                                     # recorded only where --results says
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from pathlib import Path

import torch
import transformers
import triton
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf

from fastmoe import patching
from fastmoe.kernels.dispatch import use_triton
from fastmoe.kernels.short_conv import short_conv
from fastmoe.models.lfm2_moe import FastLfm2MoeModel

# Scripts in benchmarks/ import each other from their folder (Python puts it first on sys.path).
from bench_lora_linear import measure
from bench_norm_rope import bench_eager, copy_bandwidth, fwd_bwd
from bench_train_step import PRESETS, make_config, parse_shapes

SHAPES = {"cuda": "1x4096,4x2048", "cpu": "1x32,2x16"}
HIDDEN = {"cuda": PRESETS["lfm2-8b-a1b"]["hidden_size"], "cpu": PRESETS["lfm2-tiny"]["hidden_size"]}
NAN = float("nan")


def conv_bytes(tokens: int, hidden: int, conv_params: int, element_size: int) -> tuple[int, int]:
    """(forward, forward + backward) bytes the conv op must move at least, every tensor read or written once.

    Forward reads the in_proj output bcx (3 T H elements) and the conv's weight and bias (P), and writes y (T H):
    4 T H + P. Backward with a frozen weight reads bcx, dy and the weight again and writes dbcx: 7 T H + P. Forward +
    backward: (11 T H + 2 P) * element size. Both implementations are charged the same count, so the ratio of their
    GB/s is the speedup."""
    fwd = 4 * tokens * hidden + conv_params
    bwd = 7 * tokens * hidden + conv_params
    return fwd * element_size, (fwd + bwd) * element_size


def hbm_peak_gbs() -> float:
    """The device's theoretical memory bandwidth: bus width x memory clock (kHz in cudaDeviceProp) x 2 (double
    data rate); NaN where torch does not report them."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    bus_bits, clock_khz = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    return 2 * bus_bits / 8 * clock_khz * 1e3 / 1e9 if bus_bits and clock_khz else NAN


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
    """Output and input gradient of module(x), and its timings (NaN on the CPU)."""
    out = module(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    eager_ms, peak_mib = measure(module, x, grad, device)
    fwd_ms = all_ms = NAN
    if device == "cuda":
        with torch.no_grad():
            fwd_ms = bench_eager(lambda: module(x))
        all_ms = bench_eager(fwd_bwd(module, [x], [grad]))
    return dict(out=out.detach(), dx=dx, fwd=fwd_ms, all=all_ms, eager=eager_ms, peak=peak_mib)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def table_rows(case: str, results: list[tuple[str, dict]], moved: tuple[int, int] | None, hbm: float) -> list[str]:
    """One row per implementation; the first is transformers, the baseline for speedups and errors."""
    rows = []
    base = results[0][1]
    for label, r in results:
        speedup = err = gbs = share = ""
        if r is not base:
            speedup = f"{base['fwd'] / r['fwd']:.2f}x / {base['all'] / r['all']:.2f}x"
            err = f"{rel_err(r['out'], base['out']):.1e} / {rel_err(r['dx'], base['dx']):.1e}"
        if moved:
            fwd_gbs, all_gbs = moved[0] / r["fwd"] / 1e6, moved[1] / r["all"] / 1e6
            gbs = f"{fwd_gbs:.0f} / {all_gbs:.0f}"
            share = f"{100 * fwd_gbs / hbm:.0f}% / {100 * all_gbs / hbm:.0f}%"
        rows.append(f"| {case} | {label} | {r['fwd']:.3f} | {r['all']:.3f} | {speedup} | {gbs} | {share} "
                    f"| {r['eager']:.3f} | {r['peak']:.0f} | {err} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 shapes on the CPU, untimed")
    parser.add_argument("--shapes", default=None, help="batch x sequence length, comma-separated "
                        f"(default {SHAPES['cuda']} on a GPU, {SHAPES['cpu']} on the CPU)")
    parser.add_argument("--results", default=None, help="markdown file the table is appended to (default on a "
                        "GPU: benchmarks/RESULTS.md; on the CPU nothing is recorded unless given)")
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results_file = args.results or (str(Path(__file__).with_name("RESULTS.md")) if device == "cuda" else None)
    torch.manual_seed(0)

    # Only one ShortConv layer is built, so the tiny preset's other sizes do not matter; L_cache (3) and
    # conv_bias (False) are Lfm2MoeConfig's defaults, which LFM2-8B-A1B uses.
    config = make_config(dict(PRESETS["lfm2-tiny"], hidden_size=HIDDEN[device]))
    module = hf.Lfm2MoeShortConv(config, layer_idx=0).to(device, dtype).requires_grad_(False)
    hidden, taps = config.hidden_size, config.conv_L_cache
    conv_params = sum(p.numel() for p in module.conv.parameters())
    patches = [p for p in FastLfm2MoeModel.patches() if p.owner is hf.Lfm2MoeShortConv]
    hf_conv = "causal_conv1d" if importlib.util.find_spec("causal_conv1d") else "torch conv1d"
    hbm = hbm_peak_gbs() if device == "cuda" else NAN

    was_patched = patching.is_patched(patches)
    rows = []
    try:
        for batch, seq in parse_shapes(args.shapes or SHAPES[device]):
            bcx = torch.randn(batch, seq, 3 * hidden, device=device, dtype=dtype, requires_grad=True)
            h = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
            ours = "fastmoe (Triton)" if use_triton(bcx) else "fastmoe (PyTorch reference)"
            moved = conv_bytes(batch * seq, hidden, conv_params, bcx.element_size())
            # (case, input, bytes for GB/s, [(implementation, module, with fastmoe's patch)]), transformers first
            for case, x, case_bytes, impls in (
                (f"conv op {batch}x{seq}", bcx, moved,
                 [(f"transformers ({hf_conv})", ConvOp(module.conv, transformers_conv), False),
                  (ours, ConvOp(module.conv, short_conv), False)]),
                (f"ShortConv block {batch}x{seq}", h, None,
                 [("transformers", module, False), (ours, module, True)]),
            ):
                results = []
                for label, impl, patched in impls:
                    (patching.apply_patches if patched else patching.remove_patches)(patches)
                    results.append((label, run(impl, x, dy, device)))
                rows += table_rows(case, results, case_bytes, hbm)
    finally:
        (patching.apply_patches if was_patched else patching.remove_patches)(patches)

    header = ("| case | implementation | fwd ms | fwd+bwd ms | speedup fwd / fwd+bwd | GB/s fwd / fwd+bwd "
              "| % of HBM peak fwd / fwd+bwd | fwd+bwd eager ms | fwd+bwd peak MiB | rel err out / dx |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = "\n".join([header, *rows])
    print(table)
    if results_file is None:
        return
    if device == "cuda":
        where = (f"{torch.cuda.get_device_name()}; HBM peak {hbm:.0f} GB/s (theoretical), device-to-device copy "
                 f"{copy_bandwidth():.0f} GB/s")
    else:
        where = "CPU smoke run (untimed)"
    meta = (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {where}; "
            f"torch {torch.__version__}; triton {triton.__version__}; transformers {transformers.__version__}\n"
            f"- {str(dtype).removeprefix('torch.')}, hidden {hidden}, L_cache {taps}, weights frozen (input "
            f"gradients only); fwd and fwd+bwd are CUDA-graph replays, eager is do_bench launched from Python; GB/s "
            f"count (4 T H + P) bytes forward, (11 T H + 2 P) forward + backward (T tokens, P conv parameters); rel "
            f"err vs transformers\n"
            f"- command: `python benchmarks/bench_short_conv.py {' '.join(sys.argv[1:])}`")
    with open(results_file, "a") as handle:
        handle.write(f"\n## bench_short_conv: LFM2 gated short conv and ShortConv block vs transformers\n\n"
                     f"{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
