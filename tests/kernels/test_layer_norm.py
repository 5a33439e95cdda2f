import pytest
import torch
from transformers.models.cohere.modeling_cohere import CohereLayerNorm

from fastmoe.kernels.layer_norm import layer_norm, reference_layer_norm
from testing_utils import rel_err

# (x shape, weight shape): a (dim,) weight over hidden states, and Cohere's per-head (heads, dim) q/k norms.
CASES = [
    ((1, 7, 40), (40,)),
    ((2, 5, 24), (24,)),
    ((2, 5, 3, 40), (3, 40)),
    ((1, 9, 4, 24), (4, 24)),
    ((2, 3, 2, 128), (2, 128)),
]


def run(fn, x, weight, dy):
    """out, dx, dweight of fn(x, weight) for upstream gradient dy."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = fn(x, weight)
    out.backward(dy)
    return out, x.grad, weight.grad


def inputs(x_shape, w_shape, dtype=torch.float32, device="cpu", weight_dtype=torch.float32):
    torch.manual_seed(sum(x_shape) + len(w_shape))
    x = torch.randn(x_shape, dtype=dtype, device=device) * 2 + 0.7
    weight = (torch.randn(w_shape, device=device) * 0.5 + 1).to(weight_dtype)
    dy = torch.randn(x_shape, dtype=dtype, device=device)
    return x, weight, dy


@pytest.mark.parametrize("x_shape, w_shape", CASES)
def test_triton_matches_reference(x_shape, w_shape):
    x, weight, dy = inputs(x_shape, w_shape)
    got = run(lambda a, w: layer_norm(a, w, 1e-5), x, weight, dy)
    want = run(lambda a, w: reference_layer_norm(a, w, 1e-5), x, weight, dy)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("x_shape, w_shape", CASES[:3])
def test_reference_matches_transformers(x_shape, w_shape):
    x, weight, dy = inputs(x_shape, w_shape)
    module = CohereLayerNorm(w_shape if len(w_shape) == 2 else w_shape[0], eps=1e-5)

    def hf(a, w):
        module.weight = torch.nn.Parameter(w)
        return module(a)

    hf_out, hf_dx, _ = run(hf, x, weight, dy)
    hf_dw = module.weight.grad
    for impl in (reference_layer_norm, layer_norm):
        out, dx, dw = run(lambda a, w: impl(a, w, 1e-5), x, weight, dy)
        assert rel_err(out, hf_out) < 1e-5
        assert rel_err(dx, hf_dx) < 1e-5
        assert rel_err(dw, hf_dw) < 1e-5


def test_non_contiguous_per_head_input():
    x, weight, dy = inputs((2, 6, 3, 48), (3, 40))
    x, dy = x[:, 1:, :, 4:44], dy[:, 1:, :, 4:44]  # strided heads and tokens
    got = run(lambda a, w: layer_norm(a, w, 1e-5), x, weight, dy)
    want = run(lambda a, w: reference_layer_norm(a, w, 1e-5), x, weight, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_fp16():
    x, weight, dy = inputs((2, 5, 3, 40), (3, 40), dtype=torch.float16)
    got = run(lambda a, w: layer_norm(a, w, 1e-5), x, weight, dy)
    want = run(lambda a, w: reference_layer_norm(a, w, 1e-5), x, weight, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "x_shape, w_shape", [((2, 333, 2048), (2048,)), ((2, 257, 16, 128), (16, 128)), ((3, 7, 40), (40,))]
)
def test_bf16_gpu(x_shape, w_shape):
    x, weight, dy = inputs(x_shape, w_shape, dtype=torch.bfloat16, device="cuda")
    got = run(lambda a, w: layer_norm(a, w, 1e-5), x, weight, dy)
    want = run(lambda a, w: reference_layer_norm(a, w, 1e-5), x.float(), weight, dy.float())
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2
