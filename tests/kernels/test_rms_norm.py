import pytest
import torch
from transformers.models.afmoe.modeling_afmoe import AfmoeRMSNorm
from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeRMSNorm

from fastmoe.kernels import reference_only, use_triton
from fastmoe.kernels.rms_norm import reference_rms_norm, reference_rms_norm_add, rms_norm, rms_norm_add
from testing_utils import rel_err

SHAPES = [(1, 7, 40), (2, 5, 24), (3, 128), (2, 3, 4, 72)]


def run(fn, x, weight, dy):
    """out, dx, dweight of fn(x, weight) for upstream gradient dy."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = fn(x, weight)
    out.backward(dy)
    return out, x.grad, weight.grad


def inputs(shape, dtype=torch.float32, device="cpu", weight_dtype=torch.float32):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    weight = (torch.randn(shape[-1], device=device) * 0.5 + 1).to(weight_dtype)
    dy = torch.randn(shape, dtype=dtype, device=device)
    return x, weight, dy


def test_interpreter_takes_triton_path():
    assert use_triton(torch.zeros(1))
    with reference_only():
        assert not use_triton(torch.zeros(1))


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape):
    x, weight, dy = inputs(shape)
    got = run(lambda a, w: rms_norm(a, w, 1e-6), x, weight, dy)
    want = run(lambda a, w: reference_rms_norm(a, w, 1e-6), x, weight, dy)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("module_cls", [AfmoeRMSNorm, Lfm2MoeRMSNorm])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_reference_matches_transformers(module_cls, shape):
    x, weight, dy = inputs(shape)
    module = module_cls(shape[-1], eps=1e-5)

    def hf(a, w):
        module.weight = torch.nn.Parameter(w)
        return module(a)

    hf_out, hf_dx, _ = run(hf, x, weight, dy)
    hf_dw = module.weight.grad
    for impl in (reference_rms_norm, rms_norm):
        out, dx, dw = run(lambda a, w: impl(a, w, 1e-5), x, weight, dy)
        assert rel_err(out, hf_out) < 1e-5
        assert rel_err(dx, hf_dx) < 1e-5
        assert rel_err(dw, hf_dw) < 1e-5


def test_non_contiguous_input():
    x, weight, dy = inputs((4, 6, 80))
    x = x[:, ::2, :40]  # rows strided and cut: a view the kernel must read through strides or copy
    dy = dy[:, ::2, :40]
    weight = weight[:40]
    got = run(lambda a, w: rms_norm(a, w, 1e-6), x, weight, dy)
    want = run(lambda a, w: reference_rms_norm(a, w, 1e-6), x, weight, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_fp16_with_fp32_weight():
    x, weight, dy = inputs((2, 5, 40), dtype=torch.float16)
    got = run(lambda a, w: rms_norm(a, w, 1e-6), x, weight, dy)
    want = run(lambda a, w: reference_rms_norm(a, w, 1e-6), x, weight, dy)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float32
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


def run_add(fn, x, residual, weight, dy, dsum):
    """normed, sum, dx, dresidual, dweight of fn(x, residual, weight) for upstream gradients dy, dsum."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
    outs = fn(*leaves)
    torch.autograd.backward(outs, [dy, dsum])
    return [*outs, *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_rms_norm_add_matches_transformers(shape):
    x, weight, dy = inputs(shape)
    residual, dsum = torch.randn(shape), torch.randn(shape)
    module = AfmoeRMSNorm(shape[-1], eps=1e-5)

    def hf(a, r, w):
        del module.weight
        module.weight = w
        total = r + a  # a decoder layer's residual add, then the next norm
        return module(total), total

    want = run_add(hf, x, residual, weight, dy, dsum)
    for impl in (rms_norm_add, reference_rms_norm_add):
        got = run_add(lambda a, r, w: impl(a, r, w, 1e-5), x, residual, weight, dy, dsum)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert rel_err(g, w) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 333, 2048), (4096, 128), (3, 7, 40)])
def test_bf16_gpu(shape):
    x, weight, dy = inputs(shape, dtype=torch.bfloat16, device="cuda")
    got = run(lambda a, w: rms_norm(a, w, 1e-6), x, weight, dy)
    want = run(lambda a, w: reference_rms_norm(a, w, 1e-6), x.float(), weight, dy.float())
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rms_norm_add_bf16_gpu():
    x, weight, dy = inputs((2, 333, 2048), dtype=torch.bfloat16, device="cuda")
    residual, dsum = torch.randn_like(x), torch.randn_like(x)
    got = run_add(lambda a, r, w: rms_norm_add(a, r, w, 1e-6), x, residual, weight, dy, dsum)
    want = run_add(lambda a, r, w: reference_rms_norm_add(a, r, w, 1e-6), x, residual, weight, dy, dsum)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2
