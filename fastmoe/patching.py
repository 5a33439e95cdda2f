"""Patches, and the description of a model family that the rest of fastmoe reads.

A patch replaces an attribute of a class (a transformers forward, usually) or of a module (trl's
`add_fused_lm_head`), never source text, so it is reversible: `remove_patches` puts back exactly the object that
was there, and applying twice is the same as once. A family module (`fastmoe/models/<family>.py`) describes its
family as a `Family`: the forwards it swaps, grouped into ops that can be switched on and off one by one, and what
loading, LoRA, quantization and the tests need to know about it. The registry (`fastmoe.models`) finds the
descriptions by model type and patches families on and off.

This module imports nothing else of fastmoe: family modules, and the shared patches of `fastmoe.linear_lora` and
`fastmoe.trl_fused_head`, depend on it, never the other way round.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import transformers
from packaging.version import Version

# The transformers releases whose modeling code the patched forwards were written against and tested with.
# Keep in step with pyproject.toml.
TESTED_TRANSFORMERS = (Version("5.17.0"), Version("5.24.0"))

# How transformers runs a family's routed experts (`Family.routed_experts`).
# SWITCHABLE: transformers' `experts_implementation` switch picks their forward; fastmoe's kernel is the choice named
# "fastmoe", loaded by default, and another one asked for is honoured.
SWITCHABLE = "switchable"
# FIXED: the family's own MoE forward runs them, without that switch; fastmoe replaces it whole, so another choice
# is refused.
FIXED = "fixed"


@dataclass(frozen=True)
class ForwardPatch:
    """Replace `owner.attribute` (a transformers class's forward, usually, or a module's function) with
    `replacement`."""

    owner: type | ModuleType
    attribute: str
    replacement: Callable


@dataclass(frozen=True, eq=False)
class Family:
    """What fastmoe knows about one transformers model family, as data. `fastmoe/models/<family>.py` holds one, named
    FAMILY, beside the forwards it swaps in; `fastmoe.models` registers it; nothing else names a family."""

    # config.model_type of the family's checkpoints.
    model_type: str
    # The public class is `Fast{name}Model` (fastmoe.FastAfmoeModel, ...).
    name: str
    # op name -> the forwards that op swaps. Each op is switched on or off as a whole (`fastmoe.patch(model_type,
    # rms_norm=False)`), so the forwards of one op must work with transformers' own forwards of every other op.
    ops: Mapping[str, Sequence[ForwardPatch]]
    # What get_peft_model adapts when given no targets or "all-linear": Linear layers by module name, and parameters
    # (the experts' 3D weights, Linear weights that peft's MoE conversion would otherwise rename) by parameter name.
    lora_target_modules: tuple[str, ...]
    lora_target_parameters: tuple[str, ...] = ()
    # Module names (suffixes) of the routers: kept 16-bit by 4/8-bit loading (top-k choices flip on rounded logits),
    # never LoRA targets, and drawn at random in the tiny checkpoints (transformers zero-initialises some).
    routers: tuple[str, ...] = ()
    # SWITCHABLE, FIXED (see above) or None for a dense family.
    routed_experts: str | None = None
    # Routed-experts module classes whose 3D weights are not SwiGLU stacks, each with the names of those weights:
    # load_in_4bit quantizes them to NF4 (fastmoe.quantize) and load_in_8bit counts them as experts. SwiGLU stacks
    # (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)) need no entry: they are recognised by layout.
    expert_stacks: Mapping[type, tuple[str, ...]] = field(default_factory=dict)
    # The tiny random checkpoint the tests and the built-in model are built from (fastmoe.builtin.tiny_config): config
    # fields, with sizes that are not multiples of any kernel block and every feature of the family exercised.
    tiny_config: Mapping[str, Any] = field(default_factory=dict)
    # Parameters (name suffixes) that transformers initialises to zero and the tiny checkpoints draw at random, so that
    # the comparisons with transformers see them.
    random_init: tuple[str, ...] = ()
    # The ops that, all switched on, run packed rows (position_ids restarting at each document) on flash layouts
    # without seq^2 masks wherever flash runs the attention (fastmoe.sliding_window_attention), and the configured
    # attention implementations those layouts stand in for. With them on, a right-padded training batch drops its
    # padding (fastmoe.padding_free).
    packed_row_ops: tuple[str, ...] = ("attention",)
    layout_implementations: tuple[str, ...] = ("sdpa",)
    # What get_peft_model's cuda_graphs defaults to: graphed checkpointing (fastmoe.graphed_checkpointing) where
    # Python issuing a layer's few hundred launches keeps the GPU waiting (MoE layers), eager layers where the GPU
    # is busy without graphs and their private pool and kept attention would cost more memory than they save time.
    graphed_layers: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", MappingProxyType({op: tuple(patches) for op, patches in self.ops.items()}))
        object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))
        object.__setattr__(self, "expert_stacks", MappingProxyType(dict(self.expert_stacks)))
        if self.routed_experts not in (SWITCHABLE, FIXED, None):
            raise ValueError(f"routed_experts must be {SWITCHABLE!r}, {FIXED!r} or None, got {self.routed_experts!r}")

    @property
    def class_name(self) -> str:
        return f"Fast{self.name}Model"

    def patches(self, ops: Mapping[str, bool] | None = None) -> list[ForwardPatch]:
        """The patches of the ops switched on in `ops` (op name -> bool; an op not named is on), in `self.ops` order."""
        ops = ops or {}
        return [patch for op, patches in self.ops.items() if ops.get(op, True) for patch in patches]


# (owner, attribute) -> the original object, for every patch currently applied.
_originals: dict[tuple[type | ModuleType, str], object] = {}
# The original of an attribute the owner class inherited (peft's PeftModel.zero_grad is torch's Module's): undoing the
# patch deletes the class's own attribute, so that the inherited one shows again.
_INHERITED = object()


def check_transformers_version(version: str | None = None) -> None:
    """Refuse transformers releases the patches were not checked against: their forwards may differ."""
    found = Version(version or transformers.__version__)
    low, high = TESTED_TRANSFORMERS
    if not (low <= found < high):
        raise RuntimeError(
            f"fastmoe supports transformers >={low},<{high}, but transformers {found} is installed. "
            f'Install a supported release, e.g. pip install "transformers>={low},<{high}".'
        )


def apply_patches(patches: list[ForwardPatch]) -> None:
    check_transformers_version()
    for patch in patches:
        key = (patch.owner, patch.attribute)
        if key not in _originals:
            inherited = isinstance(patch.owner, type) and patch.attribute not in patch.owner.__dict__
            _originals[key] = _INHERITED if inherited else patch.owner.__dict__[patch.attribute]
        setattr(patch.owner, patch.attribute, patch.replacement)


def _restore(owner: type | ModuleType, attribute: str, original_object: object) -> None:
    if original_object is _INHERITED:
        delattr(owner, attribute)
    else:
        setattr(owner, attribute, original_object)


def remove_patches(patches: list[ForwardPatch]) -> None:
    for patch in patches:
        key = (patch.owner, patch.attribute)
        if key in _originals:
            _restore(patch.owner, patch.attribute, _originals.pop(key))


def remove_all_patches() -> None:
    """Put back every original object a patch replaced."""
    for (owner, attribute), original_object in list(_originals.items()):
        _restore(owner, attribute, original_object)
    _originals.clear()


def original(owner: type | ModuleType, attribute: str):
    """`owner.attribute` as it was before fastmoe patched it (as it is, when unpatched)."""
    found = _originals.get((owner, attribute), owner.__dict__.get(attribute, _INHERITED))
    if found is _INHERITED:
        return next(base.__dict__[attribute] for base in owner.__mro__[1:] if attribute in base.__dict__)
    return found


def modules_binding(attribute: str, module_names: Sequence[str]) -> tuple[ModuleType, ...]:
    """The modules among `module_names` whose own namespace binds `attribute` (each `from .utils import name` is a
    binding of its own, so each is patched); a module that cannot be imported (its optional dependencies missing) is
    left out."""
    found = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if attribute in vars(module):
            found.append(module)
    return tuple(found)


def is_patched(patches: list[ForwardPatch]) -> bool:
    return all(patch.owner.__dict__.get(patch.attribute) is patch.replacement for patch in patches)
