"""load_in_4bit=True: bitsandbytes' 4-bit Linear layers plus NF4 experts (fastmoe.quantize), fp32 on the CPU."""

import pytest
import torch
from fastmoe.kernels.nf4 import dequantize_nf4
from testing_utils import batch_with_padding, randomize_lora, rel_err

import fastmoe
from fastmoe import FastModel
from fastmoe.quantize import SWIGLU_EXPERT_PARAMETERS, is_quantized, nf4_weight

pytestmark = pytest.mark.filterwarnings("ignore:bitsandbytes quantization without a CUDA GPU")
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _load_4bit(checkpoint):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64, load_in_4bit=True)
    return model


def _quantized_experts(model):
    return [m for m in model.modules() if is_quantized(m)]


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe"])
def test_experts_are_nf4_and_compute_as_their_dequantized_weights(tiny_checkpoint, model_type):
    model = _load_4bit(tiny_checkpoint(model_type))
    experts = _quantized_experts(model)
    assert len(experts) == model.config.num_hidden_layers - model.config.num_dense_layers
    linear_kinds = {name.split(".")[-1]: type(m).__name__ for name, m in model.named_modules()}
    assert linear_kinds["q_proj"] == "Linear4bit" and linear_kinds["lm_head"] == "Linear"
    assert linear_kinds.get("gate", "Linear") != "Linear4bit"  # AFMoE's router Linear stays 16-bit
    for module in experts:
        for name in SWIGLU_EXPERT_PARAMETERS:
            placeholder = getattr(module, name)
            assert placeholder.untyped_storage().nbytes() <= placeholder.element_size()
            assert nf4_weight(module, name).nbytes() <= 0.3 * placeholder.numel() * 2  # vs 16-bit
    assert not any("_nf4_" in key for key in model.state_dict())  # buffers stay out of checkpoints
    batch = batch_with_padding(model.config.vocab_size)
    quantized = _logits(model, batch)

    # The same model with its experts replaced by their dequantized values, through plain transformers.
    for module in experts:
        dense = {name: dequantize_nf4(nf4_weight(module, name)) for name in SWIGLU_EXPERT_PARAMETERS}
        del module._fastmoe_nf4
        del module.forward  # the guard against unpatched NF4 use; these experts are dense again
        for name, weight in dense.items():
            setattr(module, name, torch.nn.Parameter(weight, requires_grad=False))
    fastmoe.unpatch()
    model.config._experts_implementation = "eager"
    assert rel_err(quantized, _logits(model, batch)) < 1e-5


def test_lora_on_nf4_experts_trains(tiny_checkpoint):
    model = _load_4bit(tiny_checkpoint("afmoe"))
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     target_parameters=EXPERT_TARGETS, use_gradient_checkpointing=False)
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    expert_lora = [name for name in lora if ".experts." in name]
    assert expert_lora and all(p.device.type == "cpu" for p in lora.values())
    layer = model.get_base_model().model.layers[1].mlp.experts
    assert layer.lora_A["default"].weight.shape == (8 * 4, 24)  # down_proj: (experts * r, moe_intermediate)
    randomize_lora(model)
    batch = batch_with_padding(model.config.vocab_size)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):  # the interpreter runs each step's kernels in Python: ~10 s a step
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        assert all(lora[name].grad is not None and lora[name].grad.abs().sum() > 0 for name in expert_lora)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(is_quantized(m) for m in _quantized_experts(model.get_base_model()))


def test_jetmoe_4bit_experts_are_refused_clearly(tiny_checkpoint):
    with pytest.raises(ValueError, match="4-bit experts are not supported for jetmoe"):
        _load_4bit(tiny_checkpoint("jetmoe"))


def test_unreadable_lora_on_nf4_experts_is_an_error_not_zero_experts(monkeypatch):
    import transformers

    from fastmoe.models import shared
    from fastmoe.quantize import quantize_module_

    config = transformers.AfmoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    experts = transformers.models.afmoe.modeling_afmoe.AfmoeExperts(config)
    assert quantize_module_(experts) > 0
    # What unwrap_expert_lora answers for layouts only peft's own forward handles (several active adapters).
    monkeypatch.setattr(shared, "unwrap_expert_lora", lambda module: None)
    index, weights = torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    with pytest.raises(NotImplementedError, match="quantized to 4 bits"):
        shared.swiglu_experts(experts, torch.randn(2, 32), index, weights)


def test_unpatched_forward_of_nf4_experts_raises_instead_of_using_zero_experts(tiny_checkpoint):
    import fastmoe

    model = _load_4bit(tiny_checkpoint("afmoe"))
    fastmoe.unpatch()
    with pytest.raises(RuntimeError, match="NF4"):
        model(input_ids=torch.tensor([[3, 4, 5]]))
