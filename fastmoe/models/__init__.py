"""The family registry: which module describes each model type, and patching families on and off.

Each family is one module, `fastmoe/models/<family>.py`, that defines its forwards and describes the family as data
(`FAMILY`, a `fastmoe.patching.Family`). Adding a family = adding that module and one line to FAMILIES (and its
tests). Modules are imported only when their family is asked for: each imports transformers' modeling code.

Besides its own ops, every family uses the SHARED_OPS: peft's Linear LoRA forwards, trl's fused LM head and trl's
rollouts, which serve any patched family's models. They stay patched while at least one family patched with them on
remains, so unpatching one family never undoes another's.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Mapping

from fastmoe import patching
from fastmoe.patching import Family, ForwardPatch

# model_type -> the module holding its FAMILY.
FAMILIES: dict[str, str] = {
    "afmoe": "fastmoe.models.afmoe",
    "lfm2_moe": "fastmoe.models.lfm2_moe",
    "jetmoe": "fastmoe.models.jetmoe",
    "cohere": "fastmoe.models.cohere",
    "qwen3_moe": "fastmoe.models.qwen3_moe",
    "mixtral": "fastmoe.models.mixtral",
    "qwen2_moe": "fastmoe.models.qwen2_moe",
    "gpt_oss": "fastmoe.models.gpt_oss",
}

# op name -> "module:function" returning its patches. Loaded on use: the modules import peft and trl.
SHARED_OPS: dict[str, str] = {
    # peft's lora.Linear, ParamWrapper (a Linear's weight) and 4-bit Linear forwards on fastmoe's fused LoRA linear.
    "lora_linear": "fastmoe.linear_lora:lora_linear_patches",
    # trl's add_fused_lm_head: fastmoe's head on models whose family's loss op is patched, trl's own on the others.
    "trl_fused_head": "fastmoe.trl_fused_head:fused_lm_head_patches",
    # trl's unwrap_model_for_generation: its trainers' rollouts (GRPO, RLOO without vLLM) on fastmoe's decode path.
    "trl_generation": "fastmoe.trl_generation:generation_patches",
    # The Trainer's per-step parameter count and gradient clipping, without walking every module of a fastmoe model.
    "trainer_step": "fastmoe.trainer_step:trainer_step_patches",
    # trl's SFTTrainer metrics (entropy, token accuracy, tokens seen) read at logging steps, not after every forward.
    "trl_sft_metrics": "fastmoe.trl_sft_metrics:sft_metrics_patches",
}

# shared op -> the model types patched with that op on.
_shared_users: dict[str, set[str]] = {op: set() for op in SHARED_OPS}


def family(model_type: str) -> Family | None:
    """The description of `model_type`'s family, or None for a model type fastmoe has no fast path for."""
    module = FAMILIES.get(model_type)
    return None if module is None else importlib.import_module(module).FAMILY


def op_names(model_type: str) -> tuple[str, ...]:
    """The ops `patch(model_type, ...)` switches: the family's own, then the shared ones."""
    return (*_known(model_type).ops, *SHARED_OPS)


def check_ops(model_type: str, ops: Mapping[str, object]) -> dict[str, bool]:
    """`ops` (op name -> True/False) as `patch` takes them; ValueError naming the valid ops otherwise."""
    names = op_names(model_type)
    for name, value in ops.items():
        if name not in names:
            raise ValueError(f"{model_type} has no op {name!r} to switch; its ops are {', '.join(names)}")
        if not isinstance(value, bool):
            raise ValueError(f"op {name}={value!r}: switch an op with True or False")
    return dict(ops)


def patch(model_type: str, **ops: bool) -> None:
    """Swap transformers' forwards for fastmoe's in `model_type`'s family, op by op: every op is on unless switched
    off (`patch("afmoe", rms_norm=False)`: transformers' own RMSNorm, fastmoe's everything else); an op switched off
    that an earlier call patched is put back. Patches are per class, so they apply to every model of the family in the
    process. Idempotent. Also makes "fastmoe" one of transformers' experts implementations."""
    from fastmoe.models.shared import register_experts_implementation

    described = _known(model_type)
    ops = check_ops(model_type, ops)
    patching.check_transformers_version()
    patching.remove_patches([p for op, patches in described.ops.items() if not ops.get(op, True) for p in patches])
    patching.apply_patches(described.patches(ops))
    for op in SHARED_OPS:
        users = _shared_users[op]
        if ops.get(op, True):
            users.add(model_type)
        else:
            users.discard(model_type)
            if users:
                warnings.warn(f"{op}=False does not take effect: that op is shared by every family, and stays patched "
                              f"for {', '.join(sorted(users))} (fastmoe.unpatch those first)", stacklevel=2)
        (patching.apply_patches if users else patching.remove_patches)(shared_patches(op))
    register_experts_implementation()


def unpatch(model_type: str | None = None) -> None:
    """Restore transformers' own forwards for one family, or for every family when model_type is None; the shared ops
    go back once no patched family uses them.

    A model FastModel loaded still names fastmoe's experts kernel as its experts_implementation ("fastmoe"), which
    transformers' own MoE forward then calls; `model.set_experts_implementation("eager")` (or another) leaves it."""
    if model_type is None:
        patching.remove_all_patches()
        for users in _shared_users.values():
            users.clear()
        return
    if model_type in FAMILIES and FAMILIES[model_type] not in sys.modules:
        return  # never imported, so never patched; don't import it just to find that out
    patching.remove_patches(_known(model_type).patches())
    for op, users in _shared_users.items():
        if model_type in users:
            users.discard(model_type)
            if not users:
                patching.remove_patches(shared_patches(op))


def _known(model_type: str) -> Family:
    described = family(model_type)
    if described is None:
        raise ValueError(f"fastmoe has no fast path for model type {model_type!r}; it patches {', '.join(FAMILIES)}")
    return described


def shared_patches(op: str) -> list[ForwardPatch]:
    """The patches of one of the SHARED_OPS."""
    module, function = SHARED_OPS[op].split(":")
    return getattr(importlib.import_module(module), function)()
