"""trl's fused LM head (its ChunkedLogProbFunction) against fastmoe's (linear_log_probs), at Trinity-Mini's head.

Hidden 2048 and vocabulary 200,192 (bench_train_step's trinity-mini preset), bf16, 4,096 and 16,384 scored tokens
(trl's add_fused_lm_head hands the head only the positions whose label is not -100), three objectives over the
per-token fields trl's trainers ask for:

* sft: SFTTrainer's. Fields log_probs, entropy, is_top1; loss = -mean log p; entropy and top-1 are only logged.
  Frozen lm_head (LoRA).
* grpo-entropy: GRPO with entropy_coef: fields log_probs and entropy, both with a gradient; temperature 0.7.
  Frozen lm_head.
* full-ft: sft with a trainable lm_head (full fine-tuning), so the weight gets a gradient too.

Times one forward + backward of the head (triton.testing.do_bench, median; the backbone is not part of it) and its
peak memory above the inputs, and checks that both heads agree (loss difference, grad_hidden relative error).
Prints one line per case; appends one record per case (question "fused-lm-head") to benchmarks/results.jsonl.

    python benchmarks/bench_fused_lm_head.py                            # GPU
    TRITON_INTERPRET=1 python benchmarks/bench_fused_lm_head.py --cpu    # tiny fp32 smoke run: untimed, recorded
                                                                         # only where --jsonl says
"""

from __future__ import annotations

import argparse

import torch
import triton
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

import common
from fastmoe.kernels.linear_cross_entropy import linear_log_probs

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# name -> (fields trl's trainer asks for, temperature, entropy weight in the loss, trainable lm_head)
OBJECTIVES = {
    "sft": (("log_probs", "entropy", "is_top1"), 1.0, 0.0, False),
    "grpo-entropy": (("log_probs", "entropy"), 0.7, 0.01, False),
    "full-ft": (("log_probs", "entropy", "is_top1"), 1.0, 0.0, True),
}
SHAPES = {"cuda": dict(tokens=(4096, 16384), hidden=2048, vocab=200192),
          "cpu": dict(tokens=(37, 64), hidden=48, vocab=997)}


def trl_head(hidden, weight, labels, outputs, temperature):
    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                        1.0, outputs)


def fastmoe_head(hidden, weight, labels, outputs, temperature):
    return linear_log_probs(hidden, weight, labels, temperature=temperature)


IMPLEMENTATIONS = {"trl": trl_head, "fastmoe": fastmoe_head}


def step(head, hidden, weight, labels, objective) -> torch.Tensor:
    """One forward + backward as the trainer runs it; returns the loss."""
    outputs, temperature, entropy_weight, _ = OBJECTIVES[objective]
    log_probs, entropy, *_, is_top1 = head(hidden, weight, labels, outputs, temperature)
    tokens = labels.shape[0]
    loss = -log_probs.sum() / tokens
    if entropy_weight:
        loss = loss - entropy_weight * entropy.sum() / tokens
    # The sums SFTTrainer logs, outside the graph: part of the step's cost.
    entropy.detach().sum()
    if is_top1 is not None:
        is_top1.sum()
    loss.backward()
    return loss.detach()


def measure(head, hidden, weight, labels, objective, timed: bool) -> dict:
    def run():
        hidden.grad = None
        weight.grad = None
        return step(head, hidden, weight, labels, objective)

    loss = run()
    grad_hidden = hidden.grad.clone()
    result = {"loss": loss.item(), "grad_hidden": grad_hidden, "ms": None, "peak_mib": None}
    if timed:
        result["peak_mib"] = common.peak_mib_above(run)
        result["ms"] = triton.testing.do_bench(run, grad_to_none=[hidden, weight], return_mode="median")
    hidden.grad = None
    weight.grad = None
    return result


def main() -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 shapes on the CPU, untimed")
    parser.add_argument("--tokens", default=None, help="scored tokens, comma-separated (default 4096,16384 on a GPU)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated, among "
                        f"{', '.join(OBJECTIVES)}")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = SHAPES[device]
    token_counts = [int(t) for t in args.tokens.split(",")] if args.tokens else shape["tokens"]
    hidden_size, vocab = shape["hidden"], shape["vocab"]
    environment = dict(common.environment(device), question="fused-lm-head")

    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator) * hidden_size**-0.5).to(dtype)
    records = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, hidden_size, device=device, generator=generator).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
        for objective in args.objectives.split(","):
            weight.requires_grad_(OBJECTIVES[objective][3])
            results = {}
            for name, head in IMPLEMENTATIONS.items():
                record = dict(environment, case=f"{objective}, {tokens} tokens", tokens=tokens, hidden=hidden_size,
                              vocab=vocab, dtype=str(dtype).removeprefix("torch."), objective=objective,
                              implementation=name)
                try:
                    results[name] = measure(head, hidden, weight, labels, objective, timed=device == "cuda")
                    record.update(status="ok", ms=results[name]["ms"], peak_mib=results[name]["peak_mib"],
                                  loss=results[name]["loss"])
                except torch.cuda.OutOfMemoryError:
                    record.update(status="oom")
                    hidden.grad = weight.grad = None
                    torch.cuda.empty_cache()
                if name == "fastmoe" and record["status"] == "ok" and "trl" in results:
                    trl_result, ours = results["trl"], results["fastmoe"]
                    record.update(loss_diff_vs_trl=abs(ours["loss"] - trl_result["loss"]),
                                  grad_hidden_rel_err_vs_trl=common.rel_err(ours["grad_hidden"],
                                                                            trl_result["grad_hidden"]))
                    if ours["ms"] is not None:
                        record["speedup_vs_trl"] = trl_result["ms"] / ours["ms"]
                records.append(record)
                print(line(record), flush=True)
                if not args.no_record:
                    common.append_record(record, args.jsonl)
        del hidden, labels
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


def line(record: dict) -> str:
    def fmt(key, spec, suffix=""):
        value = record.get(key)
        return "-" if value is None else f"{value:{spec}}{suffix}"

    return (f"fused_lm_head {record['objective']:<12} {record['tokens']:>6} tokens x vocab {record['vocab']} "
            f"{record['dtype']} {record['implementation']:<8} {record['status']:<3} {fmt('ms', '.2f', ' ms')} "
            f"peak {fmt('peak_mib', ',.0f', ' MiB')} loss {fmt('loss', '.5f')} "
            f"speedup {fmt('speedup_vs_trl', '.2f', 'x')} "
            f"grad_hidden vs trl {fmt('grad_hidden_rel_err_vs_trl', '.1e')}")


if __name__ == "__main__":
    main()
