"""Choosing between an op's Triton kernel and its PyTorch reference.

Triton runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (how CI tests every kernel).
Anything else takes the PyTorch reference, so a CPU user without the interpreter still gets exact results.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_state = threading.local()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run for these tensors."""
    if getattr(_state, "reference_only", False):
        return False
    if any(t.is_cuda for t in tensors if t is not None):
        return True
    if interpreter_enabled():
        # The interpreter has no bf16 support worth trusting (NaNs seen with triton 3.9).
        return all(t.dtype != torch.bfloat16 for t in tensors if t is not None)
    return False


@contextlib.contextmanager
def reference_only():
    """Run every fastmoe op through its PyTorch reference inside this block (tests compare both paths)."""
    previous = getattr(_state, "reference_only", False)
    _state.reference_only = True
    try:
        yield
    finally:
        _state.reference_only = previous
