"""Qwen2-MoE: FastModel + LoRA (attention, shared expert, dense MLP and experts) against transformers + peft, fp32 on
CPU, with and without renormalised routing; unpatch() giving transformers back its own forwards; generation through
the sliding-window layers; the router aux loss."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf

import fastmoe
from fastmoe import FastModel, FastQwen2MoeModel
from fastmoe.models import qwen2_moe
from testing_utils import (batch_with_padding, compare_with_transformers, fp32_model_tolerance,
                           patched_model_and_unpatched_reference, rel_err)

TARGETS = dict(
    target_modules=list(FastQwen2MoeModel.default_target_modules),
    target_parameters=list(FastQwen2MoeModel.default_target_parameters),
)
PATCHED = (hf.Qwen2MoeRMSNorm, hf.Qwen2MoeTopKRouter, hf.Qwen2MoeSparseMoeBlock, hf.Qwen2MoeAttention,
           hf.Qwen2MoeForCausalLM)


@pytest.fixture(scope="module")
def renormalised_checkpoint(tmp_path_factory, tiny_tokenizer):
    """The tiny checkpoint with norm_topk_prob=True: fastmoe's routing kernel instead of transformers' router."""
    from fastmoe.builtin import build_tiny_checkpoint

    return build_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe_norm_topk"), seed=0,
                                 tokenizer=tiny_tokenizer, norm_topk_prob=True)


# With checkpointing the recompute skips the outputs only the layer's sum reads (fastmoe.models.shared
# unread_in_recompute), but not the shared expert's, which its gate's gradient reads.
@pytest.mark.parametrize("renormalised,gradient_checkpointing", [(False, False), (True, False), (False, True)],
                         ids=["softmax-weights", "renormalised", "checkpointed"])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, renormalised_checkpoint,
                                                                renormalised, gradient_checkpointing):
    checkpoint = renormalised_checkpoint if renormalised else tiny_checkpoint("qwen2_moe")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), gradient_checkpointing=gradient_checkpointing)
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    # Every kind of adapter is compared: experts, attention, the shared expert, the dense MLP of the first layer.
    for part in ("mlp.experts.base_layer.lora_A", "mlp.experts.lora_A", "self_attn.q_proj", "self_attn.o_proj",
                 "mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj", "layers.0.mlp.gate_proj"):
        assert any(part in name for name in grads), part
    assert not any("shared_expert_gate" in name or "mlp.gate." in name for name in grads)  # frozen, as routers
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_unpatch_restores_transformers(tiny_checkpoint):
    model, reference, batch = patched_model_and_unpatched_reference(tiny_checkpoint("qwen2_moe"), PATCHED)
    with torch.no_grad():
        ref_out = reference(**batch, use_cache=False)
        FastQwen2MoeModel.pre_patch()
        out = model.eval()(**batch, use_cache=False)
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    fastmoe.unpatch()


def test_generation_with_cache_matches_transformers(tiny_checkpoint, kernel_references):
    """Past the sliding window (6) of the upper layers: the cache and the window as transformers has them."""
    checkpoint = str(tiny_checkpoint("qwen2_moe"))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert reference.config.layer_types == ["sliding_attention", "full_attention"]
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
    config = hf.Qwen2MoeConfig(**{**qwen2_moe.FAMILY.tiny_config, "norm_topk_prob": norm_topk_prob})
    router = hf.Qwen2MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 13, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_weights = torch.randn(26, config.num_experts_per_tok, generator=torch.Generator().manual_seed(2))

    def run(forward):
        hidden.grad = None
        logits, weights, index = forward(router, hidden)
        (weights * grad_weights).sum().backward()
        return logits, weights, index, hidden.grad

    ref = run(qwen2_moe._original_router_forward)
    got = run(qwen2_moe.router_forward)
    assert rel_err(got[0], ref[0]) < 1e-6
    assert torch.equal(got[2], ref[2])
    assert rel_err(got[1], ref[1]) < 1e-6
    assert rel_err(got[3], ref[3]) < 1e-5


def test_router_aux_loss_is_added_as_transformers_adds_it(tiny_checkpoint, kernel_references):
    checkpoint = tiny_checkpoint("qwen2_moe")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), call_kwargs=dict(output_router_logits=True))
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(loss, ref_loss) < tolerance
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name
