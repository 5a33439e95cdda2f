"""Mixtral: FastModel + LoRA (attention and experts) against transformers + peft, fp32 on CPU, with the tiny model's
sliding window shorter than the batch; unpatch() giving transformers back its own forwards; generation; the router;
the router aux loss; router jitter left to transformers."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral import modeling_mixtral as hf

import fastmoe
from fastmoe import FastMixtralModel, FastModel
from fastmoe.models import mixtral
from fastmoe.models.shared import softmax_topk_router_forward
from testing_utils import (batch_with_padding, compare_with_transformers, fp32_model_tolerance,
                           patched_model_and_unpatched_reference, rel_err)

TARGETS = dict(
    target_modules=list(FastMixtralModel.default_target_modules),
    target_parameters=list(FastMixtralModel.default_target_parameters),
)
PATCHED = (hf.MixtralRMSNorm, hf.MixtralTopKRouter, hf.MixtralSparseMoeBlock, hf.MixtralAttention,
           hf.MixtralForCausalLM)


@pytest.mark.parametrize("rank, alpha", [(4, 8), (1, 1)])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, rank, alpha):
    checkpoint = tiny_checkpoint("mixtral")
    assert AutoConfig.from_pretrained(checkpoint).sliding_window < 11  # the batch's 11 tokens see a window
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=rank, lora_alpha=alpha, **TARGETS))
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    # (peft nests the two expert weights' wrappers: experts.base_layer is gate_up_proj's, experts down_proj's.)
    for part in ("mlp.experts.base_layer.lora_A", "mlp.experts.lora_A", "self_attn.q_proj", "self_attn.o_proj"):
        assert any(part in name for name in grads), part
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_unpatch_restores_transformers(tiny_checkpoint):
    model, reference, batch = patched_model_and_unpatched_reference(tiny_checkpoint("mixtral"), PATCHED)
    with torch.no_grad():
        ref_out = reference(**batch, use_cache=False)
        FastMixtralModel.pre_patch()
        out = model.eval()(**batch, use_cache=False)
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    fastmoe.unpatch()


def test_generation_with_cache_matches_transformers(tiny_checkpoint, kernel_references):
    checkpoint = str(tiny_checkpoint("mixtral"))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = batch_with_padding(reference.config.vocab_size)["input_ids"][:1, :9]
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_out = reference.generate(prompt, **settings)

    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32)
    out = FastModel.for_inference(model).generate(prompt, **settings)
    assert torch.equal(out.sequences, ref_out.sequences)
    for step, ref_step in zip(out.logits, ref_out.logits):
        assert rel_err(step, ref_step) < 1e-5
    fastmoe.unpatch()


def test_router_matches_transformers():
    config = hf.MixtralConfig(**mixtral.FAMILY.tiny_config)
    router = hf.MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 13, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_weights = torch.randn(26, config.num_experts_per_tok, generator=torch.Generator().manual_seed(2))

    def run(forward):
        hidden.grad = None
        logits, weights, index = forward(router, hidden)
        (weights * grad_weights).sum().backward()
        return logits, weights, index, hidden.grad

    fastmoe.unpatch()
    ref = run(hf.MixtralTopKRouter.forward)
    got = run(softmax_topk_router_forward)
    assert rel_err(got[0], ref[0]) < 1e-6
    assert torch.equal(got[2], ref[2]) and got[1].dtype == ref[1].dtype == torch.float32
    assert rel_err(got[1], ref[1]) < 1e-6
    assert rel_err(got[3], ref[3]) < 1e-5


def test_router_aux_loss_is_added_as_transformers_adds_it(tiny_checkpoint, kernel_references):
    checkpoint = tiny_checkpoint("mixtral")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), call_kwargs=dict(output_router_logits=True))
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(loss, ref_loss) < tolerance
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_router_jitter_runs_transformers_block(monkeypatch):
    """Training with router_jitter_noise scales the input by random draws: transformers' own block draws them."""
    config = hf.MixtralConfig(**{**mixtral.FAMILY.tiny_config, "router_jitter_noise": 0.1})
    block = hf.MixtralSparseMoeBlock(config).train()
    calls = []
    monkeypatch.setattr(mixtral, "_original_sparse_moe_forward", lambda self, x: calls.append(1) or x)
    hidden = torch.randn(1, 3, config.hidden_size)
    assert mixtral.sparse_moe_forward(block, hidden) is hidden and calls
