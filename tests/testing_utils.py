"""Helpers for the tests: relative error, and whole-model equivalence of a FastModel with LoRA against plain
transformers + peft on the same weights."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def batch_with_padding(vocab_size: int, seed: int = 0, batch: int = 2, seq: int = 11):
    """Random token ids, right padding on the second row (masked in attention, -100 in labels)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, seq - 3:] = 0
    input_ids[1, seq - 3:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def randomize_lora(model, seed: int = 1) -> None:
    """peft zero-initialises B, which hides every A gradient; draw all adapter weights at random."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def forward_backward(model, batch):
    """Logits without labels, then loss and the gradient of every trainable parameter."""
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.detach()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits, loss.detach(), grads


def compare_with_transformers(checkpoint, lora_kwargs: dict, seed: int = 0, gradient_checkpointing: bool = False,
                              **load_kwargs):
    """Run the same LoRA model through plain transformers+peft and through FastModel (loaded with `load_kwargs`).

    Returns (reference, fast) tuples of (logits, loss, grads); the reference is transformers + peft in float64."""
    fastmoe.unpatch()
    # The reference runs in float64: the fp32 budget (1e-5) is then spent on fastmoe's own rounding rather than
    # on the difference between two fp32 summation orders compounding through the layers.
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64, experts_implementation="eager")
    reference = get_peft_model(reference, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(reference)
    batch = batch_with_padding(reference.config.vocab_size, seed=seed)
    ref_out = forward_backward(reference, batch)

    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64, **load_kwargs)
    family = fastmoe.patching.family_class(model.config.model_type)
    assert fastmoe.patching.is_patched(family.patches()), "FastModel did not patch its family"
    model = FastModel.get_peft_model(model, use_gradient_checkpointing=gradient_checkpointing, **lora_kwargs)
    randomize_lora(model)
    fast_out = forward_backward(model, batch)
    return ref_out, fast_out
