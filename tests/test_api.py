"""The public API on the tiny checkpoints: loading (where the weights go, which experts implementation runs),
argument checks, unsupported families, patching and unpatching, train/inference toggles, LoRA targets
("all-linear", peft's rewrites), and adapters that move both ways between fastmoe and plain peft.

The adapter tests run the ops' PyTorch references (`reference_only`): what they check is the API's plumbing,
and the Triton kernels are compared against transformers in tests/models."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fastmoe.kernels.dispatch import reference_only
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from testing_utils import batch_with_padding, compare_with_transformers, randomize_lora, rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import fastmoe
from fastmoe import FastAfmoeModel, FastModel, models, patching


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def _eval_logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(**_inputs(batch)).logits


def _lora_config(**overrides) -> LoraConfig:
    """What FastModel.get_peft_model builds for AFMoE with r=4, lora_alpha=8 and the default targets."""
    kwargs = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "target_modules": list(FastAfmoeModel.default_target_modules),
              "target_parameters": list(FastAfmoeModel.default_target_parameters)}
    return LoraConfig(**{**kwargs, **overrides})


def test_from_pretrained_returns_frozen_fp32_model_and_tokenizer_with_pad(tiny_checkpoint):
    model, tokenizer = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256, dtype=None)
    assert model.config.model_type == "afmoe"
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.model_max_length == 256
    assert not any(p.requires_grad for p in model.parameters())
    assert patching.is_patched(FastAfmoeModel.patches())


def test_tokenizer_without_pad_token_gets_eos(tiny_checkpoint, tmp_path):
    checkpoint = shutil.copytree(tiny_checkpoint("afmoe"), tmp_path / "no_pad")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(checkpoint)
    assert AutoTokenizer.from_pretrained(checkpoint).pad_token is None
    _, tokenizer = FastModel.from_pretrained(str(checkpoint), max_seq_length=256)
    assert tokenizer.pad_token == tokenizer.eos_token is not None


@pytest.mark.parametrize("dtype", ["float64", torch.float64, torch.int8, "int8"])
def test_unsupported_dtype_is_refused(tiny_checkpoint, dtype):
    with pytest.raises(ValueError, match="dtype"):
        FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=dtype)


MISSING_GPUS = [(0, "cuda"), (0, 0), (0, {"": 0}), (0, {"": "cuda:0", "lm_head": "cpu"}), (0, torch.device("cuda")),
                (1, "cuda:1"), (1, {"": 1})]


@pytest.mark.parametrize("gpus,device_map", MISSING_GPUS)
def test_device_map_naming_a_missing_gpu_is_refused_before_loading(tiny_checkpoint, monkeypatch, gpus, device_map):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: gpus)
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match="names GPU 1, but this machine has 1" if gpus else "but no GPU|has no CUDA"):
        FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), device_map=device_map)
    assert loads == []


@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", 0, {"": 0, "lm_head": "cpu"}, "auto", "cpu", None,
                                        {"": "cpu"}])
def test_device_map_naming_gpus_the_machine_has_is_accepted(monkeypatch, device_map):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    fastmoe.api._check_device_map(device_map)


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model") as error:
        FastModel.from_pretrained(missing)
    assert missing in str(error.value)


def test_4bit_and_8bit_together_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("rank", [0, -2, 1.5])
def test_get_peft_model_refuses_a_bad_rank(tiny_checkpoint, rank):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256)
    with pytest.raises(ValueError, match="rank"):
        FastModel.get_peft_model(model, r=rank)


@pytest.mark.parametrize("alpha", [0, -4, math.nan, "16", True])
def test_get_peft_model_refuses_a_bad_lora_alpha(tiny_checkpoint, alpha):
    # alpha 0 would scale every update to zero: the adapter trains and changes nothing.
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256)
    with pytest.raises(ValueError, match=r"^lora_alpha must be a positive number \(LoRA scales its update by alpha"):
        FastModel.get_peft_model(model, r=4, lora_alpha=alpha)


@pytest.mark.parametrize("model_type, cuda_graphs, expected", [
    ("afmoe", None, "graphs"), ("cohere", None, "standard"), ("cohere", True, "graphs"), ("afmoe", False, "standard")])
def test_cuda_graphs_default_is_the_familys_choice(tiny_checkpoint, monkeypatch, model_type, cuda_graphs, expected):
    """get_peft_model(cuda_graphs=None), its default, graphs MoE families' layers and leaves dense Cohere's eager
    (Family.graphed_layers); an explicit setting wins. The mode is what a CUDA machine would install (without CUDA
    the graph modes fall back to their eager counterparts)."""
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint(model_type)), max_seq_length=256)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FastModel.get_peft_model(model, r=4, cuda_graphs=cuda_graphs)
    assert model._fastmoe_checkpointing == expected


def _checkpointing_deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]


@pytest.mark.parametrize("mode", [True, "fastmoe", False])
def test_get_peft_model_triggers_no_checkpointing_deprecation(tiny_checkpoint, mode):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode)
    assert not _checkpointing_deprecations(caught)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == bool(mode)
    if hasattr(type(model), "is_activation_checkpointing"):
        # Silenced only inside fastmoe's call into peft: the user's own use of the old name still warns.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model.get_base_model().is_gradient_checkpointing
        assert _checkpointing_deprecations(caught)


def test_8bit_refusal_comes_before_any_warning(tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"load_in_8bit quantizes Linear layers only.*load_in_4bit=True"):
            FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256, load_in_8bit=True)
    assert not [str(w.message) for w in caught if "slow CPU backend" in str(w.message)]


def test_importing_fastmoe_silences_only_the_bitsandbytes_kernels_probe(tmp_path):
    # bitsandbytes logs the probe at import on CPUs with AVX512-BF16 when Hugging Face's `kernels` package cannot
    # fetch its CPU kernel; the record is logged here by hand as well, so that the check holds on any CPU.
    pytest.importorskip("bitsandbytes")
    code = (
        "import logging, fastmoe, peft\n"
        "logger = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "logger.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
        "already `pip install kernels` and the kernels >= 0.11.1', ImportError('no kernels'))\n"
        "logger.warning('some other bitsandbytes warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr
    assert result.stderr.strip() == "some other bitsandbytes warning"


def test_readme_quick_start_runs_on_the_cpu(tiny_checkpoint, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"## Quick start\n+```python\n(.*?)```", readme, re.S).group(1)
    # Only the model and the length change: a tiny checkpoint in place of the 26B model, two steps.
    for text, replacement in [('"arcee-ai/Trinity-Mini"', repr(str(tiny_checkpoint("afmoe")))),
                              ("max_steps=100", "max_steps=2")]:
        assert text in snippet
        snippet = snippet.replace(text, replacement)
    monkeypatch.chdir(tmp_path)
    with reference_only():
        exec(compile(snippet, "README.md (quick start)", "exec"), {})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out").is_dir()


def test_target_that_matches_nothing_is_refused_by_name(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256)
    with pytest.raises(ValueError, match="'qkv_proj'"):
        FastModel.get_peft_model(model, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="'experts.gate_proj'"):
        FastModel.get_peft_model(model, target_modules=["q_proj"], target_parameters=["experts.gate_proj"])


def test_default_targets_the_model_lacks_are_skipped_not_refused(tmp_path, tiny_tokenizer):
    """Qwen3-30B-A3B has no dense MLP layers (mlp_only_layers=[]): the family's defaults name dense MLP weights for the
    Qwen3-MoE models that have them, and get_peft_model() must adapt what this one has instead of refusing it."""
    from fastmoe.builtin import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("qwen3_moe", tmp_path, tokenizer=tiny_tokenizer, mlp_only_layers=[])
    model, _ = FastModel.from_pretrained(str(checkpoint), max_seq_length=64)
    config = FastModel.get_peft_model(model, r=4, lora_alpha=8).peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert sorted(config.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    with pytest.raises(ValueError, match="'gate_proj.weight' matches no parameter"):
        FastModel.get_peft_model(FastModel.from_pretrained(str(checkpoint), max_seq_length=64)[0],
                                 target_parameters=["experts.gate_up_proj", "gate_proj.weight"])


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A family fastmoe does not patch, built like the tiny checkpoints."""
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_unsupported_family_loads_as_plain_transformers_with_a_warning(llama_checkpoint):
    with pytest.warns(UserWarning, match="llama") as record:
        model, tokenizer = FastModel.from_pretrained(str(llama_checkpoint), max_seq_length=256)
    message = " ".join(str(w.message) for w in record)
    for family in models.FAMILIES:
        assert family in message
    assert tokenizer.pad_token is not None
    batch = batch_with_padding(model.config.vocab_size)
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
    assert torch.equal(_eval_logits(model, batch), _eval_logits(reference, batch))


def test_unpatch_restores_every_original_and_patching_twice_is_once():
    families = [fastmoe.api.family_model(model_type) for model_type in models.FAMILIES]
    assert len(families) == 8
    shared = [p for op in models.SHARED_OPS for p in models.shared_patches(op)]
    # An attribute the owner inherits (peft's PeftModel.zero_grad) is recorded as patching._INHERITED: undoing the
    # patch deletes the owner's own, and the inherited one shows again.
    originals = {(p.owner, p.attribute): p.owner.__dict__.get(p.attribute, patching._INHERITED)
                 for p in [*(p for f in families for p in f.patches()), *shared]}
    assert patching._INHERITED in originals.values()

    for family in families:
        family.pre_patch()
        family.pre_patch()
    for family in families:
        assert patching.is_patched(family.patches()), family.__name__
    assert patching.is_patched(shared)
    for (owner, attribute), original in originals.items():
        # A second pre_patch must not record the first one's replacement as the "original".
        assert patching._originals[(owner, attribute)] is original, f"{owner.__name__}.{attribute}"

    fastmoe.unpatch()
    for (owner, attribute), original in originals.items():
        assert owner.__dict__.get(attribute, patching._INHERITED) is original, f"{owner.__name__}.{attribute}"
    assert not patching._originals
    fastmoe.unpatch()  # unpatching an unpatched transformers is a no-op
    for (owner, attribute), original in originals.items():
        assert owner.__dict__.get(attribute, patching._INHERITED) is original


def test_for_inference_and_for_training_toggle_mode_and_cache(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), max_seq_length=256)
    assert model.config.use_cache
    adapted = FastModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    assert not adapted.config.use_cache  # made for training: no cache in its forwards, checkpointing or not
    for wrapped in (model, adapted):
        assert FastModel.for_training(wrapped) is wrapped
        assert wrapped.training and not wrapped.config.use_cache
        assert all(m.training for m in wrapped.modules())
        assert FastModel.for_inference(wrapped) is wrapped
        assert not wrapped.training and wrapped.config.use_cache
        assert not any(m.training for m in wrapped.modules())


def _adapter_files(folder) -> tuple[dict, dict]:
    config = json.loads((folder / "adapter_config.json").read_text())
    for key in ("target_modules", "target_parameters"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])  # saved from a set: the order is arbitrary
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        names = handle.keys()
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in names}
    return config, shapes


def test_fastmoe_adapter_loads_in_plain_peft_and_matches_plain_peft_files(tiny_checkpoint, tmp_path):
    checkpoint = str(tiny_checkpoint("afmoe"))
    batch = batch_with_padding(512, seed=2)
    model, _ = FastModel.from_pretrained(checkpoint, max_seq_length=256, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    assert any("experts" in name for name, p in model.named_parameters() if p.requires_grad)
    randomize_lora(model)
    with reference_only():
        fast_logits = _eval_logits(model, batch)
    model.save_pretrained(tmp_path / "fast")

    fastmoe.unpatch()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                                      tmp_path / "fast")
    assert rel_err(fast_logits, _eval_logits(plain, batch)) < 1e-5

    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), _lora_config())
    reference.save_pretrained(tmp_path / "plain")
    assert _adapter_files(tmp_path / "fast") == _adapter_files(tmp_path / "plain")


def test_plain_peft_adapter_loads_into_fastmoe_and_trains(tiny_checkpoint, tmp_path):
    checkpoint = str(tiny_checkpoint("afmoe"))
    batch = batch_with_padding(512, seed=4)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), _lora_config())
    randomize_lora(plain)
    plain_logits = _eval_logits(plain, batch)
    plain.save_pretrained(tmp_path / "plain")

    model, _ = FastModel.from_pretrained(checkpoint, max_seq_length=256, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, tmp_path / "plain", is_trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("experts" in name for name in trainable)
    with reference_only():
        assert rel_err(_eval_logits(model, batch), plain_logits) < 1e-5

        FastModel.for_training(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        losses = []
        for _ in range(4):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_16bit_loading_goes_onto_the_current_gpu_when_there_is_one(tiny_checkpoint, monkeypatch):
    """transformers streams each tensor onto the device_map's device; without one it builds the model in host memory
    (which cannot hold a 17 GB model on a 12 GB Colab runtime). The GPU is simulated here: the device_map transformers
    is handed is recorded, then the load proceeds on the CPU."""
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def record_device_map(cls, *args, device_map=None, **kwargs):
        seen.append(device_map)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(record_device_map))
    checkpoint = str(tiny_checkpoint("afmoe"))
    FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64)
    assert seen == [None]  # no GPU: the CPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64)
    assert seen == [None, {"": 1}]
    assert model.config.model_type == "afmoe"
    FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64, device_map="cpu")
    assert seen[-1] == "cpu"  # the caller's choice stands


_HOST_MEMORY_WHILE_LOADING = """
import json, sys, threading, time
import torch
from fastmoe import FastModel

def anonymous_bytes():  # resident host memory that is not a mapped file: the page cache of the mmap is not counted
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

# The CUDA context and the modules a first load imports take host memory of their own, not the model's.
torch.empty(1, device="cuda")
FastModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16, max_seq_length=64, device_map="meta")
baseline = anonymous_bytes()
peak, done = [baseline], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_bytes())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
device_map = None if sys.argv[2] == "default" else sys.argv[2]
model, _ = FastModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16, max_seq_length=64, device_map=device_map)
done.set()
sampler.join()
print(json.dumps({"host_growth": max(peak[0], anonymous_bytes()) - baseline,
                  "devices": sorted({str(p.device) for p in model.parameters()}),
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.gpu
def test_16bit_loading_on_a_gpu_streams_the_checkpoint_onto_it(tmp_path, tiny_tokenizer):
    import os
    import subprocess
    import sys

    from fastmoe.builtin import randomize_routers, tiny_config

    # About 1 GB in bf16 over many tensors of at most 32 MB (one layer's fused gate_up_proj).
    sizes = dict(num_hidden_layers=16, hidden_size=1024, intermediate_size=1024, moe_intermediate_size=256,
                 num_experts=32, num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    fields = {**tiny_config("afmoe", len(tiny_tokenizer)).to_dict(), "layer_types": None, **sizes}
    torch.manual_seed(0)
    built = AutoModelForCausalLM.from_config(type(tiny_config("afmoe", 8))(**fields), dtype=torch.bfloat16)
    randomize_routers(built)
    checkpoint = tmp_path / "model"
    built.save_pretrained(checkpoint)
    tiny_tokenizer.save_pretrained(checkpoint)
    del built

    def load(device_map: str) -> dict:
        result = subprocess.run([sys.executable, "-c", _HOST_MEMORY_WHILE_LOADING, str(checkpoint), device_map],
                                capture_output=True, text=True, timeout=300, check=False,
                                env=dict(os.environ, TRITON_INTERPRET="0",
                                         PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    streamed = load("default")
    assert streamed["devices"] == [f"cuda:{torch.cuda.current_device()}"]
    # The probe sees a model that sits in host memory: on the CPU, tensors stored as they are used stay views of the
    # memory-mapped file, but every expert stack (most of the model) is built from per-expert tensors.
    on_host = load("cpu")
    assert on_host["devices"] == ["cpu"] and on_host["host_growth"] > 0.5 * on_host["model_bytes"]
    # Each tensor goes from the mapped file to the GPU, and the expert stacks are built there.
    assert streamed["host_growth"] < 0.25 * streamed["model_bytes"], streamed


def _adapted(peft_model) -> set[tuple[str, str]]:
    """(module, parameter) pairs peft put LoRA on: Linear layers and, through ParamWrapper, expert parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {(name.replace(".base_layer", ""), getattr(module, "parameter_name", "weight"))
            for name, module in peft_model.get_base_model().named_modules() if isinstance(module, BaseTunerLayer)}


def _is_router(module_name: str) -> bool:
    # AFMoE: mlp.router.gate; LFM2-MoE: mlp.gate; JetMoe: mlp.router.layer, self_attention.experts.router.layer;
    # Qwen2-MoE's shared expert gate (mlp.shared_expert_gate) counts as one too.
    return ".router." in module_name or module_name.endswith((".mlp.gate", ".mlp.shared_expert_gate"))


@pytest.mark.parametrize("model_type", list(models.FAMILIES))
def test_all_linear_is_every_linear_layer_and_expert_but_no_router(tiny_checkpoint, model_type, recwarn):
    checkpoint = str(tiny_checkpoint(model_type))
    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64)
    linear_layers = {name for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name != "lm_head" and not _is_router(name)}
    # SwiGLU stacks (gate_up_proj, down_proj), or JetMoe's expert linears (weight) in both of its mixtures: the 3D
    # weights; gpt-oss's expert biases (experts, features) are no LoRA target.
    experts = {name: {n for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
               for name, module in model.named_modules() if type(module).__name__.endswith("Experts")}
    recwarn.clear()
    adapted = _adapted(FastModel.get_peft_model(model, r=2, target_modules="all-linear",
                                                use_gradient_checkpointing=False))
    assert not [str(w.message) for w in recwarn if "peft" in str(w.message) or "pattern" in str(w.message)]
    assert not any(_is_router(name) for name, _ in adapted), sorted(adapted)
    assert {name for name, _ in adapted if name not in experts} == linear_layers
    assert {name: {p for n, p in adapted if n == name} for name in experts} == experts
    if model_type == "afmoe":  # the names peft's v4->v5 conversion would have taken for expert weights
        for part in ("self_attn.gate_proj", "mlp.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"):
            assert any(name.endswith(part) for name, _ in adapted), part

    default, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64)
    assert _adapted(FastModel.get_peft_model(default, r=2, use_gradient_checkpointing=False)) == adapted


def test_all_linear_adds_the_target_parameters_you_name(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=2, target_modules="all-linear", target_parameters=["router.gate.weight"],
                                     use_gradient_checkpointing=False)
    adapted = _adapted(model)
    assert ("model.layers.1.mlp.router.gate", "weight") in adapted
    assert ("model.layers.1.mlp.experts", "gate_up_proj") in adapted


def test_peft_rewriting_explicit_targets_is_warned(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64)
    with pytest.warns(UserWarning, match=r"peft rewrote target_modules \['down_proj', 'gate_proj', 'up_proj'\]"):
        FastModel.get_peft_model(model, r=2, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
                                 use_gradient_checkpointing=False)


def test_peft_rewriting_all_linear_is_worded_for_the_user():
    """peft 0.21 rewrites "all-linear" into expert parameters on Mixtral when fastmoe does not hand it targets (Mixtral
    is now a fastmoe family, which does): the warning names what peft added, the router's gate among them."""
    from types import SimpleNamespace

    from fastmoe.api import _peft_rewrite

    rewritten = SimpleNamespace(target_parameters=["experts.down_proj", "experts.gate_up_proj", "gate.weight"],
                                target_modules={"q_proj"})
    message = _peft_rewrite("mixtral", "all-linear", set(), rewritten)
    assert message.startswith("peft rewrote target_modules='all-linear' on this mixtral model into expert "
                              "target_parameters ['experts.down_proj', 'experts.gate_up_proj', 'gate.weight']")
    assert _peft_rewrite("mixtral", "all-linear", {"experts.down_proj", "experts.gate_up_proj", "gate.weight"},
                         rewritten) is None


def test_a_family_fastmoe_does_not_patch_gets_lora_on_every_linear_layer(llama_checkpoint):
    with pytest.warns(UserWarning, match="no fast path"):
        model, _ = FastModel.from_pretrained(str(llama_checkpoint), max_seq_length=64)
    linear_layers = {name for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    model = FastModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    assert {name for name, _ in _adapted(model)} == linear_layers


@pytest.fixture
def experts_kernel_calls(monkeypatch):
    """How often fastmoe's experts kernel ran (16-bit experts: fastmoe.models.shared.moe_experts)."""
    from fastmoe.models import shared

    calls = []
    original = shared.moe_experts

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(shared, "moe_experts", counted)
    return calls


def _experts_outputs(model, batch) -> list[torch.Tensor]:
    """Each experts module's output, in layer order, for those that ran as modules (transformers' forward)."""
    outputs = []
    handles = [module.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
               for module in model.modules() if type(module).__name__.endswith("Experts")]
    try:
        _eval_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("model_type", ["afmoe", "lfm2_moe"])
@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_an_explicit_experts_implementation_runs_transformers_experts(tiny_checkpoint, model_type, implementation,
                                                                      experts_kernel_calls, kernel_references):
    checkpoint = str(tiny_checkpoint(model_type))
    batch = batch_with_padding(512, seed=5)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                     experts_implementation=implementation)
    reference_experts = _experts_outputs(reference, batch)
    reference_logits = _eval_logits(reference, batch)

    default, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64)
    assert default.config._experts_implementation == "fastmoe"
    with pytest.warns(UserWarning, match=f"experts_implementation='{implementation}'.*transformers' {implementation}"):
        chosen, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64,
                                              experts_implementation=implementation)
    assert chosen.config._experts_implementation == implementation

    experts = _experts_outputs(chosen, batch)
    assert not experts_kernel_calls
    assert len(experts) == len(reference_experts) > 0
    for out, ref in zip(experts, reference_experts):
        assert rel_err(out, ref) < 1e-5
    assert rel_err(_eval_logits(chosen, batch), reference_logits) < 1e-5

    # The other model in the process keeps fastmoe's kernel, and either can switch at run time.
    assert _experts_outputs(default, batch) == [] and experts_kernel_calls
    experts_kernel_calls.clear()
    default.set_experts_implementation(implementation)
    assert len(_experts_outputs(default, batch)) == len(reference_experts) and not experts_kernel_calls
    chosen.set_experts_implementation("fastmoe")
    assert _experts_outputs(chosen, batch) == [] and experts_kernel_calls


def test_lora_on_experts_under_an_explicit_experts_implementation_matches_transformers(tiny_checkpoint,
                                                                                       experts_kernel_calls):
    # LoRA on the experts alone: what runs differently here. (Adapters on the attention projections of this tiny model
    # have gradients whose fp32 rounding error sits near the 1e-5 budget on some CPUs whatever the experts do.)
    lora = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    with pytest.warns(UserWarning, match="experts_implementation='eager'"):
        (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = compare_with_transformers(
            tiny_checkpoint("afmoe"), lora, experts_implementation="eager")
    assert not experts_kernel_calls
    assert rel_err(logits, ref_logits) < 1e-5 and rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and any(".experts." in name for name in grads)
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_experts_implementations_fastmoe_cannot_honour_are_refused_before_loading(tiny_checkpoint, monkeypatch):
    from transformers import core_model_loading

    def read(*args, **kwargs):
        raise AssertionError("a checkpoint tensor was read before the refusal")

    monkeypatch.setattr(core_model_loading, "spawn_materialize", read)
    with pytest.raises(ValueError, match="transformers runs jetmoe's experts in its own MoE forward"):
        FastModel.from_pretrained(str(tiny_checkpoint("jetmoe")), experts_implementation="eager")
    with pytest.raises(ValueError, match="experts_implementation='eager' cannot run 4-bit experts"):
        FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), experts_implementation="eager", load_in_4bit=True)


def test_fastmoe_experts_serve_transformers_own_moe_forward(tiny_checkpoint, experts_kernel_calls):
    """After fastmoe.unpatch(), a model loaded by FastModel still names "fastmoe" as its experts implementation:
    transformers' MoE forward then calls fastmoe's kernel through its experts interface, on the same weights."""
    checkpoint = str(tiny_checkpoint("afmoe"))
    batch = batch_with_padding(512, seed=6)
    reference = _eval_logits(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), batch)
    model, _ = FastModel.from_pretrained(checkpoint, dtype=torch.float32, max_seq_length=64)
    fastmoe.unpatch()
    experts_kernel_calls.clear()
    assert rel_err(_eval_logits(model, batch), reference) < 1e-5
    assert experts_kernel_calls

    experts = model.model.layers[1].mlp.experts
    experts.has_bias = True  # a layout the kernel does not compute
    with pytest.raises(NotImplementedError, match="laid out otherwise"):
        experts(torch.randn(3, model.config.hidden_size), torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.rand(3, 2))


@pytest.mark.filterwarnings("ignore:bitsandbytes quantization without a CUDA GPU")
def test_switching_4bit_experts_to_transformers_implementation_is_refused_at_their_forward(tiny_checkpoint):
    model, _ = FastModel.from_pretrained(str(tiny_checkpoint("afmoe")), dtype=torch.float32, max_seq_length=64,
                                         load_in_4bit=True)
    model.set_experts_implementation("eager")
    model.train()  # (bitsandbytes' CPU kernels for eval mode refuse these tiny shapes on AVX-512 machines)
    with pytest.raises(RuntimeError, match=r"NF4 .*set_experts_implementation\('fastmoe'\)"):
        model(input_ids=torch.tensor([[3, 4, 5]]))
