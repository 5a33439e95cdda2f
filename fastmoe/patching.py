"""The patch registry: which transformers forwards each model family swaps, and applying/undoing them.

A family module declares its patches as `ForwardPatch(owner, attribute, replacement)` entries. Patches replace
attributes of classes (or of modules: trl's `add_fused_lm_head`), never source text, so they are reversible:
`unpatch()` puts back exactly the objects that were there, and applying twice is the same as once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import transformers
from packaging.version import Version

# The transformers releases whose modeling code the patched forwards were written against and tested with.
# Keep in step with pyproject.toml.
TESTED_TRANSFORMERS = (Version("5.17.0"), Version("5.24.0"))

# model_type -> "module:FastClass"; adding a family = adding its module and one line here.
FAMILIES: dict[str, str] = {
    "afmoe": "fastmoe.models.afmoe:FastAfmoeModel",
    "lfm2_moe": "fastmoe.models.lfm2_moe:FastLfm2MoeModel",
    "jetmoe": "fastmoe.models.jetmoe:FastJetMoeModel",
    "cohere": "fastmoe.models.cohere:FastCohereModel",
}


@dataclass(frozen=True)
class ForwardPatch:
    """Replace `owner.attribute` (a transformers class's forward, usually, or a module's function) with
    `replacement`."""

    owner: type | ModuleType
    attribute: str
    replacement: Callable


# (owner, attribute) -> the original object, for every patch currently applied.
_originals: dict[tuple[type | ModuleType, str], object] = {}


def check_transformers_version(version: str | None = None) -> None:
    """Refuse transformers releases the patches were not checked against: their forwards may differ."""
    found = Version(version or transformers.__version__)
    low, high = TESTED_TRANSFORMERS
    if not (low <= found < high):
        raise RuntimeError(
            f"fastmoe supports transformers >={low},<{high}, but transformers {found} is installed. "
            f'Install a supported release, e.g. pip install "transformers>={low},<{high}".'
        )


def family_class(model_type: str):
    """The Fast*Model class registered for `model_type`, or None for an unsupported family."""
    target = FAMILIES.get(model_type)
    if target is None:
        return None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def apply_patches(patches: list[ForwardPatch]) -> None:
    check_transformers_version()
    for patch in patches:
        key = (patch.owner, patch.attribute)
        if key not in _originals:
            _originals[key] = patch.owner.__dict__[patch.attribute]
        setattr(patch.owner, patch.attribute, patch.replacement)


def remove_patches(patches: list[ForwardPatch]) -> None:
    for patch in patches:
        key = (patch.owner, patch.attribute)
        if key in _originals:
            setattr(patch.owner, patch.attribute, _originals.pop(key))


def original(owner: type | ModuleType, attribute: str):
    """`owner.attribute` as it was before fastmoe patched it (as it is, when unpatched)."""
    return _originals.get((owner, attribute), owner.__dict__[attribute])


def is_patched(patches: list[ForwardPatch]) -> bool:
    return all(patch.owner.__dict__.get(patch.attribute) is patch.replacement for patch in patches)


def unpatch(model_type: str | None = None) -> None:
    """Restore transformers' own forwards for one family, or for every family when model_type is None.

    A model FastModel loaded still names fastmoe's experts kernel as its experts_implementation ("fastmoe"), which
    transformers' own MoE forward then calls; `model.set_experts_implementation("eager")` (or another) leaves it."""
    if model_type is not None and model_type not in FAMILIES:
        raise ValueError(f"unknown model type {model_type!r}; fastmoe patches {sorted(FAMILIES)}")
    for name in FAMILIES if model_type is None else [model_type]:
        # A family whose module was never imported has nothing patched; don't import it just to find that out.
        if FAMILIES[name].split(":")[0] in sys.modules:
            remove_patches(family_class(name).patches())
