"""Attention outputs kept from a checkpointed layer's forward, so that its recompute skips attention's forward kernel.

Why: a checkpointed layer runs its forward twice, once without autograd and once, in the backward, to rebuild what the
backward reads. For attention that recompute is a whole flash (or cuDNN) forward, whose result the backward needs only
as the output and its log-sum-exp: Trinity-Mini's sliding-window layer spends 0.43 ms of its 1.47 ms forward + backward
there (H200, 4,096 tokens, benchmarks/bench_sliding_window_attention.py). Keeping those two from the first forward
costs the output's size per layer (32 MB at 4,096 tokens for Trinity-Mini's 32 heads of 128) and the log-sum-exp's
(0.5 MB).

How: graphed checkpointing (fastmoe.graphed_checkpointing) runs a layer's forward under `keeping(kept)` and its
recompute under `reusing(kept)`, with one `KeptAttention` per layer and signature. An attention function hands `run`
its kernel as two halves: `forward(needs_lse) -> (output, aux)` and `backward(grad, query, key, value, output, aux) ->
(d query, d key, d value)`. Keeping, run stores (output, aux) in call order; reusing, it returns the stored output
through an autograd node whose backward is the kernel's. Outside both, run is the kernel's forward with its own
autograd formula, as before. A backward whose forward's outputs a later forward of the layer has replaced (two
forwards before their backwards) must not reuse them: `generation` tells the caller.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import torch

Forward = Callable[[bool], tuple[torch.Tensor, tuple]]
Backward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple], tuple]


class KeptAttention:
    """The (output, aux) of each attention call of one layer's last forward, in call order."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, tuple]] = []
        # Forwards run so far (their caller counts them: a CUDA graph's replay runs no Python): a backward reuses only
        # its own forward's entries.
        self.generation = 0
        self.reading = False
        self.cursor = 0


_ACTIVE: contextvars.ContextVar[KeptAttention | None] = contextvars.ContextVar("fastmoe_kept_attention",
                                                                              default=None)


@contextlib.contextmanager
def keeping(kept: KeptAttention):
    """A forward without autograd whose attention outputs are kept in `kept` (replacing the previous forward's)."""
    kept.entries, kept.reading, kept.cursor = [], False, 0
    token = _ACTIVE.set(kept)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def reusing(kept: KeptAttention):
    """The recompute of the forward `kept` holds: its attention calls return the kept outputs."""
    kept.reading, kept.cursor = True, 0
    token = _ACTIVE.set(kept)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class _FromKept(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query, key, value, output, aux: tuple, backward: Backward):
        ctx.save_for_backward(query, key, value, output)
        ctx.aux, ctx.kernel_backward = aux, backward
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad):
        query, key, value, output = ctx.saved_tensors
        grads = ctx.kernel_backward(grad, query, key, value, output, ctx.aux)
        return (*grads[:3], None, None, None)


def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, forward: Forward, backward: Backward
        ) -> torch.Tensor:
    """The attention output of the kernel whose halves are `forward` and `backward` on (query, key, value)."""
    kept = _ACTIVE.get()
    if kept is None:
        return forward(False)[0]
    if not kept.reading:
        output, aux = forward(True)
        kept.entries.append((output, aux))
        return output
    if kept.cursor >= len(kept.entries):  # not called in the forward (cannot happen under one signature): compute
        return forward(False)[0]
    output, aux = kept.entries[kept.cursor]
    kept.cursor += 1
    return _FromKept.apply(query, key, value, output, aux, backward)
