import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fastmoe.kernels import decode_attention as module
from fastmoe.kernels.decode_attention import decode_attention, reference_decode_attention
from testing_utils import rel_err

# (batch, heads, kv_heads, positions, dim): head dims not a power of two, groups of 1, 3 and 8, positions short of one
# tile, several tiles, and more tiles than MAX_SPLITS (splits of several tiles).
SHAPES = [(1, 4, 2, 5, 12), (2, 3, 1, 130, 16), (3, 8, 8, 64, 32), (1, 16, 2, 300, 24),
          (2, 6, 2, 64 * (module.MAX_SPLITS + 3) + 7, 8)]


def inputs(batch, heads, kv_heads, positions, dim, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    # The query as the attention forwards hand it: a transposed view of (batch, 1, heads, dim).
    query = torch.randn(batch, 1, heads, dim, generator=generator).transpose(1, 2)
    key = torch.randn(batch, kv_heads, positions, dim, generator=generator) * 2
    value = torch.randn(batch, kv_heads, positions, dim, generator=generator)
    mask = torch.rand(batch, positions, generator=generator) < 0.7
    mask[:, 0] = True  # every row attends to something (the rows with nothing are their own test)
    return (query.to(device, dtype), key.to(device, dtype), value.to(device, dtype), mask.to(device))


def transformers_sdpa(query, key, value, mask, scaling):
    """What transformers runs for a decode step over this cache: repeat_kv, then SDPA with the boolean mask."""
    attention = torch.nn.Module()
    attention.num_key_value_groups = query.shape[1] // key.shape[1]
    out, _ = sdpa_attention_forward(attention, query, key, value, mask[:, None, None, :], scaling=scaling)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_transformers(shape):
    query, key, value, mask = inputs(*shape)
    scaling = shape[-1] ** -0.5
    want = transformers_sdpa(query.double(), key.double(), value.double(), mask, scaling)
    got = decode_attention(query, key, value, mask, scaling)
    reference = reference_decode_attention(query, key, value, mask, scaling)
    assert got.shape == want.shape == (shape[0], 1, shape[1], shape[-1]) and got.dtype == query.dtype
    assert rel_err(got.double(), want) < 1e-5
    assert rel_err(reference.double(), want) < 1e-5


def test_the_kernel_ran(monkeypatch):
    """Guard: under the interpreter the Triton kernels, not the reference, produced the result."""
    monkeypatch.setattr(module, "reference_decode_attention", None)
    query, key, value, mask = inputs(*SHAPES[1])
    decode_attention(query, key, value, mask, 0.25)


def test_a_row_with_nothing_allowed_gives_zeros():
    query, key, value, mask = inputs(2, 4, 2, 70, 16)
    mask[1] = False
    got = decode_attention(query, key, value, mask, 0.25)
    assert torch.all(got[1] == 0)
    want = reference_decode_attention(query, key, value, mask, 0.25)
    assert rel_err(got[0], want[0]) < 1e-5


def test_a_split_with_nothing_allowed_does_not_count():
    """A whole split of masked positions (a ring buffer's unwritten slots, left padding) adds nothing."""
    query, key, value, mask = inputs(1, 4, 2, 64 * 5, 16)
    mask[:, 64:256] = False
    got = decode_attention(query, key, value, mask, 0.3)
    want = transformers_sdpa(query.double(), key.double(), value.double(), mask, 0.3)
    assert rel_err(got.double(), want) < 1e-5


def test_fp16():
    query, key, value, mask = inputs(*SHAPES[3], dtype=torch.float16)
    got = decode_attention(query, key, value, mask, 0.2)
    want = transformers_sdpa(query.double(), key.double(), value.double(), mask, 0.2)
    assert rel_err(got.double(), want) < 2e-3


def test_rejects_several_queries():
    query, key, value, mask = inputs(1, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention(query.expand(1, 4, 2, 16), key, value, mask, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 4, 768, 128), (8, 32, 4, 4352, 128), (3, 24, 8, 131, 64)])
def test_bf16_gpu_matches_fp32_reference(shape):
    query, key, value, mask = inputs(*shape, dtype=torch.bfloat16, device="cuda")
    got = decode_attention(query, key, value, mask, shape[-1] ** -0.5)
    want = reference_decode_attention(query.float(), key.float(), value.float(), mask, shape[-1] ** -0.5)
    assert rel_err(got.float(), want) < 1e-2


def gpt_oss_eager(query, key, value, mask, scaling, sinks):
    """transformers' gpt-oss eager attention (sinks in the softmax's denominator) under an additive mask."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    attention = torch.nn.Module()
    attention.num_key_value_groups = query.shape[1] // key.shape[1]
    attention.sinks = sinks
    additive = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
    out, _ = eager_attention_forward(attention.eval(), query, key, value, additive[:, None, None, :], scaling)
    return out


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]])
def test_sinks_match_gpt_oss_eager_attention(shape):
    """Sinks enter the merge of the splits (several splits in the second shape); a sink larger than every score
    takes most of the weight, so a dropped sink would show."""
    query, key, value, mask = inputs(*shape)
    scaling = shape[-1] ** -0.5
    sinks = torch.randn(shape[1], generator=torch.Generator().manual_seed(5)) * 2 + 8
    want = gpt_oss_eager(query.double(), key.double(), value.double(), mask, scaling, sinks.double())
    got = decode_attention(query, key, value, mask, scaling, sinks)
    assert rel_err(reference_decode_attention(query, key, value, mask, scaling, sinks), want) < 1e-6
    assert rel_err(got, want) < 1e-5
    assert rel_err(decode_attention(query, key, value, mask, scaling), want) > 1e-2
