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

`--packed BxS` times packed rows instead, as fastmoe trains trl's padded batches: B examples of bench_sft's lengths
(up to S tokens) a row, rounded up as graphed checkpointing rounds it (the filler a document of its own), both layers
on flash's variable-length form, with the longest document given to flash as the row's length (what
fastmoe.sliding_window_attention does for at most ROW_AS_LONGEST_MAX_OFFSETS offsets: one graph signature per
length) and rounded up to a power of two (more of them): the cost of the first rule's empty blocks. Means over
`--rows` consecutive batches.

    python benchmarks/bench_sliding_window_attention.py [--seq 4096] [--jsonl benchmarks/results.jsonl] [--no-record]
    python benchmarks/bench_sliding_window_attention.py --packed 4x2048 --rows 4
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import common
from fastmoe import sliding_window_attention as swa
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


def causal_pairs_within(lengths: list[int], window: int | None) -> int:
    """(query, key) pairs of causal attention within each document, keys at most `window` back."""
    return sum(min(i, window or i) for n in lengths for i in range(1, n + 1))


def packed_rows(batch: int, seq: int, rows: int) -> list[list[int]]:
    """The document lengths of `rows` packed rows: `batch` examples of bench_sft.example_lengths(seq) each (the
    draw bench_sft --data examples trains on), then the filler graphed checkpointing rounds the row up with."""
    from bench_sft import example_lengths
    from fastmoe.graphed_checkpointing import GraphedCheckpoint
    from fastmoe.padding_free import row_length_for_graphs

    rounding = GraphedCheckpoint(capture=False, max_shapes=rows)
    lengths = example_lengths(batch * rows, seq)
    documents = []
    for row in range(rows):
        examples = lengths[row * batch:(row + 1) * batch]
        filler = row_length_for_graphs(rounding, sum(examples)) - sum(examples)
        documents.append([n for n in [*examples, filler] if n])
    return documents


def bench_packed(batch: int, seq: int, rows: int) -> tuple[list[dict], str]:
    """Records of both layers on `rows` packed rows (see the module's docstring), the longest document given both
    ways; the lines printed before the table."""
    torch.manual_seed(0)
    scale = HEAD_DIM ** -0.5
    documents = packed_rows(batch, seq, rows)
    rules = [("the row's length as longest document (one graph signature per length)", 1 << 30),
             ("the longest document rounded up to a power of two", 0)]
    times = {}
    offsets_counts = []
    for lengths in documents:
        tokens = sum(lengths)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
        inputs = [torch.randn(1, tokens, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                  .requires_grad_() for heads in (HEADS, KV_HEADS, KV_HEADS)]
        grads = [torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)]
        for rule, max_offsets in rules:
            previous, swa.ROW_AS_LONGEST_MAX_OFFSETS = swa.ROW_AS_LONGEST_MAX_OFFSETS, max_offsets
            try:
                offsets, longest = swa.packed_documents(positions)
            finally:
                swa.ROW_AS_LONGEST_MAX_OFFSETS = previous
            offsets_counts.append(offsets.numel())
            for window in (None, WINDOW):
                layout = swa.FlashCausal(window, offsets, longest)

                def attention(q, k, v, layout=layout):
                    return swa.flash_causal_attention(q, k, v, layout, scale)

                with torch.no_grad():
                    forward_ms = common.bench_graph_ms(lambda: attention(*inputs))
                step_ms = common.bench_graph_ms(common.fwd_bwd(attention, inputs, grads))
                times.setdefault((window, rule), []).append((forward_ms, step_ms, longest))
                print(f"row of {tokens} tokens ({offsets.numel()} offsets), window {window}, longest {longest}: "
                      f"fwd {forward_ms:.3f} ms, fwd+bwd {step_ms:.3f} ms", flush=True)
    peak = common.matmul_peak_tflops("cuda")
    mean_tokens = round(statistics.mean(sum(lengths) for lengths in documents))
    shared = dict(common.environment("cuda"), question="sliding-window-attention", seq=mean_tokens, heads=HEADS,
                  kv_heads=KV_HEADS, head_dim=HEAD_DIM, window=WINDOW, peak_tflops=round(peak, 1),
                  packed=f"{batch}x{seq}", rows=rows, documents=documents)
    records = []
    for (window, rule), measured in times.items():
        layer = f"sliding-window layer (window {WINDOW})" if window else "full causal layer"
        pairs = statistics.mean(causal_pairs_within(lengths, window) for lengths in documents)
        step_ms = statistics.mean(m[1] for m in measured)
        tflops = 3 * 4 * pairs * HEAD_DIM * HEADS / step_ms / 1e9
        records.append(dict(shared, case=f"{layer}, packed rows of {batch} examples of up to {seq} tokens",
                            implementation="fastmoe", detail=f"flash, {rule}",
                            longest=[m[2] for m in measured], fwd_ms=round(statistics.mean(m[0] for m in measured), 4),
                            fwd_bwd_ms=round(step_ms, 4), fwd_bwd_tflops=round(tflops, 1),
                            mfu_pct=round(100 * tflops / peak, 1)))
    heading = (f"{shared['gpu']}; bf16, {rows} packed rows of {batch} examples of up to {seq} tokens (mean "
               f"{mean_tokens} tokens, {statistics.mean(offsets_counts):.1f} offsets), {HEADS} q / {KV_HEADS} kv heads "
               f"x {HEAD_DIM}; bf16 matmul peak {peak:.0f} TFLOP/s; means over the rows")
    return records, heading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    parser.add_argument("--seq", type=int, default=4096, help="tokens in the row (4096)")
    parser.add_argument("--packed", default=None, help="BxS: packed rows of B examples of up to S tokens instead")
    parser.add_argument("--rows", type=int, default=4, help="packed rows timed (with --packed)")
    args = parser.parse_args()
    if args.packed:
        batch, seq = (int(part) for part in args.packed.split("x"))
        records, heading = bench_packed(batch, seq, args.rows)
        print_and_record(records, heading, args)
        return
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
    print_and_record(records, f"{shared['gpu']}; bf16, 1 x {seq} tokens, {HEADS} q / {KV_HEADS} kv heads x "
                     f"{HEAD_DIM}, window {WINDOW}; bf16 matmul peak {peak:.0f} TFLOP/s", args)


def print_and_record(records: list[dict], heading: str, args) -> None:
    print(heading)
    print("| layer | path | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | % of matmul peak | peak MiB |\n"
          "|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['case']} | {r['implementation']}, {r['detail']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
              f"| {r['fwd_bwd_tflops']:.0f} | {r['mfu_pct']:.0f} | {r.get('peak_mib', '')} |")
    if not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_sliding_window_attention needs a CUDA GPU")
    main()
