import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Lfm2MoeConfig  # noqa: E402
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf  # noqa: E402

from fastmoe.kernels import use_triton  # noqa: E402
from fastmoe.kernels.dispatch import interpreter_enabled  # noqa: E402
from fastmoe.kernels.short_conv import reference_short_conv, short_conv  # noqa: E402
from fastmoe.models.lfm2_moe import short_conv_forward  # noqa: E402
from testing_utils import rel_err  # noqa: E402

# (batch, seq, hidden, kernel size): odd sizes, a sequence shorter than the kernel, several time tiles.
SHAPES = [(2, 7, 37, 3), (2, 2, 5, 3), (2, 3, 11, 4), (1, 41, 133, 3), (2, 19, 24, 2)]


def inputs(batch, seq, hidden, kernel_size, bias, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(batch * 1000 + seq * 100 + hidden + kernel_size)
    bcx = torch.randn(batch, seq, 3 * hidden, generator=generator)
    weight = torch.randn(hidden, 1, kernel_size, generator=generator) * 0.5
    conv_bias = torch.randn(hidden, generator=generator) if bias else None
    dy = torch.randn(batch, seq, hidden, generator=generator)
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (bcx, weight, conv_bias, dy))


def run(fn, bcx, weight, bias, dy):
    """[y, dB, dC, dx, dweight(, dbias)] of y = fn(bcx, weight, bias) for upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_() for t in (bcx, weight, bias) if t is not None]
    y = fn(*leaves) if bias is not None else fn(*leaves, None)
    y.backward(dy)
    d_b, d_c, d_x = leaves[0].grad.chunk(3, dim=-1)
    return [y, d_b, d_c, d_x] + [leaf.grad for leaf in leaves[1:]]


def transformers_core(bcx, weight, bias):
    """C * conv(B * x) exactly as Lfm2MoeShortConv.forward computes it without a cache (torch path)."""
    b, c, x = bcx.transpose(-1, -2).chunk(3, dim=-2)
    y = c * hf.causal_conv1d_fn(b * x, weight.squeeze(1), bias)
    return y.transpose(-1, -2).contiguous()


@pytest.mark.skipif(not interpreter_enabled(), reason="TRITON_INTERPRET=0 tests the PyTorch reference on the CPU")
def test_interpreter_takes_triton_path():
    assert use_triton(torch.zeros(1))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_and_transformers(shape, bias):
    args = inputs(*shape, bias)
    got = run(short_conv, *args)
    for other in (reference_short_conv, transformers_core):
        want = run(other, *args)
        for name, g, w in zip(["y", "dB", "dC", "dx", "dweight", "dbias"], got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            assert rel_err(g, w) < 1e-5, (other.__name__, name)


def test_strided_input():
    bcx, weight, bias, dy = inputs(2, 9, 21, 3, True)
    wide = torch.randn(2, 9, 3 * 21 + 5)
    wide[..., :63] = bcx
    strided = wide[..., :63]  # rows wider than the channels: read through strides, no copy
    got = run(short_conv, strided, weight, bias, dy)
    want = run(reference_short_conv, bcx, weight, bias, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("conv_bias", [False, True])
def test_patched_module_matches_transformers(conv_bias):
    """The whole short-conv layer, padding mask included: output and every parameter and input gradient."""
    config = Lfm2MoeConfig(hidden_size=29, conv_L_cache=3, conv_bias=conv_bias, num_hidden_layers=1,
                           layer_types=["conv"], num_attention_heads=1, num_key_value_heads=1)
    torch.manual_seed(0)
    module = hf.Lfm2MoeShortConv(config, layer_idx=0)
    hidden = torch.randn(2, 6, 29)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding: padded positions must not leak into the convolution
    dy = torch.randn(2, 6, 29)
    results = []
    for forward in (hf.Lfm2MoeShortConv.forward, short_conv_forward):
        module.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_()
        out = forward(module, x, attention_mask=mask)
        out.backward(dy)
        results.append([out, x.grad] + [p.grad for _, p in sorted(module.named_parameters())])
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 2048, 2048, 3), (3, 333, 1000, 3), (2, 2, 37, 4)])
def test_bf16_gpu(shape, bias):
    args = inputs(*shape, bias, dtype=torch.bfloat16, device="cuda")
    got = run(short_conv, *args)
    want = run(reference_short_conv, *[None if t is None else t.float() for t in args])
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, w) < 1e-2
