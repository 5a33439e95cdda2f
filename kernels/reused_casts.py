"""Casts of weights that stay fixed from one forward to the next (peft's float32 LoRA factors, cast to the
activations' dtype), made once and reused while a `reused_casts` scope is active.

Decoding runs the same forward once per token: without reuse every step casts every LoRA factor again (a 128-expert
layer's factors are ~15M values), which costs more than the step's own matrix products at batch 1. Inside a scope,
the first forward casts and later forwards get the same tensor back; a source changed in place since (an optimizer
step between two `generate` calls: its version counter moved) is cast again into the same tensor, so a CUDA graph
that captured the cast's address reads the new values. Outside a scope (training), a plain `.to`.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_ACTIVE: contextvars.ContextVar[CastCache | None] = contextvars.ContextVar("fastmoe_reused_casts", default=None)


class CastCache:
    """source tensor (by address, shape, strides, dtypes) -> its cast, with the source's version when cast."""

    def __init__(self):
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def cast(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if source.dtype == dtype:
            return source
        key = (source.device, source.data_ptr(), tuple(source.shape), source.stride(), source.dtype, dtype)
        entry = self._entries.get(key)
        if entry is None:
            cast = source.to(dtype)
            # The source is held so that its address cannot be reused by another tensor under the same key.
            self._entries[key] = (source, cast, source._version)
            return cast
        held, cast, version = entry
        if source._version != version:
            cast.copy_(source)
            self._entries[key] = (held, cast, source._version)
        return cast


    def derived(self, source: torch.Tensor, name: str, make) -> torch.Tensor:
        """make(), a tensor computed from `source` alone (`name` tells such derivations apart), made once and made
        again into the same tensor when the source changed in place."""
        key = (source.device, source.data_ptr(), tuple(source.shape), source.stride(), source.dtype, name)
        entry = self._entries.get(key)
        if entry is None:
            value = make()
            self._entries[key] = (source, value, source._version)
            return value
        held, value, version = entry
        if source._version != version:
            value.copy_(make())
            self._entries[key] = (held, value, source._version)
        return value


@contextlib.contextmanager
def reused_casts(cache: CastCache):
    """Within: `cast` reuses `cache`'s casts."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def scope_active() -> bool:
    """Whether a scope is active (outside torch.compile)."""
    return not torch.compiler.is_compiling() and _ACTIVE.get() is not None


def cast(source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`source.to(dtype)`, or the active scope's reused cast of it (never under torch.compile, which traces the
    plain cast)."""
    if torch.compiler.is_compiling():
        return source.to(dtype)
    cache = _ACTIVE.get()
    if cache is None or source.requires_grad and torch.is_grad_enabled():
        return source.to(dtype)
    return cache.cast(source, dtype)


def derived(source: torch.Tensor, name: str, make) -> torch.Tensor:
    """make() (a tensor computed from `source` alone, such as an NF4 weight's fp32 absmax), or the active scope's
    reused one (never under torch.compile)."""
    cache = _ACTIVE.get()
    if cache is None or torch.compiler.is_compiling():
        return make()
    return cache.derived(source, name, make)
