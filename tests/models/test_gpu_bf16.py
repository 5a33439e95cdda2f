"""Every family in bf16 on a CUDA GPU: fastmoe's logits, loss and every LoRA gradient must be as close to the
fp32 answer as transformers' own bf16 mixed-precision run (the fused kernels round differently, so equality is not
the bar), and
4-bit experts must compute as their dequantized weights and train. Skipped without CUDA.

The sigmoid-routed families (AFMoE, LFM2-MoE) are built with top-k = all experts here: in a tiny random model
some tokens have near-tied expert scores, and bf16 rounding anywhere upstream flips their selection, which moves
the output by far more than rounding (transformers' own bf16 run flips differently from fastmoe's). Selection,
ties included, is tested exactly by the routing kernel tests; here every expert runs and only weights vary. The tiny
gpt-oss has such a tie too (layer 1: second and third router logits 0.025 apart at a logit scale of 3; transformers'
bf16 run on the CPU picks another expert for that token), so it also runs every expert. Its clamped SwiGLU gets
gpt-oss's limit (7.0) here, out of the tiny model's reach: the tiny config's 0.15 puts many pre-activations near the
limit, where the activation's derivative jumps to 0 and bf16 rounding on either side of it changes gradients by whole
terms (the clamps are tested in fp32, tests/models/test_gpt_oss.py and the kernels' tests)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import batch_with_padding, forward_backward, randomize_lora, rel_err
from transformers import AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel, models

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def lora_kwargs(model_type: str) -> dict:
    # Scaling 1: larger random adapters make these tiny models chaotic in bf16 (gradients off by tens of percent in
    # transformers' own bf16 run), which leaves nothing to compare.
    family = models.family(model_type)
    return {"r": 4, "lora_alpha": 4,
            "target_modules": list(family.lora_target_modules),
            "target_parameters": list(family.lora_target_parameters) or None}


# Families whose tiny checkpoints have near-tied router scores, and what else their flip-free checkpoint changes
# (see the module docstring).
ALL_EXPERTS = {"afmoe": {}, "lfm2_moe": {}, "gpt_oss": {"swiglu_limit": 7.0}}


@pytest.fixture(scope="module")
def flip_free_checkpoint(tmp_path_factory, tiny_tokenizer, tiny_checkpoint):
    """tiny_checkpoint, with every expert selected for the families in ALL_EXPERTS (see the module docstring)."""
    from fastmoe.builtin import build_tiny_checkpoint

    cache = {}

    def get(model_type: str, softmax_routed_too: bool = False):
        """softmax_routed_too: every family with all experts selected (the 4-bit test compares the NF4 kernels with the
        dequantized references, both bf16, where any routed family may flip near-ties)."""
        if model_type not in ALL_EXPERTS and not softmax_routed_too:
            return tiny_checkpoint(model_type)
        if model_type not in cache:
            config = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(model_type)).config
            num_experts = getattr(config, "num_experts", None) or config.num_local_experts
            cache[model_type] = build_tiny_checkpoint(model_type, tmp_path_factory.mktemp(f"{model_type}_all_experts"),
                                                      seed=0, tokenizer=tiny_tokenizer,
                                                      num_experts_per_tok=num_experts,
                                                      **ALL_EXPERTS.get(model_type, {}))
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", [
    "afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"])
def test_bf16_on_gpu_is_as_close_to_fp32_as_transformers(flip_free_checkpoint, model_type):
    checkpoint = flip_free_checkpoint(model_type)
    lora = lora_kwargs(model_type)
    vocab_size = AutoModelForCausalLM.from_pretrained(checkpoint).config.vocab_size
    batch = {k: v.cuda() for k, v in batch_with_padding(vocab_size, seed=0).items()}

    def plain(dtype):
        fastmoe.unpatch()
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, experts_implementation="eager").cuda()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        randomize_lora(model)
        # Under autocast, as transformers' Trainer runs with bf16=True: peft's float32 adapters then compute in
        # bf16, which is what fastmoe's fused LoRA does (peft without autocast runs its LoRA branch in float32).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return forward_backward(model, batch)

    exact, reference = plain(torch.float32), plain(torch.bfloat16)
    model, _ = FastModel.from_pretrained(str(checkpoint), max_seq_length=512, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(model.cuda(), use_gradient_checkpointing=False, **lora)
    randomize_lora(model)
    fast = forward_backward(model, batch)

    def close_enough(out, ref, truth, name):
        assert rel_err(out, truth) <= 2 * rel_err(ref, truth) + 1e-3, name

    close_enough(fast[0], reference[0], exact[0], "logits")
    close_enough(fast[1], reference[1], exact[1], "loss")
    assert fast[2].keys() == exact[2].keys()
    # A gradient that transformers' own bf16 run gets more than 5% wrong is one bf16 cannot resolve in these tiny
    # random models (the tiny AFMoE has some at 20-40% on either side): no bound on it would say anything. For the
    # tiny JetMoe under autocast that is every LoRA gradient (H100, 2026-11-23): its bf16 check is logits and loss;
    # its gradients are checked in fp32 (tests/models/test_jetmoe.py) and its kernels in bf16 (tests/kernels).
    resolved = [name for name in exact[2] if rel_err(reference[2][name], exact[2][name]) < 0.05]
    for name in resolved:
        close_enough(fast[2][name], reference[2][name], exact[2][name], name)


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe", "qwen3_moe", "mixtral", "jetmoe", "qwen2_moe", "gpt_oss"])
def test_4bit_experts_on_gpu_compute_as_their_dequantized_weights_and_train(flip_free_checkpoint, model_type):
    pytest.importorskip("bitsandbytes")
    from fastmoe.kernels.moe.nf4 import dequantize_nf4
    from fastmoe.quantize import is_quantized, nf4_weight

    checkpoint = flip_free_checkpoint(model_type, softmax_routed_too=True)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=64, load_in_4bit=True)
    assert next(model.parameters()).is_cuda
    experts = [m for m in model.modules() if is_quantized(m)]
    assert experts and all(nf4_weight(m, m._fastmoe_nf4[-1]).absmax.is_cuda for m in experts)
    batch = {k: v.cuda() for k, v in batch_with_padding(model.config.vocab_size).items()}
    model.eval()
    with torch.no_grad():
        quantized = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # The same layers through the PyTorch reference of the dequantized weights.
        from fastmoe.kernels.dispatch import reference_only

        with reference_only():
            dequantized = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    attended = batch["attention_mask"].bool()  # JetMoe's padding rows tie every expert (tests/models/test_jetmoe.py)
    assert rel_err(quantized[attended], dequantized[attended]) < 1e-2
    for module in experts:
        for name in module._fastmoe_nf4:
            assert dequantize_nf4(nf4_weight(module, name)).dtype == torch.bfloat16

    # LoRA on the experts only (JetMoe's: both mixtures').
    experts_only = (["input_linear.weight", "output_linear.weight"] if model_type == "jetmoe"
                    else ["experts.gate_up_proj", "experts.down_proj"])
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=[], use_gradient_checkpointing=True,
                                     target_parameters=experts_only)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss  # alive during the next step's capture it would turn the graphs off (capture_failure_reason)
    assert losses[-1] < losses[0] - 0.1, losses
