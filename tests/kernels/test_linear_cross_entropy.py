import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from fastmoe.kernels import reference_only
from fastmoe.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_log_probs,
    reference_linear_cross_entropy,
    reference_linear_log_probs,
    shift_labels,
)
from testing_utils import max_rel_err

IGNORE = -100


def make_inputs(tokens, hidden, vocab, dtype=torch.float32, device="cpu", bias=False, ignore_every=4, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device=device, dtype=dtype)
    b = (torch.randn(vocab, generator=gen) * 0.1).to(device=device, dtype=dtype) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::ignore_every] = IGNORE
    return h, w, b, labels.to(device)


def loss_and_grads(fn, h, w, b, labels, train_weight, **kwargs):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(train_weight)
    b = None if b is None else b.detach().clone().requires_grad_(train_weight)
    loss = fn(h, w, labels, bias=b, **kwargs)
    loss.backward()
    grads = [h.grad]
    if train_weight:
        grads.append(w.grad)
        if b is not None:
            grads.append(b.grad)
    return loss.detach(), grads


def assert_matches_reference(h, w, b, labels, train_weight, tol, chunk_size=None, **kwargs):
    loss, grads = loss_and_grads(
        linear_cross_entropy, h, w, b, labels, train_weight, chunk_size=chunk_size, **kwargs
    )
    # The reference upcasts the same inputs, so low-precision runs are compared with the fp32 truth.
    ref_loss, ref_grads = loss_and_grads(
        reference_linear_cross_entropy, h.float(), w.float(), None if b is None else b.float(), labels,
        train_weight, **kwargs,
    )
    assert loss.dtype == torch.float32
    assert max_rel_err(loss, ref_loss) < tol, (loss, ref_loss)
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert grad.dtype == h.dtype
        assert max_rel_err(grad, ref) < tol, name


# tokens, hidden, vocab, chunk_size: vocabularies that are not a multiple of the 256-column CPU block (997 is
# prime), token counts that leave a ragged last chunk, single and many chunks, and the default chunk size.
SHAPES = [(37, 40, 1000, 8), (50, 40, 997, 16), (9, 40, 997, 64), (21, 32, 300, None)]


@pytest.mark.parametrize("tokens,hidden,vocab,chunk_size", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_fp32(tokens, hidden, vocab, chunk_size, bias):
    h, w, b, labels = make_inputs(tokens, hidden, vocab, bias=bias)
    assert_matches_reference(h, w, b, labels, train_weight=True, tol=1e-5, chunk_size=chunk_size)


@pytest.mark.parametrize("num_items", [None, 23, "tensor"])
@pytest.mark.parametrize("logit_scale", [1.0, 0.0625])
def test_scale_and_num_items(num_items, logit_scale):
    h, w, b, labels = make_inputs(37, 40, 997, bias=True)
    if num_items == "tensor":
        num_items = torch.tensor(31)
    assert_matches_reference(
        h, w, b, labels, train_weight=True, tol=1e-5, chunk_size=8,
        logit_scale=logit_scale, num_items_in_batch=num_items,
    )


def test_frozen_lm_head():
    # The LoRA case: only grad_hidden is computed; the weight gets no gradient at all.
    h, w, _, labels = make_inputs(37, 40, 997)
    assert_matches_reference(h, w, None, labels, train_weight=False, tol=1e-5, chunk_size=8)
    w = w.clone().requires_grad_(False)
    h = h.clone().requires_grad_()
    linear_cross_entropy(h, w, labels, chunk_size=8).backward()
    assert w.grad is None and h.grad is not None


def test_all_ignored_chunk():
    h, w, b, labels = make_inputs(40, 40, 997, bias=True)
    labels[8:24] = IGNORE  # chunks 1 and 2 of 8 rows are entirely ignored
    assert_matches_reference(h, w, b, labels, train_weight=True, tol=1e-5, chunk_size=8)
    h.requires_grad_()
    linear_cross_entropy(h, w, labels, bias=b, chunk_size=8).backward()
    assert torch.all(h.grad[8:24] == 0)


def test_all_ignored_batch():
    # Like torch's mean cross-entropy: nan loss, zero gradients. With num_items_in_batch: 0 loss.
    h, w, _, labels = make_inputs(12, 40, 300)
    labels[:] = IGNORE
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(reference_linear_cross_entropy(h, w, labels))
    assert torch.all(h.grad == 0)
    h.grad = None
    loss = linear_cross_entropy(h, w, labels, chunk_size=8, num_items_in_batch=5)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)


def test_grad_output_scaling():
    # backward multiplies the eagerly computed gradients by grad_output (e.g. a loss weight or GradScaler).
    h, w, _, labels = make_inputs(20, 40, 300)
    h1 = h.clone().requires_grad_()
    (3.5 * linear_cross_entropy(h1, w, labels, chunk_size=8)).backward()
    h2 = h.clone().requires_grad_()
    (3.5 * reference_linear_cross_entropy(h2, w, labels)).backward()
    assert max_rel_err(h1.grad, h2.grad) < 1e-5


def test_no_grad():
    h, w, _, labels = make_inputs(20, 40, 300)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    assert max_rel_err(loss, reference_linear_cross_entropy(h, w, labels)) < 1e-5


def test_fp16_interpreter():
    h, w, b, labels = make_inputs(37, 40, 997, dtype=torch.float16, bias=True)
    assert_matches_reference(h, w, b, labels, train_weight=True, tol=1e-2, chunk_size=16)


@pytest.mark.parametrize("num_items", [None, 17])
def test_reference_matches_transformers(num_items):
    # (batch, seq) labels with right padding and prompt masking, shifted by shift_labels, against transformers'
    # own ForCausalLMLoss on the full logits.
    batch, seq, hidden, vocab = 3, 11, 40, 300
    h, w, b, _ = make_inputs(batch * seq, hidden, vocab, bias=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :3] = IGNORE
    labels[1, 7:] = IGNORE
    labels[2, :] = IGNORE
    hidden_states = h.view(batch, seq, hidden).requires_grad_()
    logits = (hidden_states @ w.T + b) * 0.0625
    expected = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=num_items, ignore_index=IGNORE)
    (expected_grad,) = torch.autograd.grad(expected, hidden_states)

    for fn in (reference_linear_cross_entropy, linear_cross_entropy):
        hs = hidden_states.detach().clone().requires_grad_()
        loss = fn(hs.view(-1, hidden), w, shift_labels(labels), bias=b, logit_scale=0.0625,
                  num_items_in_batch=num_items)
        (grad,) = torch.autograd.grad(loss, hs)
        assert max_rel_err(loss, expected) < 1e-5, fn.__name__
        assert max_rel_err(grad, expected_grad) < 1e-5, fn.__name__


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3], [4, 5, IGNORE]])
    assert shift_labels(labels).tolist() == [2, 3, IGNORE, 5, IGNORE, IGNORE]


def test_reference_only_dispatch():
    h, w, _, labels = make_inputs(20, 40, 300)
    with reference_only():
        loss = linear_cross_entropy(h, w, labels)
    assert torch.equal(loss, reference_linear_cross_entropy(h, w, labels))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tokens,hidden,vocab,chunk_size", [(1000, 256, 32000, 128), (333, 128, 50257, None)])
@pytest.mark.parametrize("bias,logit_scale,num_items", [(False, 1.0, None), (True, 0.0625, 777)])
def test_gpu_bf16(tokens, hidden, vocab, chunk_size, bias, logit_scale, num_items):
    h, w, b, labels = make_inputs(tokens, hidden, vocab, dtype=torch.bfloat16, device="cuda", bias=bias)
    assert_matches_reference(
        h, w, b, labels, train_weight=True, tol=1e-2, chunk_size=chunk_size,
        logit_scale=logit_scale, num_items_in_batch=num_items,
    )


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_large_vocab_memory():
    # AFMoE's vocabulary at a realistic token count, with a frozen lm_head as under LoRA.
    tokens, hidden, vocab = 8192, 2048, 200192
    h, w, _, labels = make_inputs(tokens, hidden, vocab, dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(h, w, None, labels, train_weight=False, tol=1e-2)

    def run(fn, **kwargs):
        def step():
            x = h.detach().clone().requires_grad_()
            fn(x, w, labels, **kwargs).backward()
        return step

    fused = peak_bytes(run(linear_cross_entropy))
    # The HF path: bf16 logits, their fp32 upcast and its gradient.
    full = peak_bytes(run(reference_linear_cross_entropy))
    assert fused < full / 8, (fused, full)
    assert fused < 1.5 * 2**30, fused


# --- linear_log_probs: trl's fused LM head (fastmoe/trl_fused_head.py) -----------------------------------------

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def trl_log_probs(h, w, b, labels, logit_scale=1.0, temperature=1.0):
    """trl's ChunkedLogProbFunction (torch tiles on the CPU, Triton on CUDA) on the non-ignored rows, zero elsewhere,
    as trl's add_fused_lm_head scatters it. On the CPU, vocabulary chunks of 128 columns leave a ragged last one."""
    from trl.kernels import ChunkedLogProbFunction

    keep = labels != IGNORE
    vocab_chunk = 128 if h.device.type == "cpu" else 32768  # 32768: what trl's add_fused_lm_head passes
    fields = ChunkedLogProbFunction.apply(h[keep], w, b, labels[keep], temperature, vocab_chunk, None, logit_scale,
                                          FIELDS[1:])
    return [x.new_zeros(labels.shape).masked_scatter(keep, x) for x in fields]


def log_probs_and_grads(fn, h, w, b, labels, train_head, entropy_grad, seed=1, **kwargs):
    """The five fields, then the gradients of Σ g·log_probs (+ Σ g'·entropy) for random per-token weights g, g'."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(train_head)
    b = None if b is None else b.detach().clone().requires_grad_(train_head)
    fields = fn(h, w, b, labels, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    # Drawn on the CPU (one stream of numbers on every device), then moved to the fields' device.
    objective = (fields[0] * torch.randn(labels.shape, generator=gen).to(labels.device)).sum()
    if entropy_grad:
        objective = objective + (fields[1] * torch.randn(labels.shape, generator=gen).to(labels.device)).sum()
    objective.backward()
    grads = [h.grad] + ([w.grad] + ([] if b is None else [b.grad]) if train_head else [])
    return [x.detach() for x in fields], grads


def fastmoe_log_probs(chunk_size):
    def fn(h, w, b, labels, **kwargs):
        return linear_log_probs(h, w, labels, bias=b, chunk_size=chunk_size, **kwargs)

    return fn


def make_head_inputs(tokens, hidden, vocab, dtype=torch.float32, bias=False, seed=0, device="cpu"):
    # Logits of a few units, as a trained head gives (a softmax neither flat nor one-hot), and some labels that
    # are the argmax so that is_top1 is tested both ways.
    h, w, b, labels = make_inputs(tokens, hidden, vocab, dtype=dtype, bias=bias, seed=seed, device=device)
    w = w * 3
    argmax = F.linear(h.float(), w.float(), None if b is None else b.float()).argmax(-1)
    labels[1::3] = argmax[1::3]
    return h, w, b, labels


def assert_log_probs_match_trl(h, w, b, labels, train_head, entropy_grad, tol, chunk_size, **kwargs):
    fields, grads = log_probs_and_grads(fastmoe_log_probs(chunk_size), h, w, b, labels, train_head, entropy_grad,
                                        **kwargs)
    ref_fields, ref_grads = log_probs_and_grads(trl_log_probs, h, w, b, labels, train_head, entropy_grad, **kwargs)
    for name, out, ref in zip(FIELDS, fields, ref_fields):
        if name == "is_top1":
            assert out.dtype == torch.bool and torch.equal(out, ref) and out.any(), name
        else:
            assert out.dtype == torch.float32 and max_rel_err(out, ref) < tol, name
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert grad.dtype == h.dtype and max_rel_err(grad, ref) < tol, name
    return fields


# Each shape of SHAPES with a frozen head (LoRA: rows kept from the forward, the entropy's part recomputed) and a
# trainable one (everything recomputed in backward), with and without an entropy gradient and a bias.
HEAD_CASES = [
    (SHAPES[0], False, False, False),
    (SHAPES[0], False, True, True),
    (SHAPES[1], False, False, True),
    (SHAPES[1], True, True, False),
    (SHAPES[2], True, True, True),
    (SHAPES[3], True, False, False),
]


@pytest.mark.parametrize("shape,train_head,bias,entropy_grad", HEAD_CASES)
def test_log_probs_match_trl_fp32(shape, train_head, bias, entropy_grad):
    tokens, hidden, vocab, chunk_size = shape
    h, w, b, labels = make_head_inputs(tokens, hidden, vocab, bias=bias)
    fields = assert_log_probs_match_trl(h, w, b, labels, train_head, entropy_grad, 1e-5, chunk_size)
    ignored = labels == IGNORE
    assert all(torch.all(x[ignored] == 0) for x in fields)


@pytest.mark.parametrize("logit_scale,temperature", [(0.0625, 1.0), (1.0, 0.7), (0.0625, 1.3)])
def test_log_probs_scale_and_temperature(logit_scale, temperature):
    h, w, b, labels = make_head_inputs(37, 40, 997, bias=True)
    assert_log_probs_match_trl(h, w, b, labels, False, True, 1e-5, 8, logit_scale=logit_scale,
                               temperature=temperature)


def test_log_probs_reference_matches_trl():
    h, w, b, labels = make_head_inputs(37, 40, 997, bias=True)
    fields, grads = log_probs_and_grads(
        lambda h, w, b, labels, **kw: reference_linear_log_probs(h, w, labels, bias=b, **kw), h, w, b, labels, True,
        True, temperature=0.7)
    ref_fields, ref_grads = log_probs_and_grads(trl_log_probs, h, w, b, labels, True, True, temperature=0.7)
    assert torch.equal(fields[4], ref_fields[4])
    assert all(max_rel_err(x, r) < 1e-5 for x, r in zip(fields[:4] + grads, ref_fields[:4] + ref_grads))


def test_log_probs_without_entropy_gradient_do_not_recompute(monkeypatch):
    # SFT's case: a frozen head and only log_probs in the loss. Backward scales the rows the forward kept; the
    # logits are never computed again (an entropy gradient would recompute them).
    from fastmoe.kernels import linear_cross_entropy as op

    h, w, _, labels = make_head_inputs(37, 40, 997)
    x = h.clone().requires_grad_()
    fields = linear_log_probs(x, w, labels, chunk_size=8)

    def fail(*args, **kwargs):
        raise AssertionError("logits recomputed")

    monkeypatch.setattr(op, "_recomputed_grads", fail)
    (-fields.log_probs.sum() / 7 + 0 * fields.entropy.detach().sum()).backward()
    ref = h.clone().requires_grad_()
    (-reference_linear_log_probs(ref, w, labels).log_probs.sum() / 7).backward()
    assert max_rel_err(x.grad, ref.grad) < 1e-5


def test_is_top1_ties_go_to_the_first_maximum():
    # trl (as torch.argmax) counts a label as top-1 only if no earlier column ties with it: columns 5 and 6 tie in
    # one 256-column CPU block, 700 ties with them from a later block. Zero weight rows and a large bias make the
    # ties exact.
    h, w, b, labels = make_head_inputs(12, 40, 997, bias=True)
    tied = [5, 6, 700]
    w[tied] = 0.0
    b[tied] = 50.0
    labels[:4], labels[4:8], labels[8:] = 5, 6, 700
    fields = linear_log_probs(h, w, labels, bias=b, chunk_size=8)
    assert fields.is_top1.tolist() == [True] * 4 + [False] * 8
    assert torch.equal(fields.is_top1, trl_log_probs(h, w, b, labels)[4])


def test_log_probs_all_ignored_and_empty():
    # An all-masked micro-batch: zeros out, zero gradients, and (with no row at all, as trl's compaction leaves
    # it) empty outputs whose backward still runs.
    h, w, b, labels = make_head_inputs(12, 40, 300, bias=True)
    labels[:] = IGNORE
    for rows in (12, 0):
        x = h[:rows].clone().requires_grad_()
        fields = linear_log_probs(x, w, labels[:rows], bias=b, chunk_size=8)
        assert all(f.shape == (rows,) and not f.any() for f in fields)
        (fields.log_probs.sum() + fields.entropy.sum()).backward()
        assert x.grad.shape == (rows, 40) and not x.grad.any()


def test_log_probs_no_grad():
    h, w, b, labels = make_head_inputs(20, 40, 300, bias=True)
    with torch.no_grad():
        fields = linear_log_probs(h, w, labels, bias=b, chunk_size=8)
    ref = reference_linear_log_probs(h, w, labels, bias=b)
    assert all(max_rel_err(x, r) < 1e-5 for x, r in zip(fields[:4], ref[:4]))


def test_log_probs_fp16_interpreter():
    h, w, b, labels = make_head_inputs(37, 40, 997, dtype=torch.float16, bias=True)
    fields, grads = log_probs_and_grads(fastmoe_log_probs(16), h, w, b, labels, True, True)
    # trl on the same fp16 inputs computes its fp16 tiles in fp32 on the CPU: compare both with the fp32 truth.
    ref_fields, ref_grads = log_probs_and_grads(trl_log_probs, h.float(), w.float(), b.float(), labels, True, True)
    assert all(max_rel_err(x, r) < 1e-2 for x, r in zip(fields[:4] + grads, ref_fields[:4] + ref_grads))


def test_log_probs_bad_temperature():
    h, w, _, labels = make_head_inputs(4, 40, 300)
    with pytest.raises(ValueError, match="temperature must be positive"):
        linear_log_probs(h, w, labels, temperature=0.0)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tokens,hidden,vocab,chunk_size", [(1000, 256, 32000, 128), (333, 128, 50257, None)])
@pytest.mark.parametrize("train_head,bias,entropy_grad", [(False, False, False), (False, False, True),
                                                          (True, True, True)])
def test_log_probs_gpu_bf16_as_close_as_trl(tokens, hidden, vocab, chunk_size, train_head, bias, entropy_grad):
    # Against the fp32 answer, fastmoe's bf16 error keeps to the bf16 budget (1e-2) or, where trl's Triton head on the
    # same bf16 tensors does worse, to twice trl's. (A trainable head's weight gradient is summed chunk by chunk in
    # bf16, as the loss does, where trl sums in fp32.)
    h, w, b, labels = make_head_inputs(tokens, hidden, vocab, dtype=torch.bfloat16, bias=bias, device="cuda")
    kwargs = dict(logit_scale=0.0625, temperature=0.9)
    fields, grads = log_probs_and_grads(fastmoe_log_probs(chunk_size), h, w, b, labels, train_head, entropy_grad,
                                        **kwargs)
    trl_fields, trl_grads = log_probs_and_grads(trl_log_probs, h, w, b, labels, train_head, entropy_grad, **kwargs)
    exact_fields, exact_grads = log_probs_and_grads(
        lambda h, w, b, labels, **kw: reference_linear_log_probs(h, w, labels, bias=b, **kw), h.float(), w.float(),
        None if b is None else b.float(), labels, train_head, entropy_grad, **kwargs)
    for name, out, ref, exact in zip(FIELDS[:4] + ("hidden", "weight", "bias"), fields[:4] + grads,
                                     trl_fields[:4] + trl_grads, exact_fields[:4] + exact_grads):
        assert max_rel_err(out, exact) <= max(2 * max_rel_err(ref, exact), 1e-2), name
    # Top-1 flips where bf16 rounding reorders near-tied logits.
    mismatched = (fields[4] != exact_fields[4]).float().mean().item()
    assert mismatched <= 2 * (trl_fields[4] != exact_fields[4]).float().mean().item() + 1e-2
