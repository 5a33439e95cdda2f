"""Whether the decoder layer running now is a checkpointed layer's recompute for its backward.

A recompute rebuilds what the layer's backward reads; nothing reads the layer's output values there (the backward
differentiates them with the gradients it is handed). The layers use that to skip the products whose outputs only
the layer's output sum takes (fastmoe.models.shared `unread_in_recompute`). Graphed checkpointing sets the flag in its
backward body (`recomputing`); torch's non-reentrant checkpoint, wherever fastmoe installs it, has its recompute
marked by `marking_recompute`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

# A context variable: autograd's backward thread, which runs a checkpointed layer's recompute, sets and reads it there.
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastmoe_recomputing", default=False)


def recomputing_for_backward() -> bool:
    """Whether the decoder layer running now is a checkpointed layer's recompute, whose output's value nothing
    reads."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def recomputing():
    """Within: recomputing_for_backward() is true."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def marked(function: Callable) -> Callable:
    """`function` for torch's non-reentrant checkpoint: its first call is the forward, every later one a recompute
    for a backward, run inside `recomputing()`. torch's checkpoint keeps nothing from the recompute but the tensors
    autograd saves, and the skipped outputs save none."""
    calls = 0

    def run(*args: Any, **kwargs: Any):
        nonlocal calls
        calls += 1
        if calls == 1:
            return function(*args, **kwargs)
        with recomputing():
            return function(*args, **kwargs)

    return run


def marking_recompute(checkpoint_function: Callable) -> Callable:
    """checkpoint_function (torch's non-reentrant checkpoint) with each checkpointed function `marked`."""

    def checkpointed(function: Callable, *args: Any, **kwargs: Any):
        return checkpoint_function(marked(function), *args, **kwargs)

    return checkpointed
