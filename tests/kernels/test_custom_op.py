"""Every fastmoe op under torch.compile (kernels/custom_op.py): the fake implementations agree with the kernels,
forward and backward (torch.library.opcheck on every custom op a case calls), and torch.compile(fullgraph=True) of
the public function's forward and backward gives eager's outputs and gradients, with no graph break (fullgraph).

Small odd shapes in fp32: the kernels run in Triton's interpreter; with reference_only() the MoE references run as
their own ops. lora_linear and sort_by_expert are plain PyTorch, which dynamo traces: they are compiled here too."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._pytree import tree_map

from fastmoe.kernels import reference_only
from fastmoe.kernels.attention_gate import attention_gate
from fastmoe.kernels.custom_op import always_custom_ops
from fastmoe.kernels.layer_norm import layer_norm
from fastmoe.kernels.lora_linear import lora_linear
from fastmoe.kernels.moe import (
    ExpertLora,
    dequantize_nf4,
    expert_map,
    expert_map_nf4,
    expert_reduce,
    expert_reduce_nf4,
    moe_experts,
    moe_experts_clamped_swiglu,
    moe_experts_clamped_swiglu_nf4,
    moe_experts_nf4,
    quantize_nf4,
    route_sigmoid_topk,
    route_softmax_topk,
    sort_by_expert,
)
from fastmoe.kernels.qk_norm_rope import qk_norm_rope
from fastmoe.kernels.rms_norm import rms_norm, rms_norm_add
from fastmoe.kernels.rope import apply_rope, apply_rope_swapping_heads
from fastmoe.kernels.short_conv import short_conv
from fastmoe.kernels.swiglu import swiglu
from testing_utils import RecordOps, rel_err


# The kernels run on a GPU where there is one, in the interpreter otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, grad=False, seed=0, scale=1.0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * scale
    return t.to(DEVICE).requires_grad_(grad)


def routing(tokens, experts, top_k, seed=0):
    """(tokens, k) distinct experts per token, leaving expert 0 without tokens, and random weights."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([1 + torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)])
    return index.to(DEVICE), torch.rand(tokens, top_k, generator=generator).to(DEVICE).requires_grad_()


def lora_factors(experts, rank, out, inp, seed):
    """A (E, r, in) and B (E, out, r) of an expert LoRA."""
    return [randn(experts, rank, inp, grad=True, seed=seed, scale=0.3),
            randn(experts, out, rank, grad=True, seed=seed + 1, scale=0.3)]


def lora_of(factors):
    return ExpertLora(*factors, 1.5) if factors else None


def moe_case(top_k=2, lora=True, train_weights=False, tokens=7):
    hidden, inter, experts, rank = 12, 10, 5, 3
    index, weights = routing(tokens, experts, top_k)
    gate_up = randn(experts, 2 * inter, hidden, grad=train_weights, seed=1)
    down = randn(experts, hidden, inter, grad=train_weights, seed=2)
    loras = lora_factors(experts, rank, 2 * inter, hidden, 3) + lora_factors(experts, rank, hidden, inter, 5)

    def fn(x, w, gate_up, down, *loras):
        return moe_experts(x, index, w, gate_up, down, lora_of(loras[:2]), lora_of(loras[2:]))
    return fn, [randn(tokens, hidden, grad=True), weights, gate_up, down, *(loras if lora else [])]


def moe_clamped_swiglu_case():
    """gpt-oss's experts: (E, in, out) stacks with biases, every one trained beside the LoRA factors (the bias
    gradients and the stored layout's weight gradients have fakes of their own), a limit the values cross."""
    tokens, hidden, inter, experts, rank = 7, 12, 10, 5, 3
    index, weights = routing(tokens, experts, 2)
    base = [randn(experts, hidden, 2 * inter, grad=True, seed=1, scale=0.5),
            randn(experts, 2 * inter, grad=True, seed=2),
            randn(experts, inter, hidden, grad=True, seed=3), randn(experts, hidden, grad=True, seed=4)]
    loras = lora_factors(experts, rank, 2 * inter, hidden, 3) + lora_factors(experts, rank, hidden, inter, 5)

    def fn(x, w, gate_up, gate_up_bias, down, down_bias, *loras):
        return moe_experts_clamped_swiglu(x, index, w, gate_up, gate_up_bias, down, down_bias, 1.702, 1.0,
                                          lora_of(loras[:2]), lora_of(loras[2:]))
    return fn, [randn(tokens, hidden, grad=True), weights, *base, *loras]


def moe_clamped_swiglu_nf4_case():
    """gpt-oss's experts in NF4, each stored (E, in, out) stack quantized along its stored rows; the biases trained."""
    tokens, hidden, inter, experts, rank = 6, 16, 8, 3, 2
    index, weights = routing(tokens, experts, 2)
    gate_up = quantize_nf4(randn(experts, hidden, 2 * inter, seed=1, scale=0.5), double_quant=True)
    down = quantize_nf4(randn(experts, inter, hidden, seed=2))
    loras = lora_factors(experts, rank, 2 * inter, hidden, 3) + lora_factors(experts, rank, hidden, inter, 5)

    def fn(x, w, gate_up_bias, down_bias, *loras):
        return moe_experts_clamped_swiglu_nf4(x, index, w, gate_up, gate_up_bias, down, down_bias, 1.702, 1.0,
                                              lora_of(loras[:2]), lora_of(loras[2:]))
    return fn, [randn(tokens, hidden, grad=True), weights, randn(experts, 2 * inter, grad=True, seed=6),
                randn(experts, hidden, grad=True, seed=7), *loras]


def moe_nf4_case(tokens=6):
    hidden, inter, experts, rank = 16, 8, 3, 2
    index, weights = routing(tokens, experts, 2)
    gate_up = quantize_nf4(randn(experts, 2 * inter, hidden, seed=1), double_quant=True)
    down = quantize_nf4(randn(experts, hidden, inter, seed=2))
    loras = lora_factors(experts, rank, 2 * inter, hidden, 3) + lora_factors(experts, rank, hidden, inter, 5)

    def fn(x, w, *loras):
        return moe_experts_nf4(x, index, w, gate_up, down, lora_of(loras[:2]), lora_of(loras[2:]))
    return fn, [randn(tokens, hidden, grad=True), weights, *loras]


def expert_map_case():
    tokens, hidden, out, experts = 7, 12, 9, 4
    index, _ = routing(tokens, experts, 2)

    def fn(x, weight, *lora):
        return expert_map(x, index, weight, lora_of(lora))
    return fn, [randn(tokens, hidden, grad=True), randn(experts, out, hidden, grad=True, seed=1),
                *lora_factors(experts, 3, out, hidden, 2)]


def expert_reduce_case():
    tokens, hidden, width, experts = 7, 12, 9, 4
    index, weights = routing(tokens, experts, 2)

    def fn(x, w, weight, *lora):
        return expert_reduce(x, index, w, weight, lora_of(lora))
    return fn, [randn(tokens, 2, width, grad=True), weights, randn(experts, hidden, width, grad=True, seed=1),
                *lora_factors(experts, 3, hidden, width, 2)]


def expert_map_nf4_case():
    tokens, hidden, out, experts = 7, 12, 16, 4  # out * hidden a multiple of NF4's 64-element blocks
    index, _ = routing(tokens, experts, 2)
    weight = quantize_nf4(randn(experts, out, hidden, seed=1), double_quant=True)

    def fn(x, *lora):
        return expert_map_nf4(x, index, weight, lora_of(lora))
    return fn, [randn(tokens, hidden, grad=True), *lora_factors(experts, 3, out, hidden, 2)]


def expert_reduce_nf4_case():
    tokens, hidden, width, experts = 7, 12, 16, 4
    index, weights = routing(tokens, experts, 2)
    weight = quantize_nf4(randn(experts, hidden, width, seed=1))

    def fn(x, w, *lora):
        return expert_reduce_nf4(x, index, w, weight, lora_of(lora))
    return fn, [randn(tokens, 2, width, grad=True), weights, *lora_factors(experts, 3, hidden, width, 2)]


def qk_norm_rope_case(norm, interleaved, per_head, rope=True):
    batch, seq, heads, dim = 2, 5, 3, 8
    weight = randn(*((heads, dim) if per_head else (dim,)), grad=True, seed=1)
    cos, sin = (randn(1, seq, dim, seed=2), randn(1, seq, dim, seed=3)) if rope else (None, None)
    return ((lambda x, w: qk_norm_rope(x, w, cos, sin, 1e-6, norm=norm, interleaved=interleaved)),
            [randn(batch, seq, heads, dim, grad=True), weight])


def rope_case(interleaved):
    cos, sin = randn(1, 5, 8, seed=2), randn(1, 5, 8, seed=3)
    # (batch, heads, seq, dim) as a projection's transposed view, the layout the models pass.
    return (lambda x: apply_rope(x.transpose(1, 2), cos, sin, interleaved)), [randn(2, 5, 3, 8, grad=True)]


def rope_swapping_heads_case():
    cos, sin = randn(1, 5, 8, seed=2), randn(1, 5, 8, seed=3)
    # (batch, seq, a, b, dim): JetMoe's (slot, kv head) queries
    return (lambda x: apply_rope_swapping_heads(x, cos, sin)), [randn(2, 5, 2, 3, 8, grad=True)]


def short_conv_case(bias):
    return short_conv, [randn(2, 7, 30, grad=True), randn(10, 1, 3, grad=True, seed=1),
                        randn(10, grad=True, seed=2) if bias else None]


def lora_linear_case(quantized):
    weight, bias = randn(9, 12, seed=1), randn(9, seed=2)
    base = (lambda: weight * 1.0) if quantized else weight  # a callable stands for a dequantized 4-bit weight

    def fn(x, a, b):
        return lora_linear(x, base, bias, a, b, 0.5)
    return fn, [randn(2, 5, 12, grad=True), randn(3, 12, grad=True, seed=3), randn(9, 3, grad=True, seed=4)]


def nf4_case():
    weight = quantize_nf4(randn(3, 16, 8, seed=1), double_quant=True)
    return (lambda: dequantize_nf4(weight, torch.float32)), []


def sort_case():
    index, _ = routing(9, 6, 3)
    schedule = sort_by_expert(index, 6, block_m=4)
    return (lambda: (schedule.sorted_pair, schedule.expert_offsets, schedule.tile_expert)), []


CASES = {
    "rms_norm": lambda: (lambda x, w: rms_norm(x, w, 1e-6), [randn(2, 5, 24, grad=True), randn(24, grad=True)]),
    "rms_norm_frozen_weight": lambda: (lambda x, w: rms_norm(x, w, 1e-6), [randn(3, 40, grad=True), randn(40)]),
    "rms_norm_add": lambda: (lambda x, r, w: rms_norm_add(x, r, w, 1e-5),
                             [randn(2, 5, 24, grad=True), randn(2, 5, 24, grad=True, seed=1), randn(24, grad=True)]),
    "layer_norm": lambda: (lambda x, w: layer_norm(x, w, 1e-5), [randn(3, 5, 20, grad=True), randn(20, grad=True)]),
    "layer_norm_per_head": lambda: (lambda x, w: layer_norm(x, w, 1e-5),
                                    [randn(2, 3, 4, 10, grad=True), randn(4, 10, grad=True)]),
    "rope": lambda: rope_case(False),
    "rope_interleaved": lambda: rope_case(True),
    "rope_swapping_heads": rope_swapping_heads_case,
    "qk_norm_rope": lambda: qk_norm_rope_case("rms", False, False),
    "qk_layer_norm_rope_interleaved": lambda: qk_norm_rope_case("layer", True, True),
    "qk_norm_without_rope": lambda: qk_norm_rope_case("rms", False, True, rope=False),
    "attention_gate": lambda: (attention_gate, [randn(2, 5, 12, grad=True), randn(2, 5, 12, grad=True, seed=1)]),
    "swiglu": lambda: (swiglu, [randn(2, 5, 12, grad=True, scale=3.0), randn(2, 5, 12, grad=True, seed=1)]),
    "short_conv": lambda: short_conv_case(bias=True),
    "short_conv_without_bias": lambda: short_conv_case(bias=False),
    "route_sigmoid_topk": lambda: ((lambda logits, bias: route_sigmoid_topk(logits, bias, 3, True, 1e-20, 1.5)),
                                   [randn(7, 8, grad=True), randn(8, seed=1, scale=0.1)]),
    "route_softmax_topk": lambda: ((lambda logits: route_softmax_topk(logits, 2)), [randn(7, 5, grad=True)]),
    "moe_experts": lambda: moe_case(),
    "moe_experts_top1_trained_weights": lambda: moe_case(top_k=1, lora=False, train_weights=True),
    "moe_experts_nf4": moe_nf4_case,
    "moe_experts_clamped_swiglu": moe_clamped_swiglu_case,
    "moe_experts_clamped_swiglu_nf4": moe_clamped_swiglu_nf4_case,
    "expert_map": expert_map_case,
    "expert_reduce": expert_reduce_case,
    "expert_map_nf4": expert_map_nf4_case,
    "expert_reduce_nf4": expert_reduce_nf4_case,
    "dequantize_nf4": nf4_case,
    "lora_linear": lambda: lora_linear_case(False),
    "lora_linear_quantized": lambda: lora_linear_case(True),
    "sort_by_expert": sort_case,
}
# Ops whose reference runs as its own op (the MoE loops over experts); the other references are traced as they are.
REFERENCE_CASES = ["moe_experts", "moe_experts_nf4", "moe_experts_clamped_swiglu", "moe_experts_clamped_swiglu_nf4",
                   "expert_map", "expert_reduce", "expert_map_nf4", "expert_reduce_nf4", "rms_norm_add", "qk_norm_rope",
                   "short_conv", "route_sigmoid_topk"]
INDUCTOR_CASES = ["rms_norm_add", "qk_norm_rope", "moe_experts"]


def outputs(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]


def forward_backward(fn, inputs):
    """Outputs and the gradients of the inputs that require grad, for a fixed random upstream gradient."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    outs = outputs(fn(*inputs))
    trained = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    differentiable = [o for o in outs if o.requires_grad]
    grads = []
    if trained and differentiable:
        upstream = [randn(*o.shape, seed=7).to(o.dtype) for o in differentiable]
        grads = list(torch.autograd.grad(differentiable, trained, upstream, allow_unused=True))
        assert all(g is not None for g in grads), "an input that requires grad got none: the case ignores it"
    return [o.detach() for o in outs], grads


def assert_same(got, want, tol):
    for (g_outs, g_grads), (w_outs, w_grads) in [(got, want)]:
        assert len(g_outs) == len(w_outs) and len(g_grads) == len(w_grads)
        for g, w in zip(g_outs + g_grads, w_outs + w_grads):
            assert (g is None) == (w is None)
            if g is None:
                continue
            assert g.shape == w.shape and g.dtype == w.dtype
            if w.is_floating_point():
                assert rel_err(g, w) <= tol
            else:
                assert torch.equal(g, w)


def record_fastmoe_ops() -> RecordOps:
    """Records every call of a fastmoe custom op (forward and backward ops) with its arguments."""
    return RecordOps(lambda func, args, kwargs: func.namespace == "fastmoe")


def without_grad_if_backward(func, args, kwargs):
    """A backward op's arguments (saved inputs among them) detached: it is not differentiated itself; a forward
    op's as they were, so that opcheck also checks its autograd."""
    if not func.name().endswith("_backward"):
        return args, kwargs
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))


def compiled(fn, backend="aot_eager", dynamic=False):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("lora_linear", "sort_by_expert"))])
def test_every_custom_op_agrees_with_its_fake(case):
    fn, inputs = CASES[case]()
    recorder = record_fastmoe_ops()
    with always_custom_ops(), recorder:
        forward_backward(fn, inputs)
    ops = {func.name() for func, *_ in recorder.calls}
    assert ops, "the case called no fastmoe custom op"
    for func, args, kwargs, _ in recorder.calls:
        torch.library.opcheck(func, *without_grad_if_backward(func, args, kwargs))


@pytest.mark.parametrize("case", CASES)
def test_compiled_forward_and_backward_equal_eager(case):
    fn, inputs = CASES[case]()
    assert_same(forward_backward(compiled(fn), inputs), forward_backward(fn, inputs), tol=1e-6)


@pytest.mark.parametrize("tokens", [1, 5], ids=["one-token", "few-tokens"])
@pytest.mark.parametrize("case", [moe_case, moe_nf4_case], ids=["moe_experts", "moe_experts_nf4"])
def test_decoding_forms_run_as_custom_ops_and_compiled(case, tokens):
    """Without gradients (decoding) the experts op takes forms that keep nothing (one token's GEMVs; a few rows'
    LoRA inside the GEMM tiles): called as its custom op, which checks that no two outputs alias, and compiled, they
    give eager's output."""
    fn, inputs = case(tokens=tokens)
    with torch.no_grad():
        eager = fn(*inputs)
        with always_custom_ops():
            as_op = fn(*inputs)
        assert rel_err(as_op, eager) <= 1e-6
        assert rel_err(compiled(fn)(*inputs), eager) <= 1e-6


EMBEDDED_SOURCES = """
import importlib, pkgutil, triton
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as closure
import fastmoe.kernels
kernels = 0
for info in pkgutil.walk_packages(fastmoe.kernels.__path__, "fastmoe.kernels."):
    module = importlib.import_module(info.name)
    for name, value in vars(module).items():
        if isinstance(value, triton.runtime.JITFunction) and value.__module__ == module.__name__:
            kernels += 1
            embedded = eval("'''" + closure(value) + "'''")  # async_compile.triton(name, '''source''')
            compile(embedded, f"{info.name}.{name}", "exec")
print(kernels)
"""


def test_every_kernel_source_survives_inductors_embedding():
    """A kernel that dynamo traces (lora_linear's few-rows launch, under a compiled decode) goes to inductor as its
    source with everything it reaches, which inductor's wrapper embeds in a triple-quoted string literal: a constant
    whose repr holds an escape (a newline in the NF4 decode's PTX) becomes a raw newline inside a string there, and
    the kernel fails to compile (a SyntaxError on a GPU). Each kernel module's @jit functions, embedded so, compile as
    Python. In a process of its own with Triton's JIT, as the tests' kernels are the interpreter's."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", EMBEDDED_SOURCES], env={**os.environ, "TRITON_INTERPRET": "0"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 50  # every module's kernels were found


@pytest.mark.parametrize("case", ["rms_norm", "moe_experts", "route_softmax_topk"])
def test_compiles_with_dynamic_shapes(case):
    fn, inputs = CASES[case]()
    assert_same(forward_backward(compiled(fn, dynamic=True), inputs), forward_backward(fn, inputs), tol=1e-6)


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_references_compile_without_graph_break(case):
    fn, inputs = CASES[case]()
    with reference_only():
        assert_same(forward_backward(compiled(fn), inputs), forward_backward(fn, inputs), tol=1e-5)


@pytest.mark.parametrize("case", ["moe_experts", "expert_reduce", "expert_reduce_nf4"])
def test_reference_ops_agree_with_their_fakes(case):
    fn, inputs = CASES[case]()
    recorder = record_fastmoe_ops()
    # Forward only: the backward op's vjp (torch.func) does not run under a Python dispatch mode; opcheck's
    # aot_dispatch test runs it, against its fake, from the forward op's inputs that require grad.
    with reference_only(), always_custom_ops(), recorder:
        fn(*inputs)
    assert {func.name() for func, *_ in recorder.calls} >= {f"fastmoe::{case}_reference"}
    for func, args, kwargs, _ in recorder.calls:
        torch.library.opcheck(func, *without_grad_if_backward(func, args, kwargs))


@pytest.mark.parametrize("case", INDUCTOR_CASES)
@pytest.mark.parametrize("reference", [False, True], ids=["kernels", "reference"])
def test_inductor_equals_eager(case, reference, tmp_path, monkeypatch):
    # A cache of its own: inductor's CPU cache does not key its compiled kernels on ATEN_CPU_CAPABILITY, so a kernel
    # built for another instruction set on this machine would be loaded (and compute garbage).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fn, inputs = CASES[case]()
    with reference_only() if reference else contextlib.nullcontext():
        assert_same(forward_backward(compiled(fn, backend="inductor"), inputs), forward_backward(fn, inputs),
                    tol=1e-5)


ZERO_FILLS = {torch.ops.aten.zeros.default, torch.ops.aten.new_zeros.default, torch.ops.aten.zeros_like.default,
              torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar}


def zero_fill_shapes(record: RecordOps) -> list[tuple[int, ...]]:
    return [tuple(out.shape) for *_, out in record.calls]


def test_backward_fills_no_zero_gradients_for_kept_outputs():
    # What an op returns beside its result for its backward (the experts' pre-activations and LoRA row products, a
    # norm's rstd) gets no gradient: autograd must not fill one with zeros per call (a launch each, and a write the
    # size of the experts' (rows, 2 x intermediate) pre-activations).
    x, weight = randn(9, 12, grad=True), randn(12, grad=True, seed=1)
    out = rms_norm(x, weight, 1e-6)
    with RecordOps(lambda func, *_: func in ZERO_FILLS) as fills:
        out.backward(randn(9, 12, seed=2))
    assert zero_fill_shapes(fills) == []

    fn, inputs = moe_case()
    out = fn(*inputs)
    rows, inter, rank = 7 * 2, 10, 3
    with RecordOps(lambda func, *_: func in ZERO_FILLS) as fills:
        out.backward(randn(*out.shape, seed=3))
    assert not {(rows, 2 * inter), (rows, rank), (rows,)} & set(zero_fill_shapes(fills)), zero_fill_shapes(fills)


def test_a_later_output_used_alone_gets_its_gradient():
    # With the normalised output unused, autograd gives its gradient as None; the backward takes it as zeros.
    x, residual = randn(9, 12, grad=True), randn(9, 12, grad=True, seed=1)
    weight = randn(12, grad=True, seed=2)
    upstream = randn(9, 12, seed=3)
    _, total = rms_norm_add(x, residual, weight, 1e-6)
    grads = torch.autograd.grad((total * upstream).sum(), (x, residual))
    for grad in grads:
        assert rel_err(grad, upstream) < 1e-6
    assert weight.grad is None
