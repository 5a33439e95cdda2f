"""`fastmoe train`: the default run end to end (in a subprocess, like a user), the data formats it accepts, and
one-line errors for bad arguments."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fastmoe
from fastmoe import cli
from fastmoe.training import sft
from fastmoe.training.data import load_records, to_sft_dataset
from fastmoe.training.options import TrainOptions
from fastmoe.builtin import build_tokenizer


@pytest.fixture(scope="module")
def fastmoe_cache(tmp_path_factory):
    """One built-in model for the whole module, outside the user's ~/.cache."""
    return tmp_path_factory.mktemp("fastmoe-cache")


@pytest.fixture(autouse=True)
def _use_cache(monkeypatch, fastmoe_cache):
    monkeypatch.setenv("FASTMOE_CACHE", str(fastmoe_cache))


def run_cli(args, cache, timeout=240):
    """Run the installed console script (or `python -m fastmoe` where the script is not on PATH)."""
    command = [shutil.which("fastmoe")] if shutil.which("fastmoe") else [sys.executable, "-m", "fastmoe"]
    # TRITON_INTERPRET=0: on the CPU, every op takes its PyTorch reference, which is what a CPU user runs.
    env = dict(os.environ, TRITON_INTERPRET="0", HF_HUB_OFFLINE="1", FASTMOE_CACHE=str(cache),
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run(command + args, check=False, capture_output=True, text=True, env=env, timeout=timeout)


def logged_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_default_run_learns_and_saves_an_adapter_plain_peft_loads(tmp_path, fastmoe_cache):
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "out"
    result = run_cli(["train", "--max-steps", "25", "--output-dir", str(output_dir)], fastmoe_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "25 steps" in result.stdout and "tokens/s" in result.stdout and "peak memory" in result.stdout

    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json"):
        assert (output_dir / name).is_file(), name
    config = LoraConfig.from_pretrained(output_dir)
    assert config.peft_type == "LORA" and config.r == 16
    assert any(name.startswith("experts.") for name in config.target_parameters)

    losses = logged_losses(output_dir)
    assert len(losses) == 25  # one per step
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, output_dir)
    saved = load_file(output_dir / "adapter_model.safetensors")
    loaded = {name.replace(".default.", "."): p for name, p in model.named_parameters() if "lora_" in name}
    assert saved.keys() == loaded.keys()
    assert any(".experts." in name for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.slow
def test_messages_dataset_trains(tmp_path, fastmoe_cache):
    data = tmp_path / "chat.jsonl"
    with data.open("w") as handle:
        for a, b in [(2, 3), (4, 5), (6, 7), (8, 9)]:
            messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    output_dir = tmp_path / "out"
    # On the CPU checkpointing is off unless asked for; this run asks for fastmoe's offloading mode through trl's
    # trainer.
    result = run_cli(["train", "--dataset", str(data), "--max-steps", "3", "--batch-size", "2",
                      "--gradient-checkpointing", "fastmoe", "--output-dir", str(output_dir)], fastmoe_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(logged_losses(output_dir)) == 3
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_instruction_records_train_on_the_response_only(tmp_path):
    trainer, _, tokenizer = sft.prepare(TrainOptions(output_dir=str(tmp_path), max_steps=1))
    example = trainer.train_dataset[0]
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    first = load_records(None)[0]
    assert example["labels"][0] == -100
    # The built-in chat template closes the assistant turn with "<|eos|>\n"; both belong to the completion.
    assert tokenizer.decode(trained).rstrip("\n") == first["response"] + tokenizer.eos_token


def test_data_formats(tiny_tokenizer):
    from datasets import Dataset

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    dataset, assistant_only = to_sft_dataset(Dataset.from_list([{"messages": chat, "id": 1}]), tiny_tokenizer)
    assert dataset.column_names == ["messages"] and assistant_only
    dataset, _ = to_sft_dataset(Dataset.from_list([{"prompt": "a", "completion": "b"}]), tiny_tokenizer)
    assert dataset.column_names == ["prompt", "completion"]
    dataset, _ = to_sft_dataset(Dataset.from_list([{"text": "abc"}]), tiny_tokenizer)
    assert dataset[0] == {"text": "abc"}
    alpaca = Dataset.from_list([{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    dataset, _ = to_sft_dataset(alpaca, tiny_tokenizer)
    assert dataset[0]["prompt"] == [{"role": "user", "content": "Add\n\n2 and 3"}]
    assert dataset[0]["completion"] == [{"role": "assistant", "content": "5"}]
    plain = build_tokenizer()
    plain.chat_template = None
    dataset, _ = to_sft_dataset(Dataset.from_list([{"instruction": "Q", "response": "A"}]), plain)
    assert dataset[0] == {"prompt": "Q\n", "completion": "A"}


def _bad_dataset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "no usable field"}\n')
    return str(path)


def one_error_line(args, tmp_path, capsys) -> str:
    """Run `fastmoe train` in this process; it must exit with status 2 and one error line, writing nothing."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastmoe: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--model", "/does/not/exist"], "does not exist"),
    (["--dataset", "/does/not/exist.jsonl"], "does not exist"),
    (["--dataset", "BAD"], "no field to train on"),
    (["--max-steps", "-3"], "--max-steps must be a positive integer"),
    (["--max-steps", "many"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--load-in-4bit", "--load-in-8bit"], "exclusive"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1)"),
    (["--save-steps", "-1"], "--save-steps must be 0"),
    (["--resume-from-checkpoint", "/does/not/exist"], "to resume from does not exist"),
    (["--resume-from-checkpoint", "latest"], "no checkpoint-* folder"),
    (["--report-to", "wandb"], "invalid choice"),
    (["--gradient-checkpointing", "sometimes"], "invalid choice"),
    (["--fsdp", "--load-in-4bit"], "cannot be combined with FSDP"),
    (["--fsdp"], "launch with torchrun --nproc-per-node N"),
    (["--optim", "sgd_with_vibes"], "is not an optimizer transformers knows"),
    (["--lora-r", "0"], "--lora-r must be a positive integer, got 0"),
    # The same rule as FastModel.get_peft_model's (tests/test_api.py), in the flag's name.
    (["--lora-alpha", "0"], "--lora-alpha must be a positive number (LoRA scales its update by alpha / rank), got 0"),
    (["--target-modules", " , "], "--target-modules ' , ' names no module"),
    (["--target-modules", "q_proj,qkv_proj"], "target module 'qkv_proj' matches no module"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [_bad_dataset(tmp_path) if a == "BAD" else a for a in args]
    assert message in one_error_line(args, tmp_path, capsys)


def test_broken_jsonl_line_is_named_by_its_line_in_the_file(tmp_path, capsys):
    good = json.dumps({"instruction": "Add 2 and 3", "response": "5"})
    path = tmp_path / "data.jsonl"
    # A blank line counts too, as in an editor; the line separator U+2028 inside a string is not a line break.
    path.write_text(f"{good}\n\n" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n"
                    + '{"instruction": "Add 1 and 1", "response": 2,}\n' + f"{good}\n")
    line = one_error_line(["--dataset", str(path)], tmp_path, capsys)
    assert f"{str(path)!r}, line 4: not valid JSON" in line, line
    assert "line 1" not in line


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n[1, 2]\n")
    assert "line 2: a JSON list, where each line must be one JSON object" in one_error_line(
        ["--dataset", str(path)], tmp_path, capsys)


def test_truncation_that_leaves_no_example_says_so_before_training(tmp_path, capsys):
    # The built-in data trains on the responses only; 8 tokens hold no more than each prompt.
    line = one_error_line(["--max-seq-length", "8"], tmp_path, capsys)
    assert "no training example is left: truncated to --max-seq-length 8 tokens" in line, line
    assert "raise --max-seq-length" in line


def test_model_folder_without_config_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_error_line(["--model", str(tmp_path / "empty")], tmp_path, capsys)
    assert "has no config.json" in line and "model_type" not in line, line


def test_model_folder_without_tokenizer_files_says_so(tmp_path, capsys, tiny_checkpoint):
    model = shutil.copytree(tiny_checkpoint("afmoe"), tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    line = one_error_line(["--model", str(model)], tmp_path, capsys)
    assert "has no tokenizer files" in line and "sentencepiece" not in line, line


def test_8bit_refusal_speaks_in_flags(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = one_error_line(["--load-in-8bit"], tmp_path, capsys)
    assert "--load-in-8bit quantizes Linear layers only" in line and "--load-in-4bit" in line, line
    assert "load_in_" not in line and "quantization_config" not in line
    # Refused before any warning about how slowly it would have run.
    assert not [w for w in caught if "slow CPU backend" in str(w.message)]


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default:[^)]*\) \(default:", text), text
    assert "(default: the built-in tiny AFMoE model)" in text and "(default: 60)" in text
    assert "standard (the flag alone)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert re.match(rf"fastmoe {re.escape(fastmoe.__version__)} \(torch \S+, transformers \S+, peft \S+, trl \S+\)$",
                    capsys.readouterr().out.strip())


@pytest.mark.parametrize("flags, mode", [
    ([], None),
    # The flag alone asks for transformers' standard checkpointing; fastmoe's host-offloading mode is asked by name.
    (["--gradient-checkpointing"], "standard"),
    (["--gradient-checkpointing", "fastmoe"], "fastmoe"),
    (["--gradient-checkpointing", "standard"], "standard"),
    (["--gradient-checkpointing", "off"], "off"),
    (["--no-gradient-checkpointing"], "off"),
])
def test_gradient_checkpointing_flags_name_a_mode(flags, mode):
    assert cli.build_parser().parse_args(["train", *flags]).gradient_checkpointing == mode


def test_missing_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("fastmoe: error:")


@pytest.mark.slow
def test_console_script_error_is_one_line_without_traceback(tmp_path, fastmoe_cache):
    result = run_cli(["train", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")],
                     fastmoe_cache, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fastmoe: error: model path {str(tmp_path / 'missing')!r} does not exist (or is not a folder)"]


@pytest.mark.slow
def test_eval_split_packing_checkpoints_and_resume(tmp_path, fastmoe_cache):
    output_dir = tmp_path / "run"
    common = ["train", "--output-dir", str(output_dir), "--eval-fraction", "0.1", "--save-steps", "4", "--packing",
              "--batch-size", "4", "--max-seq-length", "256"]
    first = run_cli([*common, "--max-steps", "4"], fastmoe_cache)
    assert first.returncode == 0, first.stderr
    assert (output_dir / "checkpoint-4").is_dir()
    resumed = run_cli([*common, "--max-steps", "6", "--resume-from-checkpoint", "latest"], fastmoe_cache)
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["step"] == 6
    assert any("eval_loss" in entry for entry in history)
    # The resumed run trained steps 5 and 6 only; steps 1-4 come from the checkpoint's state.
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert list(losses) == [1, 2, 3, 4, 5, 6]
    # Its summary speaks of those two steps: their losses, and their tokens (trl's count restarts with the run).
    assert "fastmoe train: 4 steps in" in first.stdout
    summary = re.search(r"fastmoe train: (\d+) steps in ([\d.]+)s, ([\d,]+) tokens/s.* loss ([\d.]+) -> ([\d.]+);",
                        resumed.stdout)
    assert summary is not None, resumed.stdout
    steps, seconds, rate, first_loss, final_loss = summary.groups()
    assert steps == "2" and (first_loss, final_loss) == (f"{losses[5]:.4f}", f"{losses[6]:.4f}")
    tokens = [e["num_tokens"] for e in history if "num_tokens" in e and "loss" in e]
    assert tokens[4] < tokens[3]  # counted afresh from step 5
    # tokens/s over this run's tokens, within the printed seconds' rounding
    rate, seconds = int(rate.replace(",", "")), float(seconds)
    assert tokens[5] / (seconds + 0.05) * 0.99 <= rate <= tokens[5] / max(seconds - 0.05, 1e-9) * 1.01 + 1


def test_logs_are_written_a_step_later_so_steps_never_drain_the_gpu(tmp_path):
    """`fastmoe train` logs every step: its trainer must meet fastmoe.deferred_log's conditions (no input-token
    counting, whose per-step count reads the mask on the device; callbacks that only record logs), or every step
    would wait for the GPU at its log."""
    from fastmoe import deferred_log

    trainer, _, _ = sft.prepare(TrainOptions(output_dir=str(tmp_path / "out"), max_steps=2))
    trainer.control.should_log, trainer.state.global_step, trainer._globalstep_last_logged = True, 1, 0
    assert deferred_log.defers(trainer, torch.tensor(0.0))


def test_optim_reaches_the_trainer(tmp_path):
    options = TrainOptions(output_dir=str(tmp_path / "out"), max_steps=1, optim="adamw_8bit")
    trainer, _, _ = sft.prepare(options)
    assert trainer.args.optim == "adamw_8bit"
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.args.optim_bits == 8
    default, _, _ = sft.prepare(TrainOptions(output_dir=str(tmp_path / "default"), max_steps=1))
    from transformers import TrainingArguments

    assert default.args.optim == TrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True).optim


def test_target_modules_reach_get_peft_model(tmp_path):
    options = TrainOptions(output_dir=str(tmp_path / "out"), max_steps=1, target_modules="q_proj, v_proj")
    _, model, _ = sft.prepare(options)
    config = model.peft_config["default"]
    assert config.target_modules == {"q_proj", "v_proj"} and not config.target_parameters
    options = TrainOptions(output_dir=str(tmp_path / "out"), max_steps=1, target_modules="all-linear")
    _, model, _ = sft.prepare(options)
    assert any(name.endswith("experts.gate_up_proj") for name in model.peft_config["default"].target_parameters)
    assert cli.build_parser().parse_args(["train", "--target-modules", "q_proj,v_proj"]).target_modules == \
        "q_proj,v_proj"


@pytest.mark.slow
def test_a_model_type_without_a_fast_path_trains_with_lora_on_its_linear_layers(tmp_path, fastmoe_cache):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = build_tokenizer()
    model_dir = tmp_path / "gpt2"
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    output_dir = tmp_path / "out"
    result = run_cli(["train", "--model", str(model_dir), "--max-steps", "2", "--max-seq-length", "64",
                      "--batch-size", "2", "--output-dir", str(output_dir)], fastmoe_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 steps" in result.stdout
    assert (output_dir / "adapter_model.safetensors").is_file()
    # GPT-2's attention and MLP projections are Conv1D layers, which peft's all-linear takes too.
    targets = set(LoraConfig.from_pretrained(output_dir).target_modules)
    assert {name.split(".")[-1] for name in targets} == {"c_attn", "c_proj", "c_fc"}
    assert len(logged_losses(output_dir)) == 2
