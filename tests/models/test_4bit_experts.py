"""load_in_4bit=True: bitsandbytes' 4-bit Linear layers plus NF4 experts (fastmoe.quantize), quantized while the
checkpoint loads (fastmoe.quantized_loading), fp32 on the CPU; and load_in_8bit's refusal of MoE models."""

import pytest
import torch
import transformers
from fastmoe.kernels.moe.nf4 import dequantize_nf4
from testing_utils import batch_with_padding, randomize_lora, rel_err
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastmoe
from fastmoe import FastModel, models
from fastmoe.models.shared import EXPERTS_IMPLEMENTATION
from fastmoe.quantize import SWIGLU_EXPERT_PARAMETERS, is_quantized, nf4_weight, quantize_experts_

pytestmark = pytest.mark.filterwarnings("ignore:bitsandbytes quantization without a CUDA GPU")
gpu = pytest.mark.gpu
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(autouse=True)
def _bitsandbytes_portable_cpu_path(monkeypatch):
    """What these tests check is fastmoe's NF4 experts; bitsandbytes' Linear4bit layers around them must compute the
    same on every CPU. On a CPU with AVX512-BF16, Linear4bit.forward in inference (eval mode, an input that needs no
    gradient) re-lays its weight once for a fused kernel (bitsandbytes.functional._convert_weight_packed_for_cpu):
    rows in blocks of 32, absmax per 64 columns, and the product in bf16 whatever the compute dtype. The tiny configs'
    Linear shapes (48, 24, 80: odd on purpose, so that the NF4 kernels run their block tails) fail its `N must be
    divisible by block_n` assertion, and with shapes it accepts these fp32 comparisons would run in bf16 on those CPUs
    only. Training never takes that path (it needs eval and no gradient) and fastmoe's LoRA layers dequantize
    bitsandbytes' weights themselves, so every CPU gets bitsandbytes' portable path here, which it takes on all others:
    dequantize, then a matmul in the compute dtype. Linear4bit reads has_avx512bf16() when it is built; releases
    without that path have no such function."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False, raising=False)


def _linear_4bit(checkpoint, **kwargs):
    """(model, its BitsAndBytesConfig): plain transformers + bitsandbytes loading, with the Linear layers in 4 bits
    as FastModel's config asks (routers and lm_head 16-bit) and the experts left 16-bit."""
    from fastmoe.api import _bnb_config

    family = models.family(transformers.AutoConfig.from_pretrained(checkpoint).model_type)
    config = _bnb_config("4bit", torch.float32, ["lm_head", *family.routers])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                              quantization_config=config, **kwargs)
    assert not _quantized_experts(model)  # plain bitsandbytes leaves them 16-bit
    return model, config


def _load_4bit(checkpoint):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64, load_in_4bit=True)
    return model


def _quantized_experts(model):
    return [m for m in model.modules() if is_quantized(m)]


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _expert_modules(config) -> int:
    # AFMoE and LFM2-MoE put their dense layers first (num_dense_layers); Qwen3-MoE lists them (mlp_only_layers);
    # Mixtral has none; JetMoe has two mixtures per layer (MLP experts and attention heads), each with an input and an
    # output stack.
    if config.model_type == "jetmoe":
        return 4 * config.num_hidden_layers
    dense = getattr(config, "num_dense_layers", None)
    return config.num_hidden_layers - (len(getattr(config, "mlp_only_layers", [])) if dense is None else dense)


# The family's dense Linear layer that bitsandbytes quantizes, and the router Linear it must leave 16-bit.
LINEAR_AND_ROUTER = {"afmoe": ("q_proj", "gate"), "lfm2_moe": ("q_proj", "gate"), "qwen3_moe": ("q_proj", "gate"),
                     "mixtral": ("q_proj", "gate"), "jetmoe": ("kv_proj", "layer"),
                     "qwen2_moe": ("q_proj", "shared_expert_gate"), "gpt_oss": ("q_proj", "router")}


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe", "qwen3_moe", "mixtral", "jetmoe", "qwen2_moe", "gpt_oss"])
def test_experts_are_nf4_and_compute_as_their_dequantized_weights(tiny_checkpoint, model_type):
    model = _load_4bit(tiny_checkpoint(model_type))
    experts = _quantized_experts(model)
    assert len(experts) == _expert_modules(model.config)
    linear_kinds = {name.split(".")[-1]: type(m).__name__ for name, m in model.named_modules()}
    linear, router = LINEAR_AND_ROUTER[model_type]
    assert linear_kinds[linear] == "Linear4bit" and linear_kinds["lm_head"] == "Linear"
    assert linear_kinds[router] != "Linear4bit"  # routers stay 16-bit: top-k choices would flip on rounded logits
    for module in experts:
        assert module._fastmoe_nf4
        for name in module._fastmoe_nf4:
            placeholder = getattr(module, name)
            assert placeholder.untyped_storage().nbytes() <= placeholder.element_size()
            nf4 = nf4_weight(module, name)
            assert nf4.double_quant  # FastModel's BitsAndBytesConfig asks for bnb_4bit_use_double_quant
            assert nf4.nbytes() <= 0.3 * placeholder.numel() * 2  # vs 16-bit
    assert not any("_nf4_" in key for key in model.state_dict())  # buffers stay out of checkpoints
    batch = batch_with_padding(model.config.vocab_size)
    quantized = _logits(model, batch)
    linear_4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear_4bit)

    # The same model with its experts replaced by their dequantized values, through plain transformers.
    for module in experts:
        _dense_again_(module)
    fastmoe.unpatch()
    model.config._experts_implementation = "eager"
    # Padding positions left out: JetMoe's padding tokens embed to zeros, its routers see all-equal logits there and
    # break the tie differently from transformers (tests/models/test_jetmoe.py); nothing attends to them.
    attended = batch["attention_mask"].bool()
    assert rel_err(quantized[attended], _logits(model, batch)[attended]) < 1e-5


def test_lora_on_nf4_experts_trains(tiny_checkpoint, kernel_references):
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
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        assert all(lora[name].grad is not None and lora[name].grad.abs().sum() > 0 for name in expert_lora)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(is_quantized(m) for m in _quantized_experts(model.get_base_model()))


def _dense_again_(module) -> None:
    """Replace a quantized experts module's NF4 stacks with their dequantized values as Parameters: the 16-bit model
    the 4-bit one promises to compute as."""
    dense = {name: dequantize_nf4(nf4_weight(module, name)) for name in module._fastmoe_nf4}
    del module._fastmoe_nf4
    del module.forward
    for name, weight in dense.items():
        setattr(module, name, torch.nn.Parameter(weight, requires_grad=False))


def test_jetmoe_experts_hold_bitsandbytes_nf4_of_their_16bit_weights(tiny_checkpoint):
    """Every JetMoe expert stack (both mixtures' input and output projections) holds, expert by expert, the codes and
    double-quantized absmax that bitsandbytes' own quantize_4bit gives its 16-bit weight (what bitsandbytes would store
    if it quantized experts as it does Linear weights); the logits move by NF4's noise, more than with bitsandbytes
    alone, which quantizes kv_proj only and leaves the experts, nearly all of the weights, 16-bit. (bitsandbytes'
    CPU dequantize_4bit is not used: it misplaces values for some row widths, 48 among them.)"""
    import bitsandbytes.functional as bnb_functional

    checkpoint = tiny_checkpoint("jetmoe")
    model = _load_4bit(checkpoint)
    batch = batch_with_padding(model.config.vocab_size)
    attended = batch["attention_mask"].bool()
    quantized = _logits(model, batch)[attended]
    fastmoe.unpatch()
    full = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    stacks = {name: m for name, m in model.named_modules() if is_quantized(m)}
    assert len(stacks) == _expert_modules(model.config)
    for name, module in stacks.items():
        weight = full.get_submodule(name).weight.detach()
        nf4 = nf4_weight(module, "weight")
        for expert in range(weight.shape[0]):
            packed, state = bnb_functional.quantize_4bit(weight[expert].contiguous(), blocksize=64, quant_type="nf4",
                                                         compress_statistics=True)
            assert torch.equal(packed.view(-1), nf4.packed[expert])
            assert torch.equal(state.absmax, nf4.absmax[expert])
            assert torch.equal(state.state2.absmax, nf4.absmax_scale[expert])
            assert torch.equal(state.offset, nf4.absmax_offset[expert])

    linear_only, _ = _linear_4bit(checkpoint)
    full_logits = _logits(full, batch)[attended]
    noise, linear_noise = rel_err(quantized, full_logits), rel_err(_logits(linear_only, batch)[attended], full_logits)
    assert linear_noise < noise < 0.25, (noise, linear_noise)


def _jetmoe_4bit_lora(checkpoint):
    model = _load_4bit(checkpoint)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model


def _step_on_nf4_and_dequantized(make_model):
    """(loss, {name: gradient} of every trained parameter) of one step on a padded batch, for the 4-bit model
    make_model() gives and for another with its experts dequantized to fp32 Parameters."""
    batch = batch_with_padding(512, seed=3, seq=8)
    results = []
    for dense in (False, True):
        model = make_model()
        if dense:
            for module in _quantized_experts(model.get_base_model()):
                _dense_again_(module)
        assert bool(_quantized_experts(model.get_base_model())) != dense
        model.train()
        loss = model(**batch).loss
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), dict(zip(trained, torch.autograd.grad(loss, list(trained.values()))))))
    return results


def test_qlora_on_jetmoe_nf4_has_the_gradients_of_its_dequantized_model(tiny_checkpoint):
    """One training step through the NF4 kernels (both mixtures' map, reduce and SwiGLU experts) against the same
    step with the experts dequantized to fp32 Parameters (the 16-bit kernels, tests/models/test_jetmoe.py checks
    those against transformers + peft): loss and every LoRA gradient."""
    (loss, grads), (dense_loss, dense_grads) = _step_on_nf4_and_dequantized(
        lambda: _jetmoe_4bit_lora(tiny_checkpoint("jetmoe")))
    assert rel_err(loss, dense_loss) < 1e-5
    # LoRA on kv_proj and on every expert stack: both mixtures' input and output projections.
    suffixes = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in grads}
    assert {"kv_proj", "input_linear", "output_linear"} <= suffixes
    assert any("self_attention.experts.input_linear" in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(grad, dense_grads[name]) < 1e-5, name


def test_qlora_on_gpt_oss_nf4_has_the_gradients_of_its_dequantized_model(tiny_checkpoint):
    """gpt-oss's stacks are stored (E, in, out) and quantized along their stored rows; its kernels read them
    transposed. One training step against the same step with the experts dequantized to fp32 Parameters (the 16-bit
    kernels, tests/models/test_gpt_oss.py checks those against transformers + peft): loss, every LoRA gradient and the
    experts' bias gradients."""
    def gpt_oss_4bit_lora():
        model = _load_4bit(tiny_checkpoint("gpt_oss"))
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        randomize_lora(model)
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                p.requires_grad_(True)
        return model

    (loss, grads), (dense_loss, dense_grads) = _step_on_nf4_and_dequantized(gpt_oss_4bit_lora)
    assert rel_err(loss, dense_loss) < 1e-5
    assert any("experts.lora_A" in name for name in grads) and any(name.endswith("down_proj_bias") for name in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(grad, dense_grads[name]) < 1e-5, name


def test_qlora_on_jetmoe_trains(tiny_checkpoint):
    from fastmoe.kernels import reference_only

    model = _jetmoe_4bit_lora(tiny_checkpoint("jetmoe"))
    batch = batch_with_padding(model.config.vocab_size, seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    with reference_only():  # the NF4 references: the kernels' gradients are checked above
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert len(_quantized_experts(model.get_base_model())) == _expert_modules(model.config)


def _linear_4bit_with_dequantized_experts(checkpoint, experts: dict[str, torch.nn.Module]):
    """Plain transformers + bitsandbytes (its Linear layers in 4 bits) with the expert stacks set to the dequantized
    NF4 of `experts` (name -> quantized module): the model a fastmoe 4-bit model computes as, without fastmoe."""
    model, _ = _linear_4bit(checkpoint)
    with torch.no_grad():
        for name, module in experts.items():
            for stack in module._fastmoe_nf4:
                getattr(model.get_submodule(name), stack).copy_(dequantize_nf4(nf4_weight(module, stack)))
    return model


def test_jetmoe_qlora_adapters_move_both_ways_with_plain_peft(tiny_checkpoint, tmp_path, kernel_references):
    from peft import LoraConfig, PeftModel, get_peft_model

    checkpoint = tiny_checkpoint("jetmoe")
    batch = batch_with_padding(512, seed=2)
    attended = batch["attention_mask"].bool()

    fast = _jetmoe_4bit_lora(checkpoint)
    fast_logits = _logits(fast, batch)[attended]
    fast.save_pretrained(tmp_path / "fast")
    # Names without peft's wrappers (".base_layer"), as they are in the plain model.
    experts = {name.replace(".base_layer", ""): m for name, m in fast.get_base_model().named_modules()
               if is_quantized(m)}
    fastmoe.unpatch()
    plain = PeftModel.from_pretrained(_linear_4bit_with_dequantized_experts(checkpoint, experts), tmp_path / "fast")
    assert rel_err(_logits(plain, batch)[attended], fast_logits) < 1e-5

    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["kv_proj"],
                      target_parameters=["input_linear.weight", "output_linear.weight"])
    plain = get_peft_model(_linear_4bit_with_dequantized_experts(checkpoint, experts), lora)
    randomize_lora(plain, seed=3)
    plain_logits = _logits(plain, batch)[attended]
    plain.save_pretrained(tmp_path / "plain")
    fast = PeftModel.from_pretrained(_load_4bit(checkpoint), tmp_path / "plain", is_trainable=True)
    trainable = [name for name, p in fast.named_parameters() if p.requires_grad]
    assert all("lora_" in name for name in trainable)
    assert any("self_attention.experts.output_linear" in name for name in trainable)
    assert rel_err(_logits(fast, batch)[attended], plain_logits) < 1e-5


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


def test_unreadable_lora_on_jetmoe_nf4_experts_is_an_error_not_zero_experts(tiny_checkpoint, monkeypatch):
    from fastmoe.models import jetmoe

    model = _jetmoe_4bit_lora(tiny_checkpoint("jetmoe"))
    # What unwrap_expert_lora answers for layouts only peft's own forward handles (several active adapters).
    monkeypatch.setattr(jetmoe, "unwrap_expert_lora", lambda module: None)
    with pytest.raises(NotImplementedError, match="quantized to 4 bits"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


def test_unpatched_forward_of_nf4_experts_raises_instead_of_using_zero_experts(tiny_checkpoint):
    import fastmoe

    model = _load_4bit(tiny_checkpoint("afmoe"))
    fastmoe.unpatch()
    with pytest.raises(RuntimeError, match="NF4"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


def _load_4bit_then_quantize_experts(checkpoint):
    """The path streaming replaced: transformers + bitsandbytes load the experts 16-bit, quantize_experts_ follows."""
    from fastmoe.models.shared import register_experts_implementation
    from fastmoe.patching import SWITCHABLE

    family = models.family(transformers.AutoConfig.from_pretrained(checkpoint).model_type)
    # NF4 experts run in fastmoe's experts kernel only: the implementation FastModel.from_pretrained loads them with
    # (JetMoe's experts have no such switch: fastmoe replaces its MoE forwards whole). transformers accepts the name
    # once it is registered, which loading through fastmoe does; this test may run before any such load.
    register_experts_implementation()
    switch = {"experts_implementation": EXPERTS_IMPLEMENTATION} if family.routed_experts == SWITCHABLE else {}
    model, config = _linear_4bit(checkpoint, **switch)
    quantize_experts_(model, double_quant=config.bnb_4bit_use_double_quant)
    return model


def _afmoe_checkpoint(out_dir, tokenizer, dtype=torch.float32, **sizes):
    """A random AFMoE checkpoint shaped like the tiny one but for `sizes` (layer types follow the layer count)."""
    from fastmoe.builtin import randomize_routers, tiny_config

    fields = {**tiny_config("afmoe", len(tokenizer)).to_dict(), "layer_types": None, **sizes}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AfmoeConfig(**fields), dtype=dtype)
    randomize_routers(model, torch.Generator().manual_seed(1))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe", "qwen3_moe", "jetmoe"])
def test_streamed_quantization_equals_quantizing_after_loading(tiny_checkpoint, model_type, kernel_references):
    streamed = _load_4bit(tiny_checkpoint(model_type))
    assert quantize_experts_(streamed) == 0  # the fallback after loading found nothing left 16-bit
    reference = _load_4bit_then_quantize_experts(tiny_checkpoint(model_type))
    streamed_experts, reference_experts = _quantized_experts(streamed), _quantized_experts(reference)
    assert len(streamed_experts) == len(reference_experts) == _expert_modules(streamed.config)
    for ours, theirs in zip(streamed_experts, reference_experts):
        assert ours._fastmoe_nf4 == theirs._fastmoe_nf4
        for name in ours._fastmoe_nf4:
            a, b = nf4_weight(ours, name), nf4_weight(theirs, name)
            assert a.double_quant and b.double_quant
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
            assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, torch.device("cpu"))
            placeholder = getattr(ours, name)
            assert placeholder.untyped_storage().nbytes() <= placeholder.element_size()
            assert not placeholder.requires_grad
    batch = batch_with_padding(streamed.config.vocab_size)
    assert torch.equal(_logits(streamed, batch), _logits(reference, batch))


def test_experts_follow_the_configs_double_quant(tiny_checkpoint, monkeypatch):
    from fastmoe import api

    def without_double_quant(*args):
        config = original(*args)
        config.bnb_4bit_use_double_quant = False
        return config

    original = api._bnb_config
    monkeypatch.setattr(api, "_bnb_config", without_double_quant)
    experts = _quantized_experts(_load_4bit(tiny_checkpoint("afmoe")))
    assert experts
    for module in experts:
        for name in SWIGLU_EXPERT_PARAMETERS:
            nf4 = nf4_weight(module, name)
            assert not nf4.double_quant and nf4.absmax.dtype == torch.float32
            assert not hasattr(module, f"{name}_nf4_absmax_scale")


class ExpertStackBytes(TorchDispatchMode):
    """Peak bytes of live storage behind floating-point (num_experts, N, K) tensors made by the ops run inside the
    block: stacked 16-bit experts, and the gate and up stacks transformers builds to fuse them. It follows storages, not
    tensors, because the Parameter transformers sets on the model is a new tensor over the loaded storage."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() == 3
                    and tensor.shape[0] == self.num_experts and tensor.device.type != "meta"):
                storage = tensor.untyped_storage()
                if storage.nbytes() > tensor.element_size():  # NF4 placeholders hold one element
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def test_streamed_loading_never_holds_the_16bit_expert_set(tmp_path, tiny_tokenizer):
    checkpoint = _afmoe_checkpoint(tmp_path, tiny_tokenizer, num_hidden_layers=5)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    experts, hidden, intermediate = config.num_experts, config.hidden_size, config.moe_intermediate_size
    gate_up_bytes = experts * 2 * intermediate * hidden * 4
    expert_set_bytes = (config.num_hidden_layers - config.num_dense_layers) * experts * 3 * intermediate * hidden * 4

    with ExpertStackBytes(experts) as quantized_after_loading:
        _load_4bit_then_quantize_experts(checkpoint)
    assert quantized_after_loading.peak >= expert_set_bytes  # the tracker sees what the old path held

    with ExpertStackBytes(experts) as streamed:
        _load_4bit(checkpoint)
    # One parameter at a time: a whole gate_up_proj, and at most its gate and up stacks beside it while transformers
    # concatenates them; the set of four layers is three times that.
    assert gate_up_bytes <= streamed.peak <= 2 * gate_up_bytes < expert_set_bytes


@gpu
def test_streamed_loading_on_the_gpu_peaks_near_the_4bit_size(tmp_path, tiny_tokenizer):
    # 5 MoE layers of 32 experts at hidden 1024: 64 MiB per bf16 gate_up_proj, 480 MiB for the 16-bit expert set.
    sizes = dict(num_hidden_layers=6, hidden_size=1024, moe_intermediate_size=512, num_experts=32)
    checkpoint = _afmoe_checkpoint(tmp_path, tiny_tokenizer, dtype=torch.bfloat16, **sizes)
    gate_up_bytes = sizes["num_experts"] * 2 * sizes["moe_intermediate_size"] * sizes["hidden_size"] * 2
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=64, load_in_4bit=True)
    loaded = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    experts = _quantized_experts(model)
    device = torch.device("cuda", torch.cuda.current_device())
    assert len(experts) == 5
    assert all(nf4_weight(m, name).device == device for m in experts for name in SWIGLU_EXPERT_PARAMETERS)
    # Quantizing after loading peaked above loaded + 480 MiB; streaming adds what one gate_up_proj needs while it is
    # fused (its stacks and their concatenation) plus quantization scratch.
    assert peak <= loaded + 2 * gate_up_bytes + 32 * 2**20, (peak / 2**20, loaded / 2**20)


def _refuse_reading_weights(monkeypatch):
    from transformers import core_model_loading

    def read(*args, **kwargs):
        raise AssertionError("a checkpoint tensor was read before the refusal")

    monkeypatch.setattr(core_model_loading, "spawn_materialize", read)


def test_8bit_loading_of_an_moe_model_is_refused_before_any_weight_is_read(tiny_checkpoint, monkeypatch):
    _refuse_reading_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"load_in_8bit quantizes Linear layers only, and this model's experts \(\d+%"):
        FastModel.from_pretrained(str(tiny_checkpoint("lfm2_moe")), dtype=torch.float32, max_seq_length=64,
                                  load_in_8bit=True)


def test_8bit_linear_layers_with_16bit_experts_on_request(tiny_checkpoint):
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "router.gate"])
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64,
                                         quantization_config=config)
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Linear8bitLt"
    experts = model.model.layers[1].mlp.experts
    assert not is_quantized(experts) and experts.gate_up_proj.dtype == torch.float32
    assert torch.isfinite(_logits(model, batch_with_padding(model.config.vocab_size))).all()
