"""The forward's host reads of a batch from the host copies the Trainer's loader keeps (fastmoe/host_copies.py).

On the CPU the batch's "device" tensors are meta tensors: they have shapes and no values, so a read of one on the
host raises, and a result computed from their host copies is the one computed from the values themselves. The GPU
test runs SFTTrainer steps with CUDA's sync check raising."""

import math

import pytest
import torch
from testing_utils import randomize_lora

import fastmoe
from fastmoe import FastModel, host_copies
from fastmoe import padding_free
from fastmoe import sliding_window_attention as swa
from fastmoe.kernels.linear_cross_entropy import shift_labels
from fastmoe.trainer_step import remembering_host_copies
from fastmoe.trl_fused_head import scored_positions

META = torch.device("meta")


def on_meta(tensor: torch.Tensor) -> torch.Tensor:
    """tensor as the loader would hand it over: a copy on the device, the host tensor remembered."""
    moved = tensor.to(META)
    host_copies.remember(moved, tensor)
    return moved


def padded_batch() -> dict:
    """Three right-padded rows of 7 (7, 4 and 1 tokens), their first token out of the labels."""
    lengths, seq = (7, 4, 1), 7
    input_ids = torch.randint(3, 100, (len(lengths), seq), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    return dict(input_ids=input_ids.masked_fill(attention_mask == 0, 0), attention_mask=attention_mask, labels=labels)


def test_a_remembered_copy_is_read_until_either_tensor_changes():
    host = torch.arange(6)
    device = on_meta(host)
    assert host_copies.on_host(device) is host and host_copies.host_copy(device) is host
    assert host_copies.on_host(host) is host  # a host tensor is its own
    with pytest.raises(NotImplementedError):  # nothing remembered: read from the device (meta has no values)
        host_copies.on_host(torch.arange(6, device=META))
    shifted = host_copies.with_host_copy(shift_labels, device)
    assert torch.equal(host_copies.on_host(shifted), shift_labels(host))
    assert torch.equal(host_copies.on_host(host_copies.to_device(host * 2, META)), host * 2)

    device.add_(1)  # changed after its copy: the copy no longer holds its values
    assert host_copies.host_copy(device) is None
    other = on_meta(torch.arange(3))
    host_copies.host_copy(other).add_(1)
    assert host_copies.host_copy(other) is None


@pytest.mark.parametrize("batch_type", ["dict", "BatchEncoding"])
def test_the_loaders_copies_remember_their_host_tensors(batch_type):
    from accelerate.utils import send_to_device
    from transformers import BatchEncoding

    batch = padded_batch()
    host = dict(batch)
    moved = remembering_host_copies(send_to_device)(BatchEncoding(batch) if batch_type == "BatchEncoding" else batch,
                                                     META, non_blocking=True)
    for key, tensor in host.items():
        assert moved[key].device == META and host_copies.on_host(moved[key]) is tensor
    # Tensors left where they were (on the host already) are their own.
    same = remembering_host_copies(send_to_device)(dict(host), "cpu")
    assert all(same[key] is tensor for key, tensor in host.items())


def test_scored_positions_from_host_copies_are_those_of_the_values():
    batch = padded_batch()
    expected = scored_positions(batch["labels"], None, shift_labels(batch["labels"]), None, torch.device("cpu"))
    labels = on_meta(batch["labels"])
    found = scored_positions(labels, None, host_copies.with_host_copy(shift_labels, labels), None, META)
    for got, want in zip(found, expected):
        assert got.device == META and torch.equal(host_copies.on_host(got), want)
    with pytest.raises(NotImplementedError):  # without host copies the same call reads the device
        meta_labels = batch["labels"].to(META)
        scored_positions(meta_labels, None, shift_labels(meta_labels), None, META)


def test_packed_rows_and_their_layouts_from_host_copies(tiny_checkpoint, monkeypatch):
    """A padded batch packed into one row (fastmoe.padding_free) and the row's document offsets (the layouts of
    fastmoe.sliding_window_attention) from the batch's host copies: the same row as from the values, and no read of
    the device."""
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora(model)
    backbone = model.get_base_model()
    monkeypatch.setattr(swa, "flash_supports", lambda config, device, dtype: True)
    batch = padded_batch()
    targets = shift_labels(batch["labels"])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    expected = padding_free.pack_padded_rows(backbone, inputs, targets)
    assert expected is not None and not padding_free.scores_padding(batch["attention_mask"], targets)

    meta = {key: on_meta(value) for key, value in batch.items()}
    meta_targets = host_copies.with_host_copy(shift_labels, meta["labels"])
    meta_inputs = dict(input_ids=meta["input_ids"], attention_mask=meta["attention_mask"], use_cache=False)
    packed = padding_free.pack_padded_rows(backbone, meta_inputs, meta_targets)
    assert not padding_free.scores_padding(meta["attention_mask"], meta_targets)
    assert torch.equal(host_copies.on_host(packed.kept), expected.kept)
    assert torch.equal(host_copies.on_host(packed.inputs["position_ids"]), expected.inputs["position_ids"])
    assert torch.equal(host_copies.on_host(host_copies.with_host_copy(packed.take, meta_targets)),
                       expected.take(targets))
    assert packed.inputs["input_ids"].shape == expected.inputs["input_ids"].shape
    with pytest.raises(NotImplementedError):  # without host copies the same call reads the device
        unremembered = {key: value.to(META) for key, value in batch.items()}
        padding_free.pack_padded_rows(backbone, dict(meta_inputs, attention_mask=unremembered["attention_mask"]),
                                      meta_targets)

    embeds = torch.zeros(1, expected.kept.numel(), backbone.config.hidden_size)
    layouts = swa.flash_causal_layout(backbone.config, embeds, None, expected.inputs["position_ids"], None, True)
    meta_layouts = swa.flash_causal_layout(backbone.config, embeds.to(META), None, packed.inputs["position_ids"], None,
                                           True)
    for got, want in zip(meta_layouts, layouts):
        assert torch.equal(host_copies.on_host(got.document_offsets), want.document_offsets)
        assert got.longest_document == want.longest_document and got.window == want.window
    # the padded batch's own layouts: its attention mask read from its host copy
    assert swa.flash_causal_layout(backbone.config, torch.zeros(3, 7, 8, device=META), meta["attention_mask"], None,
                                   None, True) is not None
    fastmoe.unpatch()


def uneven_records(repeats: int = 10) -> list[dict]:
    """Four rows of uneven lengths, padded into one batch of four (and packed by fastmoe), the same at every step."""
    from fastmoe.builtin import builtin_records

    return [{"text": f"{r['instruction']} {r['response']}"[:length]}
            for r, length in zip(builtin_records()[:4], (200, 120, 60, 30))] * repeats


def train_under_sync_check(trainer, train) -> list[int]:
    """train() with the batches in order (the same four rows at every step, so that the layer graphs, captured at the
    second step, replay from the third) and CUDA's sync check set to raise from the third step's start to each step's
    end (its optimizer included). Returns the steps checked."""
    import transformers

    checked = []

    class SyncCheck(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                torch.cuda.set_sync_debug_mode("error")
                checked.append(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.set_sync_debug_mode("default")

    trainer.add_callback(SyncCheck())
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
    try:
        train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        fastmoe.unpatch()
    return checked


def tiny_flash_checkpoint(tiny_tokenizer, folder):
    from fastmoe.builtin import build_tiny_checkpoint

    # head_dim 16: flash's layouts replace transformers' masks, whose construction reads the attention mask on the
    # host (the tiny config's 12 keeps the masks)
    return build_tiny_checkpoint("afmoe", folder, seed=3, tokenizer=tiny_tokenizer, head_dim=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_steps_never_wait_for_the_gpu(tiny_tokenizer, tmp_path):
    """SFTTrainer at trl's defaults (fused head with its metrics, checkpointing, fused AdamW, clipping) on a fastmoe
    model, logging every step (each log written at the next step's log call: fastmoe/deferred_log.py), batches of
    uneven rows: from the third step on every step runs under CUDA's sync check set to raise, and every step's log is
    written with finite values."""
    import datasets
    import trl

    checkpoint = tiny_flash_checkpoint(tiny_tokenizer, tmp_path / "checkpoint")
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, max_seq_length=64, device_map="cuda")
    assert swa.flash_supports(model.config, torch.device("cuda"), torch.bfloat16)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                           logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(uneven_records()),
                             processing_class=tiny_tokenizer)
    assert train_under_sync_check(trainer, trainer.train) == [2, 3, 4, 5]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logged)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fastmoe_train_steps_never_wait_for_the_gpu(tiny_tokenizer, tmp_path):
    """README's main job, `fastmoe train` (its trainer as fastmoe.training.sft builds it: logging every step, its
    progress bar, trl's token count for the summary), under the same check."""
    import json

    from fastmoe.training import sft
    from fastmoe.training.options import TrainOptions

    checkpoint = tiny_flash_checkpoint(tiny_tokenizer, tmp_path / "checkpoint")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in uneven_records()))
    options = TrainOptions(output_dir=str(tmp_path / "run"), model=str(checkpoint), dataset=str(data), max_steps=6,
                           batch_size=4, max_seq_length=64)
    trainer, model, _ = sft.prepare(options)
    assert next(model.parameters()).is_cuda
    summaries = []
    assert train_under_sync_check(trainer, lambda: summaries.append(sft.run(options, trainer))) == [2, 3, 4, 5]
    assert summaries[0].steps == 6 and summaries[0].tokens > 0 and math.isfinite(summaries[0].final_loss)
