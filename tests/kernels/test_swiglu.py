import pytest
import torch
import torch.nn.functional as F

from fastmoe.kernels.swiglu import reference_swiglu, swiglu
from testing_utils import rel_err

# (tokens, intermediate): sizes that do not fill the last block, and one spanning several blocks.
SHAPES = [(1, 7, 40), (2, 5, 3 * 24), (3, 1000)]


def run(fn, gate, up, dh):
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    h = fn(gate, up)
    h.backward(dh)
    return h, gate.grad, up.grad


def inputs(shape, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(shape, generator=generator) * 4).to(device, dtype)  # silu's flat and linear ends too
    up = torch.randn(shape, generator=generator).to(device, dtype)
    dh = torch.randn(shape, generator=generator).to(device, dtype)
    return gate, up, dh


def gated_mlp(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What transformers' gated MLPs compute between their projections."""
    return F.silu(gate) * up


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_transformers(shape):
    gate, up, dh = inputs(shape)
    want = run(gated_mlp, gate, up, dh)
    for impl in (swiglu, reference_swiglu):
        got = run(impl, gate, up, dh)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert rel_err(a, b) < 1e-5


def test_non_contiguous_inputs():
    gate, up, dh = inputs((2, 6, 48))
    gate, up, dh = gate.transpose(0, 1), up.transpose(0, 1), dh.transpose(0, 1)
    got = run(swiglu, gate, up, dh)
    want = run(gated_mlp, gate, up, dh)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_fp16_rounds_as_pytorch():
    # silu(gate) rounded to fp16 before the product, d(silu) before silu's backward, as PyTorch's three ops do.
    gate, up, dh = inputs((2, 5, 72), dtype=torch.float16)
    got = run(swiglu, gate, up, dh)
    want = run(gated_mlp, gate, up, dh)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        assert rel_err(a, b) < 2e-3


def test_mismatched_inputs_rejected():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 4), torch.randn(4))
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 22528), (1, 7, 40)])
def test_bf16_gpu(shape):
    gate, up, dh = inputs(shape, dtype=torch.bfloat16, device="cuda")
    got = run(swiglu, gate, up, dh)
    want = run(gated_mlp, gate, up, dh)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-2
    reference = run(gated_mlp, gate.float(), up.float(), dh.float())
    for a, b in zip(got, reference):
        assert rel_err(a, b) < 1e-2
