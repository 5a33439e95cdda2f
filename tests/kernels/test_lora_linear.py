"""kernels/lora_linear.py: the fused frozen-linear + LoRA op against its PyTorch reference, forward and backward."""

import pytest
import torch
from fastmoe.kernels import lora_linear as lora_linear_module
from fastmoe.kernels.lora_linear import FEW_ROWS, lora_linear, lora_linear_few_rows, reference_lora_linear
from testing_utils import rel_err


def _inputs(tokens, d_in, d_out, rank, dtype, device="cpu", bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    x = randn(*tokens, d_in).to(dtype).requires_grad_()
    weight = randn(d_out, d_in, scale=d_in ** -0.5).to(dtype)
    b = randn(d_out).to(dtype) if bias else None
    # peft keeps adapters in float32 whatever the model's dtype
    lora_a = randn(rank, d_in, scale=d_in ** -0.5).requires_grad_()
    lora_b = randn(d_out, rank, scale=0.5).requires_grad_()
    return x, weight, b, lora_a, lora_b


def _forward_backward(fn, x, weight, b, lora_a, lora_b, scaling, seed=1):
    out = fn(x, weight, b, lora_a, lora_b, scaling)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    x.grad = lora_a.grad = lora_b.grad = None
    out.backward(grad)
    return out.detach(), x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()


@pytest.mark.parametrize("tokens,d_in,d_out,rank", [((2, 7), 33, 19, 4), ((1, 1), 8, 8, 1), ((5, 3), 64, 130, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(tokens, d_in, d_out, rank, bias):
    args = _inputs(tokens, d_in, d_out, rank, torch.float32, bias=bias)
    fused = _forward_backward(lora_linear, *args, scaling=1.7)
    reference = _forward_backward(reference_lora_linear, *args, scaling=1.7)
    assert fused[0].shape == (*tokens, d_out)
    for name, got, expected in zip(("out", "dx", "dA", "dB"), fused, reference):
        assert rel_err(got, expected) < 1e-5, name
    assert fused[2].dtype == fused[3].dtype == torch.float32


def test_callable_weight_is_dequantized_in_forward_and_backward_only():
    x, weight, b, lora_a, lora_b = _inputs((3, 5), 24, 10, 2, torch.float32)
    calls = []

    def dequantize():
        calls.append(1)
        return weight

    fused = _forward_backward(lora_linear, x, dequantize, b, lora_a, lora_b, scaling=0.5)
    reference = _forward_backward(reference_lora_linear, x, weight, b, lora_a, lora_b, scaling=0.5)
    assert len(calls) == 2  # forward GEMM and input-gradient GEMM; never kept in between
    for got, expected in zip(fused, reference):
        assert rel_err(got, expected) < 1e-5


def test_no_input_gradient_skips_the_weight():
    x, weight, b, lora_a, lora_b = _inputs((4,), 16, 12, 2, torch.float32)
    x = x.detach()
    calls = []

    def dequantize():
        calls.append(1)
        return weight

    lora_linear(x, dequantize, b, lora_a, lora_b, 2.0).sum().backward()
    expected_a = torch.autograd.grad(reference_lora_linear(x, weight, b, lora_a, lora_b, 2.0).sum(), lora_a)[0]
    assert rel_err(lora_a.grad, expected_a) < 1e-5
    assert len(calls) == 1  # the backward needs no base GEMM without an input gradient


@pytest.mark.parametrize("tokens,d_in,d_out,rank", [((1, 1), 33, 19, 4), ((3,), 64, 130, 16), ((2, 9), 50, 37, 1),
                                                    ((FEW_ROWS,), 40, 21, 20)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_without_gradients_take_one_kernel_equal_to_the_reference(tokens, d_in, d_out, rank, bias, dtype,
                                                                           monkeypatch):
    """Decoding: at most FEW_ROWS rows and nothing to differentiate run the one-launch kernel (the Function is never
    called), float32 factors read as they are; rows, columns, K and rank off every block."""
    x, weight, b, lora_a, lora_b = _inputs(tokens, d_in, d_out, rank, dtype, bias=bias)

    def refuse(*args):
        raise AssertionError("the autograd Function ran")

    monkeypatch.setattr(lora_linear_module._LoraLinear, "apply", refuse)
    with torch.no_grad():
        out = lora_linear(x, weight, b, lora_a, lora_b, 1.7)
        expected = reference_lora_linear(*(t.double() if t is not None else None
                                           for t in (x, weight, b, lora_a, lora_b)), 1.7)
    assert out.shape == (*tokens, d_out) and out.dtype == dtype
    assert rel_err(out.double(), expected) < (1e-5 if dtype == torch.float32 else 2e-3)


def _exact(x, weight, b, lora_a, lora_b, scaling):
    return reference_lora_linear(*(t.double() if t is not None else None for t in (x, weight, b, lora_a, lora_b)),
                                 scaling)


# rows, in, out, rank: K off BLOCK_K (32) and off the split size (K per split 96 for 300: the splits hold 96, 96, 96
# and 12; 64 for 129: 64, 64, 1 and an empty one), out off BLOCK_N (16), ranks that are not powers of two.
SPLIT_K_SHAPES = [(1, 100, 37, 3), (FEW_ROWS, 129, 21, 5), (1, 75, 130, 12), (FEW_ROWS, 300, 50, 7)]


@pytest.mark.parametrize("rows,d_in,d_out,rank", SPLIT_K_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_split_k_off_every_block_equals_the_reference(rows, d_in, d_out, rank, bias, dtype):
    """The interpreter's configuration splits K (1-2 BLOCK_K iterations a split), so these go through the fix-up:
    partials summed by the last program of each column block, then the bias."""
    assert lora_linear_module._few_rows_interpreter_config(d_in)["SPLIT_K"] > 1
    x, weight, b, lora_a, lora_b = _inputs((rows,), d_in, d_out, rank, dtype, bias=bias)
    with torch.no_grad():
        out = lora_linear_few_rows(x, weight, b, lora_a, lora_b, 1.7)
    assert out.shape == (rows, d_out) and out.dtype == dtype
    assert rel_err(out.double(), _exact(x, weight, b, lora_a, lora_b, 1.7)) < (1e-5 if dtype == torch.float32
                                                                               else 2e-3)


def test_few_rows_twice_in_a_row_is_bit_identical_and_leaves_the_counters_at_zero():
    """Each column block's last program resets its arrival counter: a second launch (or a CUDA graph replay) elects
    its last programs afresh, and sums the partials in the same order."""
    x, weight, b, lora_a, lora_b = _inputs((5,), 300, 50, 7, torch.float32)
    counters = lora_linear_module._arrival_counts_for(x.device, 1)
    with torch.no_grad():
        first = lora_linear_few_rows(x, weight, b, lora_a, lora_b, 1.7)
        assert not counters.any()
        second = lora_linear_few_rows(x, weight, b, lora_a, lora_b, 1.7)
    assert not counters.any()
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_unsplit_and_split_k_equal_the_reference(dtype):
    """SPLIT_K=1 stores directly (no partials, no counter); 2 and 4 splits go through the fix-up, 8 leaves splits
    empty (K 200 is 7 BLOCK_K iterations)."""
    x, weight, b, lora_a, lora_b = _inputs((9,), 200, 45, 6, dtype)
    exact = _exact(x, weight, b, lora_a, lora_b, 0.8)
    outs = {}
    with torch.no_grad():
        for split_k in (1, 2, 4, 8):
            config = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}
            outs[split_k] = lora_linear_module._launch_few_rows(x.detach(), weight, b, lora_a, lora_b, 0.8, config)
    for split_k, out in outs.items():
        assert rel_err(out.double(), exact) < (1e-5 if dtype == torch.float32 else 2e-3), split_k
        assert rel_err(out.double(), outs[1].double()) < (1e-5 if dtype == torch.float32 else 2e-3), split_k


def test_arrival_counters_grow_zeroed_and_keep_the_outgrown_ones():
    """A graph captured before the counters grew still points at the old tensor: it must stay allocated."""
    device = torch.device("cpu")
    current = lora_linear_module._arrival_counts_for(device, 1)
    assert lora_linear_module._arrival_counts_for(device, current.numel()) is current
    grown = lora_linear_module._arrival_counts_for(device, current.numel() + 1)
    assert grown.numel() > current.numel() and not grown.any() and grown.dtype == torch.int32
    assert any(t is current for t in lora_linear_module._arrival_counts[device])
    assert lora_linear_module._arrival_counts_for(device, 1) is grown


@pytest.mark.parametrize("rows", [1, 8, FEW_ROWS])
@pytest.mark.parametrize("d_in,d_out", [(2048, 512), (2048, 4096), (4096, 2048), (2048, 1024), (1024, 2048)])
def test_gpu_config_splits_k_into_whole_blocks_and_fills_an_h200(rows, d_in, d_out):
    """Trinity-Mini's projections: a power-of-two split of K into whole BLOCK_K iterations, at least 2 of them a
    program, at most one program per SM of an H200 (132), and nearly one per SM at decode's few rows (the best
    measured, kernels/lora_linear.py's _few_rows_config)."""
    config = lora_linear_module._few_rows_config(rows, d_out, d_in)
    split_k, block_k = config["SPLIT_K"], config["BLOCK_K"]
    iterations = -(-d_in // block_k)
    programs = -(-d_out // config["BLOCK_N"]) * split_k
    assert split_k & (split_k - 1) == 0 and iterations // split_k >= 2
    assert programs <= 132
    if rows <= 8:
        assert programs >= 0.9 * 132


def test_more_rows_or_gradients_take_the_function(monkeypatch):
    calls = []
    original = lora_linear_module._LoraLinear.apply
    monkeypatch.setattr(lora_linear_module._LoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    x, weight, b, lora_a, lora_b = _inputs((FEW_ROWS + 1,), 16, 12, 2, torch.float32)
    with torch.no_grad():
        lora_linear(x, weight, b, lora_a, lora_b, 1.0)
    lora_linear(x[:2], weight, b, lora_a, lora_b, 1.0)
    assert len(calls) == 2


def test_bad_inputs_are_refused():
    x, weight, b, lora_a, lora_b = _inputs((2,), 8, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="cast the input"):
        lora_linear(x.double(), weight, b, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.requires_grad_(), b, lora_a, lora_b, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_gpu_matches_fp32_reference():
    args = _inputs((4, 1000), 2048, 1536, 16, torch.bfloat16, device="cuda")
    fused = _forward_backward(lora_linear, *args, scaling=2.0)
    exact_args = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in args]
    exact = _forward_backward(reference_lora_linear, *exact_args, scaling=2.0)
    for name, got, expected in zip(("out", "dx", "dA", "dB"), fused, exact):
        assert rel_err(got, expected) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_few_rows_bf16_gpu_matches_fp32_reference(rows):
    x, weight, b, lora_a, lora_b = _inputs((rows,), 2048, 1536, 16, torch.bfloat16, device="cuda")
    with torch.no_grad():
        out = lora_linear(x, weight, b, lora_a, lora_b, 2.0)
        exact = reference_lora_linear(*(t.double() for t in (x, weight, b, lora_a, lora_b)), 2.0)
    assert rel_err(out.double(), exact) < 1e-2


@pytest.mark.parametrize("bias", [True, False])
def test_autocast_over_fp32_weights_computes_in_autocast_dtype(bias):
    """An fp32 model trained with autocast (Trainer's bf16=True on fp32 weights): the op computes in autocast's
    dtype, as F.linear does under autocast, and returns gradients in the inputs' and factors' own dtypes."""
    x, weight, b, lora_a, lora_b = _inputs((3, 5), 40, 24, 4, torch.float32, bias=bias)

    def under_autocast(fn):
        def run(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args, **kwargs)
        return run

    fused = _forward_backward(under_autocast(lora_linear), x, weight, b, lora_a, lora_b, scaling=1.3)
    exact = _forward_backward(reference_lora_linear, x, weight, b, lora_a, lora_b, scaling=1.3)
    assert fused[0].dtype == torch.bfloat16
    assert [t.dtype for t in fused[1:]] == [torch.float32] * 3
    for name, got, expected in zip(("out", "dx", "dA", "dB"), fused, exact):
        assert rel_err(got, expected) < 1e-2, name
