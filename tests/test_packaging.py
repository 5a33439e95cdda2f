"""fastmoe installs its kernels as fastmoe.kernels; a top-level `kernels` (Hugging Face's package name, which
transformers probes) must never resolve to our folder."""

import os
import subprocess
import sys
from pathlib import Path

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
