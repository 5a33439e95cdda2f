"""The host tensors that a training batch's device tensors were copied from, so that the forward reads them there.

A forward that drops padding or lays out documents (fastmoe.padding_free, fastmoe.sliding_window_attention) and
trl's fused LM head (fastmoe.trl_fused_head) read the attention mask, the labels and the position ids on the host:
which positions are padding, which are scored, where documents start. Read from the GPU, each such value waits for
everything queued before it, the previous step's backward and optimizer included, and the GPU then idles while the
host runs the forward's Python up to its first kernel: every step starts from a drained GPU. The batch came from
the host, though: where fastmoe's Trainer copies it (fastmoe.trainer_step), it remembers each device tensor's host
tensor here, and `on_host` hands that one back with no sync. What the forward computes on the host from them (the
scored positions' indices, a packed row's positions) goes to the GPU by `to_device`: from pinned memory, without
waiting, and remembered in turn.

A device tensor changed in place after its copy (its version counter moved), or whose host tensor was, is read
from the device again, as is any tensor that was not copied this way: the values are always the device tensor's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# device tensor -> (host tensor, the device tensor's version, the host tensor's version) when it was remembered;
# keyed by identity, as a tensor's == is elementwise, and weakly: an entry goes with its device tensor.
_host_copies = WeakIdKeyDictionary()


def remember(device_tensor: torch.Tensor, host_tensor: torch.Tensor) -> None:
    """Record that device_tensor holds host_tensor's values (copied from it, or computed alike)."""
    if device_tensor.device.type != "cpu" and host_tensor.device.type == "cpu":
        _host_copies[device_tensor] = (host_tensor, device_tensor._version, host_tensor._version)


def host_copy(tensor: torch.Tensor) -> torch.Tensor | None:
    """The remembered host tensor with tensor's values, or None (none remembered, or either changed since)."""
    entry = _host_copies.get(tensor)
    if entry is None:
        return None
    host, device_version, host_version = entry
    if tensor._version != device_version or host._version != host_version:
        return None
    return host


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    """tensor's values on the host: the tensor itself on the CPU, its remembered host copy (no sync), or a copy
    back from the device (a sync). The result may be the remembered tensor itself: read it, never write it."""
    if tensor.device.type == "cpu":
        return tensor
    host = host_copy(tensor)
    return host if host is not None else tensor.to("cpu")


def with_host_copy(function: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """function(tensor), with function(the host copy) remembered as its host copy where tensor has one. Under
    torch.compile, function(tensor) alone: a compiled forward reads nothing on the host (it keeps its padding and
    masks), and dynamo cannot trace the weak dictionary."""
    result = function(tensor)
    if torch.compiler.is_compiling():
        return result
    host = host_copy(tensor)
    if host is not None:
        remember(result, function(host))
    return result


def to_device(host_tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """host_tensor on `device`, remembered: to a GPU from pinned memory without waiting for the GPU (torch's host
    allocator keeps the pinned block until the copy has run), elsewhere as `.to` does."""
    device = torch.device(device)
    if device.type == "cuda" and host_tensor.device.type == "cpu":
        moved = host_tensor.pin_memory().to(device, non_blocking=True)
    else:
        moved = host_tensor.to(device)
    remember(moved, host_tensor)
    return moved
