import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from fastmoe.kernels import reference_only
from fastmoe.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    reference_linear_cross_entropy,
    shift_labels,
)

IGNORE = -100


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


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
    assert rel_err(loss, ref_loss) < tol, (loss, ref_loss)
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert grad.dtype == h.dtype
        assert rel_err(grad, ref) < tol, name


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
    assert rel_err(h1.grad, h2.grad) < 1e-5


def test_no_grad():
    h, w, _, labels = make_inputs(20, 40, 300)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    assert rel_err(loss, reference_linear_cross_entropy(h, w, labels)) < 1e-5


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
        assert rel_err(loss, expected) < 1e-5, fn.__name__
        assert rel_err(grad, expected_grad) < 1e-5, fn.__name__


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
