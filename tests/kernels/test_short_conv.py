import pytest
import torch
from transformers import Lfm2MoeConfig
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf

from fastmoe.kernels import use_triton
from fastmoe.kernels.dispatch import interpreter_enabled
from fastmoe.kernels.short_conv import (document_offsets, reference_short_conv, reference_short_conv_decode,
                                       short_conv, short_conv_decode)
from fastmoe.models.lfm2_moe import short_conv_forward
from testing_utils import rel_err

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


def test_document_offsets_restart_wherever_positions_do_not_continue():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    assert document_offsets(positions, 2).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], list(range(10))]
    assert document_offsets(positions[:1], 3).shape == (3, 10)  # positions broadcast over the batch


# (lengths of the documents packed in each row, hidden, kernel size): documents shorter than the kernel, of one
# token, a row of one document, boundaries inside and across time tiles (16 rows).
PACKED = [([[3, 1, 5, 2], [11]], 37, 3), ([[2, 2, 2, 1, 9, 4]], 133, 4), ([[17, 1, 20], [7, 31]], 24, 2)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lengths, hidden, kernel_size", PACKED)
def test_packed_documents_are_convolved_separately(lengths, hidden, kernel_size, bias):
    seq = max(sum(row) for row in lengths)
    batch = len(lengths)
    bcx, weight, conv_bias, dy = inputs(batch, seq, hidden, kernel_size, bias)
    # Rows shorter than seq end in one more document (the rest of the row).
    positions = torch.stack([torch.cat([torch.arange(n) for n in row + [seq - sum(row)] if n]) for row in lengths])
    offsets = document_offsets(positions, batch)
    got = run(lambda *a: short_conv(*a, doc_offsets=offsets), bcx, weight, conv_bias, dy)
    want = run(lambda *a: reference_short_conv(*a, doc_offsets=offsets), bcx, weight, conv_bias, dy)
    for name, g, w in zip(["y", "dB", "dC", "dx", "dweight", "dbias"], got, want):
        assert rel_err(g, w) < 1e-5, name
    # Each document alone, through the unpacked op: the same outputs and input gradients, and weight gradients that
    # sum over the documents.
    alone = [[] for _ in got]
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths + [seq - sum(row_lengths)]:
            if n:
                rows = slice(row, row + 1), slice(start, start + n)
                for parts, value in zip(alone, run(short_conv, bcx[rows], weight, conv_bias, dy[rows])):
                    parts.append(value)
                start += n
    separate_y, separate_db = torch.cat(alone[0], 1), torch.cat(alone[1], 1)
    assert rel_err(torch.cat(list(got[0]), 0)[None], separate_y) < 1e-5
    assert rel_err(torch.cat(list(got[1]), 0)[None], separate_db) < 1e-5
    assert rel_err(got[4], sum(alone[4])) < 1e-5


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_gpu_packed_documents():
    batch, seq, hidden, kernel_size = 2, 1000, 1000, 4
    bcx, weight, conv_bias, dy = inputs(batch, seq, hidden, kernel_size, True, dtype=torch.bfloat16, device="cuda")
    generator = torch.Generator().manual_seed(3)
    positions = torch.cat([torch.arange(int(n)) for n in torch.randint(1, 90, (40,), generator=generator)])[:seq]
    positions = torch.cat([positions, torch.arange(seq - positions.numel())])[None].cuda()
    offsets = document_offsets(positions, batch)
    got = run(lambda *a: short_conv(*a, doc_offsets=offsets), bcx, weight, conv_bias, dy)
    want = run(lambda *a: reference_short_conv(*a, doc_offsets=offsets),
               *[None if t is None else t.float() for t in (bcx, weight, conv_bias, dy)])
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, w) < 1e-2


@pytest.mark.parametrize("batch,hidden,taps", [(1, 40, 3), (3, 300, 3), (2, 24, 4), (1, 16, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_short_conv_decode_equals_pytorchs_step(batch, hidden, taps, bias, dtype):
    """One decode step: the state shifted with the new B * x written back, and y, as transformers' torch path gives
    them; 300 channels take two channel blocks, the second partial; a kernel of one tap keeps only the new value."""
    gen = torch.Generator().manual_seed(0)
    bcx = torch.randn(batch, 1, 3 * hidden, generator=gen).to(dtype)
    state = torch.randn(batch, hidden, taps, generator=gen).to(dtype)
    weight = torch.randn(hidden, 1, taps, generator=gen).to(dtype)
    b = torch.randn(hidden, generator=gen).to(dtype) if bias else None
    expected_state = state.clone()
    expected = reference_short_conv_decode(bcx, expected_state, weight, b)
    y = short_conv_decode(bcx, state, weight, b)
    assert y.shape == (batch, 1, hidden) and y.dtype == dtype
    assert torch.equal(state, expected_state)
    assert rel_err(y, expected) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_short_conv_decode_writes_a_strided_state_in_place_and_refuses_mismatched_shapes():
    gen = torch.Generator().manual_seed(1)
    bcx = torch.randn(2, 1, 3 * 40, generator=gen)
    storage = torch.randn(2, 3, 40, generator=gen)
    state = storage.transpose(1, 2)  # (batch, hidden, L), channels contiguous
    weight = torch.randn(40, 3, generator=gen)
    expected_state = state.clone()
    expected = reference_short_conv_decode(bcx, expected_state, weight)
    y = short_conv_decode(bcx, state, weight)
    assert torch.equal(storage.transpose(1, 2), expected_state) and rel_err(y, expected) < 1e-6
    with pytest.raises(ValueError, match="short_conv_decode takes bcx"):
        short_conv_decode(bcx[:, :, :-3], state, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_short_conv_decode_gpu_bf16(batch):
    """LFM2-8B-A1B's 2048 channels in bf16 on the GPU: the state bit-exact, y as PyTorch's step rounds it."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    bcx = torch.randn(batch, 1, 3 * 2048, generator=gen, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(batch, 2048, 3, generator=gen, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2048, 1, 3, generator=gen, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(2048, generator=gen, device="cuda", dtype=torch.bfloat16)
    expected_state = state.clone()
    expected = reference_short_conv_decode(bcx, expected_state, weight, bias)
    y = short_conv_decode(bcx, state, weight, bias)
    assert torch.equal(state, expected_state)
    assert rel_err(y.float(), expected.float()) < 1e-2
