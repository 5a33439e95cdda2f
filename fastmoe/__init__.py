"""fastmoe: fast, memory-lean LoRA fine-tuning of Mixture-of-Experts language models.

Public surface:
    FastModel                 dispatches on config.model_type
    FastAfmoeModel, FastLfm2MoeModel, FastJetMoeModel, FastCohereModel
    unpatch                   restore transformers' own forwards
"""

from fastmoe.api import FastBaseModel, FastModel
from fastmoe.patching import unpatch

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
