"""JetMoe: FastModel + LoRA (experts of both mixtures included) against transformers + peft, fp32 on CPU."""

from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import fastmoe
from fastmoe import FastJetMoeModel, FastModel
from fastmoe.builtin import build_tiny_checkpoint
from testing_utils import batch_with_padding, compare_with_transformers, fp32_model_tolerance, randomize_lora, rel_err

TARGETS = dict(target_modules=["kv_proj"], target_parameters=["input_linear.weight", "output_linear.weight"])


def lora(rank: int) -> dict:
    # LoRA scaling 1: JetMoe has no QK norm, so adapters far larger than the weights (random B, scaling 8) saturate
    # the attention softmax, and fp32 rounding alone then moves transformers' own gradients by 1e-4 from fp64.
    return dict(r=rank, lora_alpha=rank, **TARGETS)


def assert_same_training_step(reference, fast, attention_mask: torch.Tensor, tolerance: float) -> None:
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = reference, fast
    # Padding tokens embed to zeros (padding_idx), so the first MoA router sees all-equal logits there and the
    # choice among tied experts is arbitrary (torch.topk's differs between devices). Those positions reach no
    # other position (keys masked, causal) nor the loss (labels -100): only their own logits may differ.
    attended = attention_mask.bool()
    assert rel_err(logits[attended], ref_logits[attended]) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys()
    # LoRA on the MoE experts and on the attention experts (MoA) both train.
    assert any(".mlp.input_linear." in name for name in grads)
    assert any(".self_attention.experts.output_linear." in name for name in grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


def reference_and_fast(checkpoint, lora_kwargs: dict, step: Callable, checkpointing: bool = False):
    """step(model) on the same LoRA model through plain transformers + peft (which cannot checkpoint JetMoe), then
    through FastModel. Patches are class-wide, so the reference runs before FastModel patches transformers."""
    fastmoe.unpatch()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = get_peft_model(reference, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(reference)
    reference_result = step(reference)
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32)
    model = FastModel.get_peft_model(model, use_gradient_checkpointing=checkpointing, **lora_kwargs)
    assert all(layer.gradient_checkpointing == checkpointing for layer in model.get_base_model().model.layers)
    randomize_lora(model)
    return reference_result, step(model)


def training_step(model, batch: dict, **forward_kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, **forward_kwargs)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("rank", [4, 1])
def test_logits_loss_and_every_lora_gradient_match_transformers(tiny_checkpoint, rank):
    checkpoint = tiny_checkpoint("jetmoe")
    reference, fast = compare_with_transformers(checkpoint, lora(rank), seed=0)
    batch_size, seq_len, vocab_size = reference[0].shape
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), batch_size, seq_len)
    assert_same_training_step(reference, fast, batch_with_padding(vocab_size, seed=0)["attention_mask"], tolerance)


def test_the_attention_heads_projections_never_run_through_peft_wrappers(tiny_checkpoint, monkeypatch):
    """expert_map and expert_reduce read the attention heads' LoRA themselves, forward and backward (the MoE block's
    fused experts op is checked for every family in test_fast_ops.py)."""
    from fastmoe.models import jetmoe

    monkeypatch.setattr(jetmoe, "_wrapped_pairs_linear", None)
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("jetmoe")), dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    model(**batch_with_padding(model.config.vocab_size, seq=6)).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters()
               if p.requires_grad and ".self_attention.experts." in name)


def test_default_targets_cover_both_mixtures(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("jetmoe")), dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for part in ("kv_proj", "mlp.input_linear", "mlp.output_linear", "experts.input_linear", "experts.output_linear"):
        assert any(part in name for name in trainable), part
    assert not any("router" in name for name in trainable)


def test_router_logits_and_aux_loss_match_transformers(tiny_checkpoint):
    checkpoint = tiny_checkpoint("jetmoe")
    config = AutoConfig.from_pretrained(checkpoint)
    batch = batch_with_padding(config.vocab_size, seed=3, seq=8)
    (ref_out, ref_grads), (out, grads) = reference_and_fast(
        checkpoint, lora(4), lambda model: training_step(model, batch, output_router_logits=True))

    # Per layer: the MoA router (recorded by the router module and again by the attention), then the MoE router.
    assert len(out.router_logits) == len(ref_out.router_logits) == 3 * config.num_hidden_layers
    # Rows of padding tokens may differ (see assert_same_training_step); the aux loss leaves them out too.
    attended = batch["attention_mask"].reshape(-1).bool()
    for logits, ref_logits in zip(out.router_logits, ref_out.router_logits):
        assert rel_err(logits[attended], ref_logits[attended]) < 1e-5
    assert ref_out.aux_loss > 0
    assert rel_err(out.aux_loss, ref_out.aux_loss) < 1e-5
    # Both losses include aux_loss_coef * aux_loss; the fast one adds it to its fused cross-entropy.
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_checkpointed_layers_train_as_transformers_without_checkpointing(tiny_checkpoint):
    """transformers refuses to checkpoint JetMoe; fastmoe's swapped layers checkpoint (its default) with the same
    loss and gradients, the aux loss included."""
    checkpoint = tiny_checkpoint("jetmoe")
    batch = batch_with_padding(AutoConfig.from_pretrained(checkpoint).vocab_size, seed=3, seq=8)
    (ref_out, ref_grads), (out, grads) = reference_and_fast(
        checkpoint, lora(4), lambda model: training_step(model, batch, output_router_logits=True), checkpointing=True)
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_experts_without_tokens(tiny_checkpoint):
    """Three tokens, two experts each, five experts: every router leaves some expert without tokens."""
    input_ids = torch.tensor([[7, 42, 99]])
    batch = {"input_ids": input_ids, "labels": input_ids}
    (ref_out, ref_grads), (out, grads) = reference_and_fast(
        tiny_checkpoint("jetmoe"), lora(4), lambda model: training_step(model, batch, output_router_logits=True))
    for logits in ref_out.router_logits:
        assert logits.topk(2).indices.unique().numel() < logits.shape[-1]
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_other_activation_and_several_active_adapters(tmp_path, tiny_tokenizer):
    """The paths beside the fused SwiGLU kernel: a non-SiLU activation (expert_map, activation, expert_reduce), then
    two adapters active at once (peft applies those itself, so the experts run through its wrapper)."""
    checkpoint = build_tiny_checkpoint("jetmoe", tmp_path, seed=5, tokenizer=tiny_tokenizer,
                                       activation_function="gelu")
    batch = batch_with_padding(len(tiny_tokenizer), seed=4, seq=6)

    def both_adapter_settings(model):
        steps = [training_step(model, batch)]
        model.add_adapter("second", LoraConfig(task_type="CAUSAL_LM", **lora(2)))
        randomize_lora(model, seed=2)
        model.base_model.set_adapter(["default", "second"])
        return steps + [training_step(model, batch)]

    reference_steps, fast_steps = reference_and_fast(checkpoint, lora(2), both_adapter_settings)
    for adapters, (ref_out, ref_grads), (out, grads) in zip((["default"], ["default", "second"]),
                                                            reference_steps, fast_steps):
        assert rel_err(out.loss, ref_out.loss) < 1e-5
        assert grads.keys() == ref_grads.keys()
        assert all(any(f".{name}." in grad for grad in grads) for name in adapters)
        for name in ref_grads:
            assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_unpatch_restores_transformers(tiny_checkpoint):
    originals = {(p.owner, p.attribute): p.owner.__dict__[p.attribute] for p in FastJetMoeModel.patches()}
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("jetmoe"), dtype=torch.float32).eval()
    batch = batch_with_padding(model.config.vocab_size, seq=6)
    del batch["labels"]
    attended = batch["attention_mask"].bool()  # padding rows may differ, see assert_same_training_step
    with torch.no_grad():
        plain = model(**batch).logits

        FastJetMoeModel.pre_patch()
        FastJetMoeModel.pre_patch()  # idempotent
        assert all(p.owner.__dict__[p.attribute] is p.replacement for p in FastJetMoeModel.patches())
        assert rel_err(model(**batch).logits[attended], plain[attended]) < 1e-5

        fastmoe.unpatch()
        for (owner, attribute), original in originals.items():
            assert owner.__dict__[attribute] is original, f"{owner.__name__}.{attribute}"
        assert torch.equal(model(**batch).logits, plain)
