"""trl's rollouts on fastmoe's decode path.

trl's trainers that generate with the model being trained (GRPO and RLOO with ``use_vllm=False``, the generation
callbacks, distillation) do it inside ``unwrap_model_for_generation(model, accelerator, ...)``, then call
``unwrapped.generate``: with a fastmoe model that is transformers' decoding, one Python-launched forward per token. The
shared op ``trl_generation`` (fastmoe.models.SHARED_OPS) replaces that name in the trl modules that bind it. On a model
of a patched family, the decode path (fastmoe.generation) stands in front of the base model's forward inside the block
and steps aside after it, keeping its buffers, CUDA graphs and casts: each rollout shape is captured once in a whole
training run, and an optimizer step between rollouts changes the adapter in place, which the next rollout reads. The
model stays in the mode trl gives it. Any other model, and a model whose decode path the user put in place
(`FastModel.for_inference`), is left as it is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

from fastmoe import generation, patching
from fastmoe.models.causal_lm import is_fastmoe_causal_lm
from fastmoe.patching import ForwardPatch

# The trl modules that bind unwrap_model_for_generation (`from ..models import unwrap_model_for_generation`).
TRL_MODULES = (
    "trl.models.utils",
    "trl.models",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.callbacks",
    "trl.trainer.distillation_trainer",
)


@functools.cache
def _trl() -> tuple[tuple[types.ModuleType, ...], object]:
    """(the trl modules that bind unwrap_model_for_generation, trl's own function); ((), None) without trl."""
    try:
        utils = importlib.import_module(TRL_MODULES[0])
    except Exception:  # no trl, or one that cannot import: nothing to patch
        return (), None
    if "unwrap_model_for_generation" not in vars(utils):
        return (), None
    modules = (utils, *patching.modules_binding("unwrap_model_for_generation", TRL_MODULES[1:]))
    return modules, patching.original(utils, "unwrap_model_for_generation")


def generation_patches() -> list[ForwardPatch]:
    """``unwrap_model_for_generation`` -> fastmoe's, in every trl module that binds it."""
    modules, _ = _trl()
    return [ForwardPatch(module, "unwrap_model_for_generation", unwrap_model_for_generation) for module in modules]


@contextlib.contextmanager
def unwrap_model_for_generation(model, accelerator, *args, **kwargs):
    """trl's context manager, with fastmoe's decode path in front of a patched family's base model inside it."""
    _, original = _trl()
    with original(model, accelerator, *args, **kwargs) as unwrapped:
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if not is_fastmoe_causal_lm(base) or isinstance(base.__dict__.get("forward"), generation.DecodeForward):
            yield unwrapped
            return
        generation.install(base)
        try:
            yield unwrapped
        finally:
            generation.uninstall(base, keep=True)
