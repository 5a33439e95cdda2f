"""Switching fastmoe's ops off one at a time (`fastmoe.patch(model_type, op=False)`, `from_pretrained(...,
fast_ops={op: False})`), and the ops every family shares.

With an op off, its attributes are transformers' (peft's, trl's) own objects again and the model still matches
transformers + peft: the forwards of every op work beside transformers' own forwards of the others. The ops run their
PyTorch references here (`reference_only`): what is checked is which forwards run together, and the Triton kernels
are compared against transformers with every op on in tests/models/test_<family>.py.
"""

import pytest
import torch
import trl
from transformers import AutoConfig, AutoModelForCausalLM

import fastmoe
from fastmoe import FastModel, linear_lora, models, patching, trl_fused_head
from fastmoe.kernels.dispatch import reference_only
from testing_utils import batch_with_padding, compare_with_transformers, fp32_model_tolerance, rel_err

# LoRA scaling 1 for JetMoe, as in its own test: without QK norm, larger random adapters saturate its attention.
LORA_ALPHA = {"afmoe": 8, "lfm2_moe": 8, "jetmoe": 4, "cohere": 8, "qwen3_moe": 8, "mixtral": 8,
              "qwen2_moe": 8, "gpt_oss": 8}
FAMILY_OPS = [(model_type, op) for model_type in models.FAMILIES for op in models.family(model_type).ops]


def lora(model_type: str) -> dict:
    family = models.family(model_type)
    return dict(r=4, lora_alpha=LORA_ALPHA[model_type], target_modules=list(family.lora_target_modules),
                target_parameters=list(family.lora_target_parameters) or None)


ABSENT = object()  # an attribute the owner class inherits (peft's PeftModel.zero_grad): the patch adds its own


def originals(patches: list[patching.ForwardPatch]) -> dict:
    return {(p.owner, p.attribute): p.owner.__dict__.get(p.attribute, ABSENT) for p in patches}


def assert_matches_transformers(checkpoint, model_type: str, fast_ops: dict) -> None:
    with reference_only():
        (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
            checkpoint, lora(model_type), fast_ops=fast_ops)
    tolerance = fp32_model_tolerance(AutoConfig.from_pretrained(checkpoint), *ref_logits.shape[:2])
    # JetMoe's padding positions route among tied experts (see test_jetmoe.py): compare the attended ones.
    attended = batch_with_padding(ref_logits.shape[-1])["attention_mask"].bool()
    assert rel_err(logits[attended], ref_logits[attended]) < tolerance
    assert rel_err(loss, ref_loss) < tolerance
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tolerance, name


@pytest.mark.parametrize("model_type, op", FAMILY_OPS, ids=[f"{m}-{op}" for m, op in FAMILY_OPS])
def test_an_op_switched_off_is_transformers_own_and_the_model_still_matches(tiny_checkpoint, model_type, op):
    family = models.family(model_type)
    switched_off = originals(list(family.ops[op]))
    assert_matches_transformers(tiny_checkpoint(model_type), model_type, {op: False})
    for (owner, attribute), original in switched_off.items():
        assert owner.__dict__[attribute] is original, f"{owner.__name__}.{attribute}"
    assert patching.is_patched(family.patches({op: False}))  # every other op is fastmoe's


@pytest.mark.parametrize("op", list(models.SHARED_OPS))
def test_a_shared_op_switched_off_is_the_libraries_own_and_the_model_still_matches(tiny_checkpoint, op):
    switched_off = originals(models.shared_patches(op))
    assert switched_off
    assert_matches_transformers(tiny_checkpoint("afmoe"), "afmoe", {op: False})
    for (owner, attribute), original in switched_off.items():
        assert owner.__dict__.get(attribute, ABSENT) is original, f"{owner}.{attribute}"
    assert patching.is_patched(models.family("afmoe").patches())


def test_patch_sets_each_op_on_or_off_and_unpatch_restores_all():
    family = models.family("afmoe")
    before = originals(family.patches())
    fastmoe.patch("afmoe", rms_norm=False, router=False)
    assert patching.is_patched(family.patches({"rms_norm": False, "router": False}))
    assert all(owner.__dict__[attribute] is before[owner, attribute]
               for owner, attribute in originals([*family.ops["rms_norm"], *family.ops["router"]]))
    fastmoe.patch("afmoe")  # every op on again: those switched off are patched
    assert patching.is_patched(family.patches())
    fastmoe.patch("afmoe", moe=False)  # an op switched off after it was patched goes back
    assert all(owner.__dict__[attribute] is before[owner, attribute] for owner, attribute in originals(
        list(family.ops["moe"])))
    fastmoe.unpatch("afmoe")
    assert all(owner.__dict__[attribute] is original for (owner, attribute), original in before.items())
    assert not patching._originals  # the shared ops went with the last patched family


@pytest.mark.parametrize("ops, message", [
    ({"nope": False}, "afmoe has no op 'nope' to switch; its ops are rms_norm, router, moe, mlp, attention, decoder_layer, model, loss"),
    ({"short_conv": False}, "afmoe has no op 'short_conv'"),
    ({"rms_norm": 0}, r"op rms_norm=0: switch an op with True or False"),
])
def test_unknown_ops_and_non_boolean_flags_are_refused(tiny_checkpoint, ops, message):
    with pytest.raises(ValueError, match=message):
        fastmoe.patch("afmoe", **ops)
    with pytest.raises(ValueError, match=message):
        FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), fast_ops=ops)
    assert not patching._originals


def test_fast_ops_must_be_a_dict(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"fast_ops must be a dict of op name -> True/False"):
        FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), fast_ops=["rms_norm"])


def test_patching_an_unknown_model_type_names_the_known_ones():
    with pytest.raises(ValueError, match="no fast path for model type 'llama'; it patches afmoe, lfm2_moe"):
        fastmoe.patch("llama")


def test_unpatching_one_family_keeps_the_shared_ops_another_uses(tiny_checkpoint, monkeypatch):
    """peft's LoRA Linear forwards and trl's fused head serve every patched family: unpatching AFMoE leaves LFM2-MoE's
    model on fastmoe's fused LoRA linear and fused head."""
    afmoe = models.family("afmoe")
    afmoe_originals = originals(afmoe.patches())
    fastmoe.patch("afmoe")
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("lfm2_moe")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    fastmoe.unpatch("afmoe")
    assert all(owner.__dict__[attribute] is original for (owner, attribute), original in afmoe_originals.items())
    assert patching.is_patched(models.family("lfm2_moe").patches())
    for op in models.SHARED_OPS:
        assert patching.is_patched(models.shared_patches(op)), op

    fused_linear, fused_head = [], []
    lora_linear, linear_log_probs = linear_lora.lora_linear, trl_fused_head.linear_log_probs
    monkeypatch.setattr(linear_lora, "lora_linear", lambda *args: fused_linear.append(1) or lora_linear(*args))
    monkeypatch.setattr(trl_fused_head, "linear_log_probs",
                        lambda *args, **kwargs: fused_head.append(1) or linear_log_probs(*args, **kwargs))
    # The head's op is taken (its PyTorch reference runs, as every op here).
    monkeypatch.setattr(trl_fused_head, "use_triton", lambda *tensors: True)
    batch = batch_with_padding(model.config.vocab_size, seq=6)
    with reference_only():
        model.train()(**batch).loss.backward()
        assert fused_linear  # the attention and dense-MLP adapters ran fastmoe's LoRA linear
        trl.trainer.sft_trainer.add_fused_lm_head(model.get_base_model())
        out = model(**batch, fused_lm_head=True)
    assert fused_head and out.log_probs is not None

    fastmoe.unpatch("lfm2_moe")
    assert not patching._originals  # the last patched family took the shared ops with it


def test_switching_a_shared_op_off_while_another_family_uses_it_is_said():
    fastmoe.patch("lfm2_moe")
    with pytest.warns(UserWarning, match="lora_linear=False does not take effect: .* stays patched for lfm2_moe"):
        fastmoe.patch("afmoe", lora_linear=False)
    assert patching.is_patched(models.shared_patches("lora_linear"))
    fastmoe.unpatch("lfm2_moe")  # afmoe asked for it off: now nothing keeps it
    assert not any(patching.is_patched([p]) for p in models.shared_patches("lora_linear"))
    assert patching.is_patched(models.shared_patches("trl_fused_head"))


def test_an_unsupported_family_takes_no_fast_ops(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fast_ops: fastmoe has no fast path for model_type 'llama'"):
        FastModel.from_pretrained(str(tmp_path), fast_ops={"rms_norm": False})


# The module that runs one fused experts op per MoE block, where it is not transformers' "...Experts" module.
EXPERT_BLOCKS = {"jetmoe": "JetMoeMoE"}


@pytest.mark.parametrize("model_type", [t for t in models.FAMILIES if models.family(t).routed_experts is not None])
def test_every_moe_block_runs_the_fused_experts_op_with_its_lora(tiny_checkpoint, monkeypatch, model_type):
    """With the default LoRA targets each MoE block's experts run one fused experts op that is handed the LoRA of both
    expert stacks: no family falls back, with its checkpoints' own settings, to a slower path that still gives the
    same numbers (JetMoe's "silu" module once sent its MoE through expert_map, activation and expert_reduce;
    transformers' experts forward under peft's wrappers takes the LoRA merged into the weights)."""
    from fastmoe.kernels.moe.experts import ExpertLora
    from fastmoe.models import gpt_oss, jetmoe, shared

    loras_per_call = []

    def recorded(op):
        def call(*args, **kwargs):
            loras_per_call.append(sum(isinstance(a, ExpertLora) for a in (*args, *kwargs.values())))
            return op(*args, **kwargs)
        return call

    for module in (shared, jetmoe, gpt_oss):
        for name in ("moe_experts", "moe_experts_clamped_swiglu"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, recorded(getattr(module, name)))
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint(model_type)), dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    names = [type(m).__name__ for m in model.get_base_model().modules()]
    blocks = (names.count(EXPERT_BLOCKS[model_type]) if model_type in EXPERT_BLOCKS
              else sum(name.endswith("Experts") for name in names))
    with torch.no_grad():
        model(**batch_with_padding(model.config.vocab_size, seq=6))
    assert blocks > 0 and loras_per_call == [2] * blocks, (blocks, loras_per_call)
