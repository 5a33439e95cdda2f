"""The Colab notebooks, executed end to end in their CPU mode (FASTMOE_NOTEBOOK_CPU=1: a tiny random model of the
notebook's family and the built-in data instead of the real checkpoint and a hub data set), as a user's Jupyter
kernel would run them; and committed without outputs."""

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# notebook -> (family it swaps in for CPU mode, prefix of the folders it writes)
NOTEBOOKS = {
    "trinity_mini_qlora.ipynb": ("afmoe", "trinity-mini"),
    "lfm2_8b_a1b_lora.ipynb": ("lfm2_moe", "lfm2-8b-a1b"),
    "jetmoe_8b_lora.ipynb": ("jetmoe", "jetmoe-8b"),
    "aya_expanse_8b_lora.ipynb": ("cohere", "aya-expanse-8b"),
    "qwen3_30b_a3b_qlora.ipynb": ("qwen3_moe", "qwen3-30b-a3b"),
    "mixtral_8x7b_qlora.ipynb": ("mixtral", "mixtral-8x7b"),
    "gpt_oss_20b_qlora.ipynb": ("gpt_oss", "gpt-oss-20b"),
}


def test_every_notebook_is_listed_and_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        notebook = json.loads((NOTEBOOKS_DIR / name).read_text())
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name} has outputs"


@dataclass
class ExecutedNotebook:
    name: str
    model_type: str
    folder: Path  # the kernel's working folder, where the notebook saved its adapter and merged model
    adapter: Path
    merged: Path
    load_in_4bit: bool  # the notebook's LOAD_IN_4BIT setting
    stdout_by_source: list[tuple[str, str]]  # (code cell source, what it printed)

    def printed_by(self, fragment: str) -> str:
        return next(text for source, text in self.stdout_by_source if fragment in source)


def _kernel_env(folder: Path) -> dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)
    return dict(
        os.environ,
        # The tiny checkpoint goes to a tempfile.mkdtemp() folder: keep it inside the test's own folder.
        TMPDIR=str(folder),
        FASTMOE_NOTEBOOK_CPU="1",
        # On the CPU every op takes its PyTorch reference, as a CPU user's run does (the interpreter is for kernel tests).
        TRITON_INTERPRET="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # The python3 kernel spec may launch plain "python": make that this interpreter, which has fastmoe installed.
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
    )


@pytest.fixture(scope="module", params=sorted(NOTEBOOKS))
def executed(request, tmp_path_factory) -> ExecutedNotebook:
    """Each notebook executed once, in CPU mode, in a fresh kernel and folder."""
    import nbformat
    from nbclient import NotebookClient

    name = request.param
    model_type, output_prefix = NOTEBOOKS[name]
    folder = tmp_path_factory.mktemp(output_prefix)
    notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    settings = re.findall(r"^LOAD_IN_4BIT = (True|False)$", "\n".join(cell.source for cell in notebook.cells), re.M)
    assert len(settings) == 1, f"{name} sets LOAD_IN_4BIT {len(settings)} times"
    client = NotebookClient(notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(folder)}})
    # A failing cell raises CellExecutionError, with the cell and its traceback.
    client.execute(env=_kernel_env(folder))
    stdout_by_source = [
        (cell.source, "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"))
        for cell in notebook.cells if cell.cell_type == "code"
    ]
    return ExecutedNotebook(name, model_type, folder, folder / f"{output_prefix}-lora", folder / f"{output_prefix}-merged",
                            settings[0] == "True", stdout_by_source)


@pytest.mark.slow
def test_notebook_trains_on_replies_reports_and_saves(executed):
    # The install cell (tests/test_packaging.py runs its command) leaves an environment that has fastmoe alone.
    assert executed.printed_by("%pip install").startswith("fastmoe is already installed")
    # The loss is on the assistant's reply: the built-in template's user marker never reaches the labels.
    loss_on = executed.printed_by("loss on:")
    assert loss_on.startswith("loss on: '") and "<|user|>" not in loss_on and "<|eos|>" in loss_on
    train_output = executed.printed_by("trainer.train()")
    assert "5 steps" in train_output and "tokens/s" in train_output and "peak RSS" in train_output
    assert re.search(r"5 steps, [1-9][\d,]* tokens in", train_output), train_output  # trl's count, never 0

    for file in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (executed.adapter / file).is_file(), file
    # CPU mode really swapped in a tiny model of the notebook's own family (built under TMPDIR, the test's folder).
    base_model = Path(json.loads((executed.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base_model.parent == executed.folder and base_model.name.startswith(f"tiny-{executed.model_type}-")

    merged_config = json.loads((executed.merged / "config.json").read_text())
    # A plain checkpoint: the family's own type and, even from a 4-bit model, no quantization left in it.
    assert merged_config["model_type"] == executed.model_type and "quantization_config" not in merged_config


@pytest.mark.slow
def test_merged_model_is_peft_merging_the_adapter_into_the_weights_the_model_computed_with(executed):
    """Each merged weight is what peft's own merge of the saved adapter gives on the base weights the trained model
    computed with: the checkpoint's for a 16-bit model; for a 4-bit one, its weights quantized as the notebook's model
    quantized them and dequantized as its forwards dequantized them. The 16-bit checkpoint is no reference for those:
    bitsandbytes' CPU round trip leaves some shapes far from it (39% for N(0, 0.02) weights at 24 x 48, where NF4's
    rounding alone is 9%), the model having computed with those values all along."""
    import bitsandbytes.functional as bnb_functional
    from fastmoe.kernels.dispatch import reference_only
    from fastmoe.kernels.moe import dequantize_nf4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import fastmoe
    from fastmoe import FastModel
    from fastmoe.quantize import is_quantized, nf4_weight

    base_dir = Path(json.loads((executed.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    # Same tensors in both files, under the checkpoint's own keys.
    assert _safetensors_keys(executed.merged) == _safetensors_keys(base_dir)

    # The notebook's kernel ran fastmoe's PyTorch references (TRITON_INTERPRET=0): quantize the same way.
    with reference_only():
        model, _ = FastModel.from_pretrained(str(base_dir), max_seq_length=64, load_in_4bit=executed.load_in_4bit)
        dtype = model.dtype
        computed = model.state_dict()
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if type(weight).__name__ == "Params4bit":  # what fastmoe's LoRA forward dequantizes (linear_lora.py)
                computed[f"{name}.weight"] = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
            if is_quantized(module):
                for param in module._fastmoe_nf4:
                    computed[f"{name}.{param}"] = dequantize_nf4(nf4_weight(module, param), dtype)
    assert executed.load_in_4bit == any(is_quantized(module) for module in model.modules())
    fastmoe.unpatch()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    plain.load_state_dict({key: computed[key] for key in plain.state_dict()})
    reference = PeftModel.from_pretrained(plain, executed.adapter).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(executed.merged, dtype=dtype).state_dict()
    assert merged.keys() == reference.keys()

    # fastmoe adds peft's delta (get_delta_weight), which peft rounds to the adapter's dtype (trl casts QLoRA adapters
    # to bf16), then rounds the sum to the model's: the reference within one rounding of each.
    adapter_dtype = next(iter(load_file(executed.adapter / "adapter_model.safetensors").values())).dtype
    moved, off = [], {}
    for key, expected in reference.items():
        delta = (expected.double() - computed[key].double()).norm()
        allowed = torch.finfo(adapter_dtype).eps * delta + torch.finfo(dtype).eps * expected.double().norm()
        if (merged[key].double() - expected.double()).norm() > allowed:
            off[key] = float((merged[key].double() - expected.double()).norm() / expected.double().norm())
        if delta > 1e-3 * expected.double().norm():
            moved.append(key)
    assert not off, f"merged weights off peft's merge (relative distance): {off}"
    # The adapter trained: a merge that dropped it, or lost the base under it, would fail above.
    assert len(moved) >= 5, moved


def _safetensors_keys(folder: Path) -> set[str]:
    return {key for file in folder.glob("*.safetensors") for key in load_file(file)}
