"""kernels/lora_linear.py: the fused frozen-linear + LoRA op against its PyTorch reference, forward and backward."""

import pytest
import torch
from fastmoe.kernels import lora_linear as lora_linear_module
from fastmoe.kernels import split_k
from fastmoe.kernels.moe import one_token
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


@pytest.mark.parametrize("quantized", [False, True])
def test_unused_output_skips_its_products_and_keeps_the_backward(quantized):
    # A recompute's last projection (output_unused): no base product, no LoRA up-projection, the weight not even
    # dequantized; NaN where the output would be (on the CPU), and the same gradients for the same upstream one.
    x, weight, b, lora_a, lora_b = _inputs((3, 5), 24, 10, 2, torch.float32)
    calls = []

    def dequantize():
        calls.append(1)
        return weight

    base = dequantize if quantized else weight
    expected = _forward_backward(lora_linear, x, base, b, lora_a, lora_b, scaling=0.5)
    calls.clear()
    with lora_linear_module.output_unused():
        out = lora_linear(x, base, b, lora_a, lora_b, 0.5)
    assert out.shape == expected[0].shape and out.isnan().all()
    assert len(calls) == 0
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    x.grad = lora_a.grad = lora_b.grad = None
    out.backward(upstream)
    assert len(calls) == (1 if quantized else 0)  # the input gradient's
    for got, want in zip((x.grad, lora_a.grad, lora_b.grad), expected[1:]):
        assert torch.equal(got, want)


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


def test_few_rows_stay_out_of_torch_compile(monkeypatch):
    """Under torch.compile a few rows take the plain matmuls, which dynamo traces as PyTorch ops, not a Triton launch
    that inductor would embed with its own layout of x."""
    x, weight, b, lora_a, lora_b = _inputs((2,), 40, 21, 4, torch.float32, bias=True)
    with torch.no_grad():
        assert lora_linear_module.takes_few_rows(x, weight, b, lora_a, lora_b)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not lora_linear_module.takes_few_rows(x, weight, b, lora_a, lora_b)


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
    assert lora_linear_module._few_rows_interpreter_config(rows, d_in)["SPLIT_K"] > 1
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
    counters = split_k.arrival_counts(x.device, 1)
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
            outs[split_k] = lora_linear_module._launch_few_rows(
                x.detach(), [lora_linear_module.Projection(weight, b, lora_a, lora_b, 0.8)], config)[0]
    for split_k, out in outs.items():
        assert rel_err(out.double(), exact) < (1e-5 if dtype == torch.float32 else 2e-3), split_k
        assert rel_err(out.double(), outs[1].double()) < (1e-5 if dtype == torch.float32 else 2e-3), split_k


# (NF4, K, widths): K off BLOCK_K (64); NF4 rows of whole absmax blocks (K 192, every K step whole) and rows that are
# not (K 160: gathered codes, a masked last step; widths even, as N * K must be whole 64-blocks).
GEMV_WEIGHTS = [pytest.param(False, 200, (37, 130, 19), id="16-bit"),
                pytest.param(True, 192, (37, 130, 19), id="nf4-aligned"),
                pytest.param(True, 160, (38, 130, 20), id="nf4-unaligned")]


@pytest.mark.parametrize("nf4,d_in,widths", GEMV_WEIGHTS)
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_gemv_equals_the_reference(nf4, d_in, widths, swiglu, split_k, dtype):
    """One row through the GEMV form (products on the CUDA cores, summed over k after the loop; what the GPU runs at
    one row) and through tl.dot's, against the exact layers: odd widths and ranks, a layer without LoRA, a SwiGLU
    pair."""
    shapes = [(widths[0], 3), (widths[0], 5)] if swiglu else list(zip(widths, (3, 0, 16)))
    if nf4:
        pairs = [_nf4_projection(d_in, d_out, rank, dtype, double_quant=True, bias=not swiglu, seed=i)
                 for i, (d_out, rank) in enumerate(shapes)]
        layers, exact_layers = [p for p, _ in pairs], [p._replace(weight=w) for p, w in pairs]
    else:
        layers = exact_layers = _projections(d_in, shapes, dtype, bias=not swiglu)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(4)).to(dtype)
    exact = [_exact_projection(x, p) for p in exact_layers]
    if swiglu:
        exact = [torch.nn.functional.silu(exact[0].to(dtype)).double() * exact[1].to(dtype).double()]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.no_grad():
        for gemv in (True, False):
            config = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": split_k, "GEMV": gemv}
            outs = lora_linear_module._launch_few_rows(x, layers, config, swiglu)
            for out, expected in zip(outs, exact, strict=True):
                assert rel_err(out.double(), expected) < tol, gemv


def test_few_rows_gemv_refuses_more_than_one_row():
    x, weight, b, lora_a, lora_b = _inputs((2,), 64, 16, 2, torch.float32)
    config = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "GEMV": True}
    with pytest.raises(ValueError, match="GEMV form takes one row"):
        lora_linear_module._launch_few_rows(x.detach(), [lora_linear_module.Projection(weight, b, lora_a, lora_b, 1.0)],
                                            config)


# Layers of one input (out, rank; rank 0: no LoRA): widths off BLOCK_N (16), ranks that are not powers of two.
PROJECTION_SHAPES = [(37, 3), (130, 0), (19, 16), (5, 1)]


def _projections(d_in, shapes, dtype, bias, seed=0):
    layers = []
    for i, (d_out, rank) in enumerate(shapes):
        _, weight, b, lora_a, lora_b = _inputs((1,), d_in, d_out, max(rank, 1), dtype, bias=bias, seed=seed + i)
        if rank == 0:
            lora_a = lora_b = None
        layers.append(lora_linear_module.Projection(weight, b, lora_a, lora_b, 1.7 - 0.3 * i))
    return layers


def _exact_projection(x, projection):
    weight, b, lora_a, lora_b, scaling = projection
    if lora_a is None:
        return torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    return _exact(x, weight, b, lora_a, lora_b, scaling)


@pytest.mark.parametrize("rows,d_in", [(1, 100), (FEW_ROWS, 129), (3, 33)])
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_several_layers_of_one_input_in_one_launch_equal_each_alone(rows, d_in, count, bias, dtype, monkeypatch):
    """q, k, v and gate of one hidden state: one launch, column blocks numbered across the layers (K split at 100 and
    129, unsplit at 33), each layer's output equal to its reference, layers without LoRA among them."""
    launches = []
    launch = lora_linear_module._launch_few_rows
    monkeypatch.setattr(lora_linear_module, "_launch_few_rows", lambda *a: launches.append(1) or launch(*a))
    x = _inputs((rows,), d_in, 1, 1, dtype, seed=9)[0].detach()
    projections = _projections(d_in, PROJECTION_SHAPES[:count], dtype, bias)
    with torch.no_grad():
        outs = lora_linear_module.lora_linears_few_rows(x, projections)
    assert len(launches) == 1 and len(outs) == count
    for out, projection in zip(outs, projections):
        assert out.shape == (rows, projection.weight.shape[0]) and out.dtype == dtype
        assert rel_err(out.double(), _exact_projection(x, projection)) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("rows,d_in,d_out,ranks", [(1, 100, 37, (3, 5)), (FEW_ROWS, 129, 130, (16, 0)),
                                                   ((2, 3), 33, 19, (1, 1))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_pair_in_one_launch_equals_silu_of_gate_times_up(rows, d_in, d_out, ranks, bias, dtype):
    """A gated MLP's gate and up: one output, silu(gate) * up, each step rounded to the activations' dtype as the three
    PyTorch ops round it."""
    rows = rows if isinstance(rows, tuple) else (rows,)
    x = _inputs(rows, d_in, 1, 1, dtype, seed=9)[0].detach()
    gate, up = _projections(d_in, [(d_out, r) for r in ranks], dtype, bias)
    with torch.no_grad():
        (out,) = lora_linear_module.lora_linears_few_rows(x, [gate, up], swiglu=True)
    expected = (torch.nn.functional.silu(_exact_projection(x, gate).to(dtype)) * _exact_projection(x, up).to(dtype))
    assert out.shape == (*rows, d_out) and out.dtype == dtype
    assert rel_err(out.double(), expected.double()) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_several_layers_are_refused_beyond_what_one_launch_takes():
    x = torch.randn(2, 40)
    layers = _projections(40, [(8, 2)] * 5, torch.float32, bias=False)
    with pytest.raises(ValueError, match="1 to 4 layers"):
        lora_linear_module.lora_linears_few_rows(x, layers)
    with pytest.raises(ValueError, match="a SwiGLU pair 2"):
        lora_linear_module.lora_linears_few_rows(x, layers[:3], swiglu=True)
    with pytest.raises(ValueError, match="biases all or none"):
        lora_linear_module.lora_linears_few_rows(x, [*layers[:1], *_projections(40, [(8, 2)], torch.float32, True)])
    with pytest.raises(ValueError, match="same shape"):
        lora_linear_module.lora_linears_few_rows(x, [layers[0], *_projections(40, [(9, 2)], torch.float32, False)],
                                                 swiglu=True)
    with pytest.raises(ValueError, match="at most"):
        lora_linear_module.lora_linears_few_rows(torch.randn(FEW_ROWS + 1, 40), layers[:1])


@pytest.mark.parametrize("rows", [2, 8, FEW_ROWS])
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


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("d_in,d_out", [(2048, 9216), (2048, 6144), (4096, 2048), (2048, 1024), (1024, 2048),
                                        (6144, 2048), (2048, 512)])
def test_gpu_config_for_one_row_is_the_gemv_form_with_up_to_five_programs_per_sm(nf4, d_in, d_out):
    """One row: the GEMV form, 64-wide K steps, a power-of-two split of K into whole steps (2 at least a split) that
    doubles while the programs stay within 5 per SM of an H200, the same for NF4 and 16-bit layers; Trinity-Mini's q,
    k, v and gate (9216 columns) in 4 splits, its dense MLP's gate and up in 4 (the best measured)."""
    config = lora_linear_module._few_rows_config(1, d_out, d_in, nf4=nf4)
    assert config["GEMV"] and not lora_linear_module._few_rows_config(2, d_out, d_in, nf4=nf4)["GEMV"]
    split_k, steps = config["SPLIT_K"], -(-d_in // config["BLOCK_K"])
    programs = -(-d_out // config["BLOCK_N"]) * split_k
    assert config["BLOCK_K"] == 64 and split_k & (split_k - 1) == 0 and steps // split_k >= 2
    assert programs <= 5 * 132 and (2 * programs > 5 * 132 or steps // (2 * split_k) < 2)
    assert config == lora_linear_module._few_rows_config(1, d_out, d_in, nf4=not nf4)
    if d_out in (9216, 6144):
        assert split_k == 4


@pytest.mark.parametrize("rows", [2, 8])
@pytest.mark.parametrize("d_in,d_out", [(2048, 9216), (2048, 6144), (4096, 2048), (2048, 1024), (6144, 2048)])
def test_gpu_config_for_nf4_runs_more_programs_per_sm(rows, d_in, d_out):
    """NF4 layers (a quarter of the bytes per K step, decoded in the program): the same whole-block power-of-two
    splits, also doubled while fewer than 2.5 programs per SM of an H200 (up to 8, which these layers' 16-bit splits
    stay under), so never fewer programs than 16-bit weights get; Trinity-Mini's 4-bit q, k, v and gate (9216
    columns) split in 4 (the best measured)."""
    config = lora_linear_module._few_rows_config(rows, d_out, d_in, nf4=True)
    split_k, block_k = config["SPLIT_K"], config["BLOCK_K"]
    blocks = -(-d_out // config["BLOCK_N"])
    assert split_k & (split_k - 1) == 0 and (-(-d_in // block_k)) // split_k >= 2 and split_k <= 8
    assert split_k >= lora_linear_module._few_rows_config(rows, d_out, d_in)["SPLIT_K"]
    assert blocks * split_k >= 2.5 * 132 or split_k == 8 or (-(-d_in // block_k)) // (2 * split_k) < 2
    if d_out == 9216:
        assert split_k == 4


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("loop_stages", [1, 3], ids=["loop", "pipelined-loop"])
def test_several_layers_bf16_gpu_match_fp64_references(rows, swiglu, loop_stages, monkeypatch):
    monkeypatch.setattr(one_token, "GEMV_LOOP_STAGES", loop_stages)
    shapes = [(1536, 16), (1536, 8)] if swiglu else [(2048, 16), (256, 16), (256, 0), (2048, 4)]
    projections = [p._replace(weight=p.weight.cuda(), lora_a=p.lora_a.cuda() if p.lora_a is not None else None,
                              lora_b=p.lora_b.cuda() if p.lora_b is not None else None)
                   for p in _projections(2048, shapes, torch.bfloat16, bias=False)]
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        outs = lora_linear_module.lora_linears_few_rows(x, projections, swiglu=swiglu)
    exact = [_exact_projection(x, p) for p in projections]
    if swiglu:
        exact = [torch.nn.functional.silu(exact[0]) * exact[1]]
    for out, expected in zip(outs, exact, strict=True):
        assert rel_err(out.double(), expected) < 1e-2


def _nf4_projection(d_in, d_out, rank, dtype, double_quant, bias=False, seed=0):
    """A layer whose weight is NF4 in bitsandbytes' layout (one expert of fastmoe's format), its exact dequantized
    weight for the reference."""
    from fastmoe.kernels.moe import quantize_nf4, reference_dequantize_nf4

    _, weight, b, lora_a, lora_b = _inputs((1,), d_in, d_out, max(rank, 1), dtype, bias=bias, seed=seed)
    nf4 = quantize_nf4(weight[None], double_quant=double_quant)
    exact = reference_dequantize_nf4(nf4)[0]
    if rank == 0:
        lora_a = lora_b = None
    return lora_linear_module.Projection(nf4, b, lora_a, lora_b, 1.3), exact


@pytest.mark.parametrize("rows,d_in", [(1, 128), (5, 192), (FEW_ROWS, 64), (2, 96)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_layers_of_one_input_dequantize_in_the_kernel(rows, d_in, double_quant, dtype):
    """bitsandbytes' 4-bit Linear weights decoded tile by tile (K a multiple of 64 or of BLOCK_K or neither: 96),
    against the reference on the exactly dequantized weights; several layers, one without LoRA, and a SwiGLU pair."""
    layers = [_nf4_projection(d_in, d_out, rank, dtype, double_quant, seed=i)
              for i, (d_out, rank) in enumerate([(40, 3), (24, 0), (40, 5)])]
    x = _inputs((rows,), d_in, 1, 1, dtype, seed=9)[0].detach()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.no_grad():
        outs = lora_linear_module.lora_linears_few_rows(x, [p for p, _ in layers])
        (h,) = lora_linear_module.lora_linears_few_rows(x, [layers[0][0], layers[2][0]], swiglu=True)
    exact = [_exact_projection(x, p._replace(weight=w)) for p, w in layers]
    for out, expected in zip(outs, exact, strict=True):
        assert out.dtype == dtype and rel_err(out.double(), expected) < tol
    expected_h = torch.nn.functional.silu(exact[0].to(dtype)) * exact[2].to(dtype)
    assert rel_err(h.double(), expected_h.double()) < tol


def test_nf4_and_16_bit_layers_do_not_share_a_launch():
    nf4, _ = _nf4_projection(64, 16, 2, torch.float32, False)
    plain = _projections(64, [(16, 2)], torch.float32, bias=False)[0]
    with pytest.raises(ValueError, match="not a mix"):
        lora_linear_module.lora_linears_few_rows(torch.randn(1, 64), [nf4, plain])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("loop_stages,mma", [(1, False), (3, False), (3, True)],
                         ids=["loop", "pipelined-loop", "pipelined-loop-mma"])
def test_nf4_layers_bf16_gpu_match_fp64_references(rows, double_quant, swiglu, loop_stages, mma, monkeypatch):
    """bf16 NF4 layers (a SwiGLU pair too) in K splits, against fp64 references on the dequantized weights; one row's
    GEMV form with its K loop as it is and pipelined, its products in fp32 FMAs or on the tensor cores (GEMV_MMA;
    the layers of one launch share its 64-row blocks and 128-column steps)."""
    monkeypatch.setattr(one_token, "GEMV_LOOP_STAGES", loop_stages)
    monkeypatch.setattr(one_token, "GEMV_MMA", mma)
    shapes = [(1536, 16), (1536, 8)] if swiglu else [(1536, 16), (256, 0)]
    layers = [_nf4_projection(2048, d_out, rank, torch.bfloat16, double_quant, seed=i)
              for i, (d_out, rank) in enumerate(shapes)]
    layers = [(p._replace(weight=type(p.weight)(*(t.cuda() if isinstance(t, torch.Tensor) else t
                                                   for t in vars(p.weight).values())),
                          lora_a=None if p.lora_a is None else p.lora_a.cuda(),
                          lora_b=None if p.lora_b is None else p.lora_b.cuda()), w.cuda()) for p, w in layers]
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    assert lora_linear_module._few_rows_config(rows, 1536 if swiglu else 1792, 2048, nf4=True)["SPLIT_K"] > 1
    with torch.no_grad():
        outs = lora_linear_module.lora_linears_few_rows(x, [p for p, _ in layers], swiglu=swiglu)
    exact = [_exact_projection(x, p._replace(weight=w)) for p, w in layers]
    if swiglu:
        exact = [torch.nn.functional.silu(exact[0]) * exact[1]]
    for out, expected in zip(outs, exact, strict=True):
        assert rel_err(out.double(), expected) < 1e-2
