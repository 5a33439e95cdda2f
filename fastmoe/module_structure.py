"""What a module tree holds, walked once per structure instead of on every training step.

`module.modules()` and `named_parameters()` recurse through Python generators: a LoRA model of an MoE family has
thousands of modules, and each walk takes milliseconds. fastmoe's per-step paths (fastmoe.trainer_step,
fastmoe.graphed_checkpointing) read the tree through `structure_of`, which keeps what one walk found until a
module, parameter or buffer is registered on any module in the process: torch's global registration hooks
(installed on first use) count those, and a cached walk is valid while the count it was taken at is current.
Assigning a submodule, parameter or buffer (`module.x = ...`, `register_*`, peft injecting adapters, bitsandbytes
swapping layers) registers it; what a walk caches are the objects, so values read from them (`requires_grad`,
`.grad`, `data_ptr()`, hooks, `training`) are always current.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

_registrations = {"count": 0, "hooks": None}
# The modules of every tree walked so far: only a registration on one of them can change a cached walk.
_walked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _count_registration(module: torch.nn.Module, *_) -> None:
    """Counts a registration on a walked module (returns None: the registered object is kept as given). Others change
    no cached walk: a module still being built (it is counted when attached to a walked one), or a temporary
    container such as the ModuleList that slicing `model.layers` builds inside a model's forward (LFM2-MoE does at
    every call), which would otherwise invalidate every walk at every step. Never counted while torch.compile traces:
    such a slice inside a compiled forward would be a side effect on this module's state, which dynamo cannot write
    back (the dict holds the hooks' handles)."""
    if not torch.compiler.is_compiling() and module in _walked:
        _registrations["count"] += 1


def track_registrations() -> None:
    """Install the global registration hooks (once per process)."""
    if _registrations["hooks"] is None:
        from torch.nn.modules import module

        _registrations["hooks"] = (
            module.register_module_module_registration_hook(_count_registration),
            module.register_module_parameter_registration_hook(_count_registration),
            module.register_module_buffer_registration_hook(_count_registration),
        )


@dataclass(frozen=True)
class Structure:
    """One walk of a module tree."""

    count: int  # the registration count the walk was taken at
    modules: tuple[torch.nn.Module, ...]
    named_parameters: tuple[tuple[str, torch.nn.Parameter], ...]
    buffers: tuple[torch.Tensor, ...]


_CACHE_ATTRIBUTE = "_fastmoe_structure"


def structure_of(root: torch.nn.Module) -> Structure:
    """`root`'s modules, parameters and buffers as `modules()`, `named_parameters()` and `buffers()` give them."""
    track_registrations()
    cached = root.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is None or cached.count != _registrations["count"]:
        cached = Structure(_registrations["count"], tuple(root.modules()), tuple(root.named_parameters()),
                           tuple(root.buffers()))
        _walked.update(cached.modules)
        # Kept on the module itself: the walk holds the module, so a global table keyed by it (even a weak one)
        # would keep every model ever walked, and its GPU memory, alive. On the module it is a cycle that goes
        # with the model.
        root.__dict__[_CACHE_ATTRIBUTE] = cached
    return cached
