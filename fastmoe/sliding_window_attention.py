"""Sliding-window causal attention through the flash-attention kernel that ships inside PyTorch.

transformers' SDPA path hands a sliding-window layer a dense (query, key) boolean mask once the sequence is
longer than the window. SDPA cannot run its flash kernel with a mask, so it falls back to a masked kernel that
computes every (query, key) pair, the masked-out ones included: at AFMoE's 4096 tokens and 2048-token window that
is 16.8M pairs for the 6.3M the window keeps, plus reading the mask. PyTorch's flash-attention op takes the
window as two integers and skips the blocks outside it; it also takes fewer key/value heads than query heads, so
grouped-query attention needs no repeat of keys and values. Its autograd formula is PyTorch's own.

The fast path is taken only when the mask transformers built is exactly the plain sliding-window causal pattern
(no padding, no packing, no cache offset), so any other mask keeps transformers' path and its semantics.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

# A forward builds its sliding-window mask once and hands the same tensor to every sliding layer, and gradient
# checkpointing hands it again to the recomputation: the verdict, which costs a device-to-host sync, is kept per
# mask tensor (and window) for as long as that tensor lives.
_mask_verdicts = WeakIdKeyDictionary()  # keyed by identity: a tensor's == is elementwise


@functools.cache
def _flash_takes_a_window() -> bool:
    """Whether this PyTorch's flash op has the window arguments (read once: it is asked per layer per forward)."""
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return "window_size_left" in schema


def sliding_window_causal_mask(seq_len: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(seq_len, seq_len) boolean: query q sees key k when k <= q and q - k < window, as transformers'
    `sliding_window_overlay` on a causal mask (True = attend)."""
    position = torch.arange(seq_len, device=device)
    distance = position[:, None] - position[None, :]
    return (distance >= 0) & (distance < window)


def is_plain_sliding_window_mask(mask: torch.Tensor | None, seq_len: int, window: int) -> bool:
    """Whether `mask` (batch, 1 or heads, seq_len, seq_len), boolean, is the sliding-window causal pattern for
    every row of the batch: no padded or packed tokens and no cached keys."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (seq_len, seq_len):
        return False
    verdicts = _mask_verdicts.setdefault(mask, {})
    if window not in verdicts:
        expected = sliding_window_causal_mask(seq_len, window, mask.device)
        verdicts[window] = bool(torch.equal(mask, expected.expand_as(mask)))
    return verdicts[window]


def can_use_flash_sliding_window(query: torch.Tensor, key: torch.Tensor) -> bool:
    """The flash kernel's own limits: CUDA, fp16/bf16, head_dim a multiple of 8 up to 256, query heads a
    multiple of key heads. query and key are (batch, heads, seq, head_dim)."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and query.shape[1] % key.shape[1] == 0
        and torch.backends.cuda.flash_sdp_enabled()
        and _flash_takes_a_window()
    )


def flash_sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                                   scale: float) -> torch.Tensor:
    """Causal attention where query q sees keys q - window + 1 .. q. query (batch, heads, seq, head_dim); key and
    value (batch, kv_heads, seq, head_dim). Returns (batch, seq, heads, head_dim), the layout transformers'
    attention functions return."""
    seq_len = query.shape[2]
    # The kernel reads (batch, seq, heads, head_dim) with a unit last stride; our q/k/v are transposed views of
    # exactly that layout, so these transposes are free.
    output, *_ = torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, None, seq_len, seq_len,
        0.0, True, False, scale=scale, window_size_left=window - 1, window_size_right=0,
    )
    return output


def reference_sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                                       scale: float) -> torch.Tensor:
    """SDPA with the dense sliding-window mask, as transformers computes it; same layouts as the flash path."""
    groups = query.shape[1] // key.shape[1]
    mask = sliding_window_causal_mask(query.shape[2], window, query.device)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), attn_mask=mask,
        scale=scale,
    )
    return output.transpose(1, 2)
