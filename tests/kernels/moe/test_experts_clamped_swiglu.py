"""gpt-oss's experts block (moe_experts_clamped_swiglu): weights stored (E, in, out) with gate and up interleaved,
biases on both projections, the clamped activation. Its reference against transformers' GptOssExperts, then the
Triton kernels (interpreter) against the reference, forward and backward, with pre-activations on both sides of
the clamp limits."""

import pytest
import torch

from fastmoe.kernels import reference_only
from fastmoe.kernels.moe import (ExpertLora, dequantize_nf4, moe_experts_clamped_swiglu,
                                 moe_experts_clamped_swiglu_nf4, quantize_nf4, reference_moe_experts_clamped_swiglu)
from testing_utils import (check_against_reference, check_torch_products_against_reference, count_expert_products,
                           output_and_grads, random_expert_lora, random_routing, rel_err)

ALPHA = 1.702
# Below gpt-oss's 7.0 so that the random pre-activations (about unit scale) cross it often, on both sides for up.
LIMIT = 0.8


def _inputs(num_tokens, hidden, inter, num_experts, top_k, rank, dtype=torch.float32, used_experts=None, lora=True,
            train_weights=True, seed=0, device="cpu", limit=LIMIT):
    gen = torch.Generator().manual_seed(seed)
    index, weights = random_routing(num_tokens, num_experts, top_k, used_experts, generator=gen)
    index = index.to(device)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    weights = weights.to(device).requires_grad_()
    gate_up = (torch.randn(num_experts, hidden, 2 * inter, generator=gen) * 1.5 / hidden**0.5).to(device, dtype)
    gate_up_bias = (torch.randn(num_experts, 2 * inter, generator=gen) * 0.3).to(device, dtype)
    down = (torch.randn(num_experts, inter, hidden, generator=gen) / inter**0.5).to(device, dtype)
    down_bias = (torch.randn(num_experts, hidden, generator=gen) * 0.3).to(device, dtype)
    base = [gate_up, gate_up_bias, down, down_bias]
    for t in base:
        t.requires_grad_(train_weights)
    params = [x, weights] + (base if train_weights else [])
    gu_lora = down_lora = None
    if lora:
        torch.manual_seed(seed)
        # peft's factors for (E, in, out) stacks: A (E, r, in), B (E, out, r).
        gu_lora, gu_params = random_expert_lora(num_experts, rank, 2 * inter, hidden, dtype, device, permuted=True)
        down_lora, down_params = random_expert_lora(num_experts, rank, hidden, inter, dtype, device, permuted=True)
        params += gu_params + down_params
    return (x, index, weights, gate_up, gate_up_bias, down, down_bias, ALPHA, limit, gu_lora, down_lora), params


def _crosses_the_limits(args) -> bool:
    """Whether some gate pre-activation is above the limit and some up ones beyond it on both sides."""
    x, index, _, gate_up, gate_up_bias, *_ = args
    with torch.no_grad():
        pre = torch.einsum("th,tkhn->tkn", x.float(), gate_up[index].float()) + gate_up_bias[index].float()
    gate, up = pre[..., ::2], pre[..., 1::2]
    return bool((gate > LIMIT).any() and (gate < LIMIT).any() and (up > LIMIT).any() and (up < -LIMIT).any())


def test_reference_matches_transformers_gpt_oss_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=40, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                          swiglu_limit=LIMIT)
    config._experts_implementation = "eager"
    module = GptOssExperts(config)
    args, _ = _inputs(11, 40, 24, 6, 2, 1, lora=False)
    x, index, weights, gate_up, gate_up_bias, down, down_bias, *_ = args
    assert _crosses_the_limits(args)
    with torch.no_grad():
        for name, value in zip(("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
                               (gate_up, gate_up_bias, down, down_bias)):
            getattr(module, name).copy_(value)
    expected = module(x, index, weights)
    assert rel_err(reference_moe_experts_clamped_swiglu(*args), expected) < 1e-6
    assert rel_err(moe_experts_clamped_swiglu(*args), expected) < 1e-5


# (tokens, hidden, inter, experts, top_k, rank, used_experts): odd H and I over several 32-wide blocks, k=1, idle
# experts, one token. Every base tensor is trained too (full fine-tuning), so the bias gradients are checked.
SHAPES = [
    pytest.param(13, 40, 36, 6, 2, 3, None, id="odd-H-I"),
    pytest.param(1, 40, 24, 6, 2, 1, None, id="one-token-r1"),
    pytest.param(21, 24, 40, 5, 1, 4, 3, id="k1-idle-experts"),
]


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank,used", SHAPES)
def test_kernels_match_the_reference_fp32(num_tokens, hidden, inter, num_experts, top_k, rank, used):
    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used_experts=used)
    if num_tokens > 1:
        assert _crosses_the_limits(args)
    check_against_reference(moe_experts_clamped_swiglu, args, params, 1e-5)


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank,used", SHAPES)
def test_torch_products_match_the_reference_fp32(num_tokens, hidden, inter, num_experts, top_k, rank, used,
                                                  monkeypatch):
    """The base products by torch's grouped GEMM through the (E, in, out) stacks' transposed views, the kernels as
    their epilogues (interleaved gate and up, biases, the clamped activation and its backward)."""
    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used_experts=used)
    check_torch_products_against_reference(moe_experts_clamped_swiglu, args, params, 1e-5, monkeypatch)


def test_frozen_base_lora_only():
    """peft's setting: base stacks and biases frozen, LoRA factors strided views of peft's weights."""
    args, params = _inputs(17, 40, 24, 5, 2, 4, train_weights=False, seed=2)
    assert not args[-2].A.is_contiguous() and not args[-2].B.is_contiguous()
    check_against_reference(moe_experts_clamped_swiglu, args, params, 1e-5)


def test_clamped_inputs_get_no_gradient():
    """With every pre-activation far beyond the limits h is constant in them: no gradient reaches x."""
    args, params = _inputs(6, 24, 16, 3, 2, 2, lora=False)
    x, index, weights, gate_up, gate_up_bias, down, down_bias, *_ = args
    # Gate far above the limit, up far above it: h = (limit + 1) * limit * sigmoid(alpha * limit) whatever x is.
    saturated_bias = torch.full_like(gate_up_bias, 50.0)
    out, (grad_x,) = output_and_grads(moe_experts_clamped_swiglu,
                                      (x, index, weights, gate_up, saturated_bias, down, down_bias, ALPHA, LIMIT),
                                      [x])
    assert grad_x.abs().max() == 0
    with reference_only():
        ref = moe_experts_clamped_swiglu(x, index, weights, gate_up, saturated_bias, down, down_bias, ALPHA, LIMIT)
    assert rel_err(out, ref) < 1e-5


def test_without_gradients_and_empty_input():
    args, _ = _inputs(9, 40, 24, 4, 2, 3, train_weights=False, seed=3)
    with torch.no_grad():
        out = moe_experts_clamped_swiglu(*args)
        with reference_only():
            ref = moe_experts_clamped_swiglu(*args)
    assert rel_err(out, ref) < 1e-5
    empty = (args[0][:0], args[1][:0], args[2][:0], *args[3:])
    assert moe_experts_clamped_swiglu(*empty).shape == (0, 40)


# NF4 (QLoRA): each stored stack quantized along its stored rows, read transposed by the kernels. (tokens, hidden,
# inter, experts, top_k, rank, used_experts, double_quant): stored rows off the 64-blocks (the flat-index decode),
# rows on them (the row-aligned decode), one token, k=1 with idle experts.
NF4_SHAPES = [
    pytest.param(13, 40, 24, 6, 2, 3, None, False, id="rows-off-blocks"),
    pytest.param(11, 64, 32, 4, 2, 4, None, True, id="rows-aligned-double-quant"),
    pytest.param(1, 40, 24, 6, 2, 1, None, False, id="one-token-r1"),
    pytest.param(19, 24, 40, 5, 1, 4, 3, False, id="k1-idle-experts"),
]


def _nf4_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used, double_quant, seed=0):
    """_inputs with both stacks quantized (frozen) and trained biases: (args, params, the dequantized args)."""
    args, params = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used_experts=used, seed=seed,
                           train_weights=False)
    x, index, weights, gate_up, gate_up_bias, down, down_bias, alpha, limit, gu_lora, down_lora = args
    gate_up_nf4, down_nf4 = quantize_nf4(gate_up, double_quant), quantize_nf4(down, double_quant)
    gate_up_bias.requires_grad_(), down_bias.requires_grad_()
    params = params + [gate_up_bias, down_bias]
    nf4_args = (x, index, weights, gate_up_nf4, gate_up_bias, down_nf4, down_bias, alpha, limit, gu_lora, down_lora)
    dense_args = (x, index, weights, dequantize_nf4(gate_up_nf4), gate_up_bias, dequantize_nf4(down_nf4), down_bias,
                  alpha, limit, gu_lora, down_lora)
    return nf4_args, params, dense_args


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,rank,used,double_quant", NF4_SHAPES)
def test_nf4_kernels_match_the_reference_fp32(num_tokens, hidden, inter, num_experts, top_k, rank, used,
                                              double_quant):
    args, params, dense_args = _nf4_inputs(num_tokens, hidden, inter, num_experts, top_k, rank, used, double_quant)
    if num_tokens > 1:
        assert _crosses_the_limits(dense_args)
    check_against_reference(moe_experts_clamped_swiglu_nf4, args, params, 1e-5)
    # The same function as the 16-bit block on the dequantized stacks, gradients included.
    out, grads = output_and_grads(moe_experts_clamped_swiglu_nf4, args, params)
    dense, dense_grads = output_and_grads(moe_experts_clamped_swiglu, dense_args, params)
    assert rel_err(out, dense) < 1e-5
    for grad, dense_grad in zip(grads, dense_grads):
        assert rel_err(grad, dense_grad) < 1e-5


def test_nf4_refuses_stacks_that_do_not_fit():
    args, _, _ = _nf4_inputs(5, 40, 24, 4, 2, 2, None, False)
    x, index, weights, gate_up, gate_up_bias, down, *rest = args
    with pytest.raises(ValueError, match="shapes do not fit"):
        moe_experts_clamped_swiglu_nf4(x, index, weights, down, gate_up_bias, gate_up, *rest)


def _check_against_fp32_reference(args, params):
    out, grads = output_and_grads(moe_experts_clamped_swiglu, args, params)
    x, index, weights, gate_up, gate_up_bias, down, down_bias, alpha, limit, gu_lora, down_lora = args
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731
    ref_args = (x.float(), index, weights, gate_up.float(), gate_up_bias.float(), down.float(), down_bias.float(),
                alpha, limit, up(gu_lora), up(down_lora))
    with reference_only():
        ref, ref_grads = output_and_grads(moe_experts_clamped_swiglu, ref_args, params)
    assert out.dtype == x.dtype and rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 7, 1000])
def test_bf16_gpu_at_gpt_oss_20b_shapes(num_tokens):
    """gpt-oss-20b's experts (hidden = inter = 2880, 32 experts, top-4), LoRA trained, bf16 against fp32, at
    gpt-oss's limit (7.0), which these pre-activations (about 1.5 in scale) do not reach. At the fp32 tests' 0.8 the
    bf16 rounding of the pre-activations moves some across the limit, where the activation's derivative jumps to 0:
    each such flip changes the input gradient by a whole term, 3-4% of it at these sizes (H200, 2026-12-03)."""
    args, params = _inputs(num_tokens, 2880, 2880, 32, 4, 16, dtype=torch.bfloat16, train_weights=False, seed=5,
                           device="cuda", limit=7.0)
    _check_against_fp32_reference(args, params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_gpu_torch_products_at_gpt_oss_20b_shapes(monkeypatch):
    """The same with the base products by torch's grouped GEMM (512 rows per expert), forward and backward."""
    from fastmoe.kernels.moe.grouped_gemm import base_products

    args, params = _inputs(4096, 2880, 2880, 32, 4, 16, dtype=torch.bfloat16, train_weights=False, seed=5,
                           device="cuda", limit=7.0)
    products = count_expert_products(monkeypatch)
    with base_products("torch"):
        _check_against_fp32_reference(args, params)
    assert len(products) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 7, 1000])
def test_nf4_bf16_gpu_at_gpt_oss_20b_shapes(num_tokens):
    """QLoRA at gpt-oss-20b's experts (double-quantized NF4, read transposed, the PTX decode on NVIDIA GPUs): bf16
    kernels against the fp32 reference on the dequantized stacks, at gpt-oss's limit (see above)."""
    args, params = _inputs(num_tokens, 2880, 2880, 32, 4, 16, dtype=torch.bfloat16, train_weights=False, seed=5,
                           device="cuda", limit=7.0)
    x, index, weights, gate_up, gate_up_bias, down, down_bias, alpha, limit, gu_lora, down_lora = args
    gate_up_nf4, down_nf4 = quantize_nf4(gate_up, double_quant=True), quantize_nf4(down, double_quant=True)
    out, grads = output_and_grads(moe_experts_clamped_swiglu_nf4, (x, index, weights, gate_up_nf4, gate_up_bias,
                                                                   down_nf4, down_bias, alpha, limit, gu_lora,
                                                                   down_lora), params)
    up = lambda lora: ExpertLora(lora.A.float(), lora.B.float(), lora.scaling)  # noqa: E731
    ref_args = (x.float(), index, weights, dequantize_nf4(gate_up_nf4).float(), gate_up_bias.float(),
                dequantize_nf4(down_nf4).float(), down_bias.float(), alpha, limit, up(gu_lora), up(down_lora))
    with reference_only():
        ref, ref_grads = output_and_grads(moe_experts_clamped_swiglu, ref_args, params)
    assert out.dtype == x.dtype and rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


def test_fp16_interpreter():
    args, params = _inputs(16, 40, 24, 4, 2, 4, dtype=torch.float16, seed=4)
    _check_against_fp32_reference(args, params)
