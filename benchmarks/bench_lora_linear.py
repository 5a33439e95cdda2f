"""The fused LoRA linear (kernels/lora_linear.py) against the peft layers it replaces, at Trinity-Mini's projections.

For each projection: peft's `lora.Linear` (a target_modules entry: base GEMM plus a float32 LoRA branch), peft's
`ParamWrapper` on the Linear's weight (a target_parameters entry: W + s B A rebuilt every call, then a full weight
gradient), and fastmoe's fused op, which both of those run as once fastmoe is patched. Forward + backward (input
and adapter gradients), bf16 activations, float32 adapters as peft keeps them, r=16, 4096 tokens. Times are
triton.testing.do_bench medians; peak is the memory allocated above the inputs during one step.

    python benchmarks/bench_lora_linear.py          # GPU; appends its table to benchmarks/RESULTS.md
    python benchmarks/bench_lora_linear.py --cpu    # tiny CPU smoke run, nothing recorded
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

from fastmoe import patching
from fastmoe.linear_lora import lora_linear_patches

# name, in_features, out_features: AFMoE attention and shared-expert projections at Trinity-Mini's sizes
PROJECTIONS = [("q_proj / attention gate", 2048, 4096), ("k_proj, v_proj", 2048, 512), ("o_proj", 4096, 2048),
               ("shared expert gate/up", 2048, 1024), ("shared expert down", 1024, 2048)]
RANK = 16


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
    adapters = [p for p in model.parameters() if p.requires_grad]

    def step():
        return torch.autograd.grad(model(x), [x, *adapters], grad)

    if device != "cuda":
        step()
        return float("nan"), float("nan")
    import triton.testing

    ms = triton.testing.do_bench(step, warmup=10, rep=100, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, nothing recorded")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, shrink = (4096, 1) if device == "cuda" else (64, 64)
    rows = []
    for name, d_in, d_out in PROJECTIONS:
        d_in, d_out = d_in // shrink, d_out // shrink
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
        timings = {}
        for label, as_parameter in (("lora.Linear", False), ("ParamWrapper", True)):
            patching.remove_patches(lora_linear_patches())
            model = lora_layer(d_in, d_out, as_parameter, device, dtype)
            timings[f"peft {label}"] = measure(model, x, grad, device)
            patching.apply_patches(lora_linear_patches())
            timings[f"fastmoe ({label})"] = measure(model, x, grad, device)
        patching.remove_patches(lora_linear_patches())
        for label, (ms, mib) in timings.items():
            rows.append(f"| {name} ({d_in}->{d_out}) | {label} | {ms:.3f} | {mib:.0f} |")
    header = "| projection | implementation | fwd+bwd ms | peak MiB |\n|---|---|---:|---:|"
    table = "\n".join([header, *rows])
    print(table)
    if device == "cuda":
        meta = (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
                f"{torch.cuda.get_device_name()}; torch {torch.__version__}; transformers {transformers.__version__}; "
                f"peft {peft.__version__}\n- command: `python benchmarks/bench_lora_linear.py {' '.join(sys.argv[1:])}`")
        with open(args.results, "a") as handle:
            handle.write(f"\n## bench_lora_linear: fused LoRA linear vs peft, {tokens} bf16 tokens, r={RANK}\n\n"
                         f"{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
