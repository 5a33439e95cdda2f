import pytest
import torch
from transformers import AfmoeConfig, CohereConfig
from transformers.models.afmoe import modeling_afmoe
from transformers.models.cohere import modeling_cohere
from transformers.models.lfm2_moe import modeling_lfm2_moe

from fastmoe.kernels.qk_norm_rope import qk_norm_rope, reference_qk_norm_rope
from testing_utils import rel_err

# (batch, q heads, kv heads, seq, head_dim): odd seq, GQA-like kv heads, head_dim not a power of two.
SHAPES = [(1, 4, 2, 7, 40), (2, 3, 1, 5, 24)]
EPS = 1e-5


def hf_cos_sin(interleaved: bool, batch: int, heads: int, seq: int, dim: int, device="cpu"):
    if interleaved:
        config = CohereConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=1)
        rotary = modeling_cohere.CohereRotaryEmbedding(config)
    else:
        config = AfmoeConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=1, head_dim=dim)
        rotary = modeling_afmoe.AfmoeRotaryEmbedding(config)
    position_ids = torch.arange(3, 3 + seq, device=device)[None].expand(batch, seq) * 37
    return rotary.to(device)(torch.zeros(1, device=device), position_ids)


def qk_inputs(batch, q_heads, kv_heads, seq, dim, per_head: bool, dtype=torch.float32, device="cpu"):
    """q, k (batch, seq, heads, dim) as proj(h).view(...) gives them, random norm weights, and upstream
    gradients (batch, heads, seq, dim)."""
    torch.manual_seed(batch * 100 + seq + dim)
    q = (torch.randn(batch, seq, q_heads, dim, device=device) * 2 + 0.3).to(dtype)
    k = (torch.randn(batch, seq, kv_heads, dim, device=device) * 2 - 0.2).to(dtype)
    wq = torch.randn((q_heads, dim) if per_head else (dim,), device=device) * 0.5 + 1
    wk = torch.randn((kv_heads, dim) if per_head else (dim,), device=device) * 0.5 + 1
    dq = torch.randn(batch, q_heads, seq, dim, device=device).to(dtype)
    dk = torch.randn(batch, kv_heads, seq, dim, device=device).to(dtype)
    return q, k, wq, wk, dq, dk


def run(fn, tensors, grads):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    torch.autograd.backward(outs, grads)
    return [*outs, *(leaf.grad for leaf in leaves)]


def hf_attention_prologue(family: str, eps: float):
    """The transformers code qk_norm_rope replaces: q/k norm modules, transpose, apply_rotary_pos_emb."""
    norm_cls, module = {
        "afmoe": (modeling_afmoe.AfmoeRMSNorm, modeling_afmoe),
        "lfm2_moe": (modeling_lfm2_moe.Lfm2MoeRMSNorm, modeling_lfm2_moe),
        "cohere": (modeling_cohere.CohereLayerNorm, modeling_cohere),
    }[family]

    def prologue(q, k, wq, wk, cos, sin):
        q_norm = norm_cls(tuple(wq.shape), eps=eps)
        k_norm = norm_cls(tuple(wk.shape), eps=eps)
        # Parameters are replaced by the test's leaves so gradients land on them.
        del q_norm.weight, k_norm.weight
        q_norm.weight, k_norm.weight = wq, wk
        q_states = q_norm(q).transpose(1, 2)
        k_states = k_norm(k).transpose(1, 2)
        if cos is None:
            return q_states, k_states
        return module.apply_rotary_pos_emb(q_states, k_states, cos, sin)

    return prologue


FAMILIES = [("afmoe", "rms", False, False), ("lfm2_moe", "rms", False, False), ("cohere", "layer", True, True)]


@pytest.mark.parametrize("family, norm, interleaved, per_head", FAMILIES)
@pytest.mark.parametrize("shape, with_rope", [(SHAPES[0], True), (SHAPES[1], True), (SHAPES[1], False)])
def test_matches_transformers(shape, family, norm, interleaved, per_head, with_rope):
    batch, q_heads, _, seq, dim = shape
    q, k, wq, wk, dq, dk = qk_inputs(*shape, per_head=per_head)
    cos, sin = hf_cos_sin(interleaved, batch, q_heads, seq, dim) if with_rope else (None, None)
    hf = hf_attention_prologue(family, EPS)
    want = run(lambda a, b, wa, wb: hf(a, b, wa, wb, cos, sin), [q, k, wq, wk], [dq, dk])
    for impl in (qk_norm_rope, reference_qk_norm_rope):
        got = run(
            lambda a, b, wa, wb: (impl(a, wa, cos, sin, EPS, norm, interleaved),
                                  impl(b, wb, cos, sin, EPS, norm, interleaved)),
            [q, k, wq, wk], [dq, dk],
        )
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize(
    "norm, weight_kind, interleaved",
    [("rms", "shared", False), ("rms", "per_head", True), ("rms", None, False),
     ("layer", "shared", True), ("layer", "per_head", False), ("layer", None, True)],
)
def test_triton_matches_reference(norm, weight_kind, interleaved):
    batch, heads, seq, dim = 2, 3, 3, 24
    torch.manual_seed(7)
    x = torch.randn(batch, seq, heads, dim) * 3 + 0.5
    weight = None if weight_kind is None else torch.randn((heads, dim) if weight_kind == "per_head" else (dim,))
    cos, sin = torch.randn(1, seq, dim), torch.randn(1, seq, dim)  # cos/sin halves differ: tests the exact transpose
    dy = torch.randn(batch, heads, seq, dim)
    tensors = [x] if weight is None else [x, weight]

    def call(impl):
        return lambda a, w=None: (impl(a, w, cos, sin, EPS, norm, interleaved),)

    got = run(call(qk_norm_rope), tensors, [dy])
    want = run(call(reference_qk_norm_rope), tensors, [dy])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_no_rope_odd_head_dim(norm):
    x = torch.randn(2, 5, 3, 9) + 0.5
    weight = torch.randn(3, 9)
    dy = torch.randn(2, 3, 5, 9)

    def call(impl):
        return lambda a, w: (impl(a, w, None, None, EPS, norm, False),)

    got = run(call(qk_norm_rope), [x, weight], [dy])
    want = run(call(reference_qk_norm_rope), [x, weight], [dy])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_heads_split_across_programs(interleaved):
    """20 heads of dim 130 exceed one tile's head block, so heads are split over a second grid axis."""
    x = torch.randn(1, 3, 20, 130) + 0.5
    weight = torch.randn(20, 130)
    cos, sin = torch.randn(1, 3, 130), torch.randn(1, 3, 130)
    dy = torch.randn(1, 20, 3, 130)

    def call(impl):
        return lambda a, w: (impl(a, w, cos, sin, EPS, "layer", interleaved),)

    got = run(call(qk_norm_rope), [x, weight], [dy])
    want = run(call(reference_qk_norm_rope), [x, weight], [dy])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_no_norm_is_rope_of_transpose():
    x = torch.randn(1, 7, 2, 40)
    cos, sin = hf_cos_sin(False, 1, 2, 7, 40)
    got = qk_norm_rope(x, None, cos, sin, EPS, None, False)
    want = reference_qk_norm_rope(x, None, cos, sin, EPS, None, False)
    assert rel_err(got, want) < 1e-6


def test_output_is_transposed_view_of_contiguous():
    out = qk_norm_rope(torch.randn(1, 7, 2, 40), torch.randn(40), None, None, EPS, "rms")
    assert out.shape == (1, 2, 7, 40) and out.transpose(1, 2).is_contiguous()


def test_fp16():
    q, _, wq, _, dq, _ = qk_inputs(1, 4, 2, 7, 40, per_head=True, dtype=torch.float16)
    cos, sin = hf_cos_sin(True, 1, 4, 7, 40)
    cos, sin = cos.half(), sin.half()

    def call(impl):
        return lambda a, w: (impl(a, w, cos, sin, EPS, "layer", True),)

    got = run(call(qk_norm_rope), [q, wq], [dq])
    want = run(call(reference_qk_norm_rope), [q, wq], [dq])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_rope", [True, False])
@pytest.mark.parametrize("family, norm, interleaved, per_head", FAMILIES)
@pytest.mark.parametrize("shape", [(2, 16, 4, 1023, 128), (1, 4, 2, 7, 40)])
def test_bf16_gpu(shape, family, norm, interleaved, per_head, with_rope):
    batch, q_heads, _, seq, dim = shape
    q, k, wq, wk, dq, dk = qk_inputs(*shape, per_head=per_head, dtype=torch.bfloat16, device="cuda")
    cos, sin = hf_cos_sin(interleaved, batch, q_heads, seq, dim, "cuda") if with_rope else (None, None)
    hf = hf_attention_prologue(family, EPS)
    want = run(
        lambda a, b, wa, wb: hf(a, b, wa, wb, cos, sin), [q.float(), k.float(), wq, wk], [dq.float(), dk.float()]
    )
    cos16, sin16 = (cos.bfloat16(), sin.bfloat16()) if with_rope else (None, None)
    got = run(
        lambda a, b, wa, wb: (qk_norm_rope(a, wa, cos16, sin16, EPS, norm, interleaved),
                              qk_norm_rope(b, wb, cos16, sin16, EPS, norm, interleaved)),
        [q, k, wq, wk], [dq, dk],
    )
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2
