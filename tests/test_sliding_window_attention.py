"""Sliding-window layers: the mask check that decides the flash path (CPU, on the masks transformers really
builds) and the flash path itself against SDPA over the dense mask (GPU, bf16)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel
from fastmoe import sliding_window_attention as swa
from fastmoe.models import afmoe
from testing_utils import rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    flash = swa.flash_sliding_window_attention
    monkeypatch.setattr(afmoe, "flash_sliding_window_attention", lambda *a: taken.append(1) or flash(*a))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    fast_loss, fast_grads = loss_and_grads()
    assert taken, "the sliding layers did not take the flash path"
    monkeypatch.setattr(afmoe, "can_use_flash_sliding_window", lambda query, key: False)
    taken.clear()
    dense_loss, dense_grads = loss_and_grads()
    assert not taken
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
