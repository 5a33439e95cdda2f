"""use_gradient_checkpointing="fastmoe": every decoder layer is recomputed in the backward pass and only its input
is kept, in host memory, until then.

The CPU tests run the ops' PyTorch references (`reference_only`): what they check is the checkpointing, and the
Triton kernels are compared with those references in tests/kernels and tests/models. The GPU test checks the
pinned-memory copies and that peak memory drops."""

import pytest
import torch
from testing_utils import batch_with_padding, forward_backward, randomize_lora, rel_err

from fastmoe import FastModel, offloaded_checkpointing
from fastmoe.builtin import build_tiny_checkpoint
from fastmoe.kernels.dispatch import reference_only
from fastmoe.offloaded_checkpointing import checkpoint_with_offloaded_inputs


@pytest.fixture(autouse=True)
def _one_thread():
    """These models' matmuls, about (22 tokens, 48), are too small to split across threads, and OpenMP's barriers
    made the file several times slower whenever another process held one of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_model(checkpoint, mode, dtype=torch.float32, **lora_kwargs):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=dtype, max_seq_length=64)
    lora_kwargs = {"r": 4, "lora_alpha": 8, **lora_kwargs}
    if mode != "default":
        lora_kwargs["use_gradient_checkpointing"] = mode
    model = FastModel.get_peft_model(model, **lora_kwargs)
    randomize_lora(model)
    return FastModel.for_training(model)


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.get_base_model().model.layers)


def offloads_every_layer(model) -> bool:
    return all(layer.gradient_checkpointing and layer._gradient_checkpointing_func is checkpoint_with_offloaded_inputs
               for layer in decoder_layers(model))


def record_hook(monkeypatch, name: str) -> list:
    """Route one of the saved-tensor hooks (`offload_to_host`, `reload_to_device`) through a recorder: what it
    returned for each call, in call order."""
    returned = []
    hook = getattr(offloaded_checkpointing, name)

    def recording_hook(argument):
        returned.append(hook(argument))
        return returned[-1]

    monkeypatch.setattr(offloaded_checkpointing, name, recording_hook)
    return returned


def record_offloads(monkeypatch) -> list:
    return record_hook(monkeypatch, "offload_to_host")


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe", "cohere"])
def test_logits_loss_and_every_lora_gradient_equal_those_without_checkpointing(tiny_checkpoint, model_type):
    checkpoint = tiny_checkpoint(model_type)
    with reference_only():
        plain = lora_model(checkpoint, False)
        batch = batch_with_padding(plain.config.vocab_size)
        ref_logits, ref_loss, ref_grads = forward_backward(plain, batch)
        model = lora_model(checkpoint, "fastmoe")
        assert offloads_every_layer(model)
        logits, loss, grads = forward_backward(model, batch)
    assert rel_err(logits, ref_logits) < 1e-5
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_default_mode_is_transformers_checkpointing_without_offload(tiny_checkpoint):
    model = lora_model(tiny_checkpoint("afmoe"), "default")
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert not offloads_every_layer(model)


@pytest.mark.parametrize("mode", [False, "fastmoe"])
def test_backward_recomputes_each_layer_once(tiny_checkpoint, mode):
    model = lora_model(tiny_checkpoint("afmoe"), mode)
    layers = decoder_layers(model)
    # A layer's own hooks stay outside the checkpoint in transformers >= 5.23; its submodules' run on every recompute.
    # Pre-hooks, since the recompute stops inside the last submodule once every tensor it needs is back.
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        for child in layer.children():
            child.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    with reference_only():
        loss = model(**batch_with_padding(model.config.vocab_size)).loss
        forward_calls = list(calls)
        loss.backward()
    recomputed = [after - before for after, before in zip(calls, forward_calls)]
    assert all(count > 0 for count in forward_calls)
    assert recomputed == (forward_calls if mode == "fastmoe" else [0] * len(layers))


def test_only_each_layer_input_is_saved_and_it_comes_back_for_the_recompute(tiny_checkpoint, monkeypatch):
    model = lora_model(tiny_checkpoint("lfm2_moe"), "fastmoe")
    saved = record_offloads(monkeypatch)
    reloaded = record_hook(monkeypatch, "reload_to_device")
    layer_inputs = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0].detach().clone()))
             for layer in decoder_layers(model)]
    with reference_only():
        loss = model(**batch_with_padding(model.config.vocab_size)).loss
        # transformers 5.17 runs a layer's own hooks inside the checkpoint, so again in the recompute.
        for hook in hooks:
            hook.remove()
        # On the CPU the offload keeps the tensor where it is: what was saved is the layer input itself.
        assert len(saved) == len(layer_inputs) == len(decoder_layers(model))
        for handle, layer_input in zip(saved, layer_inputs):
            assert isinstance(handle, torch.Tensor) and handle.device.type == "cpu"
            assert torch.equal(handle, layer_input)
        loss.backward()
    # The backward pass reloads each input once, last layer first.
    assert len(reloaded) == len(layer_inputs)
    for tensor, layer_input in zip(reloaded, reversed(layer_inputs)):
        assert torch.equal(tensor, layer_input)


def test_recompute_draws_the_same_lora_dropout_masks(tiny_checkpoint):
    checkpoint = tiny_checkpoint("afmoe")
    # peft has no dropout for expert parameters: adapt the attention projections only.
    lora = {"lora_dropout": 0.5, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    results = {}
    with reference_only():
        for mode, seed in ((False, 0), ("fastmoe", 0), ("fastmoe", 1)):
            model = lora_model(checkpoint, mode, **lora)
            torch.manual_seed(seed)
            loss = model(**batch_with_padding(model.config.vocab_size)).loss
            loss.backward()
            results[mode, seed] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    reference, same_masks, other_masks = results[False, 0], results["fastmoe", 0], results["fastmoe", 1]
    for name in reference:
        assert rel_err(same_masks[name], reference[name]) < 1e-5, name
    # Other masks give other gradients: the dropout is really on.
    assert any(rel_err(other_masks[name], reference[name]) > 1e-2 for name in reference)


def test_evaluation_does_not_checkpoint_and_training_does_again(tiny_checkpoint, monkeypatch):
    model = lora_model(tiny_checkpoint("afmoe"), "fastmoe")
    packed = record_offloads(monkeypatch)
    batch = batch_with_padding(model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with reference_only():
        FastModel.for_inference(model)
        eval_logits = model(**inputs).logits
        assert packed == []
        generated = model.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, inputs["input_ids"].shape[1] + 3) and packed == []
        FastModel.for_training(model)
        train_logits = model(**inputs).logits
    assert len(packed) == len(decoder_layers(model))
    # No dropout in this model: evaluation and (checkpointed) training compute the same logits.
    assert rel_err(train_logits, eval_logits) < 1e-6


def test_disabling_restores_transformers_default(tiny_checkpoint):
    model = lora_model(tiny_checkpoint("afmoe"), "fastmoe")
    base = model.get_base_model()
    # transformers 5.23 renamed gradient_checkpointing_disable (the old name warns); 5.17 has the old name only.
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert not any(layer._gradient_checkpointing_func is checkpoint_with_offloaded_inputs
                   for layer in decoder_layers(model))


def test_model_without_checkpointing_support_warns_and_trains_without(tiny_checkpoint, monkeypatch):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    with pytest.warns(UserWarning, match="does not support gradient checkpointing"):
        model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="fastmoe")
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))


@pytest.mark.parametrize("mode", ["foo", "unsloth", 2, None])
def test_unknown_mode_is_refused_naming_the_allowed_values(tiny_checkpoint, mode):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    with pytest.raises(ValueError, match=r'use_gradient_checkpointing must be "fastmoe", True or False, got'):
        FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode)


@pytest.mark.gpu
def test_on_cuda_inputs_wait_in_pinned_memory_and_peak_memory_drops(tiny_tokenizer, tmp_path, monkeypatch):
    # Wide hidden states and narrow everything else, so that the 8 saved layer inputs are what standard
    # checkpointing keeps on the GPU, not the weights or one layer's recomputed activations.
    layers, hidden, batch_size, seq = 8, 1024, 2, 2048
    checkpoint = build_tiny_checkpoint(
        "afmoe", tmp_path / "afmoe-8-layers", tokenizer=tiny_tokenizer, num_hidden_layers=layers, hidden_size=hidden,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), max_position_embeddings=seq)
    batch = {k: v.cuda() for k, v in batch_with_padding(len(tiny_tokenizer), batch=batch_size, seq=seq).items()}
    input_bytes = batch_size * seq * hidden * torch.float32.itemsize

    def step(mode):
        model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=seq)
        model = FastModel.get_peft_model(model.cuda(), r=4, lora_alpha=8, use_gradient_checkpointing=mode)
        randomize_lora(model)
        FastModel.for_training(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = model(**batch).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        peak = torch.cuda.max_memory_allocated() - start
        del model
        return loss.detach(), grads, peak

    ref_loss, ref_grads, standard_peak = step(True)
    handles = record_offloads(monkeypatch)
    loss, grads, offloaded_peak = step("fastmoe")

    offloaded = [h for h in handles if isinstance(h, offloaded_checkpointing.HostCopy)]
    # Besides each layer's hidden states, checkpoint saves an empty placeholder tensor per layer; it stays as it is.
    assert all(isinstance(h, offloaded_checkpointing.HostCopy) or h.numel() == 0 for h in handles)
    assert len(offloaded) == layers
    assert all(h.host.device.type == "cpu" and h.host.is_pinned() for h in offloaded)
    assert rel_err(loss, ref_loss) < 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name
    # Standard checkpointing holds up to all 8 inputs while the backward pass starts; the offload holds about one.
    assert offloaded_peak < standard_peak - 4 * input_bytes, (offloaded_peak, standard_peak, input_bytes)
