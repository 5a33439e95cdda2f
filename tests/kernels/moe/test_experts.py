import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastmoe.kernels import reference_only
from fastmoe.kernels.moe.experts import ExpertLora, moe_experts, reference_moe_experts
from testing_utils import (check_against_reference, check_torch_products_against_reference, count_expert_products,
                           output_and_grads, random_expert_lora, random_routing, rel_err)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _experts_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, dtype=torch.float32, device="cpu",
                    used_experts=None, lora=True, train_weights=True, permuted=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    index, weights = random_routing(num_tokens, num_experts, top_k, used_experts, device, gen)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    weights = weights.to(device).requires_grad_()
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device) / hidden**0.5)
    down = (torch.randn(num_experts, hidden, inter, dtype=dtype, device=device) / inter**0.5)
    gate_up.requires_grad_(train_weights), down.requires_grad_(train_weights)
    params = [x, weights] + ([gate_up, down] if train_weights else [])
    gu_lora = down_lora = None
    if lora:
        gu_lora, gu_params = random_expert_lora(num_experts, rank, 2 * inter, hidden, dtype, device, permuted)
        down_lora, down_params = random_expert_lora(num_experts, rank, hidden, inter, dtype, device, permuted)
        params += gu_params + down_params
    return (x, index, weights, gate_up, down, gu_lora, down_lora), params


def _eager_pair_loop(x, index, weights, gate_up, down, gu_lora, down_lora):
    """The semantics spelled out one (token, slot) at a time, independent of reference_moe_experts."""
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            gu = x[t] @ gate_up[e].T
            if gu_lora is not None:
                gu = gu + gu_lora.scaling * (gu_lora.B[e] @ (gu_lora.A[e] @ x[t]))
            h = F.silu(gu[:inter]) * gu[inter:]
            y = h @ down[e].T
            if down_lora is not None:
                y = y + down_lora.scaling * (down_lora.B[e] @ (down_lora.A[e] @ h))
            out[t] = out[t] + weights[t, k] * y
    return out


# --------------------------------------------------------------------------------------------------------
# Reference semantics
# --------------------------------------------------------------------------------------------------------


def test_reference_matches_pair_loop():
    args, params = _experts_inputs(9, 40, 24, 5, 2, 3)
    ref, ref_grads = output_and_grads(reference_moe_experts, args, params)
    loop, loop_grads = output_and_grads(_eager_pair_loop, args, params)
    assert rel_err(ref, loop) < 1e-5
    for a, b in zip(ref_grads, loop_grads):
        assert rel_err(a, b) < 1e-5


def test_reference_matches_transformers_eager_experts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.afmoe.modeling_afmoe import AfmoeExperts

    config = transformers.AfmoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=6,
                                      num_experts_per_tok=2, hidden_act="silu")
    config._experts_implementation = "eager"
    module = AfmoeExperts(config)
    (x, index, weights, gate_up, down, _, _), _ = _experts_inputs(11, 40, 24, 6, 2, 1, lora=False)
    with torch.no_grad():
        module.gate_up_proj.copy_(gate_up)
        module.down_proj.copy_(down)
    expected = module(x, index, weights)
    assert rel_err(reference_moe_experts(x, index, weights, gate_up, down), expected) < 1e-6
    assert rel_err(moe_experts(x, index, weights, gate_up, down), expected) < 1e-5


# --------------------------------------------------------------------------------------------------------
# Triton (interpreter) vs reference, fp32
# --------------------------------------------------------------------------------------------------------

# (tokens, hidden, inter, experts, top_k, rank, used_experts): odd H and I, k=1 and k=E, idle experts,
# one token, r=1 and r=8. Base weights are trained too (full fine-tuning).
EXPERT_SHAPES = [
    pytest.param(13, 40, 24, 6, 2, 3, None, id="odd-H-I"),
    pytest.param(1, 40, 24, 6, 2, 1, None, id="one-token-r1"),
    pytest.param(20, 32, 16, 4, 1, 8, None, id="k1-r8"),
    pytest.param(9, 24, 40, 4, 4, 8, None, id="k-equals-E"),
    pytest.param(40, 40, 24, 8, 2, 2, 3, id="idle-experts"),
    pytest.param(19, 40, 24, 6, 1, 2, 4, id="k1-idle-experts"),
    pytest.param(64, 16, 16, 3, 2, 4, None, id="64-tokens"),
]


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank,used", EXPERT_SHAPES)
def test_moe_experts_lora(num_tokens, hidden, inter, num_experts, top_k, rank, used):
    args, params = _experts_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used_experts=used)
    check_against_reference(moe_experts, args, params, 1e-5)


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank,used",
                         [EXPERT_SHAPES[i] for i in (0, 1, 2, 4)])  # odd sizes, one token, k=1, idle experts
def test_moe_experts_torch_products(num_tokens, hidden, inter, num_experts, top_k, rank, used, monkeypatch):
    """The base products by torch's grouped GEMM, the kernels as their epilogues (LoRA, SwiGLU and its backward,
    routing weights, scattered rows): the same outputs and gradients. All four products (gate_up and down forward,
    d(h) and d(x) backward) take that path."""
    args, params = _experts_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used_experts=used)
    check_torch_products_against_reference(moe_experts, args, params, 1e-5, monkeypatch)


@pytest.mark.parametrize("hidden,inter,num_experts,top_k,tokens,expected", [
    # GPU kernel time of the block (forward + backward, H100) with torch's products for both weights against none
    (4096, 14336, 8, 2, 4096, (True, True)),  # Mixtral-8x7B: 31% less
    (2048, 5632, 8, 2, 4096, (True, True)),  # JetMoe-8B at 4k: 12% less
    (2048, 5632, 8, 2, 16384, (True, True)),  # JetMoe-8B at 16k: 16% less
    (2048, 1792, 32, 4, 4096, (True, True)),  # LFM2-8B-A1B at 4k: 5% less
    (2048, 1024, 128, 8, 16384, (True, True)),  # Trinity-Mini at 16k: 3% less
    (2048, 1024, 128, 8, 4096, (True, False)),  # Trinity-Mini at 4k: 3% less; down's 5e8 multiply-adds an expert
    (2048, 768, 128, 8, 4096, (False, False)),  # Qwen3-30B-A3B at 4k: 1% more
    (2048, 768, 128, 8, 16384, (True, False)),  # Qwen3-30B-A3B at 16k: 1-2% more with both; down's K is 768
])
def test_auto_base_products_where_measured(hidden, inter, num_experts, top_k, tokens, expected):
    """"auto"'s rule takes torch's products (gate_up, down) where bench_moe_block measured them faster."""
    from fastmoe.kernels.moe.grouped_gemm import products_large_enough_for_torch

    gate_up, down = (torch.empty(num_experts, 2 * inter, hidden, device="meta"),
                     torch.empty(num_experts, hidden, inter, device="meta"))
    assert tuple(products_large_enough_for_torch(w.shape, tokens * top_k, num_experts)
                 for w in (gate_up, down)) == expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, needs_cuda])])
@pytest.mark.parametrize("block_m", [32, 64, 128])
@pytest.mark.parametrize("rank", [1, 16, 32])
def test_thin_products_in_row_parts(device, block_m, rank):
    """LoRA's thin products (x A^T, at most THIN_PRODUCT_COLUMNS columns) run one program per part of
    THIN_PRODUCT_ROWS rows of each tile (_thin_row_split): the same rows as whole tiles, gathered and scattered,
    including parts past an expert's last row and an expert without rows."""
    from fastmoe.kernels.moe.grouped_gemm import THIN_PRODUCT_ROWS, _thin_row_split, _weight_operand, grouped_mm
    from fastmoe.kernels.moe.routing import sort_by_expert

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    num_tokens, top_k, num_experts, k = 150, 2, 5, 200
    gen = torch.Generator().manual_seed(block_m + rank)
    index, _ = random_routing(num_tokens, num_experts, top_k, 4, "cpu", gen)  # expert 4 idle
    index = index.to(device)
    schedule = sort_by_expert(index, num_experts, block_m)
    x = torch.randn(num_tokens, k, generator=gen).to(device, dtype)
    a = torch.randn(num_experts, rank, k, generator=gen).to(device, dtype)
    rows = torch.arange(schedule.num_pairs, dtype=torch.int32, device=device)
    out = torch.full((schedule.num_pairs, rank), float("nan"), dtype=dtype, device=device)
    grouped_mm(x, schedule.sorted_token, a, schedule, out, rows, out_scale=0.5)
    split = _thin_row_split(_weight_operand(a, False, dtype, schedule), None, schedule)
    assert split == max(1, block_m // THIN_PRODUCT_ROWS)
    experts = index.reshape(-1)[schedule.sorted_pair.long()].long()
    expected = 0.5 * torch.einsum("sk,srk->sr", x[schedule.sorted_token.long()].double(), a[experts].double())
    assert rel_err(out.double(), expected) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rank", [1, 16])
def test_moe_experts_with_thin_products_in_row_parts(rank, monkeypatch):
    """The whole experts block, forward and backward, with 64-row schedule tiles (as at training sizes on a GPU), so
    that every LoRA thin product (x A^T forward, d(out) B and d(gate_up) B backward) runs in row parts: against the
    reference, with an idle expert and tiles past an expert's rows."""
    from fastmoe.kernels.moe import experts

    monkeypatch.setattr(experts, "gemm_block_m", lambda *args: 64)
    args, params = _experts_inputs(150, 40, 24, 5, 2, rank, used_experts=4)
    check_against_reference(moe_experts, args, params, 1e-5)


def test_moe_experts_no_lora_full_finetune():
    args, params = _experts_inputs(17, 40, 24, 5, 2, 1, lora=False)
    check_against_reference(moe_experts, args, params, 1e-5)


def test_moe_experts_frozen_base_permuted_lora_views():
    """peft-style: base weights frozen, LoRA factors are strided views; gradients reach the base tensors."""
    args, params = _experts_inputs(15, 40, 24, 5, 2, 4, train_weights=False, permuted=True)
    assert not args[5].A.is_contiguous() and not args[5].B.is_contiguous()
    check_against_reference(moe_experts, args, params, 1e-5)


def test_moe_experts_under_activation_checkpointing():
    """Everything the backward needs goes through save_for_backward, so non-reentrant checkpointing (which
    drops saved tensors and recomputes them) gives the same gradients."""
    from torch.utils.checkpoint import checkpoint

    args, params = _experts_inputs(12, 24, 16, 4, 2, 2)
    _, grads = output_and_grads(moe_experts, args, params)
    _, ckpt_grads = output_and_grads(lambda *a: checkpoint(moe_experts, *a, use_reentrant=False), args, params)
    for grad, ckpt_grad in zip(grads, ckpt_grads):
        assert rel_err(ckpt_grad, grad) < 1e-6


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_output_unused_skips_the_output_and_keeps_every_gradient(kernels):
    """Under output_unused (a checkpointed layer's recompute) the output holds NaN on the CPU, not its values, and
    every gradient (input, routing weights, base weights, LoRA) equals the block's own, on the kernels' path and the
    reference's; an odd shape with an expert left without tokens."""
    from fastmoe.kernels.moe import output_unused

    args, params = _experts_inputs(13, 24, 20, 5, 2, 3, used_experts=4)
    with contextlib.nullcontext() if kernels else reference_only():
        out, grads = output_and_grads(moe_experts, args, params)
        with output_unused():
            unused, unused_grads = output_and_grads(moe_experts, args, params)
    assert torch.isnan(unused).all() and not torch.isnan(out).any()
    for grad, unused_grad in zip(grads, unused_grads):
        assert rel_err(unused_grad, grad) < 1e-6


def test_moe_experts_only_gate_up_lora():
    (x, index, weights, gate_up, down, gu_lora, _), params = _experts_inputs(12, 24, 40, 4, 2, 2)
    check_against_reference(moe_experts, (x, index, weights, gate_up, down, gu_lora, None), params[:6], 1e-5)


def test_moe_experts_fp32_lora_on_fp16_base():
    """peft may keep the adapters in fp32 over a half-precision base (autocast_adapter_dtype)."""
    (x, index, weights, gate_up, down, gu_lora, down_lora), params = _experts_inputs(
        10, 40, 24, 4, 2, 4, dtype=torch.float16, train_weights=False)
    gu_lora = ExpertLora(gu_lora.A.detach().float().requires_grad_(), gu_lora.B.detach().float().requires_grad_(), 0.5)
    down_lora = ExpertLora(down_lora.A.detach().float().requires_grad_(),
                           down_lora.B.detach().float().requires_grad_(), 0.5)
    params = params[:2] + [gu_lora.A, gu_lora.B, down_lora.A, down_lora.B]
    out, grads = output_and_grads(moe_experts, (x, index, weights, gate_up, down, gu_lora, down_lora), params)
    assert out.dtype == torch.float16
    assert [g.dtype for g in grads[2:]] == [torch.float32] * 4
    ref_args = (x.float(), index, weights, gate_up.float(), down.float(), gu_lora, down_lora)
    with reference_only():
        ref, ref_grads = output_and_grads(moe_experts, ref_args, params)
    assert rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


def test_moe_experts_fp16_interpreter():
    args, params = _experts_inputs(16, 40, 24, 4, 2, 4, dtype=torch.float16)
    out, grads = output_and_grads(moe_experts, args, params)
    x, index, weights, gate_up, down, gu_lora, down_lora = args
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731
    ref_args = (x.float(), index, weights, gate_up.float(), down.float(), up(gu_lora), up(down_lora))
    with reference_only():
        ref, ref_grads = output_and_grads(moe_experts, ref_args, params)
    assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float16 or grad.dtype == torch.float32
        assert rel_err(grad, ref_grad) < 1e-2


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank,used",
                         [shape for shape in EXPERT_SHAPES if shape.values[0] > 1])  # one token: test_one_token.py
@pytest.mark.parametrize("permuted", [False, True], ids=["contiguous", "peft-views"])
def test_moe_experts_without_gradients_take_lora_in_the_tile(num_tokens, hidden, inter, num_experts, top_k, rank,
                                                             used, permuted, monkeypatch):
    """Decoding (nothing to differentiate, few pairs): the thin LoRA products are computed inside the expert GEMMs'
    tiles (grouped_mm_lora_in_tile), never by grouped_mm's separate launches, with the reference's output."""
    from fastmoe.kernels.moe import experts as experts_module

    args, _ = _experts_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used_experts=used,
                              train_weights=False, permuted=permuted, seed=1)
    with reference_only(), torch.no_grad():
        ref = moe_experts(*args)
    calls, in_tile = [], experts_module.grouped_mm_lora_in_tile

    def counted_in_tile(*a, **kw):
        calls.append(kw.get("swiglu", False))
        return in_tile(*a, **kw)

    monkeypatch.setattr(experts_module, "grouped_mm_lora_in_tile", counted_in_tile)
    monkeypatch.setattr(experts_module, "grouped_mm", None)  # the launches this path replaces
    with torch.no_grad():
        out = moe_experts(*args)
    assert calls == [True, False]
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------------------
# GPU, bf16
# --------------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param(256, 40, 24, 8, 2, 8, id="odd"),
    pytest.param(512, 256, 128, 16, 4, 1, id="r1"),
    pytest.param(4096, 2048, 1024, 128, 8, 16, id="trinity-mini"),
]
# Few wide experts (Mixtral-8x7B's shapes at 1,024 tokens), and a shape whose rows do not fill the tiles (16-byte
# rows for torch's GEMM: H and I multiples of 8).
GPU_PRODUCT_SHAPES = [
    pytest.param(1024, 4096, 14336, 8, 2, 16, id="mixtral"),
    pytest.param(600, 264, 136, 8, 2, 8, id="odd"),
]


def _gpu_check(fn, args, params, ref_args):
    out, grads = output_and_grads(fn, args, params)
    with reference_only():
        ref, ref_grads = output_and_grads(fn, ref_args, params)
    assert rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_moe_experts_without_gradients_gpu_bf16(num_tokens):
    """The decode path (LoRA in the tile) at Trinity-Mini's experts, bf16 against the fp32 reference."""
    args, _ = _experts_inputs(num_tokens, 2048, 1024, 128, 8, 16, dtype=torch.bfloat16, device="cuda",
                              train_weights=False, permuted=True)
    x, index, weights, gate_up, down, gu_lora, down_lora = args
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731
    with torch.no_grad():
        out = moe_experts(*args)
        with reference_only():
            ref = moe_experts(x.float(), index, weights, gate_up.float(), down.float(), up(gu_lora), up(down_lora))
    assert rel_err(out.float(), ref) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank", GPU_SHAPES)
def test_moe_experts_gpu_bf16(num_tokens, hidden, inter, num_experts, top_k, rank):
    args, params = _experts_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, dtype=torch.bfloat16,
                                   device="cuda", train_weights=num_tokens < 4096)
    x, index, weights, gate_up, down, gu_lora, down_lora = args
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731
    ref_args = (x.float(), index, weights, gate_up.float(), down.float(), up(gu_lora), up(down_lora))
    _gpu_check(moe_experts, args, params, ref_args)


@gpu
@needs_cuda
@pytest.mark.parametrize("by", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank", GPU_PRODUCT_SHAPES)
def test_moe_experts_gpu_bf16_base_products(num_tokens, hidden, inter, num_experts, top_k, rank, by, monkeypatch):
    from fastmoe.kernels.moe.grouped_gemm import base_products

    args, params = _experts_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, dtype=torch.bfloat16,
                                   device="cuda", train_weights=False, permuted=True)
    x, index, weights, gate_up, down, gu_lora, down_lora = args
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731
    ref_args = (x.float(), index, weights, gate_up.float(), down.float(), up(gu_lora), up(down_lora))
    products = count_expert_products(monkeypatch)
    with base_products(by):
        _gpu_check(moe_experts, args, params, ref_args)
    # Forward and backward each (the backward runs on autograd's device thread) take the chosen way.
    assert len(products) == (4 if by == "torch" else 0)


@gpu
@needs_cuda
def test_moe_experts_gpu_no_host_sync():
    """The whole block, routing sort included, must queue without waiting for the GPU."""
    args, params = _experts_inputs(512, 256, 128, 16, 4, 8, dtype=torch.bfloat16, device="cuda")
    output_and_grads(moe_experts, args, params)  # compile the kernels first: only the steady state is checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_experts(*args)
        torch.autograd.backward(out, torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_tokens, top_k, width, dtype", [
    (5, 2, 37, torch.float32), (3, 3, 1500, torch.float32), (4, 8, 64, torch.float16), (2, 4, 1024, torch.float32)])
def test_slot_sum_kernel_adds_the_slots_as_torch_does(num_tokens, top_k, width, dtype):
    """The (token, slot) rows summed over slots in fp32 and rounded once, by the Triton kernel (widths below, at
    and above one column block of 1,024) and by torch's sum: the same values."""
    from fastmoe.kernels.moe.experts import _sum_slots

    generator = torch.Generator().manual_seed(0)
    pairs = torch.randn(num_tokens * top_k, width, generator=generator).to(dtype)
    expected = pairs.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(dtype)
    got = _sum_slots(pairs, num_tokens, top_k, dtype)
    assert got.shape == (num_tokens, width) and got.dtype == dtype
    assert rel_err(got, expected) < 1e-6
    with reference_only():
        assert torch.equal(_sum_slots(pairs, num_tokens, top_k, dtype), expected)
