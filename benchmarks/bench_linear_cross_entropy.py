"""fastmoe's chunked lm_head + cross-entropy against transformers' lm_head + ForCausalLMLoss (GPU only).

    python benchmarks/bench_linear_cross_entropy.py [--jsonl benchmarks/results.jsonl] [--no-record]

Times one forward + backward (triton.testing.do_bench, median) and its peak memory above what the inputs
already hold, for 8,192 bf16 tokens at AFMoE's and Cohere's vocabulary sizes, with a frozen lm_head (LoRA) and
a trainable one. Prints a markdown table and appends one JSON line per (case, implementation) to
benchmarks/results.jsonl (question "loss").
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import common
from fastmoe.kernels.linear_cross_entropy import linear_cross_entropy, shift_labels

TOKENS = 8192
# name, hidden, vocab, logit_scale
CASES = [
    ("AFMoE-like", 2048, 200192, 1.0),
    ("Cohere-like", 4096, 256000, 0.0625),
]


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


def measure(step, hidden, weight, labels, logit_scale) -> tuple[float, float, float]:
    def run():
        hidden.grad = None
        weight.grad = None
        return step(hidden, weight, labels, logit_scale)

    loss = run().item()
    hidden.grad = None
    weight.grad = None
    mib = common.peak_mib_above(run)
    ms = common.bench_ms(run, warmup=25, rep=100, grad_to_none=[hidden, weight])
    hidden.grad = None
    weight.grad = None
    return ms, mib, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_linear_cross_entropy needs a CUDA GPU")
    torch.manual_seed(0)
    shared = dict(common.environment("cuda"), question="loss", tokens=TOKENS, masked_tokens=TOKENS // 8)
    records = []
    for name, hidden_size, vocab, logit_scale in CASES:
        hidden = torch.randn(1, TOKENS, hidden_size, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * hidden_size**-0.5
        labels = torch.randint(0, vocab, (1, TOKENS), device="cuda")
        labels[:, : TOKENS // 8] = -100  # a masked prompt
        for trainable in (False, True):
            hidden.requires_grad_(True)
            weight.requires_grad_(trainable)
            case = dict(shared, case=f"{name}, lm_head {'trainable' if trainable else 'frozen'}", hidden=hidden_size,
                        vocab=vocab, logit_scale=logit_scale, lm_head="trainable" if trainable else "frozen")
            hf_ms, hf_mib, hf_loss = measure(hf_step, hidden, weight, labels, logit_scale)
            fm_ms, fm_mib, fm_loss = measure(fastmoe_step, hidden, weight, labels, logit_scale)
            records.append(dict(case, implementation="transformers", ms=round(hf_ms, 3), peak_mib=round(hf_mib),
                                loss=hf_loss))
            records.append(dict(case, implementation="fastmoe", ms=round(fm_ms, 3), peak_mib=round(fm_mib),
                                loss=fm_loss, abs_loss_diff=float(f"{abs(fm_loss - hf_loss):.2e}")))
            print(f"{case['case']}: transformers {hf_ms:.2f} ms, {hf_mib:,.0f} MiB; fastmoe {fm_ms:.2f} ms, "
                  f"{fm_mib:,.0f} MiB ({hf_ms / fm_ms:.2f}x, {hf_mib / fm_mib:.1f}x less memory); "
                  f"|loss diff| {abs(fm_loss - hf_loss):.1e}", flush=True)
        del hidden, weight, labels
        torch.cuda.empty_cache()
    if not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    main()
