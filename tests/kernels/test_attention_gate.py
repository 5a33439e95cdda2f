import pytest
import torch

from fastmoe.kernels.attention_gate import attention_gate, reference_attention_gate
from testing_utils import rel_err

# (batch, seq, heads * head_dim): sizes that do not fill the last block, and one spanning several blocks.
SHAPES = [(1, 7, 40), (2, 5, 3 * 24), (2, 3, 1000)]


def run(fn, o, g, dout):
    o = o.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    out = fn(o, g)
    out.backward(dout)
    return out, o.grad, g.grad


def inputs(shape, dtype=torch.float32, device="cpu"):
    torch.manual_seed(sum(shape))
    o = torch.randn(shape, device=device).to(dtype)
    g = (torch.randn(shape, device=device) * 3).to(dtype)  # spans sigmoid's saturated ends too
    dout = torch.randn(shape, device=device).to(dtype)
    return o, g, dout


def afmoe_gate(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The line in transformers' AfmoeAttention.forward this op replaces."""
    return o * torch.sigmoid(g)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_transformers(shape):
    o, g, dout = inputs(shape)
    want = run(afmoe_gate, o, g, dout)
    for impl in (attention_gate, reference_attention_gate):
        got = run(impl, o, g, dout)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert rel_err(a, b) < 1e-5


def test_non_contiguous_inputs():
    o, g, dout = inputs((2, 6, 48))
    o, g, dout = o.transpose(0, 1), g.transpose(0, 1), dout.transpose(0, 1)
    got = run(attention_gate, o, g, dout)
    want = run(reference_attention_gate, o, g, dout)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        attention_gate(torch.randn(2, 4), torch.randn(4))


def test_fp16():
    o, g, dout = inputs((2, 5, 72), dtype=torch.float16)
    got = run(attention_gate, o, g, dout)
    want = run(reference_attention_gate, o, g, dout)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 2048, 2048), (1, 7, 40)])
def test_bf16_gpu(shape):
    o, g, dout = inputs(shape, dtype=torch.bfloat16, device="cuda")
    got = run(attention_gate, o, g, dout)
    want = run(afmoe_gate, o.float(), g.float(), dout.float())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-2
