"""fastmoe: fast, memory-lean LoRA fine-tuning of Mixture-of-Experts language models.

Public surface:
    FastModel                 dispatches on config.model_type
    FastAfmoeModel, FastLfm2MoeModel, FastJetMoeModel, FastCohereModel
    unpatch                   restore transformers' own forwards
"""

from fastmoe.noise import silence_bitsandbytes_kernels_probe

# Before anything imports bitsandbytes (peft does, whenever it is installed).
silence_bitsandbytes_kernels_probe()

from fastmoe.api import FastBaseModel, FastModel  # noqa: E402
from fastmoe.patching import unpatch  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # Family classes import transformers' modeling modules; load them only when asked for.
    from fastmoe import patching

    for model_type, target in patching.FAMILIES.items():
        if target.split(":")[1] == name:
            return patching.family_class(model_type)
    raise AttributeError(f"module 'fastmoe' has no attribute {name!r}")


__all__ = [
    "FastModel",
    "FastBaseModel",
    "FastAfmoeModel",
    "FastLfm2MoeModel",
    "FastJetMoeModel",
    "FastCohereModel",
    "unpatch",
]
