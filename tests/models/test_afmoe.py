"""AFMoE: FastModel + LoRA (experts included) against transformers + peft, fp32 on CPU."""

import pytest
from transformers import AutoConfig

from testing_utils import compare_with_transformers, fp32_model_tolerance, rel_err

# fastmoe's defaults: attention projections as modules; the attention gate, dense and shared MLPs and the
# experts as parameters (see FastAfmoeModel for why).
TARGETS = dict(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate_proj.weight", "up_proj.weight",
                       "down_proj.weight"],
)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, gradient_checkpointing):
    checkpoint = tiny_checkpoint("afmoe")
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), gradient_checkpointing=gradient_checkpointing)
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    assert any("experts" in name for name in grads)
    assert any("shared_experts.gate_proj" in name for name in grads)
    assert any("self_attn.gate_proj" in name for name in grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name
