"""Norm, RoPE and attention-gate kernels against the transformers code they replace, at Trinity-Mini shapes.

GPU only. bf16 activations (norm weights in fp32, as transformers keeps them), 4096 tokens, hidden 2048,
16 query heads and 4 key/value heads of head_dim 128. Times are triton.testing.do_bench medians; GB/s counts
the bytes the fused kernel must move (activations read + written, cos/sin included), the same count for both
columns, set against a measured device-to-device copy. Forward and forward+backward are CUDA-graph replays (GPU time);
the eager column is launched from Python, launch overhead included. Prints a table and appends one JSON line per (op,
implementation) to benchmarks/results.jsonl (question "norm-rope").

    python benchmarks/bench_norm_rope.py [--jsonl benchmarks/results.jsonl] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from transformers import AfmoeConfig, CohereConfig
from transformers.models.afmoe import modeling_afmoe
from transformers.models.cohere import modeling_cohere

import common
from fastmoe.kernels.attention_gate import attention_gate
from fastmoe.kernels.layer_norm import layer_norm
from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.kernels.rms_norm import rms_norm
from fastmoe.kernels.rope import apply_rope

TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 2048, 16, 4, 128
EPS = 1e-6
DTYPE = torch.bfloat16
DEVICE = "cuda"
BYTES = 2  # bf16


def rotary(interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, tokens, head_dim) in bf16 from the family's own rotary embedding."""
    if interleaved:
        config = CohereConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
        module = modeling_cohere.CohereRotaryEmbedding(config)
    else:
        config = AfmoeConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM
        )
        module = modeling_afmoe.AfmoeRotaryEmbedding(config)
    x = torch.zeros(1, dtype=DTYPE, device=DEVICE)
    return module.to(DEVICE)(x, torch.arange(TOKENS, device=DEVICE)[None])


def leaf(*shape: int, dtype: torch.dtype = DTYPE, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def cases() -> list[tuple[str, Callable, Callable, list[torch.Tensor], list[torch.Tensor], int, int]]:
    """(name, ours, transformers', inputs, upstream grads, forward bytes, forward+backward bytes)."""
    out = []
    n_hidden = TOKENS * HIDDEN
    n_q, n_k = TOKENS * HEADS * HEAD_DIM, TOKENS * KV_HEADS * HEAD_DIM
    n_cos = TOKENS * HEAD_DIM

    x, w = leaf(1, TOKENS, HIDDEN), leaf(HIDDEN, dtype=torch.float32)
    hf_rms = modeling_afmoe.AfmoeRMSNorm(HIDDEN, eps=EPS).to(DEVICE)
    hf_rms.weight = torch.nn.Parameter(w)
    out.append((
        "rms_norm (4096x2048)", lambda a, b: rms_norm(a, b, EPS), lambda a, b: hf_rms(a), [x, hf_rms.weight],
        [torch.randn_like(x)], 2 * n_hidden * BYTES, 5 * n_hidden * BYTES,
    ))

    hf_ln = modeling_cohere.CohereLayerNorm(HIDDEN, eps=EPS).to(DEVICE)
    with torch.no_grad():
        hf_ln.weight.normal_()
    out.append((
        "layer_norm (4096x2048)", lambda a, b: layer_norm(a, b, EPS), lambda a, b: hf_ln(a), [x, hf_ln.weight],
        [torch.randn_like(x)], 2 * n_hidden * BYTES, 5 * n_hidden * BYTES,
    ))

    q_bshd, k_bshd = leaf(1, TOKENS, HEADS, HEAD_DIM), leaf(1, TOKENS, KV_HEADS, HEAD_DIM)
    dq, dk = torch.randn(1, HEADS, TOKENS, HEAD_DIM, dtype=DTYPE, device=DEVICE), torch.randn(
        1, KV_HEADS, TOKENS, HEAD_DIM, dtype=DTYPE, device=DEVICE
    )
    for interleaved, family in ((False, modeling_afmoe), (True, modeling_cohere)):
        cos, sin = rotary(interleaved)
        q, k = q_bshd.detach().transpose(1, 2).requires_grad_(), k_bshd.detach().transpose(1, 2).requires_grad_()
        out.append((
            f"rope q+k ({'interleaved, cohere' if interleaved else 'half, afmoe'})",
            lambda a, b, c=cos, s=sin, il=interleaved: (apply_rope(a, c, s, il), apply_rope(b, c, s, il)),
            lambda a, b, c=cos, s=sin, fam=family: fam.apply_rotary_pos_emb(a, b, c, s),
            [q, k], [dq, dk], (2 * (n_q + n_k) + 4 * n_cos) * BYTES, (4 * (n_q + n_k) + 8 * n_cos) * BYTES,
        ))

    # AFMoE sliding-window layer: RMSNorm over head_dim (shared weight) + half RoPE; Cohere: per-head LayerNorm
    # + interleaved RoPE. Forward moves x in and out once; backward reads x and dy, writes dx.
    qk_bytes = ((2 * (n_q + n_k) + 4 * n_cos) * BYTES, (5 * (n_q + n_k) + 8 * n_cos) * BYTES)
    for name, family, norm, interleaved, per_head, norm_cls in (
        ("qk_norm_rope (rms, afmoe)", modeling_afmoe, "rms", False, False, modeling_afmoe.AfmoeRMSNorm),
        ("qk_norm_rope (layer/head, cohere)", modeling_cohere, "layer", True, True, modeling_cohere.CohereLayerNorm),
    ):
        cos, sin = rotary(interleaved)
        q_norm = norm_cls((HEADS, HEAD_DIM) if per_head else HEAD_DIM, eps=EPS).to(DEVICE)
        k_norm = norm_cls((KV_HEADS, HEAD_DIM) if per_head else HEAD_DIM, eps=EPS).to(DEVICE)
        with torch.no_grad():
            q_norm.weight.normal_()
            k_norm.weight.normal_()

        def ours(a, b, wq, wk, c=cos, s=sin, nm=norm, il=interleaved):
            return qk_norm_rope(a, wq, c, s, EPS, nm, il), qk_norm_rope(b, wk, c, s, EPS, nm, il)

        def theirs(a, b, wq, wk, c=cos, s=sin, fam=family, qn=q_norm, kn=k_norm):
            return fam.apply_rotary_pos_emb(qn(a).transpose(1, 2), kn(b).transpose(1, 2), c, s)

        out.append((name, ours, theirs, [q_bshd, k_bshd, q_norm.weight, k_norm.weight], [dq, dk], *qk_bytes))

    o, g = leaf(1, TOKENS, HIDDEN), leaf(1, TOKENS, HIDDEN)
    out.append((
        "attention_gate (4096x2048)", attention_gate, lambda a, b: a * torch.sigmoid(b), [o, g],
        [torch.randn_like(o)], 3 * n_hidden * BYTES, 8 * n_hidden * BYTES,
    ))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()
    torch.manual_seed(0)
    shared = dict(common.environment(DEVICE), question="norm-rope", tokens=TOKENS, hidden=HIDDEN, heads=HEADS,
                  kv_heads=KV_HEADS, head_dim=HEAD_DIM, copy_gbs=round(common.copy_bandwidth_gbs()))
    header = (
        "| op | fwd ours ms | fwd HF ms | fwd speedup | fwd GB/s ours (HF) | fwd+bwd ours ms | fwd+bwd HF ms "
        "| fwd+bwd speedup | fwd+bwd GB/s ours (HF) | fwd+bwd eager ms ours (HF) |"
    )
    rows, records = [header, "|" + "---|" * 10], []
    for name, ours, theirs, inputs, grads, fwd_bytes, all_bytes in cases():
        timings = {}
        for impl, fn in (("transformers", theirs), ("fastmoe", ours)):
            with torch.no_grad():
                fwd_ms = common.bench_graph_ms(lambda fn=fn: fn(*inputs))
            step = common.fwd_bwd(fn, inputs, grads)
            timings[impl] = (fwd_ms, common.bench_graph_ms(step), common.bench_ms(step, warmup=25, rep=200))
            records.append(dict(shared, case=name, implementation=impl, fwd_ms=round(timings[impl][0], 4),
                                fwd_bwd_ms=round(timings[impl][1], 4), fwd_bwd_eager_ms=round(timings[impl][2], 4),
                                fwd_gbs=round(fwd_bytes / timings[impl][0] / 1e6),
                                fwd_bwd_gbs=round(all_bytes / timings[impl][1] / 1e6)))
        (f_hf, b_hf, e_hf), (f_ours, b_ours, e_ours) = timings["transformers"], timings["fastmoe"]
        rows.append(
            f"| {name} | {f_ours:.3f} | {f_hf:.3f} | {f_hf / f_ours:.2f}x | {fwd_bytes / f_ours / 1e6:.0f} "
            f"({fwd_bytes / f_hf / 1e6:.0f}) | {b_ours:.3f} | {b_hf:.3f} | {b_hf / b_ours:.2f}x "
            f"| {all_bytes / b_ours / 1e6:.0f} ({all_bytes / b_hf / 1e6:.0f}) | {e_ours:.3f} ({e_hf:.3f}) |"
        )
    print(f"{shared['gpu']}, bf16, {TOKENS} tokens, hidden {HIDDEN}, {HEADS} q / {KV_HEADS} kv heads x {HEAD_DIM}; "
          f"device-to-device copy {shared['copy_gbs']} GB/s")
    print("\n".join(rows))
    if not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_norm_rope needs a CUDA GPU")
    main()
