"""The whole-model tolerance (testing_utils.fp32_model_tolerance) against what it has to separate: every correct fp32
implementation must pass it, as transformers' own fp32 run does, and a kernel off by one half-precision rounding must
not."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import fastmoe
from fastmoe.models import cohere
from fastmoe.models import family
from testing_utils import (batch_with_padding, compare_with_transformers, forward_backward, fp32_model_tolerance,
                           randomize_lora, rel_err)

# The LoRA of each family's equivalence test (tests/models/test_<family>.py), on the family's default targets.
LORA_ALPHA = {"afmoe": 8, "lfm2_moe": 8, "cohere": 8, "jetmoe": 4, "qwen3_moe": 8, "mixtral": 8,
              "qwen2_moe": 8, "gpt_oss": 8}


def lora(model_type: str) -> dict:
    described = family(model_type)
    return dict(r=4, lora_alpha=LORA_ALPHA[model_type], target_modules=list(described.lora_target_modules),
                target_parameters=list(described.lora_target_parameters))


def transformers_training_step(checkpoint, lora_kwargs: dict, dtype: torch.dtype):
    fastmoe.unpatch()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, experts_implementation="eager")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(model)
    return forward_backward(model, batch_with_padding(model.config.vocab_size))


def largest_error(out, ref, positions: torch.Tensor | None = None) -> float:
    """The largest rel_err over logits (at `positions`), loss and every gradient."""
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = out, ref
    if positions is not None:
        logits, ref_logits = logits[positions], ref_logits[positions]
    return max([rel_err(logits, ref_logits), rel_err(loss, ref_loss)]
               + [rel_err(grads[name], ref_grads[name]) for name in ref_grads])


@pytest.mark.parametrize("model_type", [
    "afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"])
def test_transformers_own_fp32_run_is_within_the_tolerance(tiny_checkpoint, model_type):
    checkpoint = tiny_checkpoint(model_type)
    reference = transformers_training_step(checkpoint, lora(model_type), torch.float64)
    fp32 = transformers_training_step(checkpoint, lora(model_type), torch.float32)
    batch_size, seq_len = reference[0].shape[:2]
    # JetMoe's padding positions route among tied experts (see test_jetmoe.py): compare the attended ones.
    attended = batch_with_padding(reference[0].shape[-1])["attention_mask"].bool()
    error = largest_error(fp32, reference, attended)
    assert error < fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), batch_size, seq_len)
    assert error > 0  # the two runs really differ in precision


def test_a_kernel_rounding_to_half_precision_fails_the_tolerance(tiny_checkpoint, monkeypatch):
    """Cohere's LayerNorm kernel with its output rounded to float16, as a kernel that keeps an intermediate in half
    precision would: a bug that only rounding shows. The same comparison as test_cohere's must now fail."""
    exact = cohere.layer_norm
    monkeypatch.setattr(cohere, "layer_norm", lambda *args, **kwargs: exact(*args, **kwargs).half().float())
    checkpoint = tiny_checkpoint("cohere")
    reference, fast = compare_with_transformers(checkpoint, lora("cohere"))
    batch_size, seq_len = reference[0].shape[:2]
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), batch_size, seq_len)
    # fp16's rounding (2**-11) is 8192 times fp32's: the comparison misses it by far more than the margin above.
    assert largest_error(fast, reference) > 10 * tolerance
