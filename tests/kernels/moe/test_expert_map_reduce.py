"""JetMoe's expert_map / expert_reduce, 16-bit and NF4: Triton vs reference, forward and every gradient."""

import pytest
import torch
from testing_utils import (check_against_reference, check_torch_products_against_reference, count_expert_products,
                           output_and_grads, random_expert_lora, random_routing, rel_err)

from fastmoe.kernels import reference_only
from fastmoe.kernels.moe.expert_map_reduce import (
    expert_map,
    expert_map_nf4,
    expert_reduce,
    expert_reduce_nf4,
    reference_expert_map,
    reference_expert_reduce,
)
from fastmoe.kernels.moe.experts import ExpertLora
from fastmoe.kernels.moe.nf4 import dequantize_nf4, quantize_nf4

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------------------
# Triton (interpreter) vs reference, fp32, and the references against a pair loop
# --------------------------------------------------------------------------------------------------------


def _map_inputs(num_tokens, hidden, out_features, num_experts, top_k, rank, lora, used=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    index, _ = random_routing(num_tokens, num_experts, top_k, used, generator=gen)
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    weight = (torch.randn(num_experts, out_features, hidden) / hidden**0.5).requires_grad_()
    params = [x, weight]
    adapter = None
    if lora:
        adapter, lora_params = random_expert_lora(num_experts, rank, out_features, hidden, torch.float32, "cpu")
        params += lora_params
    return (x, index, weight, adapter), params


MAP_SHAPES = [
    pytest.param(13, 40, 24, 4, 2, 3, None, id="odd"),
    pytest.param(1, 24, 40, 8, 2, 1, None, id="one-token"),
    pytest.param(20, 32, 20, 4, 4, 8, None, id="k-equals-E"),
    pytest.param(30, 24, 24, 8, 1, 2, 3, id="k1-idle-experts"),
]


@pytest.mark.parametrize("num_tokens,hidden,out_features,num_experts,top_k,rank,used", MAP_SHAPES)
@pytest.mark.parametrize("lora", [True, False])
def test_expert_map(num_tokens, hidden, out_features, num_experts, top_k, rank, used, lora):
    args, params = _map_inputs(num_tokens, hidden, out_features, num_experts, top_k, rank, lora, used)
    check_against_reference(expert_map, args, params, 1e-5)


@pytest.mark.parametrize("num_tokens,hidden,in_features,num_experts,top_k,rank,used", MAP_SHAPES)
@pytest.mark.parametrize("lora", [True, False])
def test_expert_reduce(num_tokens, hidden, in_features, num_experts, top_k, rank, used, lora):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    index, weights = random_routing(num_tokens, num_experts, top_k, used, generator=gen)
    weights.requires_grad_()
    x = torch.randn(num_tokens, top_k, in_features, requires_grad=True)
    weight = (torch.randn(num_experts, hidden, in_features) / in_features**0.5).requires_grad_()
    params = [x, weights, weight]
    adapter = None
    if lora:
        adapter, lora_params = random_expert_lora(num_experts, rank, hidden, in_features, torch.float32, "cpu")
        params += lora_params
    check_against_reference(expert_reduce, (x, index, weights, weight, adapter), params, 1e-5)


@pytest.mark.parametrize("num_tokens,hidden,features,num_experts,top_k,rank,used", [MAP_SHAPES[0], MAP_SHAPES[3]])
def test_expert_map_reduce_torch_products(num_tokens, hidden, features, num_experts, top_k, rank, used, monkeypatch):
    """The base products by torch's grouped GEMM, the kernels adding LoRA and the routing weights and scattering the
    rows: the same outputs and gradients, all four products (two forward, two backward) taking that path."""
    (x, index, w_map, lora_map), params = _map_inputs(num_tokens, hidden, features, num_experts, top_k, rank, True,
                                                      used)
    weights = torch.rand(num_tokens, top_k).requires_grad_()
    w_reduce = (torch.randn(num_experts, hidden, features) / features**0.5).requires_grad_()
    lora_reduce, reduce_params = random_expert_lora(num_experts, rank, hidden, features, torch.float32, "cpu")

    def block(x, index, weights, w_map, w_reduce, lora_map, lora_reduce):
        return expert_reduce(expert_map(x, index, w_map, lora_map), index, weights, w_reduce, lora_reduce)

    check_torch_products_against_reference(block, (x, index, weights, w_map, w_reduce, lora_map, lora_reduce),
                                           params + [weights, w_reduce] + reduce_params, 1e-5, monkeypatch)


def test_map_reduce_references_match_pair_loop():
    (x, index, weight, adapter), _ = _map_inputs(7, 24, 16, 4, 2, 2, lora=True)
    mapped = reference_expert_map(x, index, weight, adapter)
    weights = torch.rand(7, 2)
    back = torch.randn(4, 24, 16)
    reduced = reference_expert_reduce(mapped, index, weights, back)
    for t in range(7):
        total = torch.zeros(24)
        for k in range(2):
            e = int(index[t, k])
            expected = weight[e] @ x[t] + adapter.scaling * adapter.B[e] @ (adapter.A[e] @ x[t])
            assert rel_err(mapped[t, k], expected) < 1e-5
            total = total + weights[t, k] * (back[e] @ mapped[t, k])
        assert rel_err(reduced[t], total) < 1e-5


def test_references_under_autocast_compute_as_autocast_and_keep_the_inputs_dtype():
    """An fp32 model trained under autocast (trl's default bf16, also on the CPU): the references, like transformers'
    loops over experts, run their products as autocast runs F.linear, in bf16, and return the inputs' dtype."""
    (x, index, weight, adapter), _ = _map_inputs(13, 40, 24, 4, 2, 3, lora=True)
    weights = torch.rand(13, 2)
    back = torch.randn(4, 40, 24) / 24**0.5
    with torch.no_grad(), reference_only(), torch.autocast("cpu", dtype=torch.bfloat16):
        mapped = expert_map(x, index, weight, adapter)
        reduced = expert_reduce(mapped, index, weights, back)
    assert mapped.dtype == reduced.dtype == torch.float32
    bf16 = ExpertLora(adapter.A.bfloat16(), adapter.B.bfloat16(), adapter.scaling)
    with torch.no_grad():
        expected = reference_expert_map(x.bfloat16(), index, weight.bfloat16(), bf16).float()
        assert torch.equal(mapped, expected)
        expected = reference_expert_reduce(mapped.bfloat16(), index, weights, back.bfloat16(), None)
        assert rel_err(reduced, expected.float()) < 1e-2


# --------------------------------------------------------------------------------------------------------
# NF4 weights: Triton (interpreter) vs the reference on the dequantized stack, and vs the 16-bit op on the Triton
# dequantization (the semantics the NF4 ops promise)
# --------------------------------------------------------------------------------------------------------


def _check_nf4(nf4_fn, dense_fn, args, nf4_at, params, tol):
    out, grads = output_and_grads(nf4_fn, args, params)
    with reference_only():
        ref, ref_grads = output_and_grads(nf4_fn, args, params)
    dense_args = (*args[:nf4_at], dequantize_nf4(args[nf4_at]), *args[nf4_at + 1:])
    dense, dense_grads = output_and_grads(dense_fn, dense_args, params)
    assert out.shape == ref.shape == dense.shape and out.dtype == ref.dtype
    for got, want, other in zip((out, *grads), (ref, *ref_grads), (dense, *dense_grads)):
        assert got.shape == want.shape
        assert rel_err(got, want) < tol
        assert rel_err(got, other) < tol


NF4_SHAPES = [
    # N and K not multiples of the GEMM blocks, rows not on absmax blocks; expert 3 gets no token
    pytest.param(13, 40, 24, 4, 2, 3, 3, False, id="odd"),
    pytest.param(30, 24, 24, 8, 1, 2, 3, False, id="k1-idle-experts"),
    # rows of 128 and 192 (on absmax blocks), double-quantized absmax (more than one 256-block per expert)
    pytest.param(20, 192, 128, 4, 2, 4, None, True, id="aligned-double-quant"),
]


@pytest.mark.parametrize("num_tokens,hidden,out_features,num_experts,top_k,rank,used,double_quant", NF4_SHAPES)
@pytest.mark.parametrize("lora", [True, False])
def test_expert_map_nf4(num_tokens, hidden, out_features, num_experts, top_k, rank, used, double_quant, lora):
    (x, index, weight, adapter), params = _map_inputs(num_tokens, hidden, out_features, num_experts, top_k, rank,
                                                      lora, used)
    nf4 = quantize_nf4(weight.detach(), double_quant)
    params = [x, *params[2:]]  # the NF4 weight is frozen
    _check_nf4(expert_map_nf4, expert_map, (x, index, nf4, adapter), 2, params, 1e-5)


@pytest.mark.parametrize("num_tokens,hidden,in_features,num_experts,top_k,rank,used,double_quant", NF4_SHAPES)
@pytest.mark.parametrize("lora", [True, False])
def test_expert_reduce_nf4(num_tokens, hidden, in_features, num_experts, top_k, rank, used, double_quant, lora):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    index, weights = random_routing(num_tokens, num_experts, top_k, used, generator=gen)
    weights.requires_grad_()
    x = torch.randn(num_tokens, top_k, in_features, requires_grad=True)
    nf4 = quantize_nf4(torch.randn(num_experts, hidden, in_features) / in_features**0.5, double_quant)
    params = [x, weights]
    adapter = None
    if lora:
        adapter, lora_params = random_expert_lora(num_experts, rank, hidden, in_features, torch.float32, "cpu")
        params += lora_params
    _check_nf4(expert_reduce_nf4, expert_reduce, (x, index, weights, nf4, adapter), 3, params, 1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_expert_map_reduce_nf4_torch_products(double_quant, monkeypatch):
    """NF4 stacks dequantized whole for torch's grouped GEMM, the kernels as its epilogues: map and reduce with LoRA,
    forward and backward, against the reference on the dequantized stacks; all four products take that path."""
    from fastmoe.kernels.moe.grouped_gemm import base_products

    (x, index, weight, lora_map), params = _map_inputs(13, 128, 64, 4, 2, 3, True, 3)
    w_map = quantize_nf4(weight.detach(), double_quant)
    w_reduce = quantize_nf4(torch.randn(4, 128, 64) / 8, double_quant)
    weights = torch.rand(13, 2).requires_grad_()
    lora_reduce, reduce_params = random_expert_lora(4, 3, 128, 64, torch.float32, "cpu")
    params = [x, *params[2:], weights, *reduce_params]

    def block(x, index, weights, w_map, w_reduce, lora_map, lora_reduce):
        return expert_reduce_nf4(expert_map_nf4(x, index, w_map, lora_map), index, weights, w_reduce, lora_reduce)

    args = (x, index, weights, w_map, w_reduce, lora_map, lora_reduce)
    calls = count_expert_products(monkeypatch)
    with base_products("torch"):
        out, grads = output_and_grads(block, args, params)
    assert len(calls) == 4
    with reference_only():
        ref, ref_grads = output_and_grads(block, args, params)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert rel_err(got, want) < 1e-5


def test_nf4_map_reduce_run_the_kernels_not_the_reference(monkeypatch):
    """The comparisons above would pass trivially if the NF4 ops fell back to their reference."""
    from fastmoe.kernels.moe import expert_map_reduce

    def refuse(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(expert_map_reduce, "reference_expert_map", refuse)
    monkeypatch.setattr(expert_map_reduce, "reference_expert_reduce", refuse)
    (x, index, weight, adapter), _ = _map_inputs(9, 40, 24, 4, 2, 3, True)
    nf4 = quantize_nf4(weight.detach())
    back = quantize_nf4(weight.detach().transpose(1, 2).contiguous())
    expert_reduce_nf4(expert_map_nf4(x, index, nf4, adapter), index, torch.rand(9, 2), back).sum().backward()
    assert x.grad is not None and adapter.A.grad is not None


# --------------------------------------------------------------------------------------------------------
# GPU, bf16
# --------------------------------------------------------------------------------------------------------


def _gpu_check(fn, args, params, ref_args):
    out, grads = output_and_grads(fn, args, params)
    with reference_only():
        ref, ref_grads = output_and_grads(fn, ref_args, params)
    assert rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("by", ["triton", "torch"])
def test_expert_map_reduce_gpu_bf16(by, monkeypatch):
    from fastmoe.kernels.moe.grouped_gemm import base_products

    torch.manual_seed(0)
    index, weights = random_routing(2048, 8, 2, device="cuda")
    weights.requires_grad_()
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_map = (torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16) / 512**0.5).requires_grad_()
    w_red = (torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16) / 256**0.5).requires_grad_()
    lora_map, p_map = random_expert_lora(8, 16, 256, 512, torch.bfloat16, "cuda")
    lora_red, p_red = random_expert_lora(8, 16, 512, 256, torch.bfloat16, "cuda")
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731

    def block(x, index, weights, w_map, w_red, lora_map, lora_red):
        return expert_reduce(expert_map(x, index, w_map, lora_map), index, weights, w_red, lora_red)

    params = [x, weights, w_map, w_red] + p_map + p_red
    args = (x, index, weights, w_map, w_red, lora_map, lora_red)
    ref_args = (x.float(), index, weights, w_map.float(), w_red.float(), up(lora_map), up(lora_red))
    products = count_expert_products(monkeypatch)
    with base_products(by):
        _gpu_check(block, args, params, ref_args)
    assert len(products) == (4 if by == "torch" else 0)  # forward and backward (autograd's device thread)


@gpu
@needs_cuda
@pytest.mark.parametrize("double_quant", [False, True])
def test_expert_map_reduce_nf4_gpu_bf16(double_quant):
    """bf16 NF4 weights (register decode on rows of 512 and 256) against the fp32 reference on the same NF4 codes."""
    torch.manual_seed(0)
    index, weights = random_routing(2048, 8, 2, device="cuda")
    weights.requires_grad_()
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_map = quantize_nf4(torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16) / 512**0.5, double_quant)
    w_red = quantize_nf4(torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16) / 256**0.5, double_quant)
    lora_map, p_map = random_expert_lora(8, 16, 256, 512, torch.bfloat16, "cuda")
    lora_red, p_red = random_expert_lora(8, 16, 512, 256, torch.bfloat16, "cuda")
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731

    def block(x, index, weights, w_map, w_red, lora_map, lora_red):
        return expert_reduce_nf4(expert_map_nf4(x, index, w_map, lora_map), index, weights, w_red, lora_red)

    def dense_block(x, index, weights, w_map, w_red, lora_map, lora_red):
        return expert_reduce(expert_map(x, index, w_map, lora_map), index, weights, w_red, lora_red)

    params = [x, weights] + p_map + p_red
    out, grads = output_and_grads(block, (x, index, weights, w_map, w_red, lora_map, lora_red), params)
    ref_args = (x.float(), index, weights, dequantize_nf4(w_map, torch.float32), dequantize_nf4(w_red, torch.float32),
                up(lora_map), up(lora_red))
    with reference_only():
        ref, ref_grads = output_and_grads(dense_block, ref_args, params)
    assert rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


@pytest.mark.parametrize("needs_x, needs_weights", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("rows, width, dtype", [(7, 37, torch.float32), (3, 2100, torch.float32),
                                                (5, 64, torch.float16)])
def test_weighted_pair_grads_kernel_matches_torch(needs_x, needs_weights, rows, width, dtype):
    """expert_reduce's backward from the unweighted row gradients: d(x) = w * gx and d(w) = <gx, x>, by the Triton
    kernel (one column block, two, fp16 rows) against the torch computation it replaces; what is not asked for is
    None."""
    from fastmoe.kernels.moe.expert_map_reduce import _weighted_pair_grads

    gen = torch.Generator().manual_seed(0)
    gx, x = (torch.randn(rows, width, generator=gen).to(dtype) for _ in range(2))
    pair_weights = torch.rand(rows, generator=gen)
    got = _weighted_pair_grads(gx, x, pair_weights, needs_x, needs_weights)
    with reference_only():
        expected = _weighted_pair_grads(gx, x, pair_weights, needs_x, needs_weights)
    for got_grad, expected_grad, needed in zip(got, expected, (needs_x, needs_weights)):
        if not needed:
            assert got_grad is None and expected_grad is None
            continue
        assert got_grad.dtype == expected_grad.dtype and got_grad.shape == expected_grad.shape
        assert rel_err(got_grad, expected_grad) < 1e-6
