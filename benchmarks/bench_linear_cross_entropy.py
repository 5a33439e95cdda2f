"""fastmoe's chunked lm_head + cross-entropy against transformers' lm_head + ForCausalLMLoss (GPU only).

    python benchmarks/bench_linear_cross_entropy.py

Times one forward + backward (triton.testing.do_bench, median) and its peak memory above what the inputs
already hold, for 8,192 bf16 tokens at AFMoE's and Cohere's vocabulary sizes, with a frozen lm_head (LoRA) and
a trainable one. Prints a markdown table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
from transformers.loss.loss_utils import ForCausalLMLoss

from fastmoe.kernels.linear_cross_entropy import linear_cross_entropy, shift_labels

TOKENS = 8192
# name, hidden, vocab, logit_scale
CASES = [
    ("AFMoE-like", 2048, 200192, 1.0),
    ("Cohere-like", 4096, 256000, 0.0625),
]
RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def hf_step(hidden, weight, labels, logit_scale):
    # What a transformers *ForCausalLM does: full bf16 logits, scaled in bf16 (Cohere), fp32 upcast in the loss.
    logits = F.linear(hidden, weight)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    loss = ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0])
    loss.backward()
    return loss


def fastmoe_step(hidden, weight, labels, logit_scale):
    loss = linear_cross_entropy(
        hidden.view(-1, hidden.shape[-1]), weight, shift_labels(labels), logit_scale=logit_scale
    )
    loss.backward()
    return loss


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(step, hidden, weight, labels, logit_scale) -> tuple[float, float, float]:
    def run():
        hidden.grad = None
        weight.grad = None
        return step(hidden, weight, labels, logit_scale)

    loss = run().item()
    hidden.grad = None
    weight.grad = None
    mib = peak_mib(run)
    ms = triton.testing.do_bench(run, grad_to_none=[hidden, weight], return_mode="median")
    hidden.grad = None
    weight.grad = None
    return ms, mib, loss


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_linear_cross_entropy needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    for name, hidden_size, vocab, logit_scale in CASES:
        hidden = torch.randn(1, TOKENS, hidden_size, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * hidden_size**-0.5
        labels = torch.randint(0, vocab, (1, TOKENS), device="cuda")
        labels[:, : TOKENS // 8] = -100  # a masked prompt
        for trainable in (False, True):
            hidden.requires_grad_(True)
            weight.requires_grad_(trainable)
            hf_ms, hf_mib, hf_loss = measure(hf_step, hidden, weight, labels, logit_scale)
            fm_ms, fm_mib, fm_loss = measure(fastmoe_step, hidden, weight, labels, logit_scale)
            rows.append(
                f"| {name} | {hidden_size} | {vocab} | {logit_scale:g} | {'full' if trainable else 'frozen'} "
                f"| {hf_ms:.2f} | {fm_ms:.2f} | {hf_ms / fm_ms:.2f}x | {hf_mib:,.0f} | {fm_mib:,.0f} "
                f"| {hf_mib / fm_mib:.1f}x | {abs(fm_loss - hf_loss):.1e} |"
            )
            print(rows[-1], flush=True)
        del hidden, weight, labels
        torch.cuda.empty_cache()

    header = (
        "| case | hidden | vocab | logit_scale | lm_head | HF ms | fastmoe ms | speedup | HF peak MiB "
        "| fastmoe peak MiB | memory saved | abs loss diff |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(rows) + "\n"
    section = (
        f"\n## linear_cross_entropy: {TOKENS} bf16 tokens, forward + backward\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}\n"
        f"- command: `python benchmarks/bench_linear_cross_entropy.py`\n"
        "- HF = F.linear lm_head (+ logit_scale) + transformers ForCausalLMLoss; times are do_bench medians; "
        "peak = max_memory_allocated above the inputs during one step.\n\n" + table
    )
    print(section)
    with RESULTS.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    main()
