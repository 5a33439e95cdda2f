"""trl's rollouts on fastmoe's decode path (fastmoe/trl_generation.py): GRPO without vLLM generates its completions
through the decode path, which then steps aside (the trainer's fused head back in front), keeps its buffers for the
next rollout, and gives the tokens transformers' decoding gives the same model with the same sampling seed."""

import datasets
import torch
import trl
from testing_utils import randomize_lora

import fastmoe
from fastmoe import FastModel, generation, models, trl_generation
from fastmoe.builtin import builtin_records
from fastmoe.kernels import reference_only


def grpo_completions(model, tokenizer, tmp_path, steps: int = 2) -> list:
    """The completion ids of `steps` GRPO steps with sampling (seeded), recorded from trl's own generate call."""
    config = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2,
                            num_generations=2, max_completion_length=4, max_steps=steps, report_to="none",
                            gradient_checkpointing=False, logging_steps=1, seed=0, learning_rate=1e-2)
    prompts = datasets.Dataset.from_list([{"prompt": r["instruction"]} for r in builtin_records()[:4]])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=config, train_dataset=prompts, processing_class=tokenizer)
    completions = []
    generate = trainer._generate_single_turn

    def recorded(*args, **kwargs):
        out = generate(*args, **kwargs)
        completions.append(out[0])
        return out

    trainer._generate_single_turn = recorded
    trainer.train()
    return completions


def fast_lora_model(checkpoint, **fast_ops: bool):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=128, fast_ops=fast_ops)
    family = models.family(model.config.model_type)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                     target_modules=list(family.lora_target_modules),
                                     target_parameters=list(family.lora_target_parameters) or None)
    randomize_lora(model)
    return model


def test_grpo_rollouts_take_the_decode_path_with_transformers_tokens(tiny_checkpoint, tiny_tokenizer, tmp_path):
    checkpoint = tiny_checkpoint("afmoe")
    with reference_only():  # the ops' PyTorch references: the subject is where the rollouts run
        model = fast_lora_model(checkpoint)
        assert trl.trainer.grpo_trainer.unwrap_model_for_generation is trl_generation.unwrap_model_for_generation
        got = grpo_completions(model, tiny_tokenizer, tmp_path / "fast")
        base = model.get_base_model()
        decode = base.__dict__.get(generation._KEPT)
        assert isinstance(decode, generation.DecodeForward)  # kept for the next rollout, out of the way
        assert not isinstance(base.__dict__.get("forward"), generation.DecodeForward)  # the fused head in front
        assert decode.decode_steps == 2 * 3  # two rollouts (steps) of 4 tokens: 3 decode steps each
        assert len(decode.buffers) == 1  # the second rollout reused the first one's buffers

        # The same run with the op off (trl's own unwrap_model_for_generation): transformers' decoding.
        fastmoe.unpatch()
        model = fast_lora_model(checkpoint, trl_generation=False)
        assert trl.trainer.grpo_trainer.unwrap_model_for_generation is trl_generation._trl()[1]
        expected = grpo_completions(model, tiny_tokenizer, tmp_path / "plain")
        assert generation._KEPT not in model.get_base_model().__dict__
    assert got == expected and len(got) == 2


def test_unpatch_restores_trls_function(tiny_checkpoint):
    original = trl_generation._trl()[1]
    FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    assert trl.trainer.grpo_trainer.unwrap_model_for_generation is not original
    fastmoe.unpatch()
    for module in trl_generation._trl()[0]:
        assert module.unwrap_model_for_generation is original
