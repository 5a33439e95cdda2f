"""trl's SFTTrainer metrics kept on the device between logging steps (fastmoe/trl_sft_metrics.py): the same logged
history as trl's own compute_loss, with no host read of a tensor inside compute_loss."""

import pytest
import torch
import trl

import datasets
import fastmoe
from fastmoe import FastModel, trl_sft_metrics
from fastmoe.builtin import builtin_records
from testing_utils import randomize_lora

pytestmark = pytest.mark.usefixtures("kernel_references")


def lora_model(checkpoint, metrics_op: bool, device: str = "cpu"):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64, device_map=device,
                                         fast_ops={"trl_sft_metrics": metrics_op})
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model


class HostReads:
    """Counts .item(), .tolist() and bool() of tensors inside SFTTrainer.compute_loss."""

    def __init__(self, monkeypatch):
        self.inside, self.count = False, 0
        for name in ("item", "tolist", "__bool__"):
            method = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(method))
        compute_loss = trl.SFTTrainer.compute_loss
        reads = self

        def watched(self, *args, **kwargs):
            reads.inside = True
            try:
                return compute_loss(self, *args, **kwargs)
            finally:
                reads.inside = False
        monkeypatch.setattr(trl.SFTTrainer, "compute_loss", watched)

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.count += self.inside
            return method(tensor, *args, **kwargs)
        return counted


def train(model, tokenizer, output_dir, monkeypatch, loss_type="nll", device="cpu"):
    records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:10]]
    config = trl.SFTConfig(
        output_dir=str(output_dir), use_cpu=device == "cpu", bf16=False, max_steps=4, per_device_train_batch_size=2,
        optim="sgd", learning_rate=0.1, logging_steps=2, report_to="none", save_strategy="no",
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2, gradient_checkpointing=False, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0, loss_type=loss_type)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records[:8]),
                             eval_dataset=datasets.Dataset.from_list(records[8:]), processing_class=tokenizer)
    reads = HostReads(monkeypatch)
    trainer.train()
    history = [{key: value for key, value in entry.items() if key not in ("train_runtime", "train_samples_per_second",
                                                                          "train_steps_per_second", "eval_runtime",
                                                                          "eval_samples_per_second",
                                                                          "eval_steps_per_second")}
               for entry in trainer.state.log_history]
    return history, reads.count, trainer


# AFMoE without an aux loss; Qwen3-MoE with one (trl turns it on where the config has a coefficient).
@pytest.mark.parametrize("model_type, loss_type", [("afmoe", "nll"), ("qwen3_moe", "nll"), ("afmoe", "dft")])
def test_logged_history_is_trls_without_host_reads_in_compute_loss(tiny_checkpoint, tiny_tokenizer, tmp_path,
                                                                   monkeypatch, model_type, loss_type):
    checkpoint = tiny_checkpoint(model_type)
    with monkeypatch.context() as patches:
        expected, expected_reads, _ = train(lora_model(checkpoint, metrics_op=False), tiny_tokenizer,
                                            tmp_path / "trl", patches, loss_type)
    fastmoe.unpatch()
    with monkeypatch.context() as patches:
        history, reads, trainer = train(lora_model(checkpoint, metrics_op=True), tiny_tokenizer,
                                        tmp_path / "fast", patches, loss_type)
    train_logs = [entry for entry in history if "entropy" in entry and "eval_loss" not in entry]
    assert len(train_logs) == 2 and all(key in train_logs[0] for key in ("mean_token_accuracy", "num_tokens"))
    if model_type == "qwen3_moe":
        assert trainer.aux_loss_enabled and "aux_loss" in train_logs[0]
    assert [list(entry) for entry in history] == [list(entry) for entry in expected]  # trl's key order too
    assert history == expected
    # trl reads five values per training step (num_valid > 0 twice, two .item(), the token count), six with the aux
    # loss; fastmoe's compute_loss none of them (the model's forward and evaluation read the same as with trl's).
    assert reads == expected_reads - 4 * (5 + trainer.aux_loss_enabled)
    assert trl_sft_metrics._PENDING_TOKENS not in trainer.__dict__
    fastmoe.unpatch()
    assert trl.SFTTrainer.compute_loss.__module__ == "trl.trainer.sft_trainer"


def training_afmoe(tiny_checkpoint, tiny_tokenizer, output_dir):
    """(model, SFTTrainer) of a tiny AFMoE with the op on, the model in training mode."""
    model = lora_model(tiny_checkpoint("afmoe"), metrics_op=True)
    records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:2]]
    config = trl.SFTConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none",
                           gradient_checkpointing=False, per_device_train_batch_size=2)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tiny_tokenizer)
    model.train()
    return model, trainer


def test_other_models_and_calls_run_trls_compute_loss(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """A model of no patched family, evaluation and return_outputs take trl's own method."""
    model, trainer = training_afmoe(tiny_checkpoint, tiny_tokenizer, tmp_path)
    assert trl_sft_metrics._keeps_metrics_on_device(trainer, return_outputs=False)
    assert not trl_sft_metrics._keeps_metrics_on_device(trainer, return_outputs=True)
    model.eval()
    assert not trl_sft_metrics._keeps_metrics_on_device(trainer, return_outputs=False)
    model.train()
    trainer.model = torch.nn.Linear(2, 2)
    assert not trl_sft_metrics._keeps_metrics_on_device(trainer, return_outputs=False)
    fastmoe.unpatch()


@pytest.mark.parametrize("case", ["some valid", "none valid", "items given", "position ids"])
def test_metrics_of_given_outputs_are_trls(tiny_checkpoint, tiny_tokenizer, tmp_path, case):
    """compute_loss on a stand-in forward's outputs (a token accuracy that is not zero, a batch without scored
    positions, num_items_in_batch given, a padding-free batch's position ids without a mask): the loss, and after the
    read the metrics and tokens seen, are trl's."""
    from trl.trainer.utils import FusedCausalLMOutput

    model, trainer = training_afmoe(tiny_checkpoint, tiny_tokenizer, tmp_path)
    generator = torch.Generator().manual_seed(3)
    label_mask = torch.rand(2, 7, generator=generator) > (1.0 if case == "none valid" else 0.3)
    log_probs = -torch.rand(2, 7, generator=generator, requires_grad=True)
    entropy = torch.rand(2, 7, generator=generator) * label_mask
    outputs = FusedCausalLMOutput(log_probs=log_probs * label_mask, entropy=entropy, label_mask=label_mask,
                                  is_top1=(torch.rand(2, 7, generator=generator) > 0.5) & label_mask)
    inputs = {"input_ids": torch.zeros(2, 7, dtype=torch.long), "attention_mask": (torch.arange(7) < 6).repeat(2, 1)}
    if case == "position ids":
        inputs = {"input_ids": torch.zeros(1, 14, dtype=torch.long), "position_ids": torch.arange(7).repeat(1, 2)}
    items = torch.tensor(9) if case == "items given" else None

    def results(method):
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 5
        loss = method(trainer, lambda **kwargs: outputs, dict(inputs), num_items_in_batch=items)
        trl_sft_metrics.read_device_metrics(trainer)
        return loss, dict(trainer._metrics["train"]), trainer._total_train_tokens

    from fastmoe.patching import original
    expected = results(original(trl.SFTTrainer, "compute_loss"))
    got = results(trl_sft_metrics.compute_loss)
    assert torch.equal(got[0], expected[0])
    assert got[1:] == expected[1:] and list(got[1]) == list(expected[1])
    assert case == "none valid" or 0 < expected[1]["mean_token_accuracy"][0] < 1
    fastmoe.unpatch()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_logged_history_is_trls(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    """On the GPU (fp32, graphed layers off: checkpointing off), the op's logged history against trl's own, to
    fp32 tolerance (the grouped GEMMs' sums may run in another order between two runs)."""
    checkpoint = tiny_checkpoint("qwen3_moe")
    with monkeypatch.context() as patches:
        expected, expected_reads, _ = train(lora_model(checkpoint, False, "cuda"), tiny_tokenizer, tmp_path / "trl",
                                            patches, device="cuda")
    fastmoe.unpatch()
    with monkeypatch.context() as patches:
        history, reads, trainer = train(lora_model(checkpoint, True, "cuda"), tiny_tokenizer, tmp_path / "fast",
                                        patches, device="cuda")
    assert [list(entry) for entry in history] == [list(entry) for entry in expected]
    for got, want in zip(history, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert reads == expected_reads - 4 * (5 + trainer.aux_loss_enabled)
    fastmoe.unpatch()
