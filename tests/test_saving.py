"""save_pretrained_merged: merged checkpoints that plain transformers loads with the adapter's logits, adapter-only
saves, and adapter folders loading back into FastModel trainable.

The forwards run the ops' PyTorch references (`reference_only`): what is checked here is the merging and the file
plumbing, and under the Triton interpreter every forward would cost seconds; tests/models compares the Triton kernels
against transformers."""

import json

import pytest
import torch
from fastmoe.kernels.dispatch import reference_only
from peft import PeftModel
from peft.tuners.lora.layer import ParamWrapper
from safetensors import safe_open
from testing_utils import batch_with_padding, randomize_lora, rel_err
from transformers import AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel
from fastmoe.quantize import is_quantized

# LoRA per family, with each family's default targets: AFMoE's attention, attention gate, dense and shared MLPs and
# (nested parameter wrappers) routed experts; JetMoe's kv_proj and the experts of both mixtures (MoE and MoA);
# Cohere's dense projections; Qwen3-MoE's attention, dense MLP and experts. JetMoe takes scaling 1: without QK norm, larger random adapters saturate attention.
LORA = {
    "afmoe": {"r": 4, "lora_alpha": 8},
    "jetmoe": {"r": 4, "lora_alpha": 4, "use_gradient_checkpointing": False},
    "cohere": {"r": 4, "lora_alpha": 8},
    "qwen3_moe": {"r": 4, "lora_alpha": 8},
    "mixtral": {"r": 4, "lora_alpha": 8},
    "qwen2_moe": {"r": 4, "lora_alpha": 8},
    "gpt_oss": {"r": 4, "lora_alpha": 8},
}


@pytest.fixture(autouse=True)
def _pytorch_references():
    with reference_only():
        yield


def adapted_model(checkpoint, model_type: str, **load_kwargs):
    load_kwargs.setdefault("dtype", torch.float32)
    model, tokenizer = FastModel.from_pretrained(str(checkpoint), max_seq_length=64, **load_kwargs)
    model = FastModel.get_peft_model(model, **LORA[model_type])
    randomize_lora(model)
    return model, tokenizer


def batch(vocab_size: int) -> dict:
    return {k: v for k, v in batch_with_padding(vocab_size).items() if k != "labels"}


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    """Eval logits at the attended positions. Padding embeds to zeros in JetMoe, where its routers then pick among
    tied experts arbitrarily; those positions reach nothing else, so only attended ones are compared."""
    model.eval()
    return model(**inputs).logits[inputs["attention_mask"].bool()]


def load_plain(folder) -> torch.nn.Module:
    """The checkpoint as plain transformers loads it: no fastmoe patches, no peft, no quantization."""
    fastmoe.unpatch()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle is no dict)


@pytest.mark.parametrize("model_type", ["afmoe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"])
def test_merged_checkpoint_loads_plainly_with_the_adapter_models_logits(tiny_checkpoint, tmp_path, model_type):
    model, tokenizer = adapted_model(tiny_checkpoint(model_type), model_type)
    if model_type == "jetmoe":
        wrapped = [name for name, module in model.named_modules() if isinstance(module, ParamWrapper)]
        assert any(".mlp.input_linear" in name for name in wrapped)
        assert any(".self_attention.experts.output_linear" in name for name in wrapped)
    inputs = batch(model.config.vocab_size)
    expected = logits(model, inputs)

    model.save_pretrained_merged(tmp_path / "merged", tokenizer)

    keys = saved_tensors(tmp_path / "merged").keys()
    assert not any("lora_" in key or "base_layer" in key for key in keys)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    plain = load_plain(tmp_path / "merged")
    assert rel_err(logits(plain, inputs), expected) < 1e-5
    # The adapters do move the logits, so a checkpoint that silently dropped them would fail above.
    base = load_plain(tiny_checkpoint(model_type))
    assert rel_err(logits(base, inputs), expected) > 1e-3


def test_live_model_is_untouched_and_keeps_training_after_a_merged_save(tiny_checkpoint, tmp_path):
    model, tokenizer = adapted_model(tiny_checkpoint("afmoe"), "afmoe")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    inputs = batch(model.config.vocab_size)
    expected = logits(model, inputs)

    model.save_pretrained_merged(tmp_path / "merged", tokenizer)

    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(module.merged for module in model.modules() if hasattr(module, "merged_adapters"))
    assert torch.equal(logits(model, inputs), expected)
    model.train()
    model(**batch_with_padding(model.config.vocab_size)).loss.backward()
    assert all(model.get_parameter(name).grad is not None for name in trainable)
    assert any("experts" in name for name in trainable)


def test_lora_method_saves_the_adapter_only(tiny_checkpoint, tmp_path):
    model, tokenizer = adapted_model(tiny_checkpoint("cohere"), "cohere")
    model.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files


def test_unknown_save_method_names_the_valid_ones(tiny_checkpoint, tmp_path):
    model, _ = adapted_model(tiny_checkpoint("cohere"), "cohere")
    with pytest.raises(ValueError, match="'lora'.*'merged_16bit'"):
        model.save_pretrained_merged(tmp_path / "out", save_method="merged_4bit")
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:bitsandbytes quantization without a CUDA GPU")
@pytest.mark.parametrize(("model_type", "bits"), [("afmoe", 4), ("jetmoe", 4), ("gpt_oss", 4), ("cohere", 8)])
def test_quantized_model_merges_to_a_dense_checkpoint(tiny_checkpoint, tmp_path, model_type, bits):
    model, tokenizer = adapted_model(tiny_checkpoint(model_type), model_type, **{f"load_in_{bits}bit": True})
    # 4-bit AFMoE, JetMoe and gpt-oss have both kinds of quantized weight: bitsandbytes Linear layers and fastmoe's
    # NF4 experts (JetMoe's in both mixtures, gpt-oss's stored (E, in, out)).
    kinds = {type(getattr(m, "weight", None)).__name__ for m in model.modules()} | \
        {"nf4 experts" for m in model.modules() if is_quantized(m)}
    assert kinds >= ({"Params4bit", "nf4 experts"} if bits == 4 else {"Int8Params"})
    inputs = batch(model.config.vocab_size)
    expected = logits(model, inputs)

    model.save_pretrained_merged(tmp_path / "merged", tokenizer)

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {tensor.dtype for tensor in saved_tensors(tmp_path / "merged").values()} == {torch.float32}
    # The live model is still the quantized one it was.
    assert model.config.quantization_config is not None and model.get_base_model().hf_quantizer is not None
    plain = load_plain(tmp_path / "merged")
    # Dequantized weights are the ones bitsandbytes computes with (8-bit also quantizes activations, hence 1e-2).
    assert rel_err(logits(plain, inputs), expected) < 1e-2


def test_bf16_model_saves_bf16_weights(tiny_checkpoint, tmp_path):
    model, tokenizer = adapted_model(tiny_checkpoint("afmoe"), "afmoe", dtype=torch.bfloat16)
    model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {tensor.dtype for tensor in saved_tensors(tmp_path / "merged").values()} == {torch.bfloat16}


def test_tied_embeddings_are_untied_when_merging_makes_them_differ(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("cohere")
    model, tokenizer = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    assert model.config.tie_word_embeddings
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    randomize_lora(model)
    inputs = batch(model.config.vocab_size)
    expected = logits(model, inputs)

    model.save_pretrained_merged(tmp_path / "merged", tokenizer)

    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert model.config.tie_word_embeddings
    assert rel_err(logits(load_plain(tmp_path / "merged"), inputs), expected) < 1e-5
    # Without an adapter on either, they stay tied and stored once, as transformers saves them.
    untouched = adapted_model(checkpoint, "cohere")[0]
    untouched.save_pretrained_merged(tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in saved_tensors(tmp_path / "tied")


def test_adapter_folder_loads_base_and_adapter_trainable(tiny_checkpoint, tmp_path):
    model, tokenizer = adapted_model(tiny_checkpoint("afmoe"), "afmoe")
    inputs = batch(model.config.vocab_size)
    expected = logits(model, inputs)
    model.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")
    fastmoe.unpatch()

    loaded, loaded_tokenizer = FastModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32,
                                                         max_seq_length=64)

    assert isinstance(loaded, PeftModel) and loaded_tokenizer.pad_token is not None
    assert fastmoe.patching.is_patched(fastmoe.FastAfmoeModel.patches())
    assert torch.equal(logits(loaded, inputs), expected)
    trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("experts" in name for name in trainable)
    loaded.train()
    loaded(**batch_with_padding(loaded.config.vocab_size)).loss.backward()
    assert all(loaded.get_parameter(name).grad is not None for name in trainable)
    # The method rides along on adapter-folder loads too.
    loaded.save_pretrained_merged(tmp_path / "merged")
    assert rel_err(logits(load_plain(tmp_path / "merged"), inputs), expected) < 1e-5


def test_modules_to_save_copy_is_what_gets_saved(tiny_checkpoint, tmp_path):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=["lm_head"])
    randomize_lora(model)
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    inputs = batch(model.config.vocab_size)
    expected = logits(model, inputs)

    model.save_pretrained_merged(tmp_path / "merged")

    assert rel_err(logits(load_plain(tmp_path / "merged"), inputs), expected) < 1e-5


def test_lora_variants_are_refused_with_the_way_out(tiny_checkpoint, tmp_path):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("cohere")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="save_method='lora'"):
        model.save_pretrained_merged(tmp_path / "merged")
