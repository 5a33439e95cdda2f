"""Training in several processes on the CPU (torchrun, gloo): `fastmoe train` under torchrun against one process with
the same global batch, fastmoe models sharded with FSDP2 the way accelerate shards them and NF4 models in DDP
(tests/distributed_worker.py), and where `from_pretrained` puts each process's weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmoe import FastModel, cli, distributed
from fastmoe.training import sft
from fastmoe.training.options import TrainOptions
from fastmoe.kernels.dispatch import reference_only
from testing_utils import rel_err

ROOT = Path(__file__).resolve().parents[1]


def child_env(cache: Path | None = None) -> dict[str, str]:
    """Children import this checkout's fastmoe (and the tests' helpers), as the tests themselves do."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    # TRITON_INTERPRET=0: on the CPU every op takes its PyTorch reference, which is what a CPU user runs; what
    # FSDP or DDP hand to the ops is the same either way.
    env = dict(os.environ, PYTHONPATH=path, TRITON_INTERPRET="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    if cache is not None:
        env["FASTMOE_CACHE"] = str(cache)
    return env


def torchrun(args: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    # --standalone: a private rendezvous on a free port, so parallel test runs cannot meet each other.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def trainer_state(output_dir: Path) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def logged_losses(output_dir: Path) -> list[float]:
    return [entry["loss"] for entry in trainer_state(output_dir)["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_torchrun_fastmoe_train_equals_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    """Two processes with batch 2 each against one with batch 4. The same examples make each global batch: accelerate's
    seedable sampler draws the same permutation (data_seed) in both runs, and hands rank r the per-device batches
    r, r + 2, ... of it, so step k trains on permutation[4k : 4k + 4] either way. The same loss: the trainer counts the
    label tokens over both processes and scales each process's loss so that DDP's gradient average is the global
    batch's gradient; the logged loss is the processes' mean. Only the order of floating-point sums differs."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTMOE_CACHE", str(cache))
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    # The one-process run in this process (with the PyTorch references, as the children run on the CPU) also builds
    # the built-in model, so the two ranks do not both build it.
    with reference_only():
        sft.train(TrainOptions(output_dir=str(single_dir), max_steps=3, batch_size=4))
    ddp = torchrun(["-m", "fastmoe", "train", "--max-steps", "3", "--batch-size", "2", "--output-dir", str(ddp_dir)],
                   child_env(cache))
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    # One summary, from the main process, which counts both processes.
    summaries = [line for line in ddp.stdout.splitlines() if line.startswith("fastmoe train:")]
    assert len(summaries) == 1 and "over 2 processes" in summaries[0], ddp.stdout
    assert trainer_state(ddp_dir)["train_batch_size"] == 2
    # trl's token count, gathered over the processes: the same examples either way
    tokens = [[entry["num_tokens"] for entry in trainer_state(folder)["log_history"] if "num_tokens" in entry]
              for folder in (ddp_dir, single_dir)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3
    single_losses, ddp_losses = logged_losses(single_dir), logged_losses(ddp_dir)
    assert len(ddp_losses) == 3 and single_losses[0] != single_losses[-1]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)

    config_base = json.loads((ddp_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config_base), ddp_dir)
    saved = load_file(ddp_dir / "adapter_model.safetensors")
    loaded = {name.replace(".default.", "."): p for name, p in model.named_parameters() if "lora_" in name}
    assert saved.keys() == loaded.keys() and any(".experts." in name for name in saved)
    expected = load_file(single_dir / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
        assert rel_err(tensor, expected[name]) < 1e-4, name


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    from fastmoe.builtin import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp("distributed")
    checkpoints = [f"{kind}={build_tiny_checkpoint(kind, folder / kind, seed=0)}" for kind in ("lfm2_moe", "afmoe")]
    out = folder / "results.json"
    result = torchrun([str(ROOT / "tests" / "distributed_worker.py"), str(out), *checkpoints], child_env())
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(out.read_text())


def assert_trains_like_one_process(case: dict) -> None:
    assert case["losses"] == pytest.approx(case["reference_losses"], rel=1e-5)
    assert case["losses"][-1] < case["losses"][0] - 0.05, case["losses"]
    assert case["grad_names"] == case["reference_grad_names"]
    assert case["max_grad_rel_err"] < 1e-5


def assert_kernels_got_whole_tensors(case: dict) -> None:
    """Between forwards the experts' weight is a DTensor shard; inside one, the op gets the whole local tensor."""
    storage = case["expert_storage"]
    assert storage["type"] == "DTensor"
    assert storage["local_shape"][0] * 2 == storage["full_shape"][0]
    assert case["expert_inputs"], "the MoE forward never reached the experts op"
    for seen in case["expert_inputs"]:
        assert seen["weight"] in ("Parameter", "Tensor") and seen["weight_shape"] == storage["full_shape"], seen
        assert seen["lora_a"] in (None, "Parameter", "Tensor"), seen


@pytest.mark.slow
def test_fsdp2_lora_with_checkpointing_trains_like_one_process_and_saves_the_same_adapter(worker_results):
    case = worker_results["fsdp2-lora"]
    assert_trains_like_one_process(case)
    assert_kernels_got_whole_tensors(case)
    assert all(seen["lora_a"] is not None for seen in case["expert_inputs"])
    assert case["saved_names"] == case["expected_saved_names"]
    assert any(".experts." in name for name in case["saved_names"])
    assert case["max_saved_rel_err"] < 1e-5


@pytest.mark.slow
def test_fsdp2_full_finetuning_with_an_untied_head_trains_like_one_process(worker_results):
    case = worker_results["fsdp2-full"]
    assert_trains_like_one_process(case)
    assert_kernels_got_whole_tensors(case)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(case["grad_names"])
    assert any(name.endswith("experts.gate_up_proj") for name in case["grad_names"])


@pytest.mark.slow
def test_ddp_wraps_nf4_experts_and_trains_like_one_process(worker_results):
    assert_trains_like_one_process(worker_results["ddp-nf4"])


def test_each_process_loads_onto_its_own_gpu_except_16bit_under_fsdp(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    # One process: the current GPU, 16-bit or quantized (host memory never holds the model).
    assert distributed.default_device_map(quantized=False) == {"": 0}
    assert distributed.default_device_map(quantized=True) == {"": 0}
    assert chosen == []

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.default_device_map(quantized=False) == {"": 3}
    assert distributed.default_device_map(quantized=True) == {"": 3}
    assert chosen == [3, 3]
    # accelerate's FSDP2 shards 16-bit weights from the CPU, on one process as on several.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.default_device_map(quantized=False) is None
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.default_device_map(quantized=False) is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert distributed.default_device_map(quantized=False) is None
    assert distributed.default_device_map(quantized=True) is None


def test_quantized_loading_under_an_accelerate_fsdp_launch_is_refused(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for bits in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(ValueError, match="cannot be combined with FSDP"):
            FastModel.from_pretrained(str(tiny_checkpoint("lfm2_moe")), **{bits: True})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fsdp_on_the_cpu_is_refused_rather_than_quietly_run_as_ddp(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--fsdp", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--fsdp needs CUDA GPUs" in capsys.readouterr().err
