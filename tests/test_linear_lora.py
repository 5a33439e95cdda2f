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


class OneInput(torch.nn.Module):
    """Attention's projections of one hidden state (widths off the kernel's blocks), one without LoRA, and a gated
    MLP's gate and up."""

    def __init__(self, bias=False):
        super().__init__()
        for name, width in (("q_proj", 20), ("k_proj", 12), ("v_proj", 12), ("o_gate", 20), ("extra", 7),
                            ("gate_proj", 18), ("up_proj", 18)):
            setattr(self, name, torch.nn.Linear(24, width, bias=bias))


def _one_input_model(bias=False):
    torch.manual_seed(0)
    lora = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "extra", "up_proj"],
                      target_parameters=["o_gate.weight", "gate_proj.weight"])
    model = get_peft_model(OneInput(bias), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    return model.base_model.model


@pytest.fixture
def count_launches(monkeypatch):
    launches = []
    few_rows = linear_lora.lora_linears_few_rows
    monkeypatch.setattr(linear_lora, "lora_linears_few_rows", lambda *a, **k: launches.append(1) or few_rows(*a, **k))
    patching.apply_patches(linear_lora.lora_linear_patches())
    yield launches
    patching.remove_patches(linear_lora.lora_linear_patches())


@pytest.mark.parametrize("bias", [False, True])
def test_layers_of_one_input_take_one_launch_while_decoding(count_launches, bias):
    """q, k (no LoRA), v and a ParamWrapper'd gate in one launch, a fifth layer in a second; each output equal to
    peft's own forward of that layer."""
    model = _one_input_model(bias)
    x = torch.randn(2, 1, 24)
    layers = [model.q_proj, model.k_proj, model.v_proj, model.o_gate, model.extra]
    patching.remove_patches(linear_lora.lora_linear_patches())
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        patching.apply_patches(linear_lora.lora_linear_patches())
        got = linear_lora.project(x, *layers)
    assert len(count_launches) == 2
    for out, ref in zip(got, expected, strict=True):
        assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


def test_swiglu_of_gate_and_up_takes_one_launch_while_decoding(count_launches):
    model = _one_input_model()
    x = torch.randn(3, 24)
    patching.remove_patches(linear_lora.lora_linear_patches())
    with torch.no_grad():
        expected = torch.nn.functional.silu(model.gate_proj(x)) * model.up_proj(x)
        patching.apply_patches(linear_lora.lora_linear_patches())
        got = linear_lora.swiglu(x, model.gate_proj, model.up_proj, torch.nn.SiLU())
        assert len(count_launches) == 1 and rel_err(got, expected) < 1e-5
        assert rel_err(linear_lora.swiglu(x, model.gate_proj, model.up_proj), expected) < 1e-5
        assert len(count_launches) == 2
        gelu = linear_lora.swiglu(x, model.gate_proj, model.up_proj, torch.nn.GELU())
    assert len(count_launches) == 2  # another activation: the three ops
    assert rel_err(gelu, torch.nn.functional.gelu(model.gate_proj(x)) * model.up_proj(x)) < 1e-5


@pytest.mark.parametrize("case", ["gradients", "rows", "hook", "op_off", "autocast"])
def test_layers_of_one_input_go_one_by_one_where_the_launch_does_not_apply(count_launches, case):
    """Training (gradients), more rows than a decode batch, a hooked layer, the lora_linear op switched off, autocast:
    each layer's own forward, the same outputs."""
    model = _one_input_model()
    x = torch.randn(80 if case == "rows" else 2, 24)
    layers = [model.q_proj, model.k_proj, model.v_proj]
    if case == "hook":
        model.k_proj.register_forward_hook(lambda module, args, out: out * 2)
    if case == "op_off":
        patching.remove_patches(linear_lora.lora_linear_patches())
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else torch.no_grad()
    with torch.enable_grad() if case == "gradients" else context:
        got = linear_lora.project(x, *layers)
        expected = [layer(x) for layer in layers]
    assert count_launches == []
    for out, ref in zip(got, expected, strict=True):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_layers_decode_their_nf4_weights_in_one_few_rows_launch(count_launches, double_quant):
    """bitsandbytes' 4-bit Linear layers (with and without LoRA) at a decode step's few rows: their NF4 storage read
    by the few-rows kernel as it is (no 16-bit copy of the weight), equal to the LoRA linear over the exactly
    dequantized weight (fastmoe's reference dequantization: bitsandbytes' CPU kernel is not a reference)."""
    bnb = pytest.importorskip("bitsandbytes")
    from fastmoe.kernels.moe import reference_dequantize_nf4

    torch.manual_seed(0)
    base = torch.nn.Module()
    for name, width in (("q_proj", 40), ("k_proj", 24)):
        setattr(base, name, bnb.nn.Linear4bit(64, width, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                              compress_statistics=double_quant))
    base.forward = lambda x: base.q_proj(x)
    base = base.to("cpu")  # quantizes
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    layers = model.base_model.model.q_proj, model.base_model.model.k_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        q, k = linear_lora.project(x, *layers)
        assert len(count_launches) == 1
        q_alone = layers[0](x)  # peft's wrapper forward: the same kernel for its one layer
    assert len(count_launches) == 2
    bases = layers[0].get_base_layer(), layers[1]
    weights = [reference_dequantize_nf4(linear_lora._nf4_view(layer.weight))[0] for layer in bases]
    lora = layers[0]
    expected_q = x @ weights[0].t() + lora.scaling["default"] * (x @ lora.lora_A["default"].weight.t()) @ \
        lora.lora_B["default"].weight.t()
    assert rel_err(q, expected_q) < 1e-5 and rel_err(q_alone, expected_q) < 1e-5
    assert rel_err(k, x @ weights[1].t()) < 1e-5


def test_is_silu_names_exactly_the_silu_activations():
    import transformers.activations

    assert linear_lora.is_silu(torch.nn.functional.silu)
    assert linear_lora.is_silu(torch.nn.SiLU())
    assert linear_lora.is_silu(transformers.activations.ACT2FN["silu"])
    assert not linear_lora.is_silu(transformers.activations.ACT2FN["gelu"])
    assert not linear_lora.is_silu(torch.nn.functional.gelu)
    assert not linear_lora.is_silu(None)
    hooked = torch.nn.SiLU()
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    assert not linear_lora.is_silu(hooked)
    replaced = torch.nn.SiLU()
    replaced.forward = torch.nn.functional.gelu
    assert not linear_lora.is_silu(replaced)
