"""Sliding-window and mask-free attention: the mask check that decides the flash path (CPU, on the masks transformers
really builds), the flash paths against SDPA over the dense mask (GPU, bf16), and the layouts AFMoE's forward hands
its layers instead of masks (packed documents, windows) against transformers' masks (CPU, fp32, with the reference
standing in for the CUDA-only kernel)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel
from fastmoe import sliding_window_attention as swa
from fastmoe.models import afmoe
from testing_utils import attention_kernel_caller, rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# On the CPU what these tests check is which masks or layouts the layers get, not the other ops' kernels.
pytestmark = pytest.mark.usefixtures("kernel_references")


def masks_seen_by_sliding_layers(model, input_ids, attention_mask):
    """The attention_mask each sliding-window attention module receives in one forward."""
    seen = []

    def record(module, args, kwargs):
        if module.sliding_window is not None:
            seen.append(kwargs["attention_mask"])

    handles = [m.register_forward_pre_hook(record, with_kwargs=True)
               for m in model.modules() if type(m).__name__ == "AfmoeAttention"]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    return seen


def test_transformers_sliding_masks_are_recognised_only_without_padding(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("afmoe"), attn_implementation="sdpa")
    window = model.config.sliding_window
    seq = 3 * window + 1  # longer than the window, so transformers builds a dense mask
    input_ids = torch.randint(3, model.config.vocab_size, (2, seq))

    unpadded = masks_seen_by_sliding_layers(model, input_ids, torch.ones(2, seq, dtype=torch.long))
    assert unpadded and all(swa.is_plain_sliding_window_mask(m, seq, window) for m in unpadded)
    # A different window, or a plain causal mask, is not this pattern.
    assert not swa.is_plain_sliding_window_mask(unpadded[0], seq, window + 1)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    assert not swa.is_plain_sliding_window_mask(causal, seq, window)

    padding = torch.ones(2, seq, dtype=torch.long)
    padding[1, -3:] = 0
    padded = masks_seen_by_sliding_layers(model, input_ids, padding)
    assert padded and not any(swa.is_plain_sliding_window_mask(m, seq, window) for m in padded)
    left_padding = torch.ones(2, seq, dtype=torch.long)
    left_padding[0, :2] = 0
    assert not any(swa.is_plain_sliding_window_mask(m, seq, window)
                   for m in masks_seen_by_sliding_layers(model, input_ids, left_padding))


def test_sliding_window_mask_matches_the_definition():
    mask = swa.sliding_window_causal_mask(9, 4)
    for q in range(9):
        for k in range(9):
            assert bool(mask[q, k]) == (k <= q and q - k < 4)


def test_the_cpu_never_takes_the_flash_path():
    query = torch.randn(1, 4, 8, 16)
    assert not swa.can_use_flash_sliding_window(query, query[:, :2])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("seq, window, heads, kv_heads, head_dim", [
    (4096, 2048, 8, 2, 128),   # Trinity's window at its training length
    (1000, 257, 4, 4, 64),     # sizes off every block
    (333, 2, 6, 3, 96),        # a window of two: each query sees itself and the one before
    (128, 500, 2, 1, 32),      # a window longer than the sequence: plain causal
])
def test_flash_sliding_window_matches_sdpa_over_the_dense_mask(seq, window, heads, kv_heads, head_dim):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        # (batch, seq, heads, head_dim) memory seen as (batch, heads, seq, head_dim), as the AFMoE forward has it.
        return torch.randn(*shape, device="cuda", generator=generator, dtype=torch.bfloat16).transpose(1, 2)

    inputs = [rand(2, seq, heads, head_dim), rand(2, seq, kv_heads, head_dim), rand(2, seq, kv_heads, head_dim)]
    grad_out = torch.randn(2, seq, heads, head_dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    scale = head_dim ** -0.5

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves, window, scale)
        out.backward(grad_out.to(dtype))
        return out, [t.grad for t in leaves]

    assert swa.can_use_flash_sliding_window(inputs[0], inputs[1])
    out, grads = run(swa.flash_sliding_window_attention, torch.bfloat16)
    ref, ref_grads = run(swa.reference_sliding_window_attention, torch.float32)
    assert rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


def test_packed_documents_start_wherever_the_position_does_not_follow_on(monkeypatch):
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 0, 0, 1, 2, 3]])
    offsets, longest = swa.packed_documents(positions)
    # Every row starts a document; a repeated 0 is a one-token document. The static form: empty documents up to
    # 8 offsets, and with that few offsets the row's length as the longest document.
    assert offsets.tolist() == [0, 3, 5, 9, 13, 14, 18, 18] and offsets.dtype == torch.int32
    assert longest == 18
    another = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2], [0, 1, 0, 1, 2, 3, 0, 1, 2]])
    offsets, longest = swa.packed_documents(another)
    assert offsets.tolist() == [0, 5, 6, 9, 11, 15, 18, 18] and longest == 18
    assert swa.packed_documents(torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))[1] == 7
    # More offsets than ROW_AS_LONGEST_MAX_OFFSETS: the longest document rounded up to a power of two, at most the
    # tokens, so that batches of as many tokens and documents share a form.
    monkeypatch.setattr(swa, "ROW_AS_LONGEST_MAX_OFFSETS", 2)
    assert swa.packed_documents(positions)[1] == 4  # a power of two already
    offsets, longest = swa.packed_documents(another)
    assert offsets.tolist() == [0, 5, 6, 9, 11, 15, 18, 18] and longest == 8  # 5, rounded up
    assert swa.packed_documents(torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))[1] == 4
    assert swa.packed_documents(torch.tensor([[0, 1, 2, 3, 4, 0, 0]]))[1] == 7  # 5: 8, at most the tokens
    assert swa.packed_documents(torch.arange(7).repeat(3, 1)) is None  # each row one document
    assert swa.packed_documents(torch.arange(3, 10)[None]) is None  # an offset row is still one document


def test_the_reference_layout_attention_is_the_dense_masks_attention():
    generator = torch.manual_seed(0)
    batch, seq, window = 2, 11, 3
    query, key, value = (torch.randn(batch, h, seq, 8, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    scale = 8 ** -0.5
    ref = swa.reference_flash_causal_attention(query, key, value, swa.FlashCausal(window), scale)
    assert rel_err(ref, swa.reference_sliding_window_attention(query, key, value, window, scale)) < 1e-12
    # Packed: each document attends to itself alone, as if it were its own sequence.
    offsets = torch.tensor([0, 4, 5, 11, 18, 22], dtype=torch.int32)
    out = swa.reference_flash_causal_attention(query, key, value, swa.FlashCausal(None, offsets, 7), scale)
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], 8) for t in (query, key, value)]
    flat.append(out.reshape(batch * seq, 4, 8))  # already (batch, seq, heads, head_dim)
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in flat[:3])
        alone = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                 v.repeat_interleave(2, 1), is_causal=True,
                                                                 scale=scale)
        assert rel_err(flat[3][start:end], alone[0].transpose(0, 1)) < 1e-12


def test_no_layout_on_the_cpu_or_with_padding_or_a_cache(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("afmoe"), attn_implementation="sdpa")
    embeds = torch.randn(1, 5, model.config.hidden_size)
    assert swa.flash_causal_layout(model.config, embeds, None, None, None, True) is None  # CPU, fp32

    cuda_like = embeds.to(torch.bfloat16)
    supports = swa.flash_supports
    try:
        swa.flash_supports = lambda config, device, dtype: True
        full, sliding = swa.flash_causal_layout(model.config, cuda_like, torch.ones(1, 5), None, None, True)
        assert (full, sliding) == (swa.FlashCausal(None), swa.FlashCausal(model.config.sliding_window))
        left_padded = torch.tensor([[0, 1, 1, 1, 1]])
        assert swa.flash_causal_layout(model.config, cuda_like, left_padded, None, None, True) is None
        holed = torch.tensor([[1, 0, 1, 1, 1]])
        assert swa.flash_causal_layout(model.config, cuda_like, holed, None, None, True) is None
        # Right padding: the padded tail is a document of its own, in every row.
        two_rows = cuda_like.expand(2, -1, -1)
        right_padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        full, _ = swa.flash_causal_layout(model.config, two_rows, right_padded, None, None, True)
        assert full.document_offsets.tolist() == [0, 3, 5, 10] and full.longest_document == 10
        # With packed rows too: both boundaries.
        positions = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
        full, _ = swa.flash_causal_layout(model.config, two_rows, right_padded, positions, None, True)
        assert full.document_offsets.tolist() == [0, 2, 3, 5, 10, 10, 10, 10] and full.longest_document == 10
        # transformers' default position_ids: one row for the batch.
        full, _ = swa.flash_causal_layout(model.config, two_rows, right_padded, torch.arange(5)[None], None, True)
        assert full.document_offsets.tolist() == [0, 3, 5, 10]
        assert swa.flash_causal_layout(model.config, cuda_like, None, None, object(), True) is None
        model.config._attn_implementation = "eager"
        assert swa.flash_causal_layout(model.config, cuda_like, None, None, None, True) is None
    finally:
        swa.flash_supports = supports


def batch_of_kind(kind: str, vocab_size: int, seq: int, lengths: list[int]) -> dict:
    """Two rows of `seq` tokens: "rows" with an all-ones attention mask, "packed" with position_ids restarting at
    each of `lengths` (no mask), "padded" right-padded after lengths[0] and lengths[1] tokens (labels -100 there)."""
    input_ids = torch.randint(3, vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    if kind == "packed":
        return dict(input_ids=input_ids, labels=labels,
                    position_ids=torch.cat([torch.arange(n) for n in lengths]).repeat(2, 1))
    attention_mask = torch.ones(2, seq, dtype=torch.long)
    if kind == "padded":
        for row, length in enumerate(lengths[:2]):
            attention_mask[row, length:] = 0
        labels[attention_mask == 0] = -100
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


@pytest.mark.parametrize("kind", ["rows", "packed", "padded"])
def test_afmoe_layouts_give_the_masks_losses_and_gradients(tmp_path, tiny_tokenizer, monkeypatch, kind):
    """AFMoE's forward hands its layers layouts, not masks, where flash could run them; with the reference standing
    in for the CUDA-only kernel, loss and every LoRA gradient equal transformers' dense-mask path (fp32): rows with
    an all-ones attention mask, packed rows (position_ids restarting, no mask) and right-padded rows, windows
    included."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=512)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, use_gradient_checkpointing=True)
    window = model.config.sliding_window
    seq = 3 * window + 1
    # Packed: longer than the window, one token, the rest. Padded: rows of window + 2 tokens and of one.
    batch = batch_of_kind(kind, model.config.vocab_size, seq, [window + 2, 1, seq - window - 3])
    taken = []
    monkeypatch.setattr(afmoe, "flash_causal_attention",
                        lambda *a: taken.append(a[3]) or swa.reference_flash_causal_attention(*a))

    def loss_and_grads(layouts: bool):
        monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: layouts)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    layout_loss, layout_grads = loss_and_grads(True)
    assert {layout.window for layout in taken} == {None, window}
    assert all((layout.document_offsets is not None) == (kind != "rows") for layout in taken)
    taken.clear()
    dense_loss, dense_grads = loss_and_grads(False)
    assert not taken
    assert rel_err(layout_loss, dense_loss) < 1e-5
    for name, grad in dense_grads.items():
        assert rel_err(layout_grads[name], grad) < 1e-5, name
    fastmoe.unpatch()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch, seq, window, documents, head_dim, cudnn_on_hopper, row_as_longest", [
    (2, 1000, None, None, 128, False, True),              # plain causal rows, sizes off every block
    (1, 4096, None, None, 128, True, True),               # plain causal rows cuDNN takes on Hopper
    (2, 2100, None, None, 64, True, True),                # the same, a length off every block, head_dim 64
    (1, 4096, 2048, None, 128, False, True),              # Trinity's window: flash
    (2, 2048, 2048, None, 128, True, True),               # a window as long as the rows: plain causal
    (2, 2100, 4096, None, 64, True, True),                # a window longer than the rows
    (1, 1000, 257, [300, 1, 450, 249], 128, False, True),   # packed, a one-token document, longer than the window
    (1, 1000, 257, [300, 1, 450, 249], 128, False, False),  # the same, the longest document rounded up (to 512)
    (2, 333, None, [100, 233, 1, 332], 128, False, True),   # two packed rows
    (2, 333, None, [100, 233, 1, 332], 128, False, False),  # the same, the longest document rounded up (to 512)
])
def test_flash_causal_layouts_match_sdpa_over_the_dense_mask(batch, seq, window, documents, head_dim,
                                                             cudnn_on_hopper, row_as_longest, monkeypatch):
    if not row_as_longest:
        monkeypatch.setattr(swa, "ROW_AS_LONGEST_MAX_OFFSETS", 0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads = 8, 2

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=generator, dtype=torch.bfloat16).transpose(1, 2)

    inputs = [rand(batch, seq, heads, head_dim), rand(batch, seq, kv_heads, head_dim),
              rand(batch, seq, kv_heads, head_dim)]
    grad_out = torch.randn(batch, seq, heads, head_dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    if documents is None:
        layout = swa.FlashCausal(window)
    else:
        positions = torch.cat([torch.arange(n) for n in documents]).view(batch, seq).cuda()
        layout = swa.FlashCausal(window, *swa.packed_documents(positions))
    scale = head_dim ** -0.5

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves, layout, scale)
        out.backward(grad_out.to(dtype))
        return out, [t.grad for t in leaves]

    hopper = torch.cuda.get_device_capability()[0] == 9
    assert swa._cudnn_runs(inputs[0], layout) == (hopper and cudnn_on_hopper)
    out, grads = run(swa.flash_causal_attention, torch.bfloat16)
    ref, ref_grads = run(swa.reference_flash_causal_attention, torch.float32)
    assert rel_err(out, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_afmoe_takes_the_flash_path_and_matches_the_dense_mask_path(tmp_path, tiny_tokenizer, monkeypatch):
    from fastmoe.builtin import build_tiny_checkpoint

    # The flash kernel needs head_dim a multiple of 8; the shared tiny AFMoE has 12.
    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=512)
    model = FastModel.get_peft_model(model.cuda(), r=4, lora_alpha=4, use_gradient_checkpointing=True)
    window = model.config.sliding_window
    input_ids = torch.randint(3, model.config.vocab_size, (2, 5 * window + 3), device="cuda")
    taken = []
    flash = swa.flash_causal_attention
    monkeypatch.setattr(afmoe, "flash_causal_attention", lambda *a: taken.append(1) or flash(*a))
    # Without it no mask is ever built; the second run builds transformers' masks and checks them instead.
    monkeypatch.setattr(afmoe.hf, "create_sliding_window_causal_mask", lambda **kw: 1 / 0)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    fast_loss, fast_grads = loss_and_grads()
    assert taken, "the layers did not take the flash path"
    monkeypatch.undo()
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: False)
    window_checks = []
    check = swa.is_plain_sliding_window_mask
    monkeypatch.setattr(afmoe, "is_plain_sliding_window_mask", lambda *a: window_checks.append(1) or check(*a))
    dense_loss, dense_grads = loss_and_grads()
    assert window_checks  # the dense masks were built, and the sliding layers checked theirs
    assert rel_err(fast_loss, dense_loss) < 1e-2
    for name, grad in dense_grads.items():
        if grad.norm() > 0:
            # Two bf16 attention kernels, each within 1e-2 of fp32, through three layers and the loss.
            assert rel_err(fast_grads[name], grad) < 2e-2, name
    fastmoe.unpatch()


def test_afmoe_wiring_of_the_window_path_on_cpu(tmp_path, tiny_tokenizer, monkeypatch):
    """The flash kernel is CUDA-only; with the reference standing in for it, the sliding layers' routing (mask
    check, layouts in and out) gives the dense-mask path's loss and gradients in fp32."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=512)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, use_gradient_checkpointing=True)
    window = model.config.sliding_window
    input_ids = torch.randint(3, model.config.vocab_size, (2, 3 * window + 1))
    taken = []
    monkeypatch.setattr(afmoe, "flash_sliding_window_attention",
                        lambda *a: taken.append(1) or swa.reference_sliding_window_attention(*a))

    def loss_and_grads(window_path: bool):
        monkeypatch.setattr(afmoe, "can_use_flash_sliding_window", lambda query, key: window_path)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    window_loss, window_grads = loss_and_grads(True)
    assert taken
    dense_loss, dense_grads = loss_and_grads(False)
    assert rel_err(window_loss, dense_loss) < 1e-5
    for name, grad in dense_grads.items():
        assert rel_err(window_grads[name], grad) < 1e-5, name
    fastmoe.unpatch()


def test_afmoe_builds_masks_when_its_attention_op_is_off(tmp_path, tiny_tokenizer, monkeypatch):
    """Layouts are read by fastmoe's attention forward only: with the `attention` op off, transformers' attention
    must receive transformers' masks, whatever flash could run."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("afmoe", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=512,
                                         fast_ops={"attention": False})
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    window = model.config.sliding_window
    masks = masks_seen_by_sliding_layers(model, torch.randint(3, model.config.vocab_size, (1, 3 * window + 1)), None)
    assert masks and not any(isinstance(mask, swa.FlashCausal) for mask in masks)
    fastmoe.unpatch()


# The layout attention each family's forward calls, and the reference that stands in for it on the CPU.
LAYOUT_ATTENTION = {"gpt_oss": ("flash_causal_attention_with_sinks", swa.reference_flash_causal_attention_with_sinks)}


# Each case costs ~25 s on two cores: every family once packed, the rest spread over the families.
@pytest.mark.parametrize("model_type, kind", [
    ("lfm2_moe", "packed"), ("lfm2_moe", "padded"), ("qwen3_moe", "rows"), ("qwen3_moe", "packed"),
    ("mixtral", "rows"), ("mixtral", "packed"), ("gpt_oss", "packed"), ("gpt_oss", "padded"), ("jetmoe", "packed"),
    ("cohere", "packed")])
def test_transformers_model_forwards_get_layouts_with_the_masks_results(tiny_checkpoint, monkeypatch, model_type,
                                                                        kind):
    """Families whose model forward is transformers' own get layouts from its mask functions (patched with their
    attention op); with the reference standing in for the kernel, loss and every LoRA gradient equal the
    dense-mask path (fp32), for rows, packed rows and right-padded rows."""
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint(model_type)), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, use_gradient_checkpointing=True)
    batch = batch_of_kind(kind, model.config.vocab_size, 17, [6, 1, 10])
    taken = []
    name, reference = LAYOUT_ATTENTION.get(model_type, ("flash_causal_attention", swa.reference_flash_causal_attention))
    monkeypatch.setattr(attention_kernel_caller(model_type, name), name,
                        lambda *a: taken.append(a[-2]) or reference(*a))

    def loss_and_grads(layouts: bool):
        monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: layouts)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    layout_loss, layout_grads = loss_and_grads(True)
    assert taken and all((layout.document_offsets is not None) == (kind != "rows") for layout in taken)
    if model_type == "gpt_oss":  # full and sliding layers alternate
        assert {layout.window for layout in taken} == {None, model.config.sliding_window}
    taken.clear()
    dense_loss, dense_grads = loss_and_grads(False)
    assert not taken
    assert rel_err(layout_loss, dense_loss) < 1e-5
    for name, grad in dense_grads.items():
        assert rel_err(layout_grads[name], grad) < 1e-5, name
    fastmoe.unpatch()


# Attention with sinks (gpt-oss). Its autograd Function feeds PyTorch's flash backward a scaled gradient and the
# sink-scaled output; on the CPU these stand in for the CUDA-only flash kernels: flash's contract (variable-length
# causal attention with a window and grouped-query heads, the log-sum-exp (heads, tokens), and the backward that
# computes d(score) = P * (do . v - rowsum(do * out))) written out in PyTorch.


def _math_flash_scores(query, key, offsets, scale, window):
    groups = query.shape[1] // key.shape[1]
    scores = torch.einsum("thd,shd->hts", query, key.repeat_interleave(groups, dim=1)) * scale
    # Flash's variable-length tokens are one row of documents at `offsets`, keys window_size_left back at most.
    layout = swa.FlashCausal(window["window_size_left"] + 1 if window else None, offsets)
    keep = swa._layout_mask(layout, 1, query.shape[0], query.device)[0, 0]
    return scores.masked_fill(~keep, float("-inf")), groups


def _math_flash_forward(query, key, value, offsets, longest, scale, window):
    scores, groups = _math_flash_scores(query, key, offsets, scale, window)
    logsumexp = scores.logsumexp(-1)
    probs = (scores - logsumexp[..., None]).exp()
    output = torch.einsum("hts,shd->thd", probs, value.repeat_interleave(groups, dim=1))
    return output, logsumexp, None, None


def _math_flash_backward(grad_output, query, key, value, output, logsumexp, offsets, longest, scale, window,
                         rng_state, unused):
    scores, groups = _math_flash_scores(query, key, offsets, scale, window)
    probs = (scores - logsumexp[..., None]).exp()
    values = value.repeat_interleave(groups, dim=1)
    d_value = torch.einsum("hts,thd->shd", probs, grad_output)
    d_probs = torch.einsum("thd,shd->hts", grad_output, values)
    d_scores = probs * (d_probs - (grad_output * output).sum(-1).t()[..., None])
    d_query = torch.einsum("hts,shd->thd", d_scores, key.repeat_interleave(groups, dim=1)) * scale
    d_key = torch.einsum("hts,thd->shd", d_scores, query) * scale

    def per_kv_head(grad):
        return grad.view(grad.shape[0], -1, groups, grad.shape[-1]).sum(2)

    return d_query, per_kv_head(d_key), per_kv_head(d_value)


def _sink_inputs(batch, seq, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator, dtype=torch.float32)

    qkv = [rand(batch, seq, heads, head_dim).to(dtype).transpose(1, 2),
           rand(batch, seq, kv_heads, head_dim).to(dtype).transpose(1, 2),
           rand(batch, seq, kv_heads, head_dim).to(dtype).transpose(1, 2)]
    # Sinks about as large as the scores' log-sum-exp, so that they take a real share of each softmax.
    sinks = (rand(heads) + 2.0).to(dtype)
    grad_out = rand(batch, seq, heads, head_dim).to(dtype)
    return qkv, sinks, grad_out


def _sink_layout(batch, seq, window, documents, device="cpu"):
    if documents is None:
        return swa.FlashCausal(window)
    positions = torch.cat([torch.arange(n) for n in documents]).view(batch, seq).to(device)
    return swa.FlashCausal(window, *swa.packed_documents(positions))


def _output_and_grads(fn, qkv, sinks, grad_out, layout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*qkv, sinks)]
    out = fn(*leaves, layout, qkv[0].shape[-1] ** -0.5)
    out.backward(grad_out.to(dtype))
    return out, [t.grad for t in leaves]


SINK_CASES = [
    pytest.param(2, 13, None, None, id="rows"),
    pytest.param(1, 17, 5, None, id="window"),
    pytest.param(1, 19, 4, [7, 1, 11], id="packed-window"),
]


@pytest.mark.parametrize("batch, seq, window, documents", SINK_CASES)
def test_sink_attention_is_flash_with_the_sinks_folded_in(monkeypatch, batch, seq, window, documents):
    """The Function's algebra (output scaled by sigmoid(lse - sink), flash's backward given the scaled gradient and
    that output, the sinks' own gradient) against eager attention with sinks, in fp64, flash's contract in PyTorch."""
    monkeypatch.setattr(swa, "_flash_forward", _math_flash_forward)
    monkeypatch.setattr(swa, "_flash_backward", _math_flash_backward)
    qkv, sinks, grad_out = _sink_inputs(batch, seq, 6, 2, 8, torch.float64)
    layout = _sink_layout(batch, seq, window, documents)
    out, grads = _output_and_grads(swa.flash_causal_attention_with_sinks, qkv, sinks, grad_out, layout, torch.float64)
    ref, ref_grads = _output_and_grads(swa.reference_flash_causal_attention_with_sinks, qkv, sinks, grad_out, layout,
                                       torch.float64)
    assert rel_err(out, ref) < 1e-10
    for name, grad, ref_grad in zip(("query", "key", "value", "sinks"), grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-10, name


def test_sink_reference_is_transformers_gpt_oss_eager_attention():
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    qkv, sinks, _ = _sink_inputs(2, 9, 6, 2, 8, torch.float64)
    layout = swa.FlashCausal(4)
    mask = torch.zeros(2, 1, 9, 9, dtype=torch.float64).masked_fill(~swa._layout_mask(layout, 2, 9, "cpu"),
                                                                    float("-inf"))
    module = SimpleNamespace(num_key_value_groups=3, sinks=sinks, training=False)
    expected, _ = eager_attention_forward(module, *qkv, mask, scaling=8 ** -0.5)
    assert rel_err(swa.reference_flash_causal_attention_with_sinks(*qkv, sinks, layout, 8 ** -0.5), expected) < 1e-12


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch, seq, window, documents", [
    (2, 1000, None, None),               # plain causal rows, sizes off every block
    (1, 4096, 128, None),                # gpt-oss's window
    (1, 1000, 129, [300, 1, 450, 249]),  # packed, a one-token document, documents longer than the window
])
def test_flash_sink_attention_bf16_matches_the_fp32_reference(batch, seq, window, documents):
    """gpt-oss's heads (64 of dim 64, 8 key/value heads) through PyTorch's flash kernels, bf16 against fp32."""
    qkv, sinks, grad_out = _sink_inputs(batch, seq, 64, 8, 64, torch.bfloat16, device="cuda")
    layout = _sink_layout(batch, seq, window, documents, device="cuda")
    out, grads = _output_and_grads(swa.flash_causal_attention_with_sinks, qkv, sinks, grad_out, layout,
                                   torch.bfloat16)
    ref, ref_grads = _output_and_grads(swa.reference_flash_causal_attention_with_sinks, qkv, sinks, grad_out, layout,
                                       torch.float32)
    assert rel_err(out, ref) < 1e-2
    for name, grad, ref_grad in zip(("query", "key", "value", "sinks"), grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-2, name


@pytest.mark.gpu
@needs_gpu
def test_gpt_oss_takes_the_flash_path_as_close_to_fp32_as_its_eager_attention(tmp_path, tiny_tokenizer, monkeypatch):
    """The tiny gpt-oss (head_dim 16, which flash needs; every expert selected and the clamps out of reach, so that
    only the attention differs): in bf16 the flash path with sinks must be as close to the fp32 eager model (loss,
    every LoRA gradient) as transformers' bf16 eager attention is, the bar of tests/models/test_gpu_bf16.py."""
    from fastmoe.builtin import build_tiny_checkpoint
    from fastmoe.models import gpt_oss

    checkpoint = build_tiny_checkpoint("gpt_oss", tmp_path, seed=0, tokenizer=tiny_tokenizer, head_dim=16,
                                       num_experts_per_tok=4, swiglu_limit=7.0)
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = FastModel.from_pretrained(str(checkpoint), dtype=dtype, max_seq_length=512)
        model = FastModel.get_peft_model(model.cuda(), r=4, lora_alpha=4, use_gradient_checkpointing=False)
        with torch.no_grad():
            for layer in model.base_model.model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 3.0, layer.self_attn.sinks.numel()))
        models[dtype] = model.train()
    with torch.no_grad():
        adapters = dict(models[torch.bfloat16].named_parameters())
        for name, param in models[torch.float32].named_parameters():
            if param.requires_grad:
                param.copy_(adapters[name])
    config = models[torch.float32].config
    input_ids = torch.randint(3, config.vocab_size, (2, 5 * config.sliding_window + 3), device="cuda")
    taken = []
    flash = swa.flash_causal_attention_with_sinks
    monkeypatch.setattr(gpt_oss, "flash_causal_attention_with_sinks", lambda *a: taken.append(a[-2]) or flash(*a))

    def loss_and_grads(dtype):
        model = models[dtype]
        model.zero_grad(set_to_none=True)
        # use_cache=False, as under gradient checkpointing: a cache keeps transformers' masks (and the eager path).
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    exact = loss_and_grads(torch.float32)
    assert not taken  # fp32: flash cannot run it
    fast = loss_and_grads(torch.bfloat16)
    assert {layout.window for layout in taken} == {None, config.sliding_window}
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: False)
    taken.clear()
    eager = loss_and_grads(torch.bfloat16)
    assert not taken
    assert rel_err(fast[0], exact[0]) <= 2 * rel_err(eager[0], exact[0]) + 1e-3
    for name, truth in exact[1].items():
        if rel_err(eager[1][name], truth) < 0.05:  # what bf16 can resolve in a tiny random model (test_gpu_bf16.py)
            assert rel_err(fast[1][name], truth) <= 2 * rel_err(eager[1][name], truth) + 1e-3, name
    fastmoe.unpatch()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,strided", [((6, 2, 3, 16), False), ((5, 3, 2, 8), True), ((4, 2, 5, 3), False)])
def test_jetmoe_head_regrouping_moves_the_values_torch_moves(dtype, shape, strided):
    """JetMoe's (slot, kv head) <-> (kv head, slot) regrouping, copied as 8-byte words where the rows allow (head_dim
    a multiple of the words, any strides with a unit last one) and element by element otherwise (head_dim 3): the
    values and gradients of torch's transpose + contiguous, exactly."""
    from fastmoe.models.jetmoe import swap_middle_axes

    generator = torch.Generator().manual_seed(0)
    rows, a, b, d = shape
    base = torch.randn(rows, b, a, d, generator=generator).to(dtype)
    x = (base.transpose(1, 2) if strided else base.reshape(rows, a, b, d)).requires_grad_()
    grad = torch.randn(rows, b, a, d, generator=generator).to(dtype)
    expected = x.transpose(1, 2).contiguous()
    out = swap_middle_axes(x)
    assert out.is_contiguous() and torch.equal(out, expected)
    (got,) = torch.autograd.grad(out, x, grad)
    (ref,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, ref)
