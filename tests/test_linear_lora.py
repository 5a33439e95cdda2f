"""fastmoe.linear_lora: peft's Linear LoRA wrappers computed by the fused op give peft's own outputs and gradients,
and everything the fused op does not cover falls back to peft's forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import rel_err

import fastmoe.linear_lora as linear_lora
from fastmoe import patching


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 16, bias=True)
        self.gate_proj = torch.nn.Linear(16, 12, bias=False)

    def forward(self, x):
        return self.gate_proj(torch.tanh(self.q_proj(x)))


def _model(seed=0, **config):
    torch.manual_seed(seed)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["gate_proj.weight"])
    lora.update(config)
    model = get_peft_model(TwoLinears(), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    return model


def _run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.ones_like(out))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    fused = linear_lora.lora_linear
    monkeypatch.setattr(linear_lora, "lora_linear", lambda *args: calls.append(1) or fused(*args))
    yield calls
    patching.remove_patches(linear_lora.lora_linear_patches())


def test_fused_forward_and_gradients_equal_peft(count_fused):
    model, x = _model(), torch.randn(3, 5, 24)
    expected_out, expected_grads = _run(model, x)
    patching.apply_patches(linear_lora.lora_linear_patches())
    out, grads = _run(model, x)
    assert len(count_fused) == 2  # q_proj (lora.Linear) and gate_proj.weight (ParamWrapper)
    assert rel_err(out, expected_out) < 1e-5
    assert grads.keys() == expected_grads.keys() and len(grads) == 4
    for name in grads:
        assert rel_err(grads[name], expected_grads[name]) < 1e-5, name


@pytest.mark.parametrize("case", ["dropout", "two_adapters", "disabled", "merged", "trainable_base"])
def test_what_the_fused_op_does_not_cover_goes_through_peft(count_fused, case):
    model = _model(lora_dropout=0.1, target_parameters=None) if case == "dropout" else _model()
    if case == "two_adapters":
        model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["gate_proj.weight"],
                                               init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
    x = torch.randn(2, 24)
    model.eval()  # dropout off, so peft's answer is deterministic; the fused op still must not take dropout layers
    context = model.disable_adapter() if case == "disabled" else torch.enable_grad()
    if case == "merged":
        model.merge_adapter()
    if case == "trainable_base":
        model.base_model.model.q_proj.base_layer.weight.requires_grad_(True)
        model.base_model.model.gate_proj.base_layer.weight.requires_grad_(True)
    with context:
        expected = model(x)
        patching.apply_patches(linear_lora.lora_linear_patches())
        got = model(x)
    assert count_fused == []
    assert rel_err(got, expected) < 1e-6


def test_4bit_base_weight_is_dequantized_on_demand(count_fused):
    bnb = pytest.importorskip("bitsandbytes")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4"))
    base = base.to(device)  # quantizes
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    x = torch.randn(6, 64, device=device, requires_grad=True)
    expected = model(x)
    expected_dx = torch.autograd.grad(expected.sum(), x)[0]
    patching.apply_patches(linear_lora.lora_linear_patches())
    got = model(x)
    dx = torch.autograd.grad(got.sum(), x)[0]
    assert count_fused == [1]
    assert rel_err(got, expected) < 1e-5
    assert rel_err(dx, expected_dx) < 1e-5
