"""Norm, RoPE and attention-gate kernels against the transformers code they replace, at Trinity-Mini shapes.

GPU only. bf16 activations (norm weights in fp32, as transformers keeps them), 4096 tokens, hidden 2048,
16 query heads and 4 key/value heads of head_dim 128. Times are triton.testing.do_bench medians; GB/s counts
the bytes the fused kernel must move (activations read + written, cos/sin included), the same count for both
columns, set against a measured device-to-device copy. Prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/bench_norm_rope.py
"""

from __future__ import annotations

import datetime
import pathlib
import sys
from collections.abc import Callable

import torch
import transformers
import triton
from transformers import AfmoeConfig, CohereConfig
from transformers.models.afmoe import modeling_afmoe
from transformers.models.cohere import modeling_cohere

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


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of GPU time: replayed from a CUDA graph, so Python and autograd launch overhead
    (tens of microseconds per op, comparable to these kernels at this size) is left out for both columns."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def bench_eager(fn: Callable[[], object]) -> float:
    """Median milliseconds launched eagerly from Python, launch overhead included."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def fwd_bwd(fn: Callable[..., object], inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], object]:
    """Forward then backward through fn(*inputs); autograd.grad, so no .grad accumulation is timed."""

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)

    return step


def copy_bandwidth() -> float:
    """GB/s of a 512 MiB device-to-device copy (bytes read + written)."""
    src = torch.empty(256 * 2**20, dtype=DTYPE, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_eager(lambda: dst.copy_(src))
    return 2 * src.numel() * BYTES / ms / 1e6


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
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    header = (
        "| op | fwd ours ms | fwd HF ms | fwd speedup | fwd GB/s ours (HF) | fwd+bwd ours ms | fwd+bwd HF ms "
        "| fwd+bwd speedup | fwd+bwd GB/s ours (HF) | fwd+bwd eager ms ours (HF) |"
    )
    rows = [header, "|" + "---|" * 10]
    for name, ours, theirs, inputs, grads, fwd_bytes, all_bytes in cases():
        with torch.no_grad():
            f_ours, f_hf = bench(lambda: ours(*inputs)), bench(lambda: theirs(*inputs))
        b_ours, b_hf = bench(fwd_bwd(ours, inputs, grads)), bench(fwd_bwd(theirs, inputs, grads))
        e_ours, e_hf = bench_eager(fwd_bwd(ours, inputs, grads)), bench_eager(fwd_bwd(theirs, inputs, grads))
        rows.append(
            f"| {name} | {f_ours:.3f} | {f_hf:.3f} | {f_hf / f_ours:.2f}x | {fwd_bytes / f_ours / 1e6:.0f} "
            f"({fwd_bytes / f_hf / 1e6:.0f}) | {b_ours:.3f} | {b_hf:.3f} | {b_hf / b_ours:.2f}x "
            f"| {all_bytes / b_ours / 1e6:.0f} ({all_bytes / b_hf / 1e6:.0f}) | {e_ours:.3f} ({e_hf:.3f}) |"
        )
    gpu = torch.cuda.get_device_name()
    table = "\n".join(rows)
    report = (
        f"\n## bench_norm_rope: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}\n\n"
        f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
        f"bf16, {TOKENS} tokens, hidden {HIDDEN}, {HEADS} q / {KV_HEADS} kv heads x {HEAD_DIM}. "
        f"Device-to-device copy: {copy_gbs:.0f} GB/s. Times are CUDA-graph replays (GPU time) except the last "
        f"column, launched eagerly from Python.\n\n"
        f"Command: `python {' '.join(sys.argv)}`\n\n{table}\n"
    )
    print(report)
    results = pathlib.Path(__file__).with_name("RESULTS.md")
    with results.open("a") as f:
        f.write(report)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_norm_rope needs a CUDA GPU")
    main()
