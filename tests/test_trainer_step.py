"""The Trainer's per-step parameter count and gradient clipping for fastmoe models (fastmoe/trainer_step.py): the same
gradient norm, clipping and total_flos as transformers' own methods, without walking the model after the first
step."""

import pytest
import torch
import trl

import fastmoe
from fastmoe import FastModel, trainer_step
from fastmoe.builtin import builtin_records
from testing_utils import randomize_lora

import datasets

# What these tests check is the Trainer's own per-step work (parameter counts, clipping, zero_grad), not the kernels.
pytestmark = pytest.mark.usefixtures("kernel_references")


def sft_trainer(model, tokenizer, output_dir, max_grad_norm=0.1):
    # A clipping threshold below the gradient norm, so that clipping changes the step.
    config = trl.SFTConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=2,
        optim="sgd", learning_rate=0.1, max_grad_norm=max_grad_norm, logging_steps=1, report_to="none",
        save_strategy="no", gradient_checkpointing=False, seed=0, data_seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:6]]
    return trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                          processing_class=tokenizer)


def lora_model(checkpoint, trainer_step_op=True):
    model, _ = FastModel.from_pretrained(str(checkpoint), dtype=torch.float32, max_seq_length=64,
                                         fast_ops={"trainer_step": trainer_step_op})
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return model


def train_and_watch(model, tokenizer, output_dir, monkeypatch, **trainer_kwargs):
    """Train; return (logged steps, total_flos, the parameters handed to the clipping per step, the number of
    num_parameters calls, the trainer, the clipping function of each step)."""
    trainer = sft_trainer(model, tokenizer, output_dir, **trainer_kwargs)
    clipped, clippers, counted = [], [], []

    def recording(clip):
        def recording_clip(parameters, *args, **kwargs):
            parameters = list(parameters)
            clipped.append(parameters)
            clippers.append(clip.__name__)
            return clip(parameters, *args, **kwargs)
        return recording_clip

    # accelerate's clipping (transformers' method, and fastmoe's for gradients of several dtypes) or fastmoe's
    # one-group clipping
    base = model.get_base_model()
    num_parameters = base.num_parameters
    with monkeypatch.context() as patches:
        patches.setattr(trainer.accelerator, "clip_grad_norm_", recording(trainer.accelerator.clip_grad_norm_))
        patches.setattr(trainer_step, "clip_one_group", recording(trainer_step.clip_one_group))
        patches.setattr(base, "num_parameters", lambda *a, **k: counted.append(1) or num_parameters(*a, **k))
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logged, trainer.state.total_flos, clipped, len(counted), trainer, clippers


@pytest.mark.parametrize("model_type", ["afmoe", "jetmoe"])
def test_same_steps_as_transformers_methods_with_one_walk(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch,
                                                          model_type):
    checkpoint = tiny_checkpoint(model_type)
    expected, expected_flos, expected_clipped, _, _, expected_clippers = train_and_watch(
        lora_model(checkpoint, trainer_step_op=False), tiny_tokenizer, tmp_path / "reference", monkeypatch)
    fastmoe.unpatch()
    model = lora_model(checkpoint)
    logged, flos, clipped, counted, trainer, clippers = train_and_watch(model, tiny_tokenizer, tmp_path / "fast",
                                                                        monkeypatch)
    assert expected_clippers == ["clip_grad_norm_"] * 2 and clippers == ["clip_one_group"] * 2

    assert len(logged) == len(expected) == 2
    for entry, ref in zip(logged, expected):
        assert entry["grad_norm"] > 0.1  # clipping acted
        # the one-group clipping computes accelerate's operations on the same values: the same norm, bit for bit
        assert entry["grad_norm"] == ref["grad_norm"]
        assert entry["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert flos == expected_flos > 0
    assert counted == 1  # the parameter count was taken on the first step only
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimizer_params} == {id(p) for p in trainable}
    # transformers' method hands over every parameter, fastmoe's the optimizer's (the ones with gradients).
    assert [len(step) for step in expected_clipped] == [len(list(model.parameters()))] * 2
    assert len(clipped) == 2 and all([id(p) for p in step] == [id(p) for p in optimizer_params] for step in clipped)


def test_a_gradient_outside_the_optimizer_keeps_transformers_clipping(tiny_checkpoint, tiny_tokenizer, tmp_path,
                                                                      monkeypatch):
    model = lora_model(tiny_checkpoint("afmoe"))
    trainer = sft_trainer(model, tiny_tokenizer, tmp_path)
    trainer.create_optimizer()
    outside = next(p for p in model.parameters() if not p.requires_grad)
    outside.grad = torch.ones_like(outside)
    assert trainer_step._optimizer_parameters(trainer, model) is None
    outside.grad = None


def test_other_models_run_transformers_methods(tmp_path, tiny_tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    fastmoe.patch("afmoe")  # the op is on, for a model of another family
    config = LlamaConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=64)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    _, flos, clipped, counted, _, clippers = train_and_watch(model, tiny_tokenizer, tmp_path, monkeypatch)
    assert clippers == ["clip_grad_norm_"] * 2
    assert counted == 2 and flos > 0
    assert all(len(step) == len(list(model.parameters())) for step in clipped)


def test_zero_grad_follows_new_modules_and_unpatches(tiny_checkpoint):
    from peft import LoraConfig, PeftModel

    model = lora_model(tiny_checkpoint("afmoe"))
    assert "zero_grad" in PeftModel.__dict__

    def give_grads():
        for p in model.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        return [p for p in model.parameters() if p.grad is not None]

    with_grads = give_grads()
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in with_grads)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # A second adapter registers new modules after the module list was cached: their gradients are cleared too.
    model.add_adapter("second", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    assert any("second" in name for name, p in model.named_parameters() if p.requires_grad)
    give_grads()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    fastmoe.unpatch()
    assert "zero_grad" not in PeftModel.__dict__ and model.zero_grad.__func__ is torch.nn.Module.zero_grad


def test_accelerates_lomo_check_searches_the_path_once_and_unpatches(monkeypatch):
    """accelerate's optimizer wrapper asks whether lomo_optim is installed twice per step, each time a search of
    sys.path; with the op on, the first answer serves every later call, the same answer; unpatched, accelerate's own
    function is back."""
    import importlib.util

    import accelerate.optimizer

    own = accelerate.optimizer.is_lomo_available
    expected = own()
    searches = []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: searches.append(name) or find_spec(name, *args))
    trainer_step.is_lomo_available.cache_clear()
    fastmoe.patch("afmoe")
    assert [accelerate.optimizer.is_lomo_available() for _ in range(4)] == [expected] * 4
    assert searches.count("lomo_optim") == 1
    fastmoe.unpatch()
    assert accelerate.optimizer.is_lomo_available is own


class NanAtSecondStep(trl.SFTTrainer):
    """The second training step's loss is nan, its gradients those of the plain loss."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.model.training and self.state.global_step == 1:
            loss = loss + float("nan")
        return loss


class FilterSettingSeen(__import__("transformers").TrainerCallback):
    """args.logging_nan_inf_filter as each callback event sees it."""

    def __init__(self):
        self.seen = {}

    def record(self, event, args):
        self.seen.setdefault(event, set()).add(args.logging_nan_inf_filter)

    def on_step_end(self, args, state, control, **kwargs):
        self.record("step_end", args)

    def on_evaluate(self, args, state, control, **kwargs):
        self.record("evaluate", args)

    def on_save(self, args, state, control, **kwargs):
        self.record("save", args)


def train_with_a_nan_step(model, tokenizer, output_dir):
    records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:8]]
    config = trl.SFTConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, max_steps=4, per_device_train_batch_size=2,
        optim="sgd", learning_rate=0.1, logging_steps=2, report_to="none", save_strategy="steps", save_steps=2,
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2, gradient_checkpointing=False, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    seen = FilterSettingSeen()
    trainer = NanAtSecondStep(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                              eval_dataset=datasets.Dataset.from_list(records[:2]), processing_class=tokenizer,
                              callbacks=[seen])
    trainer.train()
    saved = torch.load(output_dir / "checkpoint-2" / "training_args.bin", weights_only=False)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, seen.seen, trainer, saved


def test_nan_inf_filter_on_the_device_adds_what_the_loop_would(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """The loop's nan/inf check, a sync per step, is off inside the epoch for a fastmoe model; the filtered loss
    reaches it instead: the same logged losses as transformers' own filter, bit for bit, with a nan step among them.
    Evaluation, checkpoints and the arguments after training keep the user's setting."""
    checkpoint = tiny_checkpoint("afmoe")
    expected, expected_seen, _, _ = train_with_a_nan_step(lora_model(checkpoint, trainer_step_op=False),
                                                          tiny_tokenizer, tmp_path / "reference")
    fastmoe.unpatch()
    losses, seen, trainer, saved = train_with_a_nan_step(lora_model(checkpoint), tiny_tokenizer, tmp_path / "fast")
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # the nan step was filtered, not logged
    assert losses == expected
    assert expected_seen == {"step_end": {True}, "evaluate": {True}, "save": {True}}
    assert seen == {"step_end": {False}, "evaluate": {True}, "save": {True}}
    assert saved.logging_nan_inf_filter and trainer.args.logging_nan_inf_filter
    assert "training_step" not in trainer.__dict__ and trainer_step._FILTERING not in trainer.__dict__
    fastmoe.unpatch()
    from transformers import Trainer
    assert Trainer._run_epoch.__module__ == Trainer._maybe_log_save_evaluate.__module__ == "transformers.trainer"


def test_batches_copied_without_waiting_for_the_gpu_while_the_epoch_runs(tiny_checkpoint, tiny_tokenizer, tmp_path,
                                                                         monkeypatch):
    """For a fastmoe model on a GPU accelerate's loader copies each batch with non_blocking=True while the epoch
    runs (pinned memory); its own setting is back afterwards. On the CPU machine the device check is stood in for:
    what is checked is that every batch the loop gets went through a non-blocking copy."""
    import accelerate.data_loader

    model = lora_model(tiny_checkpoint("afmoe"))
    trainer = sft_trainer(model, tiny_tokenizer, tmp_path)
    copies = []
    send = accelerate.data_loader.send_to_device
    monkeypatch.setattr(accelerate.data_loader, "send_to_device",
                        lambda batch, device, non_blocking=False, **kw: copies.append(non_blocking)
                        or send(batch, device, non_blocking=non_blocking, **kw))
    loaders = []
    monkeypatch.setattr(trainer_step, "_copies_batches_asynchronously",
                        lambda trainer, dataloader: loaders.append(dataloader) or True)
    trainer.train()
    assert len(copies) >= 2 and all(copies)
    assert loaders and not any(loader._non_blocking for loader in loaders)


def test_which_loaders_copy_asynchronously(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """accelerate's loader of pinned memory to a CUDA device, for a fastmoe model only; a loader already
    non-blocking, of pageable memory, to the CPU, or for another model keeps its setting."""
    from types import SimpleNamespace

    model = lora_model(tiny_checkpoint("afmoe"))
    trainer = SimpleNamespace(model=model)

    def loader(**changes):
        fields = dict(_non_blocking=False, pin_memory=True, device=torch.device("cuda", 0))
        return SimpleNamespace(**{**fields, **changes})

    assert trainer_step._copies_batches_asynchronously(trainer, loader())
    assert not trainer_step._copies_batches_asynchronously(trainer, loader(pin_memory=False))
    assert not trainer_step._copies_batches_asynchronously(trainer, loader(device=torch.device("cpu")))
    assert not trainer_step._copies_batches_asynchronously(trainer, loader(_non_blocking=True))
    assert not trainer_step._copies_batches_asynchronously(trainer, SimpleNamespace(pin_memory=True))
    assert not trainer_step._copies_batches_asynchronously(SimpleNamespace(model=torch.nn.Linear(2, 2)), loader())
    fastmoe.unpatch()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batches_copied_asynchronously_train_as_before(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    """On the GPU the loader's own check lets a fastmoe model's batches go non-blocking (pinned memory, the Trainer's
    default), and the logged losses are those of blocking copies."""
    import accelerate.data_loader
    import trl

    def run(op_on: bool, output_dir):
        model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64,
                                             device_map="cuda", fast_ops={"trainer_step": op_on})
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        randomize_lora(model)
        records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:6]]
        config = trl.SFTConfig(output_dir=str(output_dir), bf16=False, max_steps=3, per_device_train_batch_size=2,
                               optim="sgd", learning_rate=0.1, logging_steps=1, report_to="none", save_strategy="no",
                               gradient_checkpointing=False, seed=0, data_seed=0, disable_tqdm=True)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                                 processing_class=tiny_tokenizer)
        copies = []
        send = accelerate.data_loader.send_to_device
        with monkeypatch.context() as patches:
            patches.setattr(accelerate.data_loader, "send_to_device",
                            lambda batch, device, non_blocking=False, **kw: copies.append(non_blocking)
                            or send(batch, device, non_blocking=non_blocking, **kw))
            trainer.train()
        fastmoe.unpatch()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], copies

    expected, blocking = run(False, tmp_path / "blocking")
    losses, copies = run(True, tmp_path / "fast")
    assert blocking and not any(blocking) and copies and all(copies)
    assert losses == pytest.approx(expected, rel=1e-5)


def train_logging_every_step(model, tokenizer, output_dir, callbacks=()):
    """Five steps of SFTTrainer logging every step, with clipping, trl's metrics and an evaluation at step 3; returns
    (the log history, the number of log entries at each step's start, the trainer)."""
    config = trl.SFTConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, max_steps=5, per_device_train_batch_size=2,
        optim="sgd", learning_rate=0.1, max_grad_norm=0.1, logging_steps=1, eval_strategy="steps", eval_steps=3,
        per_device_eval_batch_size=2, report_to="none", save_strategy="no", gradient_checkpointing=False, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    records = [{"text": f"{r['instruction']} {r['response']}"} for r in builtin_records()[:14]]
    entries_at_start = []
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            entries_at_start.append(len(state.log_history))

    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records[:10]),
                             eval_dataset=datasets.Dataset.from_list(records[10:]), processing_class=tokenizer,
                             callbacks=[Watch(), *callbacks])
    trainer.train()
    return trainer.state.log_history, entries_at_start, trainer


def comparable(history: list[dict]) -> list[dict]:
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
              "eval_samples_per_second", "eval_steps_per_second")
    return [{key: value for key, value in entry.items() if key not in timing} for entry in history]


def test_logs_written_a_step_later_are_transformers_logs(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    """Each logging step's log is written at the next step's log call (fastmoe/deferred_log.py), so the step's values
    are read once the next step's work is queued: the same log history as transformers' own logging, entry for
    entry (values, key order, steps, the evaluation between them, the final training metrics), each entry one step
    later. A callback of the user's with on_log, which could act on a log, keeps transformers' timing."""
    from transformers import TrainerCallback

    from fastmoe import deferred_log

    checkpoint = tiny_checkpoint("afmoe")
    with monkeypatch.context() as patches:
        patches.setattr(deferred_log, "defers", lambda trainer, tr_loss: False)
        expected, expected_entries, _ = train_logging_every_step(lora_model(checkpoint), tiny_tokenizer,
                                                                 tmp_path / "reference")
    fastmoe.unpatch()
    from fastmoe.training.progress import LossProgressBar

    # fastmoe train's progress bar only shows the logs: the logs are still written a step later with it
    history, entries, trainer = train_logging_every_step(lora_model(checkpoint), tiny_tokenizer, tmp_path / "fast",
                                                         callbacks=[LossProgressBar()])
    fastmoe.unpatch()
    assert comparable(history) == comparable(expected)
    assert [list(entry) for entry in history] == [list(entry) for entry in expected]  # key order too
    assert sum("loss" in entry for entry in history) == 5 and any("eval_loss" in entry for entry in history)
    # transformers' logs are in the history at the next step's start; the deferred ones one step later (the
    # evaluation at step 3 writes step 3's log first, so step 4 starts with it)
    assert expected_entries == [0, 1, 2, 4, 5]
    assert entries == [0, 0, 1, 4, 4]
    assert deferred_log._PENDING not in trainer.__dict__ and trainer_step._DEFERRING not in trainer.__dict__

    class ActsOnLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    history, entries, _ = train_logging_every_step(lora_model(checkpoint), tiny_tokenizer, tmp_path / "user",
                                                   callbacks=[ActsOnLogs()])
    fastmoe.unpatch()
    assert comparable(history) == comparable(expected) and entries == expected_entries
