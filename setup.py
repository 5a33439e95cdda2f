"""The package list, which pyproject.toml cannot express: kernels/ is installed as fastmoe.kernels, with every
subpackage setuptools finds under it, and never as a top-level `kernels` (Hugging Face's package, which transformers
probes). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

KERNELS_DIR = "kernels"

setup(
    packages=find_packages(include=["fastmoe", "fastmoe.*"])
    + ["fastmoe.kernels"] + [f"fastmoe.kernels.{name}" for name in find_packages(KERNELS_DIR)],
    # Subpackages follow their parent's mapping: fastmoe.kernels.<name> is kernels/<name>.
    package_dir={"fastmoe.kernels": KERNELS_DIR},
)
