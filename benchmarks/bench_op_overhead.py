"""Host time of one call of fastmoe's ops, the kernels themselves left out: what an eager training step pays in
Python per op, which issue #16 measured as more than half of a step.

Every Triton launch of the measured ops is replaced by a no-op and the ops run on tiny CPU tensors with
TRITON_INTERPRET=1 (so that dispatch takes the Triton path), so what is timed is the op's Python: argument checks,
the autograd wrapper, allocations, the launchers' own arithmetic and the few PyTorch ops around the kernels. Two
paths per op, each forward alone (under no_grad) and forward + backward:

* ``eager``: the op as a training step calls it (a ``torch.autograd.Function``);
* ``custom_op``: the same op through its ``torch.library`` custom op (``always_custom_ops()``), as a torch.compile'd
  graph calls it (where the installed fastmoe has them), to show what eager calls would pay if they went through it.

Median microseconds per call over `--calls` calls. Run from any checkout (the installed fastmoe is measured), e.g.
before and after a change. Records (question "op-overhead") go where --jsonl says, nowhere by default.

    python benchmarks/bench_op_overhead.py [--calls 2000] [--jsonl R.jsonl]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # read by triton when the kernels are defined: before fastmoe is imported

import torch  # noqa: E402
import triton  # noqa: E402

import common  # noqa: E402
from fastmoe.kernels import attention_gate, qk_norm_rope, rms_norm  # noqa: E402
from fastmoe.kernels.moe import ExpertLora, moe_experts, routing  # noqa: E402

try:  # fastmoe before its ops were custom ops has no custom-op path to measure
    from fastmoe.kernels.custom_op import always_custom_ops
except ImportError:
    always_custom_ops = None

class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) only zeroes its integer tensors (the router's expert
    indices, the experts' schedule), so that the PyTorch code after it indexes in bounds."""

    def __getitem__(self, grid):
        return self.launch

    @staticmethod
    def launch(*args, **kwargs):
        for arg in args:
            if isinstance(arg, torch.Tensor) and not arg.dtype.is_floating_point and arg.dtype != torch.bool:
                arg.zero_()


def stub_kernels() -> None:
    """Every @triton.jit kernel that fastmoe's kernel modules hold, whichever module launches it."""
    modules = [module for name, module in list(sys.modules.items()) if name.startswith("fastmoe.kernels")]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.KernelInterface):
                setattr(module, name, _NoLaunch())


def cases() -> dict[str, tuple]:
    """name -> (call, inputs that get gradients)."""
    torch.manual_seed(0)
    tokens, hidden, heads, head_dim, num_experts, top_k, inter, rank = 8, 32, 4, 16, 8, 2, 24, 4
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    norm_weight = torch.randn(hidden, requires_grad=True)
    q = torch.randn(1, tokens, heads, head_dim, requires_grad=True)
    q_weight = torch.randn(head_dim)
    cos, sin = torch.randn(1, tokens, head_dim), torch.randn(1, tokens, head_dim)
    gate = torch.randn(1, tokens, hidden, requires_grad=True)
    logits = torch.randn(tokens, num_experts, requires_grad=True)
    flat = torch.randn(tokens, hidden, requires_grad=True)
    index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, requires_grad=True)
    gate_up, down = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
    gu_lora = ExpertLora(torch.randn(num_experts, rank, hidden, requires_grad=True),
                         torch.randn(num_experts, 2 * inter, rank, requires_grad=True), 2.0)
    down_lora = ExpertLora(torch.randn(num_experts, rank, inter, requires_grad=True),
                           torch.randn(num_experts, hidden, rank, requires_grad=True), 2.0)

    return {
        "rms_norm": (lambda: rms_norm.rms_norm(x, norm_weight, 1e-6), [x, norm_weight]),
        "qk_norm_rope": (lambda: qk_norm_rope.qk_norm_rope(q, q_weight, cos, sin, 1e-6), [q]),
        "attention_gate": (lambda: attention_gate.attention_gate(x, gate), [x, gate]),
        "route_sigmoid_topk": (lambda: routing.route_sigmoid_topk(logits, None, top_k, True, 1e-20, 1.0)[0],
                               [logits]),
        "moe_experts": (lambda: moe_experts(flat, index, weights, gate_up, down, gu_lora, down_lora),
                        [flat, weights, gu_lora.A, gu_lora.B, down_lora.A, down_lora.B]),
    }


def median_us(fn, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - start) / (calls // 5) * 1e6)
    return statistics.median(samples)


def through_custom_ops(call):
    def run():
        with always_custom_ops():
            return call()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--jsonl", default=None, help="JSON-lines file the records go to (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub_kernels()
    shared = dict(common.environment("cpu"), question="op-overhead", cpu_threads=1)
    for name, (call, trained) in cases().items():
        paths = {"eager": call}
        if always_custom_ops is not None:
            paths["custom_op"] = through_custom_ops(call)
        for path, fn in paths.items():
            def fwd_bwd(fn=fn):
                out = fn()
                torch.autograd.grad(out, trained, torch.ones_like(out))
            with torch.no_grad():
                fwd = median_us(fn, args.calls)
            both = median_us(fwd_bwd, args.calls)
            record = dict(shared, op=name, path=path, fwd_us=round(fwd, 1), fwd_bwd_us=round(both, 1))
            print(f"{name:20s} {path:10s} forward {fwd:7.1f} us   forward + backward {both:7.1f} us")
            if args.jsonl:
                common.append_record(record, args.jsonl)


if __name__ == "__main__":
    main()
