"""Which checkpoint function a fastmoe model's decoder layers use, whoever turns checkpointing on.

`FastModel.get_peft_model` turns gradient checkpointing on, and so does transformers' Trainer when its arguments
ask for it (trl's `SFTConfig` does by default): it calls `activation_checkpointing_enable`, which hands torch's
checkpoint to every decoder layer through `_set_gradient_checkpointing`, replacing whatever was chosen before. So a
fastmoe model carries its own `_set_gradient_checkpointing` (an instance attribute, the one transformers calls) that
swaps torch's plain non-reentrant checkpoint for the model's mode:

- "graphs": `fastmoe.graphed_checkpointing.GraphedCheckpoint`, each layer's forward and recompute + backward replayed
  as CUDA graphs (CUDA only; LoRA training, where few parameters train);
- "offload": `fastmoe.offloaded_checkpointing`, the layer inputs wait in host memory (its recompute marked as below);
- "graphs-offload": both, the graphs' layer inputs in host memory (`GraphedCheckpoint(offload_inputs=True)`), the
  calls the graphs leave (long sequences, a signature's first step) offloaded eagerly;
- "standard": torch's checkpoint, as transformers does, its recompute marked (fastmoe.recompute.marking_recompute)
  so that the layers skip the products whose output nobody reads there.

Without CUDA the graph modes become their eager counterparts ("standard", "offload").

Any other checkpoint function (reentrant checkpointing, transformers' `offload=True`, a function of the user's) is
used as given.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("graphs", "graphs-offload", "offload", "standard")


def _is_plain_checkpoint(function: Callable) -> bool:
    """torch's non-reentrant checkpoint with nothing else asked of it: what transformers passes by default."""
    return (isinstance(function, functools.partial) and function.func is checkpoint and not function.args
            and function.keywords.get("use_reentrant") is False
            and set(function.keywords) <= {"use_reentrant", "preserve_rng_state"}
            and function.keywords.get("preserve_rng_state", True))


def _checkpoint_function(model: torch.nn.Module, given: Callable) -> Callable:
    if not _is_plain_checkpoint(given):
        return given
    from fastmoe.offloaded_checkpointing import checkpoint_with_offloaded_inputs
    from fastmoe.recompute import marking_recompute

    mode = model._fastmoe_checkpointing
    if mode == "offload":
        return checkpoint_with_offloaded_inputs
    if mode in ("graphs", "graphs-offload"):
        from fastmoe.graphed_checkpointing import GraphedCheckpoint

        offload = mode == "graphs-offload"
        graphed = model.__dict__.get("_fastmoe_graphed_checkpoint")
        if graphed is None or (graphed.host_inputs is not None) != offload:
            release_graphs(model)
            graphed = model._fastmoe_graphed_checkpoint = GraphedCheckpoint(offload_inputs=offload)
        graphed.fallback = checkpoint_with_offloaded_inputs if offload else marking_recompute(given)
        return graphed
    # The recompute marked, so that the layers skip the products whose output nobody reads there.
    return marking_recompute(given)


def set_checkpointing_mode(model: torch.nn.Module, mode: str) -> None:
    """Make `mode` what every later enabling of gradient checkpointing on `model` installs."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode must be one of {MODES}, got {mode!r}")
    if mode.startswith("graphs") and not torch.cuda.is_available():
        mode = "offload" if mode == "graphs-offload" else "standard"
    if not mode.startswith("graphs"):
        release_graphs(model)
    model._fastmoe_checkpointing = mode
    if "_set_gradient_checkpointing" not in model.__dict__:
        original = type(model)._set_gradient_checkpointing

        def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint,
                                        every_n_layers: int = 1):
            if not enable:
                release_graphs(self)
            return original(self, enable, _checkpoint_function(self, gradient_checkpointing_func), every_n_layers)

        model._set_gradient_checkpointing = types.MethodType(_set_gradient_checkpointing, model)


def release_graphs(model: torch.nn.Module) -> None:
    """Free the CUDA graphs and buffers of a model trained with graphed checkpointing."""
    graphed = model.__dict__.get("_fastmoe_graphed_checkpoint")
    if graphed is not None:
        graphed.release()
