"""Cohere: FastModel + LoRA against transformers + peft, fp32 on CPU, with and without QK LayerNorm."""

import pytest
import torch
from testing_utils import (RecordOps, batch_with_padding, compare_with_transformers, fp32_model_tolerance,
                           rel_err)
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.cohere import modeling_cohere as hf

import fastmoe
from fastmoe import FastCohereModel, FastModel
from fastmoe.builtin import build_tiny_checkpoint
from fastmoe.graphed_checkpointing import standard_checkpoint

TARGETS = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def checkpoint_without_qk_norm(tmp_path_factory, tiny_tokenizer):
    return build_tiny_checkpoint("cohere", tmp_path_factory.mktemp("cohere_no_qk_norm"), use_qk_norm=False,
                                 tokenizer=tiny_tokenizer)


def assert_matches_transformers(checkpoint, rank: int) -> None:
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=rank, lora_alpha=8, **TARGETS))
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    assert any("q_proj" in name for name in grads) and any("down_proj" in name for name in grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


@pytest.mark.parametrize("rank", [4, 2])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, rank):
    checkpoint = tiny_checkpoint("cohere")
    config = AutoModelForCausalLM.from_pretrained(checkpoint).config
    # The tiny config must exercise what sets Cohere apart, or the comparison proves little.
    assert config.use_qk_norm and config.logit_scale != 1.0
    assert_matches_transformers(checkpoint, rank)


def test_without_qk_norm_matches_transformers(checkpoint_without_qk_norm):
    assert not AutoModelForCausalLM.from_pretrained(checkpoint_without_qk_norm).config.use_qk_norm
    assert_matches_transformers(checkpoint_without_qk_norm, rank=4)


@pytest.mark.parametrize("num_items_in_batch", [None, 37, torch.tensor(37)])
def test_training_loss_with_logit_scale_padding_and_num_items_in_batch(tiny_checkpoint, num_items_in_batch):
    checkpoint = tiny_checkpoint("cohere")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    batch = batch_with_padding(reference.config.vocab_size, seed=3)
    assert (batch["labels"] == -100).any()
    reference.train()
    ref_loss = reference(**batch, num_items_in_batch=num_items_in_batch).loss

    # transformers' loss by hand: scaled logits, shifted labels, -100 ignored, summed over num_items_in_batch.
    with torch.no_grad():
        logits = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum")
    denominator = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    assert rel_err(ref_loss, token_losses / denominator) < 1e-6

    model, _ = FastModel.from_pretrained(str(checkpoint), max_seq_length=512, dtype=torch.float32)
    model.train()
    outputs = model(**batch, num_items_in_batch=num_items_in_batch)
    # The fused loss ran (no logits materialised) and applied logit_scale as transformers does.
    assert outputs.logits is None
    assert model.logit_scale == reference.config.logit_scale != 1.0
    assert rel_err(outputs.loss, ref_loss) < 1e-5


def test_greedy_generation_with_cache_matches_transformers(tiny_checkpoint, kernel_references):
    checkpoint = tiny_checkpoint("cohere")
    prompt = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(5))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)

    model, _ = FastModel.from_pretrained(str(checkpoint), max_seq_length=512, dtype=torch.float32)
    model = FastModel.for_inference(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True), expected)


def test_unpatch_restores_transformers_forwards(tiny_checkpoint):
    originals = {(patch.owner, patch.attribute): patch.owner.__dict__[patch.attribute]
                 for patch in FastCohereModel.patches()}
    cohere_owners = {owner for owner, _ in originals
                     if isinstance(owner, type) and owner.__module__.startswith("transformers")}
    assert cohere_owners == {hf.CohereLayerNorm, hf.CohereAttention, hf.CohereMLP, hf.CohereDecoderLayer,
                             hf.CohereForCausalLM}

    checkpoint = tiny_checkpoint("cohere")
    model, _ = FastModel.from_pretrained(str(checkpoint), max_seq_length=512, dtype=torch.float32)
    for patch in FastCohereModel.patches():
        assert patch.owner.__dict__[patch.attribute] is patch.replacement
    batch = batch_with_padding(model.config.vocab_size, seed=7)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        patched_logits = model(**inputs).logits

    fastmoe.unpatch()
    for (owner, attribute), original in originals.items():
        assert owner.__dict__[attribute] is original
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(patched_logits, reference(**inputs).logits) < 1e-5


PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}


def test_the_recompute_skips_the_products_only_the_sum_reads(tiny_checkpoint):
    """With checkpointing, the parallel block's recompute (torch's checkpoint, its recompute marked by
    fastmoe.checkpointing) skips the output projection's and the down projection's base products and LoRA
    up-projections: two products each, four a layer, fewer in the backward. Every gradient stays transformers +
    peft's, and equals an unmarked checkpoint's."""
    checkpoint = tiny_checkpoint("cohere")
    (ref_logits, ref_loss, ref_grads), (_, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), gradient_checkpointing=True)
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(loss, ref_loss) < tolerance
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name

    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, **TARGETS)
    model.train()
    layers = model.get_base_model().model.layers
    batch = batch_with_padding(model.config.vocab_size, seed=2)

    def backward_products(checkpoint_function=None):
        for layer in layers:
            if checkpoint_function is not None:
                layer._gradient_checkpointing_func = checkpoint_function
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        with RecordOps(lambda func, *_: func in PRODUCTS) as products:
            loss.backward()
        return len(products.calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    marked, marked_grads = backward_products()
    unmarked, unmarked_grads = backward_products(standard_checkpoint)
    assert unmarked - marked == 4 * len(layers)
    for name, grad in unmarked_grads.items():
        assert torch.equal(marked_grads[name], grad), name
