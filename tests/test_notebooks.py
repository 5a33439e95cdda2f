"""The Colab notebooks, executed end to end in their CPU mode (FASTMOE_NOTEBOOK_CPU=1: a tiny random model of the
notebook's family and the built-in data instead of the real checkpoint and a hub data set), as a user's Jupyter
kernel would run them; and committed without outputs."""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# notebook -> (family it swaps in for CPU mode, prefix of the folders it writes)
NOTEBOOKS = {
    "trinity_mini_qlora.ipynb": ("afmoe", "trinity-mini"),
    "lfm2_8b_a1b_lora.ipynb": ("lfm2_moe", "lfm2-8b-a1b"),
    "jetmoe_8b_lora.ipynb": ("jetmoe", "jetmoe-8b"),
    "aya_expanse_8b_lora.ipynb": ("cohere", "aya-expanse-8b"),
}
# LoRA after a few steps moves a weight by far less than this; NF4 rounding of a 4-bit base moves it by about 10%.
MERGED_RELATIVE_TOLERANCE = 0.25


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
    client = NotebookClient(notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(folder)}})
    # A failing cell raises CellExecutionError, with the cell and its traceback.
    client.execute(env=_kernel_env(folder))
    stdout_by_source = [
        (cell.source, "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"))
        for cell in notebook.cells if cell.cell_type == "code"
    ]
    return ExecutedNotebook(name, model_type, folder, folder / f"{output_prefix}-lora", folder / f"{output_prefix}-merged",
                            stdout_by_source)


@pytest.mark.slow
def test_notebook_trains_on_replies_reports_and_saves(executed):
    # The loss is on the assistant's reply: the built-in template's user marker never reaches the labels.
    loss_on = executed.printed_by("loss on:")
    assert loss_on.startswith("loss on: '") and "<|user|>" not in loss_on and "<|eos|>" in loss_on
    train_output = executed.printed_by("trainer.train()")
    assert "5 steps" in train_output and "tokens/s" in train_output and "peak RSS" in train_output

    for file in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (executed.adapter / file).is_file(), file
    # CPU mode really swapped in a tiny model of the notebook's own family (built under TMPDIR, the test's folder).
    base_model = Path(json.loads((executed.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base_model.parent == executed.folder and base_model.name.startswith(f"tiny-{executed.model_type}-")

    merged_config = json.loads((executed.merged / "config.json").read_text())
    # A plain checkpoint: the family's own type and, even from a 4-bit model, no quantization left in it.
    assert merged_config["model_type"] == executed.model_type and "quantization_config" not in merged_config


@pytest.mark.slow
def test_merged_model_is_the_base_plus_a_small_update(executed):
    """Each merged weight is its base weight plus a small LoRA update: a merge that lost the base (a 4-bit weight
    read as its placeholder, say) is as far as the weight itself."""
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        return {key: value for file in sorted(folder.glob("*.safetensors")) for key, value in load_file(file).items()}

    base_dir = Path(json.loads((executed.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    base, merged = weights(base_dir), weights(executed.merged)
    assert merged.keys() == base.keys()
    far = {key: round(float((merged[key].float() - base[key].float()).norm() / base[key].float().norm()), 3)
           for key in base if base[key].float().norm() > 0}
    far = {key: distance for key, distance in far.items() if distance > MERGED_RELATIVE_TOLERANCE}
    assert not far, f"merged weights far from the base checkpoint's (relative distance): {far}"
