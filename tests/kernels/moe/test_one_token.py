"""The one-token experts block (batch-1 decoding, kernels/moe/one_token.py): its two GEMV launches against the exact
experts block, 16-bit and NF4, and moe_experts / moe_experts_nf4 taking it at one token when nothing is
differentiated."""

import pytest
import torch

from fastmoe.kernels import reference_only, split_k
from fastmoe.kernels.moe import experts as experts_module
from fastmoe.kernels.moe.experts import ExpertLora, moe_experts, moe_experts_nf4, reference_moe_experts
from fastmoe.kernels.moe.nf4 import Nf4Weight, absmax_fp32, quantize_nf4, reference_dequantize_nf4
from fastmoe.kernels.moe import one_token
from fastmoe.kernels.moe.one_token import one_token_experts
from testing_utils import random_expert_lora, random_routing, rel_err

gpu = pytest.mark.gpu

# (hidden, inter, experts, top_k, rank): K off the blocks, top-1, every expert chosen, ranks off 16.
SHAPES = [
    pytest.param(40, 24, 6, 2, 3, id="odd"),
    pytest.param(64, 48, 8, 1, 8, id="top1"),
    pytest.param(100, 70, 5, 5, 1, id="k-equals-E-r1"),
    pytest.param(64, 40, 12, 8, 16, id="top8"),
]


def _inputs(hidden, inter, num_experts, top_k, rank, dtype, device="cpu", permuted=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    index, weights = random_routing(1, num_experts, top_k, None, device, gen)
    x = torch.randn(1, hidden, dtype=dtype, device=device)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, dtype=dtype, device=device) / inter**0.5
    gu_lora, _ = random_expert_lora(num_experts, rank, 2 * inter, hidden, dtype, device, permuted)
    down_lora, _ = random_expert_lora(num_experts, rank, hidden, inter, dtype, device, permuted)
    return x, index, weights.to(dtype), gate_up, down, _detached(gu_lora), _detached(down_lora)


def _detached(lora):
    return ExpertLora(lora.A.detach(), lora.B.detach(), lora.scaling)


def _exact(x, index, weights, gate_up, down, gu_lora, down_lora):
    """The experts block in float64."""
    up = lambda lora: lora and ExpertLora(lora.A.double(), lora.B.double(), lora.scaling)  # noqa: E731
    return reference_moe_experts(x.double(), index, weights.double(), gate_up.double(), down.double(), up(gu_lora),
                                 up(down_lora))


def _factors(lora):
    return (lora.A, lora.B, lora.scaling) if lora is not None else (None, None, 0.0)


@pytest.mark.parametrize("hidden,inter,num_experts,top_k,rank", SHAPES)
@pytest.mark.parametrize("lora,dtype", [("both", torch.float32), ("both", torch.float16), ("gate_up", torch.float32),
                                        ("down", torch.float32), ("none", torch.float32)])
@pytest.mark.parametrize("down_xa_in_gate_up", [False, True], ids=["down-xa-in-down", "down-xa-in-gate-up"])
def test_one_token_experts_equal_the_exact_block(hidden, inter, num_experts, top_k, rank, lora, dtype,
                                                 down_xa_in_gate_up, monkeypatch):
    """Both launches split K in the interpreter (1-2 K steps a split), so their fix-ups run: the gate_up partials per
    (slot, block), and the down partials of every slot and split of a block summed by the last to arrive. The down
    LoRA's h A^T in the down programs or from gate_up's per-block partials (DOWN_XA_IN_GATE_UP)."""
    monkeypatch.setattr(one_token, "DOWN_XA_IN_GATE_UP", down_xa_in_gate_up)
    x, index, weights, gate_up, down, gu_lora, down_lora = _inputs(hidden, inter, num_experts, top_k, rank, dtype,
                                                                   permuted=lora == "both")
    gu_lora = gu_lora if lora in ("both", "gate_up") else None
    down_lora = down_lora if lora in ("both", "down") else None
    assert split_k.interpreter_split(hidden, 32) > 1 and top_k * split_k.interpreter_split(inter, 32) > 1
    out = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    assert out.shape == (1, hidden) and out.dtype == dtype
    assert rel_err(out.double(), _exact(x, index, weights, gate_up, down, gu_lora, down_lora)) < (
        1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("hidden,inter,num_experts,top_k,rank", SHAPES[:2] + [pytest.param(96, 40, 4, 3, 4,
                                                                                           id="rows-off-absmax")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_one_token_experts_nf4_equal_the_exact_block_on_the_dequantized_weights(hidden, inter, num_experts, top_k,
                                                                                  rank, double_quant):
    """NF4 stacks decoded in the kernels, the double-quantized absmax of the chosen experts only; rows-off-absmax:
    gate_up's rows (K = 96) and down's (K = 40) start inside an absmax block."""
    x, index, weights, gate_up, down, gu_lora, down_lora = _inputs(hidden, inter, num_experts, top_k, rank,
                                                                   torch.float32)
    gate_up, down = quantize_nf4(gate_up, double_quant), quantize_nf4(down, double_quant)
    out = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    exact = _exact(x, index, weights, reference_dequantize_nf4(gate_up), reference_dequantize_nf4(down), gu_lora,
                   down_lora)
    assert rel_err(out.double(), exact) < 1e-5


def test_a_double_quantized_absmax_decoded_in_the_kernels_equals_its_fp32_copy(monkeypatch):
    """The kernels decode a double-quantized absmax where they read it (nf4.absmax_values), as absmax_fp32's launch
    decodes the stack: the same block with that fp32 copy as a plain absmax gives bit-identical output, and so does
    the block that decodes the chosen experts' absmax first (GEMV_PREDECODED_ABSMAX)."""
    x, index, weights, gate_up, down, gu_lora, down_lora = _inputs(64, 48, 8, 3, 4, torch.float32)
    stacks = quantize_nf4(gate_up, True), quantize_nf4(down, True)
    decoded = [Nf4Weight(w.packed, absmax_fp32(w), w.shape, w.dtype) for w in stacks]
    assert all(w.double_quant for w in stacks) and not any(w.double_quant for w in decoded)
    lora = (*_factors(gu_lora), *_factors(down_lora))
    expected = one_token_experts(x, index, weights, *stacks, *lora)
    assert torch.equal(expected, one_token_experts(x, index, weights, *decoded, *lora))
    monkeypatch.setattr(one_token, "GEMV_PREDECODED_ABSMAX", True)
    assert torch.equal(expected, one_token_experts(x, index, weights, *stacks, *lora))


def test_one_token_experts_twice_in_a_row_are_bit_identical_and_leave_the_counters_at_zero():
    args = _inputs(40, 24, 6, 3, 3, torch.float32)
    x, index, weights, gate_up, down, gu_lora, down_lora = args
    counters = split_k.arrival_counts(x.device, 1)
    first = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    assert not counters.any()
    second = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    assert not counters.any() and torch.equal(first, second)


def test_one_token_experts_refuse_two_tokens_and_weights_in_another_dtype():
    x, index, weights, gate_up, down, _, _ = _inputs(40, 24, 6, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="one token"):
        one_token_experts(x.expand(2, -1), index.expand(2, -1), weights.expand(2, -1), gate_up, down,
                          None, None, 0.0, None, None, 0.0)
    with pytest.raises(ValueError, match="activations' dtype"):
        one_token_experts(x.half(), index, weights, gate_up, down, None, None, 0.0, None, None, 0.0)


@pytest.mark.parametrize("nf4", [False, True], ids=["16-bit", "nf4"])
def test_moe_experts_take_the_one_token_form_at_one_token_without_gradients(nf4, monkeypatch):
    x, index, weights, gate_up, down, gu_lora, down_lora = _inputs(40, 24, 6, 2, 3, torch.float32)
    block = moe_experts_nf4 if nf4 else moe_experts
    if nf4:
        gate_up, down = quantize_nf4(gate_up, True), quantize_nf4(down, True)
    with reference_only():
        ref = block(x, index, weights, gate_up, down, gu_lora, down_lora)
    calls, one_token = [], experts_module.one_token_experts

    def counted(*args):
        calls.append(args[0].shape[0])
        return one_token(*args)

    monkeypatch.setattr(experts_module, "one_token_experts", counted)
    with torch.no_grad():
        out = block(x, index, weights, gate_up, down, gu_lora, down_lora)
        block(x.expand(2, -1), index.expand(2, -1), weights.expand(2, -1), gate_up, down, gu_lora, down_lora)
    assert calls == [1] and rel_err(out, ref) < 1e-5
    # A forward autograd will differentiate keeps what its backward needs: the grouped path.
    x.requires_grad_()
    out = block(x, index, weights, gate_up, down, gu_lora, down_lora)
    assert calls == [1]
    out.sum().backward()
    assert x.grad is not None


# --------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("hidden,inter,num_experts,top_k", [(2048, 1024, 128, 8), (2048, 1792, 32, 4),
                                                            (200, 72, 8, 1)],
                         ids=["trinity-mini", "lfm2-8b-a1b", "odd-top1"])
@pytest.mark.parametrize("nf4,register_decode,mma", [(False, False, False), (True, False, False), (True, True, False),
                                                      (True, True, True)],
                         ids=["bf16", "nf4", "nf4-register-decode", "nf4-register-decode-mma"])
@pytest.mark.parametrize("loop_stages", [1, 3], ids=["loop", "pipelined-loop"])
def test_one_token_experts_gpu_bf16(hidden, inter, num_experts, top_k, nf4, register_decode, mma, loop_stages,
                                    monkeypatch):
    """bf16 against the float64 block, at real experts' shapes (the GPU configuration's splits) and an odd one; NF4
    tiles through the portable decode and, where the rows sit on 64-weight blocks, the PTX register decode, its
    products in fp32 FMAs or on the tensor cores (GEMV_MMA); the K loop as it is and pipelined (its loads in cp.async
    copies issued steps ahead)."""
    monkeypatch.setattr(one_token, "GEMV_REGISTER_DECODE", register_decode)
    monkeypatch.setattr(one_token, "GEMV_MMA", mma)
    monkeypatch.setattr(one_token, "GEMV_LOOP_STAGES", loop_stages)
    x, index, weights, gate_up, down, gu_lora, down_lora = _inputs(hidden, inter, num_experts, top_k, 16,
                                                                   torch.bfloat16, "cuda", permuted=True)
    if nf4:
        gate_up, down = quantize_nf4(gate_up, True), quantize_nf4(down, True)
        dense = reference_dequantize_nf4(gate_up), reference_dequantize_nf4(down)
        aligned = hidden % 64 == 0 and inter % 64 == 0
        assert one_token.gemv_register_decode(gate_up, torch.bfloat16, 64, 64, 4) == (register_decode and aligned)
        assert one_token.gemv_mma(gate_up, torch.bfloat16, 64, 4) == (mma and aligned)
    else:
        dense = gate_up, down
    out = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    assert rel_err(out.double(), _exact(x, index, weights, *dense, gu_lora, down_lora)) < 1e-2
    again = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    assert torch.equal(out, again)
    if nf4:  # the chosen experts' absmax decoded by a launch of its own first: the same output
        monkeypatch.setattr(one_token, "GEMV_PREDECODED_ABSMAX", True)
        predecoded = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
        assert torch.equal(out, predecoded)
    # the down LoRA's h A^T from gate_up's per-block partials: the same sum in another order
    monkeypatch.setattr(one_token, "DOWN_XA_IN_GATE_UP", True)
    down_xa = one_token_experts(x, index, weights, gate_up, down, *_factors(gu_lora), *_factors(down_lora))
    assert rel_err(down_xa.double(), _exact(x, index, weights, *dense, gu_lora, down_lora)) < 1e-2
    assert rel_err(down_xa.double(), out.double()) < 1e-2
