import pytest
import torch

from fastmoe.kernels import reference_only
from fastmoe.kernels.custom_op import always_custom_ops
from fastmoe.kernels.moe import routing
from fastmoe.kernels.moe.routing import (
    ONE_PROGRAM_PAIRS,
    ROUTER_GEMV_TOKENS,
    reference_router_topk,
    router_topk,
    reference_route_sigmoid_topk,
    reference_route_softmax_topk,
    reference_sort_by_expert,
    route_sigmoid_topk,
    route_softmax_topk,
    sort_by_expert,
)
from testing_utils import rel_err

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _grads(fn, logits, *args):
    logits = logits.detach().clone().requires_grad_()
    weights, index = fn(logits, *args)
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1)).to(weights.device)
    (grad,) = torch.autograd.grad(weights, logits, upstream)
    return weights, index, grad


def _compare(fn, logits, *args, tol=1e-5, max_index_mismatch=0.0):
    weights, index, grad = _grads(fn, logits, *args)
    with reference_only():
        ref_weights, ref_index, ref_grad = _grads(fn, logits, *args)
    assert weights.dtype == torch.float32 and index.dtype == torch.int64
    # On GPU, tl.sigmoid and torch.sigmoid may differ by an ulp and swap two nearly equal scores.
    mismatch = (index != ref_index).any(dim=-1)
    assert mismatch.float().mean().item() <= max_index_mismatch
    keep = ~mismatch
    weights, ref_weights, index = weights[keep], ref_weights[keep], index[keep]
    grad, ref_grad = grad[keep], ref_grad[keep]
    assert rel_err(weights, ref_weights) < tol
    # With normalize and k=1 the weight is s/(s+eps) == 1: its true gradient is ~eps and both paths return
    # rounding noise, so the gradient error is measured against an RMS floor of 1e-2 (true gradients here are ~0.1).
    floor = 1e-2 * max(ref_grad.numel(), 1) ** 0.5
    assert (grad.float() - ref_grad.float()).norm().item() / max(ref_grad.float().norm().item(), floor) < tol


# AFMoE (normalize, eps 1e-20), LFM2-MoE (eps 1e-6, optional normalize), no bias
SIGMOID_CASES = [
    (True, True, 1e-20, 2.5),
    (True, True, 1e-6, 1.0),
    (True, False, 1e-6, 1.5),
    (False, True, 1e-6, 1.0),
]


@pytest.mark.parametrize("num_tokens", [1, 37, 64])
@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (12, 4), (6, 6)])
@pytest.mark.parametrize("with_bias,normalize,norm_eps,scale", SIGMOID_CASES)
def test_route_sigmoid_topk_matches_reference(num_tokens, num_experts, top_k, with_bias, normalize, norm_eps, scale):
    torch.manual_seed(0)
    logits = torch.randn(num_tokens, num_experts)
    bias = torch.randn(num_experts) * 0.1 if with_bias else None
    _compare(route_sigmoid_topk, logits, bias, top_k, normalize, norm_eps, scale)


@pytest.mark.parametrize("num_tokens", [1, 37, 64])
@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 2), (5, 5)])
def test_route_softmax_topk_matches_reference(num_tokens, num_experts, top_k):
    torch.manual_seed(0)
    _compare(route_softmax_topk, torch.randn(num_tokens, num_experts), top_k)


def test_reference_sigmoid_matches_transformers_routers():
    """AFMoE's and LFM2-MoE's router code, written out as in transformers (no ties: topk order is unique)."""
    torch.manual_seed(0)
    logits, bias = torch.randn(50, 16), torch.randn(16) * 0.1
    scores = torch.sigmoid(logits)
    _, selected = torch.topk(scores + bias, k=4, dim=1)
    top = scores.gather(1, selected)
    afmoe = top / (top.sum(-1, keepdim=True) + 1e-20) * 2.5
    weights, index = reference_route_sigmoid_topk(logits, bias, 4, True, 1e-20, 2.5)
    assert torch.equal(index, selected) and rel_err(weights, afmoe) < 1e-6

    lfm_weights, lfm_selected = torch.topk(scores, k=4, dim=-1)
    lfm_weights = lfm_weights / (lfm_weights.sum(-1, keepdim=True) + 1e-6) * 1.5
    weights, index = reference_route_sigmoid_topk(logits, None, 4, True, 1e-6, 1.5)
    assert torch.equal(index, lfm_selected) and rel_err(weights, lfm_weights) < 1e-6


def test_reference_softmax_matches_jetmoe_router():
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    top_logits, top_index = logits.topk(2, dim=1)
    weights, index = reference_route_softmax_topk(logits, 2)
    assert torch.equal(index, top_index) and rel_err(weights, torch.softmax(top_logits, dim=1)) < 1e-6


def test_ties_pick_lowest_expert():
    # Logits from a handful of values: most rows have ties, and bias 0 keeps them.
    torch.manual_seed(0)
    logits = torch.randint(-2, 3, (48, 10)).float()
    _compare(route_sigmoid_topk, logits, torch.zeros(10), 4, True, 1e-20, 1.0)
    _compare(route_sigmoid_topk, logits, None, 3, False, 1e-6, 1.0)
    _compare(route_softmax_topk, logits, 3)
    _, index = route_softmax_topk(torch.zeros(3, 6), 4)
    assert index.tolist() == [[0, 1, 2, 3]] * 3


def test_fp16_logits_under_interpreter():
    torch.manual_seed(0)
    logits = torch.randn(33, 12).half()
    _compare(route_sigmoid_topk, logits, torch.randn(12) * 0.1, 4, True, 1e-20, 2.0, tol=1e-3)
    _compare(route_softmax_topk, logits, 2, tol=1e-3)


def _router_case(num_tokens, num_experts, hidden_size, sigmoid, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(num_experts, hidden_size, generator=generator) / hidden_size**0.5).to(device, dtype)
    bias = (torch.randn(num_experts, generator=generator) * 0.1).to(device) if sigmoid else None
    return hidden, weight, bias


# Decode-sized token counts (1, odd, the limit), experts not a multiple of the program's block, top-1 and top-all,
# hidden sizes not a multiple of the K step: sigmoid routing with and without bias and normalisation, and softmax.
@pytest.mark.parametrize("num_tokens", [1, 5, ROUTER_GEMV_TOKENS])
@pytest.mark.parametrize("num_experts,top_k,hidden_size", [(32, 4, 96), (12, 1, 70), (6, 6, 40), (130, 8, 64)])
@pytest.mark.parametrize("sigmoid,with_bias,normalize,norm_eps,scale",
                         [(True, True, True, 1e-20, 2.5), (True, False, False, 1e-6, 1.5),
                          (False, False, False, 0.0, 1.0)])
def test_router_topk_in_one_launch_matches_reference(num_tokens, num_experts, top_k, hidden_size, sigmoid, with_bias,
                                                     normalize, norm_eps, scale):
    hidden, weight, bias = _router_case(num_tokens, num_experts, hidden_size, sigmoid)
    bias = bias if with_bias else None
    if num_tokens == 5:  # any strides: hidden a column-major view, the weight a transposed one
        hidden = hidden.t().contiguous().t()
        weight = weight.t().contiguous().t()
    with torch.no_grad():
        logits, weights, index = router_topk(hidden, weight, bias, top_k, sigmoid, normalize, norm_eps, scale)
    ref_logits, ref_weights, ref_index = reference_router_topk(hidden, weight, bias, top_k, sigmoid, normalize,
                                                               norm_eps, scale)
    assert logits.dtype == hidden.dtype and weights.dtype == torch.float32 and index.dtype == torch.int64
    assert weights.grad_fn is None
    assert rel_err(logits, ref_logits) < 1e-5
    assert torch.equal(index, ref_index)
    assert rel_err(weights, ref_weights) < 1e-5


def test_router_topk_with_autograd_or_many_tokens_takes_the_gemm_and_routing_kernels():
    """With autograd (training) the weights are differentiable through the GEMM and the routing op; beyond
    ROUTER_GEMV_TOKENS tokens the GEMM runs too. Both equal the reference, gradients included."""
    hidden, weight, bias = _router_case(ROUTER_GEMV_TOKENS + 3, 12, 40, sigmoid=True)
    with torch.no_grad():
        logits, weights, index = router_topk(hidden, weight, bias, 4, True, True, 1e-6, 1.0)
    ref_logits, ref_weights, ref_index = reference_router_topk(hidden, weight, bias, 4, True, True, 1e-6, 1.0)
    assert rel_err(logits, ref_logits) < 1e-5 and torch.equal(index, ref_index) and rel_err(weights, ref_weights) < 1e-5
    hidden = hidden[:3].clone().requires_grad_()
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (router_topk, reference_router_topk):
        logits, weights, index = fn(hidden, weight, bias, 4, True, True, 1e-6, 1.0)
        grads.append(torch.autograd.grad((weights * upstream).sum() + logits.sum(), hidden)[0])
    assert rel_err(grads[0], grads[1]) < 1e-5


def test_router_topk_custom_op_and_its_fake():
    """The one-launch router as torch.compile sees it: the custom op's outputs equal the eager call's, and its fake
    gives their shapes and dtypes."""
    hidden, weight, bias = _router_case(3, 20, 48, sigmoid=True)
    with torch.no_grad():
        expected = router_topk(hidden, weight, bias, 4, True, True, 1e-6, 2.0)
        with always_custom_ops():
            got = router_topk(hidden, weight, bias, 4, True, True, 1e-6, 2.0)
    fake = routing._router_topk_fake(hidden, weight, bias, 4, True, True, 1e-6, 2.0)
    for g, e, f in zip(got, expected, fake):
        assert torch.equal(g, e) and g.shape == f.shape and g.dtype == f.dtype


# 255 and 256 experts: the widest uint8 sort key and the first int16 one. On CUDA (a GPU test) the sort is CUB's
# radix sort, whose passes depend on the key's width.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, needs_cuda])])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m",
                         [(1, 8, 2, 4), (37, 12, 4, 4), (64, 6, 6, 16), (20, 16, 1, 8), (90, 255, 4, 8),
                          (70, 256, 8, 16)])
def test_sort_by_expert(num_tokens, num_experts, top_k, block_m, device):
    torch.manual_seed(0)
    # Only the first half of the experts and the last receive tokens: the others must get no tile.
    used = max(1, num_experts // 2) if top_k <= num_experts // 2 else num_experts
    index = torch.stack([torch.randperm(used)[:top_k] for _ in range(num_tokens)])
    index[0, 0] = num_experts - 1  # the largest id the key holds
    schedule = sort_by_expert(index.to(device), num_experts, block_m)
    schedule = type(schedule)(**{name: value.cpu() if isinstance(value, torch.Tensor) else value
                                 for name, value in vars(schedule).items()})
    flat = index.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(schedule.expert_offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    pair = schedule.sorted_pair.long()
    assert torch.equal(torch.sort(pair).values, torch.arange(flat.numel()))
    assert torch.equal(flat[pair], torch.sort(flat).values)
    assert torch.equal(schedule.sorted_token.long(), pair // top_k)
    covered = torch.zeros(flat.numel(), dtype=torch.long)
    for expert, start in zip(schedule.tile_expert.tolist(), schedule.tile_row_start.tolist()):
        if expert < 0:
            continue
        end = min(start + block_m, int(schedule.expert_offsets[expert + 1]))
        assert start >= int(schedule.expert_offsets[expert]) and end > start
        covered[start:end] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    tiles_used = (schedule.tile_expert >= 0).sum().item()
    assert tiles_used == ((counts + block_m - 1) // block_m).sum().item()


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m",
                         [(1, 8, 2, 4), (25, 12, 4, 4), (1, 128, 8, 64), (16, 128, 8, 64), (3, 5, 5, 16), (9, 33, 1, 16)])
def test_one_program_schedule_is_the_reference_schedule(num_tokens, num_experts, top_k, block_m):
    """Up to ONE_PROGRAM_PAIRS pairs one Triton program builds the schedule: exactly PyTorch's, experts without
    tokens and top-k=1 included; beyond, the PyTorch one runs."""
    torch.manual_seed(num_tokens)
    used = max(1, num_experts // 2) if top_k <= num_experts // 2 else num_experts
    index = torch.stack([torch.randperm(used)[:top_k] for _ in range(num_tokens)])
    index[0, 0] = num_experts - 1  # the largest id the key holds
    assert index.numel() <= ONE_PROGRAM_PAIRS
    got, expected = sort_by_expert(index, num_experts, block_m), reference_sort_by_expert(index, num_experts, block_m)
    for name in ("sorted_pair", "sorted_token", "expert_offsets", "tile_expert", "tile_row_start"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
        assert getattr(got, name).dtype == torch.int32


# Chunks of 512 pairs at 8 experts, of 64 at 128 (the second: 75 chunks, two blocks of chunks in the middle
# program); 37 experts round up to 64 columns; top-k 1; 5 experts all used.
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m",
                         [(1000, 8, 2, 128), (600, 128, 8, 16), (300, 37, 4, 64), (700, 5, 1, 16), (65, 8, 2, 4)])
def test_chunked_schedule_is_the_reference_schedule(num_tokens, num_experts, top_k, block_m):
    """Past ONE_PROGRAM_PAIRS three launches build the schedule (chunk counts, offsets and tiles, placement):
    exactly PyTorch's, experts without tokens included."""
    torch.manual_seed(num_tokens)
    used = max(1, num_experts // 2) if top_k <= num_experts // 2 else num_experts
    index = torch.stack([torch.randperm(used)[:top_k] for _ in range(num_tokens)])
    index[0, 0] = num_experts - 1
    assert index.numel() > ONE_PROGRAM_PAIRS
    got = routing._schedule_in_chunks(index, num_experts, block_m)
    expected = reference_sort_by_expert(index, num_experts, block_m)
    for name in ("sorted_pair", "sorted_token", "expert_offsets", "tile_expert", "tile_row_start"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
        assert getattr(got, name).dtype == torch.int32


def test_each_schedule_builder_runs_at_its_sizes(monkeypatch):
    """One program up to ONE_PROGRAM_PAIRS pairs, the chunked kernels beyond up to CHUNKED_SCHEDULE_MAX_EXPERTS
    experts, PyTorch past that."""
    calls = []
    for builder in ("_schedule_one_program", "_schedule_in_chunks"):
        monkeypatch.setattr(routing, builder,
                            lambda *a, name=builder: calls.append(name) or reference_sort_by_expert(*a))
    monkeypatch.setattr(routing, "reference_sort_by_expert",
                        lambda *a, original=reference_sort_by_expert: calls.append("torch") or original(*a))
    small = torch.randint(0, 8, (ONE_PROGRAM_PAIRS // 2, 2))
    large = torch.randint(0, 8, (ONE_PROGRAM_PAIRS // 2 + 1, 2))
    sort_by_expert(small, 8, 16)
    sort_by_expert(large, 8, 16)
    sort_by_expert(large, routing.CHUNKED_SCHEDULE_MAX_EXPERTS + 1, 16)
    assert calls == ["_schedule_one_program", "_schedule_in_chunks", "torch"]


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(4096, 128, 8), (4096, 32, 4), (1000, 8, 2)])
def test_routing_gpu(num_tokens, num_experts, top_k):
    torch.manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(num_experts, device="cuda") * 0.01
    _compare(route_sigmoid_topk, logits, bias, top_k, True, 1e-20, 2.5, tol=1e-2, max_index_mismatch=1e-2)
    _compare(route_softmax_topk, logits, top_k, tol=1e-2, max_index_mismatch=1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_one_program_schedule_on_gpu(num_tokens):
    torch.manual_seed(num_tokens)
    index = torch.stack([torch.randperm(128)[:8] for _ in range(num_tokens)]).cuda()
    got, expected = sort_by_expert(index, 128, 64), reference_sort_by_expert(index, 128, 64)
    for name in ("sorted_pair", "sorted_token", "expert_offsets", "tile_expert", "tile_row_start"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m",
                         [(4096, 128, 8, 128), (4096, 32, 4, 128), (4096, 8, 2, 128), (16384, 8, 2, 128),
                          (333, 60, 4, 64)])
def test_chunked_schedule_on_gpu(num_tokens, num_experts, top_k, block_m):
    """The training sizes (Trinity-Mini's, LFM2-8B-A1B's, JetMoe's routing of 4,096 and 16,384 tokens) exactly as
    PyTorch sorts them."""
    torch.manual_seed(num_tokens)
    index = torch.rand(num_tokens, num_experts, device="cuda").topk(top_k, dim=1).indices
    got = sort_by_expert(index, num_experts, block_m)
    expected = reference_sort_by_expert(index, num_experts, block_m)
    for name in ("sorted_pair", "sorted_token", "expert_offsets", "tile_expert", "tile_row_start"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 8, ROUTER_GEMV_TOKENS])
@pytest.mark.parametrize("num_experts,top_k,sigmoid", [(128, 8, True), (32, 4, True), (8, 2, False), (60, 4, False)])
def test_router_topk_gpu(num_tokens, num_experts, top_k, sigmoid):
    """bf16 at the routers' real sizes (Trinity-Mini's 128 experts, LFM2-8B-A1B's 32, Mixtral's 8, Qwen1.5-MoE's
    60; hidden 2048) against the reference's GEMM and routing; indices may differ where two scores round alike."""
    hidden, weight, bias = _router_case(num_tokens, num_experts, 2048, sigmoid, torch.bfloat16, "cuda", seed=num_tokens)
    with torch.no_grad():
        logits, weights, index = router_topk(hidden, weight, bias, top_k, sigmoid, sigmoid, 1e-20, 2.5)
        ref_logits, ref_weights, ref_index = reference_router_topk(hidden, weight, bias, top_k, sigmoid, sigmoid,
                                                                   1e-20, 2.5)
    assert rel_err(logits, ref_logits) < 1e-2
    same = (index == ref_index).all(dim=-1)
    assert same.float().mean().item() >= 0.9
    assert rel_err(weights[same], ref_weights[same]) < 1e-2
