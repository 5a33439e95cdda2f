"""Qwen3-MoE: FastModel + LoRA (attention, dense MLP and experts) against transformers + peft, fp32 on CPU; unpatch()
giving transformers back its own forwards; generation; the router's two weightings; the router aux loss."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

import fastmoe
from fastmoe import FastModel, FastQwen3MoeModel
from fastmoe.models import qwen3_moe
from testing_utils import (batch_with_padding, compare_with_transformers, fp32_model_tolerance,
                           patched_model_and_unpatched_reference, rel_err)

TARGETS = dict(
    target_modules=list(FastQwen3MoeModel.default_target_modules),
    target_parameters=list(FastQwen3MoeModel.default_target_parameters),
)
PATCHED = (hf.Qwen3MoeRMSNorm, hf.Qwen3MoeTopKRouter, hf.Qwen3MoeSparseMoeBlock, hf.Qwen3MoeAttention,
           hf.Qwen3MoeForCausalLM)


@pytest.mark.parametrize("rank, alpha", [(4, 8), (1, 1)])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, rank, alpha):
    checkpoint = tiny_checkpoint("qwen3_moe")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=rank, lora_alpha=alpha, **TARGETS))
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    # Every kind of adapter is compared: experts, attention, the dense MLP of the first layer.
    # (peft nests the two expert weights' wrappers: experts.base_layer is gate_up_proj's, experts down_proj's.)
    for part in ("mlp.experts.base_layer.lora_A", "mlp.experts.lora_A", "self_attn.q_proj", "self_attn.o_proj",
                 "layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"):
        assert any(part in name for name in grads), part
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_experts_of_another_activation_are_not_computed_as_silu(tmp_path, tiny_tokenizer):
    """fastmoe's experts kernel computes SiLU-gated experts: a config with another hidden_act gets a message that
    says what to choose, and with that choice (transformers' experts forward, peft's LoRA) the same training step."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("qwen3_moe", tmp_path, seed=0, tokenizer=tiny_tokenizer, hidden_act="gelu")
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=2, use_gradient_checkpointing=False, **TARGETS)
    with pytest.raises(NotImplementedError, match="SiLU-gated experts.*grouped_mm"):
        model(**batch_with_padding(model.config.vocab_size, seq=6))
    with pytest.warns(UserWarning, match="eager forward"):
        (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
            checkpoint, dict(r=4, lora_alpha=8, **TARGETS), experts_implementation="eager")
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(loss, ref_loss) < tolerance
    assert any("mlp.experts" in name for name in grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_unpatch_restores_transformers(tiny_checkpoint):
    model, reference, batch = patched_model_and_unpatched_reference(tiny_checkpoint("qwen3_moe"), PATCHED)
    with torch.no_grad():
        ref_out = reference(**batch, use_cache=False)
        FastQwen3MoeModel.pre_patch()
        out = model.eval()(**batch, use_cache=False)
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    fastmoe.unpatch()


def test_generation_with_cache_matches_transformers(tiny_checkpoint, kernel_references):
    checkpoint = str(tiny_checkpoint("qwen3_moe"))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = batch_with_padding(reference.config.vocab_size)["input_ids"][:1, :7]
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_out = reference.generate(prompt, **settings)

    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32)
    out = FastModel.for_inference(model).generate(prompt, **settings)
    assert torch.equal(out.sequences, ref_out.sequences)
    for step, ref_step in zip(out.logits, ref_out.logits):
        assert rel_err(step, ref_step) < 1e-5
    fastmoe.unpatch()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_transformers_with_and_without_renormalising(norm_topk_prob):
    config = hf.Qwen3MoeConfig(**{**qwen3_moe.FAMILY.tiny_config, "norm_topk_prob": norm_topk_prob})
    router = hf.Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 13, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_weights = torch.randn(26, config.num_experts_per_tok, generator=torch.Generator().manual_seed(2))

    def run(forward):
        hidden.grad = None
        logits, weights, index = forward(router, hidden)
        (weights * grad_weights).sum().backward()
        return logits, weights, index, hidden.grad

    ref = run(qwen3_moe._original_router_forward)
    got = run(qwen3_moe.router_forward)
    assert rel_err(got[0], ref[0]) < 1e-6
    # The chosen experts in the same order (descending weight), their weights and the input gradient.
    assert torch.equal(got[2], ref[2])
    assert rel_err(got[1], ref[1]) < 1e-6
    assert rel_err(got[3], ref[3]) < 1e-5


def test_router_aux_loss_is_added_as_transformers_adds_it(tiny_checkpoint, kernel_references):
    """output_router_logits=True: the fused loss adds router_aux_loss_coef x the load-balancing loss, as
    transformers' forward does, and the router logits are recorded from fastmoe's router."""
    checkpoint = tiny_checkpoint("qwen3_moe")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), call_kwargs=dict(output_router_logits=True))
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(loss, ref_loss) < tolerance
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name
