"""Casts of weights that stay fixed from one forward to the next (peft's float32 LoRA factors, cast to the
activations' dtype), made once and reused while a `reused_casts` scope is active.

Decoding runs the same forward once per token: without reuse every step casts every LoRA factor again (a 128-expert
layer's factors are ~15M values), which costs more than the step's own matrix products at batch 1. Inside a scope,
the first forward casts and later forwards get the same tensor back; a source changed in place since (an optimizer
step between two `generate` calls: its version counter moved) is cast again into the same tensor, so a CUDA graph
that captured the cast's address reads the new values. Outside a scope (training), a plain `.to`.

Training casts each factor where an op uses it: a Trinity-Mini layer's forward and its recompute + backward cast some
fifty small tensors one launch each (1,507 bf16 copy kernels in a 32-layer step, H200 profile in
benchmarks/results.jsonl). Inside a `layer_casts` scope (graphed checkpointing opens one around each layer's forward
and around its recompute + backward) the layer's float32 trainable tensors are cast together by one multi-tensor copy,
and `cast` hands out views of those casts: the same values (round to nearest even either way), one launch.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_ACTIVE: contextvars.ContextVar[CastCache | None] = contextvars.ContextVar("fastmoe_reused_casts", default=None)
# Process-wide, not a context variable: autograd runs the backward of a layer's recompute on its own device thread,
# whose casts the scope must serve too.
_layer_casts: LayerCasts | None = None


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


class LayerCasts:
    """sources (contiguous tensors of one dtype) cast to `dtype` by one multi-tensor copy; `lookup` gives the cast of
    a source or of any view of one."""

    def __init__(self, sources: list[torch.Tensor], dtype: torch.dtype):
        self.dtype = dtype
        casts = [torch.empty(s.shape, dtype=dtype, device=s.device) for s in sources]
        if casts:
            torch._foreach_copy_(casts, sources)
        self._by_storage: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for s, c in zip(sources, casts):
            self._by_storage.setdefault((s.device, s.untyped_storage().data_ptr()), []).append((s, c))

    def lookup(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if dtype != self.dtype:
            return None
        for whole, cast in self._by_storage.get((source.device, source.untyped_storage().data_ptr()), ()):
            offset = source.storage_offset() - whole.storage_offset()
            last = offset + sum((size - 1) * stride for size, stride in zip(source.shape, source.stride()))
            if whole.dtype == source.dtype and 0 <= offset and last < whole.numel() and source.numel():
                # Both contiguous, one shape: a view's strides and offset address the same elements of either.
                return cast.as_strided(source.shape, source.stride(), offset)
        return None


@contextlib.contextmanager
def layer_casts(sources: list[torch.Tensor], dtype: torch.dtype):
    """Within: `cast(t, dtype)` of any of `sources` (or a view of one) returns a view of their casts, made here by
    one multi-tensor copy. sources: a layer's trainable tensors in another floating dtype (peft's LoRA factors),
    contiguous, not changed in place within (their values are read once, here)."""
    global _layer_casts
    previous = _layer_casts
    _layer_casts = LayerCasts([s.detach() for s in sources], dtype)
    try:
        yield
    finally:
        _layer_casts = previous


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
    if source.requires_grad and torch.is_grad_enabled():  # autograd must see the cast
        return source.to(dtype)
    if _layer_casts is not None and source.dtype != dtype:
        found = _layer_casts.lookup(source, dtype)
        if found is not None:
            return found
    cache = _ACTIVE.get()
    if cache is None:
        return source.to(dtype)
    return cache.cast(source, dtype)


def derived(source: torch.Tensor, name: str, make) -> torch.Tensor:
    """make() (a tensor computed from `source` alone, such as an NF4 weight's fp32 absmax), or the active scope's
    reused one (never under torch.compile)."""
    cache = _ACTIVE.get()
    if cache is None or torch.compiler.is_compiling():
        return make()
    return cache.derived(source, name, make)
