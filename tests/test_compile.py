"""torch.compile of a patched model with LoRA, as transformers' Trainer runs it with torch_compile=True: the compiled
training step gives eager's loss and LoRA gradients, and dynamo does not break its graph in fastmoe's ops (they are
torch.library custom ops, kernels/custom_op.py).

On the CPU, once through the Triton kernels (the interpreter; the loss taken from the logits, since fastmoe's fused
loss kernel is not a custom op yet) and once through the references (reference_only(); with labels, the model's own
fused loss). The references' graph breaks are listed: transformers and peft trace whole, the one break left is the
forward hook that fastmoe's fused-loss forward registers (fastmoe/models/causal_lm.py). On a GPU (`gpu` marker):
inductor, fp32, with the kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing_utils import batch_with_padding, randomize_lora, rel_err
from torch._dynamo.utils import counters

from fastmoe import FastModel
from fastmoe.kernels import reference_only

FAMILIES = ("afmoe", "lfm2_moe", "jetmoe", "cohere")
# The one graph break the reference path keeps: fused_loss_forward's register_forward_hook (dynamo cannot trace the
# hook handle's class counter).
HOOK_BREAK = "RemovableHandle"


def lora_model(checkpoint, device="cpu"):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model.to(device).train()


def training_step(model, batch, labels_in_model: bool):
    """Loss and the LoRA gradients of one step of `model` (compiled or not)."""
    model.zero_grad(set_to_none=True)
    if labels_in_model:
        loss = model(**batch).loss
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    parameters = getattr(model, "_orig_mod", model).named_parameters()  # the compiled wrapper prefixes the names
    return loss.detach(), {name: p.grad.clone() for name, p in parameters if p.requires_grad}


def compiled_and_eager(model, batch, labels_in_model: bool, backend: str):
    """((loss, grads) compiled, (loss, grads) eager, dynamo's graph-break reasons)."""
    eager = training_step(model, batch, labels_in_model)
    torch._dynamo.reset()
    counters.clear()
    compiled = training_step(torch.compile(model, backend=backend), batch, labels_in_model)
    return compiled, eager, dict(counters["graph_break"])


def assert_same_step(compiled, eager, tol):
    (loss, grads), (ref_loss, ref_grads) = compiled, eager
    assert rel_err(loss, ref_loss) <= tol
    assert grads.keys() == ref_grads.keys() and any("lora" in name for name in grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= tol, name


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_through_the_kernels_equals_eager_without_graph_breaks(tiny_checkpoint, family):
    model = lora_model(tiny_checkpoint(family))
    batch = batch_with_padding(model.config.vocab_size)
    compiled, eager, breaks = compiled_and_eager(model, batch, labels_in_model=False, backend="aot_eager")
    assert breaks == {}
    assert_same_step(compiled, eager, tol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_through_the_references_equals_eager(tiny_checkpoint, family):
    model = lora_model(tiny_checkpoint(family))
    batch = batch_with_padding(model.config.vocab_size)
    with reference_only():
        compiled, eager, breaks = compiled_and_eager(model, batch, labels_in_model=True, backend="aot_eager")
    assert all(HOOK_BREAK in reason for reason in breaks), list(breaks)
    assert_same_step(compiled, eager, tol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_on_gpu_equals_eager_without_graph_breaks(tmp_path, tiny_tokenizer, family):
    from fastmoe.builtin import build_tiny_checkpoint, tiny_config

    # Every expert selected in the sigmoid-routed families: fp32 rounding differences between inductor's fused
    # ops and eager would otherwise flip near-tied expert choices of a random tiny model.
    overrides = {}
    if family in ("afmoe", "lfm2_moe"):
        overrides["num_experts_per_tok"] = tiny_config(family, len(tiny_tokenizer)).num_experts
    checkpoint = build_tiny_checkpoint(family, tmp_path, seed=0, tokenizer=tiny_tokenizer, **overrides)
    model = lora_model(checkpoint, device="cuda")
    batch = {k: v.cuda() for k, v in batch_with_padding(model.config.vocab_size).items()}
    compiled, eager, breaks = compiled_and_eager(model, batch, labels_in_model=False, backend="inductor")
    assert breaks == {}
    # Inductor fuses the PyTorch ops around the kernels and reorders their fp32 reductions.
    assert_same_step(compiled, eager, tol=1e-4)
