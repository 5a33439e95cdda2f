"""gpt-oss: FastModel + LoRA (attention and experts) against transformers + peft, fp32 on CPU against fp64, with the
tiny model's sliding window shorter than the batch, its clamps acting and the router aux loss on; which kernels ran;
unpatch() and the "fastmoe" experts implementation under transformers' own forward; generation through the decode
step (sinks in the decode attention); the router; packed documents; 8-bit refused in one line; an MXFP4 checkpoint
loaded dequantized, and in 4 bits (NF4 experts; the rest of 4-bit: tests/models/test_4bit_experts.py)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.gpt_oss import modeling_gpt_oss as hf

import fastmoe
from fastmoe import FastGptOssModel, FastModel
from fastmoe.kernels.dispatch import reference_only
from fastmoe.kernels.moe import experts as experts_module
from fastmoe.models import gpt_oss
from testing_utils import (assert_packed_documents_train_as_if_alone, batch_with_padding, compare_with_transformers,
                           fp32_model_tolerance, patched_model_and_unpatched_reference, randomize_lora, rel_err)

TARGETS = dict(
    target_modules=list(FastGptOssModel.default_target_modules),
    target_parameters=list(FastGptOssModel.default_target_parameters),
)
PATCHED = (hf.GptOssRMSNorm, hf.GptOssTopKRouter, hf.GptOssMLP, hf.GptOssAttention, hf.GptOssForCausalLM)


def _counting(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


def test_logits_loss_aux_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, monkeypatch):
    checkpoint = tiny_checkpoint("gpt_oss")
    config = AutoConfig.from_pretrained(checkpoint)
    assert config.sliding_window < 11 and set(config.layer_types) == {"sliding_attention", "full_attention"}
    # transformers' eager experts (the reference) record how far their pre-activations reach.
    reach = []
    apply_gate = hf.GptOssExperts._apply_gate
    monkeypatch.setattr(hf.GptOssExperts, "_apply_gate",
                        lambda self, gate_up: reach.append(gate_up.detach().abs().max()) or apply_gate(self, gate_up))
    # fastmoe's side must run the Triton kernels (interpreted), not the experts' reference.
    monkeypatch.setattr(experts_module, "reference_moe_experts_clamped_swiglu", None)
    experts_calls = _counting(monkeypatch, gpt_oss, "moe_experts_clamped_swiglu")
    routing_calls = _counting(monkeypatch, gpt_oss, "route_softmax_topk")
    rope_calls = _counting(monkeypatch, gpt_oss, "apply_rope")

    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
        checkpoint, dict(r=4, lora_alpha=8, **TARGETS), call_kwargs=dict(output_router_logits=True))
    assert max(reach) > 2 * config.swiglu_limit  # the clamps act
    # Two forwards (logits, loss) of two layers; q and k rotated per layer.
    assert len(experts_calls) == len(routing_calls) == 4 and len(rope_calls) == 8
    tolerance = fp32_model_tolerance(config, *ref_logits.shape[:2])
    assert rel_err(logits, ref_logits) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    # (peft nests the two expert weights' wrappers: experts.base_layer is gate_up_proj's, experts down_proj's.)
    for part in ("mlp.experts.base_layer.lora_A", "mlp.experts.lora_B", "self_attn.q_proj", "self_attn.o_proj"):
        assert any(part in name for name in grads), part
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def test_unpatch_restores_transformers_and_fastmoe_experts_serve_its_forward(tiny_checkpoint, monkeypatch):
    """After unpatch(), transformers' own forwards run; the model still names "fastmoe" as its experts
    implementation, whose entry computes gpt-oss's layout with the kernel."""
    model, reference, batch = patched_model_and_unpatched_reference(tiny_checkpoint("gpt_oss"), PATCHED)
    monkeypatch.setattr(experts_module, "reference_moe_experts_clamped_swiglu", None)
    with torch.no_grad():
        ref_out = reference(**batch, use_cache=False)
        out = model.eval()(**batch, use_cache=False)
    assert model.config._experts_implementation == "fastmoe"
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    assert rel_err(out.loss, ref_out.loss) < 1e-5


def test_generation_through_the_decode_step_matches_transformers(tiny_checkpoint):
    """With the router logits on, as trl's SFTTrainer leaves the config: the decode step computes no aux loss (its
    prepared masks, one per layer type, are no padding mask)."""
    checkpoint = str(tiny_checkpoint("gpt_oss"))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    reference.config.output_router_logits = True
    # Longer than the sliding window, so the decode step's ring buffer wraps.
    prompt = batch_with_padding(reference.config.vocab_size)["input_ids"][:1, :9]
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_out = reference.generate(prompt, **settings)

    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32)
    model.config.output_router_logits = True
    model = FastModel.for_inference(model)
    out = model.generate(prompt, **settings)
    assert model.forward.decode_steps == 2
    assert torch.equal(out.sequences, ref_out.sequences)
    for step, ref_step in zip(out.logits, ref_out.logits):
        assert rel_err(step, ref_step) < 1e-5


def test_router_matches_transformers():
    config = hf.GptOssConfig(**gpt_oss.FAMILY.tiny_config)
    router = hf.GptOssTopKRouter(config)
    generator = torch.Generator().manual_seed(0)
    torch.nn.init.normal_(router.weight, std=0.5, generator=generator)
    torch.nn.init.normal_(router.bias, std=0.5, generator=generator)
    hidden = torch.randn(26, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_weights = torch.randn(26, config.num_experts_per_tok, generator=torch.Generator().manual_seed(2))

    def run(forward):
        hidden.grad = None
        logits, weights, index = forward(router, hidden)
        (weights * grad_weights).sum().backward()
        return logits, weights, index, hidden.grad

    ref = run(hf.GptOssTopKRouter.forward)
    got = run(gpt_oss.router_forward)
    assert rel_err(got[0], ref[0]) < 1e-6
    assert torch.equal(got[2], ref[2]) and got[1].dtype == ref[1].dtype
    assert rel_err(got[1], ref[1]) < 1e-6
    assert rel_err(got[3], ref[3]) < 1e-5


def test_8bit_is_refused_in_one_line_and_names_4bit(tiny_checkpoint):
    with pytest.raises(ValueError, match="load_in_8bit quantizes Linear layers only") as info:
        FastModel.from_pretrained(str(tiny_checkpoint("gpt_oss")), load_in_8bit=True)
    assert "\n" not in str(info.value) and "gpt_oss" in str(info.value)


def test_packed_documents_train_as_if_alone(tiny_checkpoint):
    """Packed rows (position_ids restarting, no attention mask): transformers' GptOssModel builds its masks without
    position_ids, so its documents attend to each other; fastmoe's `model` op hands them over. On the ops' PyTorch
    references (the kernels are compared above), as the other families' packed rows in test_packed_sequences.py."""
    checkpoint = tiny_checkpoint("gpt_oss")
    config = AutoConfig.from_pretrained(checkpoint)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    model.train()
    with reference_only():
        # The last document longer than the sliding window. No cache, as in training: transformers reads documents
        # from position_ids only without one.
        assert_packed_documents_train_as_if_alone(model, config, [5, 1, 8], use_cache=False)


def _mxfp4_stack(num_experts: int, out_features: int, in_features: int, generator: torch.Generator):
    """A random expert stack exactly representable in MXFP4: (weight stored (E, in, out) as gpt-oss holds it, the
    checkpoint's blocks (E, out, in / 32, 16) uint8 with two FP4 codes a byte, low nibble first, and scales (E, out,
    in / 32) uint8, the blocks' power-of-two exponents + 127)."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    codes = torch.randint(0, 16, (num_experts, out_features, in_features), generator=generator, dtype=torch.uint8)
    exponents = torch.randint(-7, -4, (num_experts, out_features, in_features // 32), generator=generator)
    dense = torch.tensor(FP4_VALUES)[codes.long()] * torch.exp2(exponents.float()).repeat_interleave(32, dim=-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(num_experts, out_features, in_features // 32, 16)
    return dense.transpose(1, 2).contiguous(), blocks, (exponents + 127).to(torch.uint8)


def _mxfp4_and_dense_checkpoints(tmp_path, tokenizer):
    """(dense checkpoint, MXFP4 checkpoint of the same weights, the dense state dict): the tiny gpt-oss model with
    experts exactly representable in MXFP4, saved both ways."""
    from safetensors.torch import load_file, save_file

    from fastmoe.builtin import build_tiny_checkpoint

    # MXFP4 blocks are 32 wide: hidden and intermediate sizes multiples of 32.
    dense_dir = build_tiny_checkpoint("gpt_oss", tmp_path / "dense", tokenizer=tokenizer, hidden_size=64,
                                      intermediate_size=32)
    state = load_file(str(dense_dir / "model.safetensors"))
    config = AutoConfig.from_pretrained(dense_dir)
    generator = torch.Generator().manual_seed(11)
    quantized = dict(state)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        shapes = {"gate_up_proj": (2 * config.intermediate_size, config.hidden_size),
                  "down_proj": (config.hidden_size, config.intermediate_size)}
        for name, (out_features, in_features) in shapes.items():
            weight, blocks, scales = _mxfp4_stack(config.num_local_experts, out_features, in_features, generator)
            state[prefix + name] = weight
            del quantized[prefix + name]
            quantized[prefix + name + "_blocks"], quantized[prefix + name + "_scales"] = blocks, scales
    save_file(state, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    mxfp4_dir = tmp_path / "mxfp4"
    mxfp4_dir.mkdir()
    save_file(quantized, str(mxfp4_dir / "model.safetensors"), metadata={"format": "pt"})
    config_json = json.loads((dense_dir / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mxfp4_dir / "config.json").write_text(json.dumps(config_json))
    tokenizer.save_pretrained(mxfp4_dir)
    return dense_dir, mxfp4_dir, state


def test_mxfp4_checkpoint_loads_dequantized_and_matches_its_dense_weights(tmp_path, tiny_tokenizer, monkeypatch):
    """gpt-oss ships MXFP4 experts: FastModel loads them dequantized (transformers' MXFP4 experts cannot train), to
    the weights of the same model saved dense, whose logits transformers gives. (transformers dequantizes by itself
    where its MXFP4 kernels cannot run, the CPU among them; FastModel asks for it everywhere.)"""
    dense_dir, mxfp4_dir, state = _mxfp4_and_dense_checkpoints(tmp_path, tiny_tokenizer)
    load_kwargs, from_pretrained = [], AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: load_kwargs.append(kwargs) or from_pretrained(cls, *args, **kwargs)))
    # On the CPU, where the reference is, on a GPU machine too (FastModel would load to the GPU there).
    model, _ = FastModel.from_pretrained(str(mxfp4_dir), dtype=torch.float32, max_seq_length=64,
                                         device_map={"": "cpu"})
    assert load_kwargs[0]["quantization_config"].dequantize
    monkeypatch.undo()
    experts = model.model.layers[1].mlp.experts
    assert type(experts) is hf.GptOssExperts and experts.gate_up_proj.dtype == torch.float32
    assert torch.equal(experts.gate_up_proj, state["model.layers.1.mlp.experts.gate_up_proj"])
    assert torch.equal(experts.down_proj, state["model.layers.1.mlp.experts.down_proj"])
    fastmoe.unpatch()
    reference = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    batch = batch_with_padding(reference.config.vocab_size)
    with torch.no_grad():
        ref_logits = reference(**batch, use_cache=False).logits
        FastGptOssModel.pre_patch()
        with reference_only():
            logits = model.eval()(**batch, use_cache=False).logits
    assert rel_err(logits, ref_logits) < 1e-5


@pytest.mark.filterwarnings("ignore:bitsandbytes quantization without a CUDA GPU")
def test_load_in_4bit_of_an_mxfp4_checkpoint_gives_the_nf4_experts_of_its_dense_weights(tmp_path, tiny_tokenizer,
                                                                                          monkeypatch):
    """load_in_4bit of an MXFP4 checkpoint: each expert stack dequantized and quantized to NF4 as it loads, never the
    whole 16-bit expert set at once; the same NF4 experts, bitsandbytes layers and logits as load_in_4bit of the same
    weights saved dense, and a model that no longer says MXFP4. Then LoRA trains on it and its merged save loads in
    plain transformers with the trained model's logits. 8 bits are refused as for every MoE model."""
    from fastmoe import quantized_loading
    from fastmoe.quantize import is_quantized, nf4_weight

    dense_dir, mxfp4_dir, state = _mxfp4_and_dense_checkpoints(tmp_path, tiny_tokenizer)
    import bitsandbytes.nn.modules  # its CPU fast path re-lays odd shapes (see tests/models/test_4bit_experts.py)

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False, raising=False)
    dequantized, convert = [], quantized_loading.Mxfp4ExpertsDequantize.convert
    monkeypatch.setattr(quantized_loading.Mxfp4ExpertsDequantize, "convert",
                        lambda self, *args, **kwargs: dequantized.append(1) or convert(self, *args, **kwargs))
    with pytest.raises(ValueError, match="load_in_8bit quantizes Linear layers only"):  # before any weight is read
        FastModel.from_pretrained(str(mxfp4_dir), dtype=torch.float32, load_in_8bit=True)
    model, _ = FastModel.from_pretrained(str(mxfp4_dir), dtype=torch.float32, max_seq_length=64, load_in_4bit=True)
    dense, _ = FastModel.from_pretrained(str(dense_dir), dtype=torch.float32, max_seq_length=64, load_in_4bit=True)
    assert len(dequantized) == 2 * model.config.num_hidden_layers  # one conversion per stack
    assert model.config.quantization_config.quant_method == "bitsandbytes"
    experts = [m for m in model.modules() if is_quantized(m)]
    dense_experts = [m for m in dense.modules() if is_quantized(m)]
    assert len(experts) == len(dense_experts) == model.config.num_hidden_layers
    for module, dense_module in zip(experts, dense_experts):
        for name in ("gate_up_proj", "down_proj"):
            got, want = nf4_weight(module, name), nf4_weight(dense_module, name)
            assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
            assert all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors()))
    # What is checked is the loading: on the ops' PyTorch references (the kernels read NF4 experts the same way
    # whatever checkpoint they came from; tests/models/test_4bit_experts.py runs them).
    batch = batch_with_padding(model.config.vocab_size)
    with torch.no_grad(), reference_only():
        logits, dense_logits = (m.eval()(**batch, use_cache=False).logits for m in (model, dense))
    assert torch.equal(logits, dense_logits)

    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    model.train()
    with reference_only():
        model(**batch).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "experts" in name and p.requires_grad)
    with torch.no_grad(), reference_only():
        trained_logits = model.eval()(**batch, use_cache=False).logits
    model.save_pretrained_merged(str(tmp_path / "merged"), tiny_tokenizer)
    fastmoe.unpatch()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.model.layers[0].mlp.experts.gate_up_proj.shape == state[
        "model.layers.0.mlp.experts.gate_up_proj"].shape
    with torch.no_grad():
        assert rel_err(merged(**batch, use_cache=False).logits, trained_logits) < 1e-5


def test_experts_holding_mxfp4_blocks_are_refused_with_the_way_out():
    config = hf.GptOssConfig(**gpt_oss.FAMILY.tiny_config)
    experts = hf.GptOssExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 48, 12, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(NotImplementedError, match="no quantization_config .it dequantizes them.$"):
        gpt_oss.experts_forward(experts, torch.randn(3, 48), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2))


def test_adapters_load_both_ways_with_plain_peft(tiny_checkpoint, tmp_path):
    """A fastmoe adapter (attention and every expert) loads into plain transformers + peft with the same logits, and
    plain peft's adapter into a FastModel. On the ops' PyTorch references: what is checked is the adapter's files and
    names; the kernels read the same peft factors in the equivalence test above."""
    from peft import LoraConfig, PeftModel, get_peft_model

    checkpoint = str(tiny_checkpoint("gpt_oss"))
    batch = {k: v for k, v in batch_with_padding(512, seed=2).items() if k != "labels"}
    model, _ = FastModel.from_pretrained(checkpoint, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model, seed=3)
    with torch.no_grad(), reference_only():
        fast_logits = model.eval()(**batch).logits
    model.save_pretrained(tmp_path / "fast")
    fastmoe.unpatch()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                                      tmp_path / "fast").eval()
    with torch.no_grad():
        assert rel_err(fast_logits, plain(**batch).logits) < 1e-5

    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, **TARGETS))
    randomize_lora(plain, seed=4)
    with torch.no_grad():
        plain_logits = plain.eval()(**batch).logits
    plain.save_pretrained(tmp_path / "plain")
    model, _ = FastModel.from_pretrained(checkpoint, max_seq_length=64, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, tmp_path / "plain").eval()
    assert any("experts" in name for name, _ in model.named_parameters() if "lora_" in name)
    with torch.no_grad(), reference_only():
        assert rel_err(model(**batch).logits, plain_logits) < 1e-5
