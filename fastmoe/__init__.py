"""fastmoe: fast, memory-lean LoRA fine-tuning of Mixture-of-Experts language models.

Public surface:
    FastModel                 dispatches on config.model_type
    FastAfmoeModel, FastLfm2MoeModel, FastJetMoeModel, FastCohereModel, FastQwen3MoeModel,
                              FastMixtralModel, FastQwen2MoeModel, FastGptOssModel
    patch                     swap a family's transformers forwards for fastmoe's, each op switchable:
                              patch("afmoe", rms_norm=False)
    unpatch                   restore transformers' own forwards
"""

from fastmoe.noise import silence_bitsandbytes_kernels_probe

# Before anything imports bitsandbytes (peft does, whenever it is installed).
silence_bitsandbytes_kernels_probe()

from fastmoe.allocator import prefer_expandable_segments  # noqa: E402

# Before CUDA is first used: the allocator reads its settings once (fastmoe.allocator says why).
prefer_expandable_segments()

from fastmoe.api import FastBaseModel, FastModel  # noqa: E402
from fastmoe.models import patch, unpatch  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # The family classes are made from their families' descriptions, whose modules import transformers' modeling
    # code: only when asked for.
    if name.startswith("Fast") and name.endswith("Model"):
        from fastmoe import api, models

        for model_type in models.FAMILIES:
            if models.family(model_type).class_name == name:
                return api.family_model(model_type)
    raise AttributeError(f"module 'fastmoe' has no attribute {name!r}")


__all__ = [
    "FastModel",
    "FastBaseModel",
    "FastAfmoeModel",
    "FastLfm2MoeModel",
    "FastJetMoeModel",
    "FastCohereModel",
    "FastQwen3MoeModel",
    "FastMixtralModel",
    "FastQwen2MoeModel",
    "FastGptOssModel",
    "patch",
    "unpatch",
]
