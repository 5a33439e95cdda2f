"""The fused LoRA linear (kernels/lora_linear.py) against the peft layers it replaces, at Trinity-Mini's projections.

For each projection: peft's `lora.Linear` (a target_modules entry: base GEMM plus a float32 LoRA branch), peft's
`ParamWrapper` on the Linear's weight (a target_parameters entry: W + s B A rebuilt every call, then a full weight
gradient), and fastmoe's fused op, which both of those run as once fastmoe is patched. Forward + backward (input
and adapter gradients), bf16 activations, float32 adapters as peft keeps them, r=16, 4096 tokens. Times are
triton.testing.do_bench medians; peak is the memory allocated above the inputs during one step. One JSON line per
(projection, peft layer, implementation) goes to benchmarks/results.jsonl (question "lora-linear").

    python benchmarks/bench_lora_linear.py          # GPU
    python benchmarks/bench_lora_linear.py --cpu    # tiny CPU smoke run, untimed, nothing recorded
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

import common
from fastmoe import patching
from fastmoe.linear_lora import lora_linear_patches

# name, in_features, out_features: AFMoE attention and shared-expert projections at Trinity-Mini's sizes
PROJECTIONS = [("q_proj / attention gate", 2048, 4096), ("k_proj, v_proj", 2048, 512), ("o_proj", 4096, 2048),
               ("shared expert gate/up", 2048, 1024), ("shared expert down", 1024, 2048)]
RANK = common.LORA_RANK


class OneLinear(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def lora_layer(d_in: int, d_out: int, as_parameter: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    targets = dict(target_modules=[], target_parameters=["proj.weight"]) if as_parameter else dict(
        target_modules=["proj"])
    model = get_peft_model(OneLinear(d_in, d_out).to(device, dtype), LoraConfig(r=RANK, lora_alpha=RANK, **targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    return model


def measure(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: str) -> tuple[float, float]:
    """(median ms, peak MiB) of forward + backward (input and adapter gradients); (None, None) on the CPU, where
    the step runs once, untimed."""
    adapters = [p for p in model.parameters() if p.requires_grad]

    def step():
        return torch.autograd.grad(model(x), [x, *adapters], grad)

    if device != "cuda":
        step()
        return None, None
    return common.bench_ms(step, warmup=10, rep=100), common.peak_mib_above(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, untimed, nothing recorded")
    parser.add_argument("--jsonl", default=str(common.RESULTS_JSONL), help="JSON-lines file the records go to")
    parser.add_argument("--no-record", action="store_true", help=common.NO_RECORD_HELP)
    args = parser.parse_args()
    device = "cpu" if args.cpu else common.default_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, shrink = (4096, 1) if device == "cuda" else (64, 64)
    shared = dict(common.environment(device), question="lora-linear", tokens=tokens, rank=RANK)
    records = []
    for name, d_in, d_out in PROJECTIONS:
        d_in, d_out = d_in // shrink, d_out // shrink
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
        for label, as_parameter in (("lora.Linear", False), ("ParamWrapper", True)):
            case = f"{name} ({d_in}->{d_out}), peft {label}"
            patching.remove_patches(lora_linear_patches())
            model = lora_layer(d_in, d_out, as_parameter, device, dtype)
            for impl in ("peft", "fastmoe"):
                if impl == "fastmoe":
                    patching.apply_patches(lora_linear_patches())
                ms, mib = measure(model, x, grad, device)
                records.append(dict(shared, case=case, implementation=impl, fwd_bwd_ms=common.rounded(ms, 4),
                                    peak_mib=common.rounded(mib, 0)))
        patching.remove_patches(lora_linear_patches())
    print("| projection, peft layer | implementation | fwd+bwd ms | peak MiB |\n|---|---|---:|---:|")
    for r in records:
        print(f"| {r['case']} | {r['implementation']} | {r['fwd_bwd_ms']} | {r['peak_mib']} |")
    if device == "cuda" and not args.no_record:
        for record in records:
            common.append_record(record, args.jsonl)


if __name__ == "__main__":
    main()
