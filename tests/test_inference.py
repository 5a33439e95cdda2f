"""for_inference / for_training: greedy generation through fastmoe's patched forwards (KV cache on) gives exactly the
tokens plain transformers + peft gives with the same adapter, for every family; for_training switches back."""

import contextlib

import pytest
import torch
from fastmoe.kernels.dispatch import reference_only
from peft import LoraConfig, get_peft_model
from testing_utils import randomize_lora
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmoe import FastModel, models

FAMILIES = ("afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe")
PROMPTS = ["<|user|>What is a mixture of experts?\n<|assistant|>", "<|user|>Hi\n<|assistant|>"]
NEW_TOKENS = 12


def lora_kwargs(model_type: str) -> dict:
    """The family's default targets, experts included. JetMoe takes scaling 1: without QK norm, larger random
    adapters saturate its attention."""
    family = models.family(model_type)
    return {"r": 4, "lora_alpha": 4 if model_type == "jetmoe" else 8,
            "target_modules": list(family.lora_target_modules),
            "target_parameters": list(family.lora_target_parameters) or None}


def prompts(tokenizer) -> dict:
    """A batch of two prompts of different lengths, left-padded as for generation."""
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][1] == 0).any(), "the second prompt should be padded"
    return batch


@torch.no_grad()
def greedy(model, batch: dict) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generation_matches_transformers_with_the_same_adapter(tiny_checkpoint, model_type):
    checkpoint = tiny_checkpoint(model_type)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = get_peft_model(reference, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(model_type)))
    randomize_lora(reference)
    reference.eval()
    batch = prompts(AutoTokenizer.from_pretrained(checkpoint))
    expected = greedy(reference, batch)

    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, use_gradient_checkpointing=False, **lora_kwargs(model_type))
    randomize_lora(model)
    FastModel.for_inference(model)
    # Cohere's ops are cheap enough for Triton's interpreter (~9 s); each MoE family's 13 forwards under the
    # interpreter take ~50 s (they pass there too), so they run the ops' PyTorch references here, which tests/models
    # and tests/kernels compare the Triton kernels with.
    with contextlib.nullcontext() if model_type == "cohere" else reference_only():
        generated = greedy(model, batch)

    assert generated.shape == (2, NEW_TOKENS)
    assert torch.equal(generated, expected)


def test_for_training_switches_back(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    assert FastModel.for_inference(model) is model
    assert not model.training and model.get_base_model().config.use_cache is True
    assert FastModel.for_training(model) is model
    assert model.training and all(module.training for module in model.modules())
    assert model.get_base_model().config.use_cache is False
    assert trainable and all(p.requires_grad for p in trainable)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_bf16_greedy_generation_on_gpu_matches_transformers_for_32_tokens(tiny_checkpoint, model_type):
    checkpoint = tiny_checkpoint(model_type)
    batch = {k: v.cuda() for k, v in prompts(AutoTokenizer.from_pretrained(checkpoint)).items()}

    def generate_32(model):
        model.eval()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=32, do_sample=False)
        return out[:, batch["input_ids"].shape[1]:]

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda()
    expected = generate_32(reference)
    del reference
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=128)
    generated = generate_32(FastModel.for_inference(model.cuda()))
    assert generated.shape == (2, 32)
    assert torch.equal(generated, expected)
