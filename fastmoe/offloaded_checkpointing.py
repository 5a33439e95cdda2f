"""Gradient checkpointing with each decoder layer's input kept in host memory: `use_gradient_checkpointing="fastmoe"`.

Standard checkpointing recomputes every decoder layer in the backward pass and keeps only the layer's input, one
(batch, seq, hidden) tensor per layer, on the GPU; at long sequences those inputs are what still grows with depth.
Here they go to pinned host memory as soon as the layer has read them (an asynchronous copy on a side CUDA stream,
overlapping the next layers' forward) and come back when the backward pass recomputes the layer, so GPU activation
memory is that of one layer whatever the depth.

How it is built: torch's non-reentrant `checkpoint` saves the checkpointed function's tensor arguments through the
ordinary saved-tensor machinery *before* it installs its own hooks for the function's body, so a
`saved_tensors_hooks` pair opened around the `checkpoint` call sees exactly the layer's inputs and nothing from inside
the layer (those become checkpoint's recompute placeholders). That gives the offload in a few lines, and keeps
everything else of torch's implementation: kwargs pass through untouched (transformers binds the position
embeddings, masks and cache=None into a partial; one copy serves every layer, so they stay on the GPU), autocast is
replayed, and the RNG state is restored for the
recompute (`preserve_rng_state=True`), so LoRA dropout draws the same masks twice. A custom autograd Function would
have to redo all of that; the reentrant variant runs a backward of its own and needs the inputs to require grad.

transformers calls the function per layer: every `GradientCheckpointingLayer` runs
`self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)` when checkpointing is on and the
model is training, so evaluation and generation never checkpoint. `fastmoe.checkpointing` installs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from fastmoe.recompute import marked

# One copy stream per GPU, made on first use: the device-to-host copies queue there, behind the compute that wrote
# each tensor, and never in front of the next layer's kernels.
_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


@dataclass
class HostCopy:
    """A saved layer input while it lives in pinned host memory."""

    host: torch.Tensor
    device: torch.device
    # Recorded on the copy stream after the device-to-host copy; the backward pass waits on it before reading `host`.
    copied: torch.cuda.Event
    # The copy back to the device started ahead of its use (graphed checkpointing's HostInputs), and the event
    # recorded after it.
    prefetch: tuple[torch.Tensor, torch.cuda.Event] | None = None


def copy_stream_of(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


def offload_to_host(tensor: torch.Tensor) -> torch.Tensor | HostCopy:
    """Pack hook: start copying a CUDA tensor to pinned host memory and return its handle. A tensor already in host
    memory (CPU training) is kept as it is: the same path runs, with nothing to move."""
    if not tensor.is_cuda:
        return tensor
    compute_stream = torch.cuda.current_stream(tensor.device)
    copy_stream = copy_stream_of(tensor.device)
    # The tensor was written on the compute stream; the copy must not start before that.
    copy_stream.wait_stream(compute_stream)
    with torch.cuda.stream(copy_stream):
        host = torch.empty(tensor.size(), dtype=tensor.dtype, device="cpu", pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(copy_stream)
    # The caching allocator may hand the tensor's memory to the next layer as soon as the compute stream drops it;
    # recording the copy stream makes it wait for the copy to have read it first.
    tensor.record_stream(copy_stream)
    return HostCopy(host, tensor.device, copied)


def reload_to_device(packed: torch.Tensor | HostCopy) -> torch.Tensor:
    """Unpack hook, called when the backward pass recomputes the layer: bring the input back to its GPU.

    The copy back runs on the compute stream, which needs the tensor next anyway; a prefetch on the side stream
    would only hide one (seq, hidden) transfer per layer behind a whole layer's recompute and backward. The pinned
    buffer is not reused before this copy ends: the host allocator records the copy's stream and waits on it."""
    if isinstance(packed, torch.Tensor):
        return packed
    compute_stream = torch.cuda.current_stream(packed.device)
    compute_stream.wait_event(packed.copied)
    return packed.host.to(packed.device, non_blocking=True)


def checkpoint_with_offloaded_inputs(function: Callable[..., Any], *args: Any) -> Any:
    """Run `function(*args)` checkpointed: nothing inside it is kept for the backward pass, which recomputes it, and
    its tensor arguments are kept in host memory until then.

    `offload_to_host` and `reload_to_device` are looked up on every call, so a test can watch what is saved."""
    with torch.autograd.graph.saved_tensors_hooks(offload_to_host, reload_to_device):
        # The recompute marked, so that the layers skip the products whose output nobody reads there.
        return checkpoint(marked(function), *args, use_reentrant=False, preserve_rng_state=True)
