"""Sliding-window attention at Trinity-Mini's shapes: transformers' SDPA over its dense sliding-window mask (what
an AFMoE sliding layer runs under attn_implementation="sdpa") against fastmoe's path, PyTorch's flash kernel
given the window (fastmoe/sliding_window_attention.py). The causal full-attention layer, flash through SDPA, is
the yardstick. bf16, 1 x 4096 tokens, 32 query / 4 key-value heads of 128, window 2048.

TFLOP/s counts the (query, key) pairs each mask keeps: 4 x pairs x head_dim x heads for the forward, twice that
for the backward, the convention of bench_train_step.py. Times are CUDA-graph replays (GPU time).

    python benchmarks/bench_sliding_window_attention.py [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import transformers
import triton
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench_norm_rope import bench, fwd_bwd
from bench_train_step import matmul_peak_tflops
from fastmoe.sliding_window_attention import flash_sliding_window_attention, sliding_window_causal_mask

SEQ, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 4096, 32, 4, 128, 2048


class AttentionShape(torch.nn.Module):
    """What transformers' sdpa_attention_forward reads from the attention module."""

    def __init__(self):
        super().__init__()
        self.num_key_value_groups = HEADS // KV_HEADS
        self.is_causal = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = HEAD_DIM ** -0.5
    module = AttentionShape().eval()

    def leaf(heads):
        # (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim), as the AFMoE forward has it.
        return torch.randn(1, SEQ, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2) \
            .requires_grad_()

    inputs = [leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)]
    grads = [torch.randn(1, SEQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)]
    dense_mask = sliding_window_causal_mask(SEQ, WINDOW, "cuda")[None, None]
    window_pairs = WINDOW * (WINDOW + 1) // 2 + (SEQ - WINDOW) * WINDOW
    causal_pairs = SEQ * (SEQ + 1) // 2
    cases = [
        ("sliding, transformers SDPA + dense mask",
         lambda q, k, v: sdpa_attention_forward(module, q, k, v, dense_mask, scaling=scale)[0], window_pairs),
        ("sliding, fastmoe flash with window",
         lambda q, k, v: flash_sliding_window_attention(q, k, v, WINDOW, scale), window_pairs),
        ("full causal, transformers SDPA (flash)",
         lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, scaling=scale)[0], causal_pairs),
    ]
    peak = matmul_peak_tflops("cuda")
    rows = ["| layer, path | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | % of matmul peak | peak MiB |",
            "|---|---|---|---|---|---|"]
    for name, fn, pairs in cases:
        with torch.no_grad():
            forward_ms = bench(lambda fn=fn: fn(*inputs))
        step = fwd_bwd(fn, inputs, grads)
        step_ms = bench(step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        tflops = 3 * 4 * pairs * HEAD_DIM * HEADS / step_ms / 1e9
        rows.append(f"| {name} | {forward_ms:.3f} | {step_ms:.3f} | {tflops:.0f} | {100 * tflops / peak:.0f} "
                    f"| {peak_mib:.0f} |")
    table = "\n".join(rows)
    report = (
        f"\n## bench_sliding_window_attention: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{torch.cuda.get_device_name()}\n\n"
        f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; bf16, "
        f"1 x {SEQ} tokens, {HEADS} q / {KV_HEADS} kv heads x {HEAD_DIM}, window {WINDOW}; measured bf16 matmul "
        f"peak {peak:.0f} TFLOP/s. CUDA-graph replays; TFLOP/s over the (query, key) pairs each mask keeps.\n\n"
        f"Command: `python {' '.join(sys.argv)}`\n\n{table}\n"
    )
    print(report)
    with args.results.open("a") as f:
        f.write(report)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_sliding_window_attention needs a CUDA GPU")
    main()
