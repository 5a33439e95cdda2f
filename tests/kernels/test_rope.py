import pytest
import torch
from transformers import AfmoeConfig, CohereConfig
from transformers.models.afmoe import modeling_afmoe
from transformers.models.cohere import modeling_cohere

from fastmoe.kernels.rope import (apply_rope, apply_rope_swapping_heads, reference_rope,
                                  reference_rope_swapping_heads)
from testing_utils import rel_err

# (batch, q heads, kv heads, seq, head_dim): odd seq, GQA-like kv heads, head_dim not a power of two.
SHAPES = [(1, 4, 2, 7, 40), (2, 3, 1, 5, 24), (2, 2, 2, 3, 128)]


def hf_cos_sin(interleaved: bool, batch: int, heads: int, seq: int, dim: int, device="cpu"):
    """cos/sin (batch, seq, dim) from the rotary embedding of the family that uses each layout."""
    if interleaved:
        config = CohereConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=1)
        rotary = modeling_cohere.CohereRotaryEmbedding(config)
    else:
        config = AfmoeConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=1, head_dim=dim)
        rotary = modeling_afmoe.AfmoeRotaryEmbedding(config)
    rotary = rotary.to(device)
    position_ids = torch.arange(3, 3 + seq, device=device)[None].expand(batch, seq) * 37  # large angles too
    return rotary(torch.zeros(1, device=device), position_ids)


def qk(batch, q_heads, kv_heads, seq, dim, dtype=torch.float32, device="cpu"):
    """q, k as attention makes them: (batch, seq, heads, dim) projections viewed as (batch, heads, seq, dim)."""
    torch.manual_seed(batch * 100 + seq)
    q = torch.randn(batch, seq, q_heads, dim, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim, dtype=dtype, device=device).transpose(1, 2)
    return q, k


def run(fn, tensors, grads):
    """fn's outputs and the gradients of its inputs for upstream grads."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    # clone() of a transposed view stays transposed (preserve_format), so the kernel still sees strides.
    outs = fn(*leaves)
    torch.autograd.backward(outs, grads)
    return [*outs, *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_and_reference_match_transformers(shape, interleaved):
    batch, q_heads, kv_heads, seq, dim = shape
    q, k = qk(*shape)
    assert not q.is_contiguous()
    cos, sin = hf_cos_sin(interleaved, batch, q_heads, seq, dim)
    grads = [torch.randn(q.shape), torch.randn(k.shape)]
    family = modeling_cohere if interleaved else modeling_afmoe
    want = run(lambda a, b: family.apply_rotary_pos_emb(a, b, cos, sin), [q, k], grads)
    for impl in (apply_rope, reference_rope):
        got = run(lambda a, b: (impl(a, cos, sin, interleaved), impl(b, cos, sin, interleaved)), [q, k], grads)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_arbitrary_cos_sin_and_broadcast_batch(interleaved):
    """Backward is the exact transpose even when cos/sin halves differ; cos/sin with batch 1 broadcast."""
    q, _ = qk(2, 3, 1, 5, 24)
    cos, sin = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    dy = torch.randn(q.shape)
    got = run(lambda a: (apply_rope(a, cos, sin, interleaved),), [q], [dy])
    want = run(lambda a: (reference_rope(a, cos, sin, interleaved),), [q], [dy])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_heads_split_across_programs():
    """20 heads of dim 130 exceed one program's head block: heads go over a second grid axis."""
    q, _ = qk(1, 20, 1, 3, 130)
    cos, sin = torch.randn(1, 3, 130), torch.randn(1, 3, 130)
    dy = torch.randn(q.shape)
    for interleaved in (False, True):
        got = run(lambda a: (apply_rope(a, cos, sin, interleaved),), [q], [dy])
        want = run(lambda a: (reference_rope(a, cos, sin, interleaved),), [q], [dy])
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5


def test_output_keeps_input_layout():
    q, _ = qk(2, 3, 1, 5, 24)
    cos, sin = hf_cos_sin(False, 2, 3, 5, 24)
    out = apply_rope(q, cos, sin, False)
    assert out.stride() == q.stride()


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError):
        apply_rope(torch.randn(1, 1, 2, 5), torch.randn(1, 2, 5), torch.randn(1, 2, 5), False)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope_swapping_heads(torch.randn(1, 2, 2, 3, 5), torch.randn(1, 2, 5), torch.randn(1, 2, 5))


@pytest.mark.parametrize("interleaved", [False, True])
def test_fp16(interleaved):
    q, _ = qk(1, 4, 2, 7, 40, dtype=torch.float16)
    cos, sin = hf_cos_sin(interleaved, 1, 4, 7, 40)
    cos, sin = cos.half(), sin.half()
    dy = torch.randn(q.shape, dtype=torch.float16)
    got = run(lambda a: (apply_rope(a, cos, sin, interleaved),), [q], [dy])
    want = run(lambda a: (reference_rope(a, cos, sin, interleaved),), [q], [dy])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 4, 1023, 128), (1, 4, 2, 7, 40)])
def test_bf16_gpu(shape, interleaved):
    batch, q_heads, kv_heads, seq, dim = shape
    q, k = qk(*shape, dtype=torch.bfloat16, device="cuda")
    cos, sin = hf_cos_sin(interleaved, batch, q_heads, seq, dim, device="cuda")
    grads = [torch.randn(q.shape, device="cuda"), torch.randn(k.shape, device="cuda")]
    family = modeling_cohere if interleaved else modeling_afmoe
    want = run(lambda a, b: family.apply_rotary_pos_emb(a, b, cos, sin), [q.float(), k.float()], grads)
    got = run(
        lambda a, b: (apply_rope(a, cos.bfloat16(), sin.bfloat16(), interleaved),
                      apply_rope(b, cos.bfloat16(), sin.bfloat16(), interleaved)),
        [q, k], [g.bfloat16() for g in grads],
    )
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("batch,seq,a,b,dim,cos_batch",
                         [(1, 7, 2, 3, 40, 1), (2, 5, 3, 2, 24, 2), (2, 3, 1, 20, 130, 1)])
def test_rope_swapping_heads(batch, seq, a, b, dim, cos_batch, interleaved):
    """RoPE with (a, b) heads written in (b, a) order (JetMoe's queries): values and gradients of the reference
    (RoPE, then the transpose), for per-batch and broadcast cos/sin; 20 heads of 130 span two head blocks."""
    torch.manual_seed(seq * a)
    x = torch.randn(batch, seq, a * b * dim).view(batch, seq, a, b, dim)
    cos, sin = torch.randn(cos_batch, seq, dim), torch.randn(cos_batch, seq, dim)
    dy = torch.randn(batch, seq, b, a, dim)
    got = run(lambda t: (apply_rope_swapping_heads(t, cos, sin, interleaved),), [x], [dy])
    want = run(lambda t: (reference_rope_swapping_heads(t, cos, sin, interleaved),), [x], [dy])
    heads = x.reshape(batch, seq, a * b, dim).transpose(1, 2)
    plain = reference_rope(heads, cos, sin, interleaved).transpose(1, 2).reshape(batch, seq, a, b, dim)
    assert torch.equal(want[0], plain.transpose(2, 3).contiguous())
    assert got[0].shape == (batch, seq, b, a, dim) and got[0].is_contiguous()
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rope_swapping_heads_bf16_gpu():
    """JetMoe-8B's queries (2 slots of 16 kv heads of 128) in bf16 against the fp32 reference."""
    x = torch.randn(1, 1023, 2, 16, 128, device="cuda")
    cos, sin = hf_cos_sin(False, 1, 32, 1023, 128, device="cuda")
    dy = torch.randn(1, 1023, 16, 2, 128, device="cuda")
    want = run(lambda t: (reference_rope_swapping_heads(t, cos, sin, False),), [x], [dy])
    got = run(lambda t: (apply_rope_swapping_heads(t, cos.bfloat16(), sin.bfloat16(), False),), [x.bfloat16()],
              [dy.bfloat16()])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2
