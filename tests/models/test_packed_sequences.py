"""Packed rows (padding-free training): documents one after another in one row, position_ids restarting at each, no
attention mask, labels -100 at each document's first token (what transformers' DataCollatorWithFlattening and trl's
padding_free collator give). Every family's patched model gives each document the logits, and the loss and LoRA
gradients, that it gets alone: attention stays within the document (masks built from position_ids; AFMoE's model
forward hands them over), LFM2's short convolution restarts at each document. fp32 on the CPU."""

import pytest
import torch
from transformers import AutoConfig

from fastmoe import FastModel
from testing_utils import assert_packed_documents_train_as_if_alone, randomize_lora

# What these tests check is where documents start and end (the masks or layouts from position_ids, LFM2's convolution
# restarting); the kernels, packed documents included (tests/kernels/test_short_conv.py), are checked elsewhere.
pytestmark = pytest.mark.usefixtures("kernel_references")

# gpt-oss's packed rows are checked in tests/models/test_gpt_oss.py.
FAMILIES = ["afmoe", "lfm2_moe", "jetmoe", "cohere", "qwen3_moe", "mixtral", "qwen2_moe"]
LENGTHS = [5, 1, 7, 3]  # a one-token document has no target of its own


def lora_model(checkpoint):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora(model)
    return FastModel.for_training(model)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_documents_train_as_if_alone(tiny_checkpoint, model_type):
    checkpoint = tiny_checkpoint(model_type)
    assert_packed_documents_train_as_if_alone(lora_model(checkpoint), AutoConfig.from_pretrained(checkpoint), LENGTHS)


# Qwen2-MoE's attention is Mixtral's with biased projections: its packed rows are checked above; its trainer run is
# left out to keep the suite within CI's time.
@pytest.mark.parametrize("model_type", [family for family in FAMILIES if family != "qwen2_moe"])
def test_sft_trainer_padding_free_logs_as_padded_batches(tiny_checkpoint, tiny_tokenizer, tmp_path, model_type):
    """trl's padding_free=True flattens each batch into one row (position_ids restarting, labels -100 at each start,
    plus cu_seq_lens and seq_idx for flash-attention kernels); with sdpa attention the patched model must train
    exactly as on the padded batch: the same targets, so the same loss, gradient norm, entropy and accuracy."""
    import datasets
    import trl

    from fastmoe.builtin import builtin_records

    records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:3]]

    def history(padding_free: bool) -> list[dict]:
        model = lora_model(tiny_checkpoint(model_type))
        config = trl.SFTConfig(
            output_dir=str(tmp_path / str(padding_free)), use_cpu=True, bf16=False, max_steps=1,
            per_device_train_batch_size=3, optim="sgd", learning_rate=0.1, logging_steps=1, report_to="none",
            save_strategy="no", gradient_checkpointing=False, seed=0, data_seed=0, disable_tqdm=True,
            dataloader_num_workers=0, padding_free=padding_free, max_length=None)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                                 processing_class=tiny_tokenizer)
        trainer.train()
        return [entry for entry in trainer.state.log_history if "loss" in entry]

    padded, flattened = history(False), history(True)
    assert len(padded) == len(flattened) == 1
    for entry, ref in zip(flattened, padded):
        for key in ("loss", "grad_norm", "entropy"):
            assert entry[key] == pytest.approx(ref[key], rel=1e-5), key
        assert entry["mean_token_accuracy"] == pytest.approx(ref["mean_token_accuracy"], abs=1e-6)
