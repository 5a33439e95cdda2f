"""Sliding-window attention at Trinity-Mini's shapes: transformers' SDPA over its dense sliding-window mask (what
an AFMoE sliding layer runs under attn_implementation="sdpa") against fastmoe's path, PyTorch's flash kernel
given the window (fastmoe/sliding_window_attention.py). The causal full-attention layer, flash through SDPA, is
the yardstick. bf16, 1 x 4096 tokens, 32 query / 4 key-value heads of 128, window 2048.

TFLOP/s counts the (query, key) pairs each mask keeps: 4 x pairs x head_dim x heads for the forward, twice that
for the backward, the convention of common.attention_flops. Times are CUDA-graph replays (GPU time). One JSON line
per (layer, implementation) goes to benchmarks/results.jsonl (question "sliding-window-attention").

fastmoe runs the sliding layer on the flash kernel given the window, and the full layer on cuDNN's fused attention on
Hopper GPUs (fastmoe/sliding_window_attention.py). cuDNN's op in PyTorch takes no window: the sliding layer on cuDNN,
as causal attention with the keys beyond the window masked by an additive bias, is timed too (the case that decided
against it). `--seq` sets the tokens (4096 by default).

    python benchmarks/bench_sliding_window_attention.py [--seq 4096] [--jsonl benchmarks/results.jsonl] [--no-record]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import common
from fastmoe.sliding_window_attention import flash_sliding_window_attention, sliding_window_causal_mask

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 32, 4, 128, 2048


def window_bias(seq: int) -> torch.Tensor:
    """(1, 1, seq, seq) bf16: 0 where the window sees, -inf elsewhere; rows start on 16-byte boundaries (cuDNN's
    alignment for the bias's row stride)."""
    padded = -(-seq // 8) * 8
    bias = torch.zeros(seq, padded, device="cuda", dtype=torch.bfloat16)[:, :seq]
    return bias.masked_fill_(~sliding_window_causal_mask(seq, WINDOW, "cuda"), float("-inf"))[None, None]


def cudnn_attention(query, key, value, bias, scale):
    """PyTorch's cuDNN attention, causal, with an optional additive bias; (batch, seq, heads, head_dim) out."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, bias, torch.is_grad_enabled(), 0.0, True, False, scale=scale)[0].transpose(1, 2)


class AttentionShape(torch.nn.Module):
    """What transformers' sdpa_attention_forward reads from the attention module."""

    def __init__(self):
        super().__init__()
        self.num_key_value_groups = HEADS // KV_HEADS
        self.is_causal = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    parser.add_argument("--seq", type=int, default=4096, help="tokens in the row (4096)")
    args = parser.parse_args()
    seq = args.seq
    torch.manual_seed(0)
    scale = HEAD_DIM ** -0.5
    module = AttentionShape().eval()

    def leaf(heads):
        # (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim), as the AFMoE forward has it.
        return torch.randn(1, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2) \
            .requires_grad_()

    inputs = [leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)]
    grads = [torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)]
    dense_mask = sliding_window_causal_mask(seq, WINDOW, "cuda")[None, None]
    bias = window_bias(seq)
    window_pairs = WINDOW * (WINDOW + 1) // 2 + (seq - WINDOW) * WINDOW
    causal_pairs = seq * (seq + 1) // 2
    sliding, full = f"sliding-window layer (window {WINDOW})", "full causal layer (the yardstick)"
    cases = [  # (case, implementation, detail, attention, (query, key) pairs)
        (sliding, "transformers", "SDPA over the dense mask",
         lambda q, k, v: sdpa_attention_forward(module, q, k, v, dense_mask, scaling=scale)[0], window_pairs),
        (sliding, "fastmoe", "flash kernel given the window",
         lambda q, k, v: flash_sliding_window_attention(q, k, v, WINDOW, scale), window_pairs),
        (sliding, "fastmoe", "cuDNN, causal with the window as an additive bias",
         lambda q, k, v: cudnn_attention(q, k, v, bias, scale), window_pairs),
        (full, "transformers", "SDPA, causal (PyTorch's kernel choice)",
         lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, scaling=scale)[0], causal_pairs),
        (full, "fastmoe", "cuDNN, causal",
         lambda q, k, v: cudnn_attention(q, k, v, None, scale), causal_pairs),
    ]
    peak = common.matmul_peak_tflops("cuda")
    shared = dict(common.environment("cuda"), question="sliding-window-attention", seq=seq, heads=HEADS,
                  kv_heads=KV_HEADS, head_dim=HEAD_DIM, window=WINDOW, peak_tflops=round(peak, 1))
    records = []
    for case, impl, detail, fn, pairs in cases:
        with torch.no_grad():
            forward_ms = common.bench_graph_ms(lambda fn=fn: fn(*inputs))
        step = common.fwd_bwd(fn, inputs, grads)
        step_ms = common.bench_graph_ms(step)
        tflops = 3 * 4 * pairs * HEAD_DIM * HEADS / step_ms / 1e9
        records.append(dict(shared, case=case, implementation=impl, detail=detail, fwd_ms=round(forward_ms, 4),
                            fwd_bwd_ms=round(step_ms, 4), fwd_bwd_tflops=round(tflops, 1),
                            mfu_pct=round(100 * tflops / peak, 1), peak_mib=round(common.peak_mib_above(step))))
    print(f"{shared['gpu']}; bf16, 1 x {seq} tokens, {HEADS} q / {KV_HEADS} kv heads x {HEAD_DIM}, window {WINDOW}; "
          f"bf16 matmul peak {peak:.0f} TFLOP/s")
    print("| layer | path | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | % of matmul peak | peak MiB |\n"
          "|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['case']} | {r['implementation']}, {r['detail']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
              f"| {r['fwd_bwd_tflops']:.0f} | {r['mfu_pct']:.0f} | {r['peak_mib']} |")
    if not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_sliding_window_attention needs a CUDA GPU")
    main()
