"""fastmoe installs its kernels as fastmoe.kernels; a top-level `kernels` (Hugging Face's package name, which
transformers probes) must never resolve to our folder. A plain install, the notebooks' install cell and a built wheel
all carry fastmoe.kernels with every subpackage."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0"})


def test_kernels_are_a_subpackage_of_fastmoe(tmp_path):
    result = run("import fastmoe.kernels.rms_norm as m; print(m.__name__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fastmoe.kernels.rms_norm"


def test_no_top_level_kernels_outside_the_checkout(tmp_path):
    result = run("import importlib.util; print(importlib.util.find_spec('kernels'))", tmp_path)
    assert result.returncode == 0, result.stderr
    spec = result.stdout.strip()
    assert spec == "None" or str(REPO) not in spec


def test_checkout_root_kernels_folder_looks_absent_to_transformers():
    # From the checkout's root the folder is on sys.path; transformers must still see no `kernels` package,
    # and none of our ops may be importable under that name.
    code = (
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import transformers.models.afmoe.modeling_afmoe\n"
        "print(is_kernels_available())\n"
        "try:\n"
        "    import kernels.rms_norm\n"
        "    print('importable')\n"
        "except ImportError:\n"
        "    print('not importable')\n"
    )
    result = run(code, REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["False", "not importable"]


def test_checkout_root_kernels_folder_steps_aside_for_an_installed_kernels_package(tmp_path):
    # The checkout's root comes before site-packages on sys.path; Hugging Face's package, where installed, must
    # still be what `import kernels` finds (bitsandbytes and transformers import it), never our folder.
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("__version__ = '0.12.0'\ndef get_kernel(repo_id, version=None):\n"
                                           "    return repo_id\n")
    code = (
        "import sys, kernels\n"
        "print(kernels.__file__)\n"
        "print(kernels.get_kernel('kernels-community/x'))\n"
        "print(sys.modules['kernels'] is kernels)\n"
        "try:\n"
        "    import kernels.rms_norm\n"
        "    print('importable')\n"
        "except ImportError:\n"
        "    print('not importable')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(installed / "__init__.py"), "kernels-community/x", "True",
                                          "not importable"]


# What a user's install carries: the notebooks' install cell run into a fresh environment that already has torch (as
# Colab's has its CUDA build), and a built wheel. Both build the package, hence `slow`.
NOTEBOOKS_DIR = REPO / "notebooks"
# A line of the install cell that pip runs: the %pip magic, uncommented (the released-package line is a comment).
PIP_MAGIC = re.compile(r"^\s*%pip (install .+)$", re.M)
# A subpackage of kernels/ that no list names: an install must carry it as fastmoe.kernels.<name> all the same.
PROBE_SUBPACKAGE = "probe_subpackage"


def notebook_install_arguments() -> list[str]:
    """pip's arguments in the install cell that every notebook starts with (the same cell in each)."""
    arguments = set()
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        first = next(cell for cell in cells if cell["cell_type"] == "code")
        source = "".join(first["source"])
        commands = PIP_MAGIC.findall(source)
        assert len(commands) == 1, f"{path.name}: its first code cell should run one `%pip install`, not {commands}"
        assert re.search(r'#.*%pip install -q "fastmoe\[bnb\]"', source), f"{path.name}: no released-package line"
        arguments.add(commands[0])
    assert len(arguments) == 1, f"the notebooks install differently: {arguments}"
    return shlex.split(arguments.pop())


@pytest.fixture
def clone(tmp_path) -> Path:
    """A copy of the checkout, as a user's clone, with a kernels/ subpackage that no list names."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", ".whl", ".device_out"))
    probe = clone / "kernels" / PROBE_SUBPACKAGE
    probe.mkdir()
    (probe / "__init__.py").write_text("")
    (probe / "op.py").write_text("NAME = __name__\n")
    return clone


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python3*/site-packages"))


@pytest.mark.slow
def test_notebook_install_cell_installs_fastmoe_over_the_runtimes_torch(clone, tmp_path):
    """The cell's command is a plain (non-editable) install of the clone: fastmoe, fastmoe.kernels and its
    subpackages import from outside the clone, the runtime's torch stays, and no top-level `kernels` appears."""
    arguments = notebook_install_arguments()
    venv = tmp_path / "venv"
    # --system-site-packages: torch (and what else this interpreter has) is already there, as on Colab. Without a pip
    # of its own (no ensurepip needed): this pip installs into it, as `%pip` would from its interpreter.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = str(venv / "bin" / "python")
    # From the notebook's folder in the clone, as the notebook runs it.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, *arguments], cwd=clone / "notebooks",
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr

    assert not list(site_packages(venv).glob("torch*")), "pip installed a torch of its own over the runtime's"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import importlib.util, fastmoe, torch\n"
        f"import fastmoe.kernels.rms_norm, fastmoe.kernels.{PROBE_SUBPACKAGE}.op as probe\n"
        "print(fastmoe.__file__, fastmoe.kernels.rms_norm.__file__, probe.__file__, sep='\\n')\n"
        "print(torch.__file__)\n"
        "print(importlib.util.find_spec('kernels'))\n"
        "import bitsandbytes\n"  # the bnb extra
    )
    result = subprocess.run([python, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    fastmoe_file, kernel_file, probe_file, torch_file, kernels_spec = result.stdout.splitlines()[:5]
    installed = site_packages(venv) / "fastmoe"
    assert Path(fastmoe_file) == installed / "__init__.py"
    assert Path(kernel_file) == installed / "kernels" / "rms_norm.py"
    assert Path(probe_file) == installed / "kernels" / PROBE_SUBPACKAGE / "op.py"
    assert str(venv) not in torch_file  # the runtime's own torch
    assert not (site_packages(venv) / "kernels").exists()
    assert kernels_spec == "None" or str(venv) not in kernels_spec


@pytest.mark.slow
def test_wheel_carries_every_kernels_subpackage_and_no_top_level_kernels(clone, tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"),
                            str(clone)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("fastmoe-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())

    sources = {f"fastmoe/{path.relative_to(clone / 'fastmoe')}" for path in (clone / "fastmoe").rglob("*.py")}
    sources |= {f"fastmoe/kernels/{path.relative_to(clone / 'kernels')}" for path in (clone / "kernels").rglob("*.py")}
    assert f"fastmoe/kernels/{PROBE_SUBPACKAGE}/op.py" in sources
    assert sources <= files, f"missing from the wheel: {sorted(sources - files)}"
    assert "fastmoe/data/instructions.jsonl" in files
    assert not [name for name in files if name.startswith("kernels/")], "a top-level kernels package"
