"""LFM2-MoE: FastModel + LoRA (experts and short-conv projections included) against transformers + peft, fp32 on
CPU; and unpatch() giving transformers back its own forwards."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf

from fastmoe import FastLfm2MoeModel, FastModel
from testing_utils import (batch_with_padding, compare_with_transformers, fp32_model_tolerance,
                           lfm2_moe_records_router_logits, patched_model_and_unpatched_reference, rel_err)

TARGETS = dict(
    target_modules=list(FastLfm2MoeModel.default_target_modules),
    target_parameters=list(FastLfm2MoeModel.default_target_parameters),
)
PATCHED = (hf.Lfm2MoeRMSNorm, hf.Lfm2MoeTopKRouter, hf.Lfm2MoeSparseMoeBlock, hf.Lfm2MoeAttention,
           hf.Lfm2MoeShortConv, hf.Lfm2MoeForCausalLM)


# Rank 1 with scaling 8 (alpha 8) makes this tiny model ill-conditioned: transformers' own fp32 gradients are
# then 1.5e-5 away from its fp64 ones, so rank 1 runs at scaling 1 (fp32 vs fp64: 1.4e-6).
# Checkpointed, the recompute skips the dense MLP's and the experts' down projections (unread_in_recompute).
@pytest.mark.parametrize("rank, alpha, gradient_checkpointing", [(4, 8, False), (1, 1, False), (4, 8, True)])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, rank, alpha, gradient_checkpointing):
    checkpoint = tiny_checkpoint("lfm2_moe")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=rank, lora_alpha=alpha, **TARGETS), gradient_checkpointing=gradient_checkpointing)
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    # Every kind of adapter is compared: experts, attention, short conv, dense MLP.
    for part in ("experts", "self_attn.q_proj", "self_attn.out_proj", "conv.in_proj", "conv.out_proj", "w1"):
        assert any(part in name for name in grads), part
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_unpatch_restores_transformers(tiny_checkpoint):
    model, reference, batch = patched_model_and_unpatched_reference(tiny_checkpoint("lfm2_moe"), PATCHED)
    with torch.no_grad():
        ref_out = reference(**batch, use_cache=False)
        FastLfm2MoeModel.pre_patch()
        out = model.eval()(**batch, use_cache=False)
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert rel_err(out.loss, ref_out.loss) < 1e-5


@pytest.mark.parametrize("prompt_len", [11, 2])
def test_generation_with_cache_matches_transformers(tiny_checkpoint, prompt_len, kernel_references):
    """Prefill runs our short conv and leaves the conv state transformers would (a prompt shorter than the kernel
    included); decoding continues from it on transformers' own path."""
    checkpoint = str(tiny_checkpoint("lfm2_moe"))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = batch_with_padding(reference.config.vocab_size)["input_ids"][:1, :prompt_len]
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_out = reference.generate(prompt, **settings)

    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32)
    out = FastModel.for_inference(model).generate(prompt, **settings)
    assert torch.equal(out.sequences, ref_out.sequences)
    for step, ref_step in zip(out.logits, ref_out.logits):
        assert rel_err(step, ref_step) < 1e-5


@pytest.mark.skipif(not lfm2_moe_records_router_logits(), reason="this transformers' LFM2-MoE returns no router logits")
def test_router_logits_are_recorded(tiny_checkpoint):
    checkpoint = str(tiny_checkpoint("lfm2_moe"))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batch = batch_with_padding(reference.config.vocab_size)
    with torch.no_grad():
        ref_out = reference(**batch, output_router_logits=True)
        model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32)
        out = model.eval()(**batch, output_router_logits=True)
    assert len(out.router_logits) == len(ref_out.router_logits) > 0
    for got, want in zip(out.router_logits, ref_out.router_logits):
        assert rel_err(got, want) < 1e-5
