"""Sliding-window causal attention through the flash-attention kernel that ships inside PyTorch.

transformers' SDPA path hands a sliding-window layer a dense (query, key) boolean mask once the sequence is
longer than the window. SDPA cannot run its flash kernel with a mask, so it falls back to a masked kernel that
computes every (query, key) pair, the masked-out ones included: at AFMoE's 4096 tokens and 2048-token window that
is 16.8M pairs for the 6.3M the window keeps, plus reading the mask. PyTorch's flash-attention op takes the
window as two integers and skips the blocks outside it; it also takes fewer key/value heads than query heads, so
grouped-query attention needs no repeat of keys and values. Its autograd formula is PyTorch's own.

The fast path is taken only when the mask transformers built is exactly the plain sliding-window causal pattern
(no padding, no packing, no cache offset), so any other mask keeps transformers' path and its semantics.

Better still is never to build the mask. A dense (query, key) mask costs seq^2 bytes, built and compared on every
forward: 4 GiB at 65,536 tokens, with several times that in temporaries while transformers builds it. A model whose
forward fastmoe owns (AFMoE's), and the mask functions of the families whose forward is transformers', hand the
layers a `FlashCausal` instead when the batch has no cache and no padding other than on the right: causal attention
within each document, with the layer's window. Packed rows (position_ids restarting, trl's padding-free batches)
become the flash kernel's variable-length form: the documents' token offsets, so no query ever looks at another
document's keys, and no time is spent on the pairs between documents. A right-padded row's padding (trl's collators
pad on the right) is one more document: the row's tokens never see it, as under the mask. The padded positions
themselves attend differently (to the padding, where the mask shows them their row's tokens), which no loss sees
unless its labels score them: the loss forwards then keep the masks for padded batches (`masks_for_scored_padding`).

A `FlashCausal` without window or documents (plain causal rows of at least CUDNN_MIN_SEQ tokens) runs cuDNN's
fused attention instead on Hopper GPUs: PyTorch's `_scaled_dot_product_cudnn_attention`, which also takes fewer
key/value heads than query heads. On an H200 (cuDNN 9.19, bf16, 32 query heads) its forward + backward took
1.1 ms against flash's 1.9 at 4,096 tokens (4 or 32 key/value heads, head_dim 128), 0.70 against 1.09 at head_dim
64, 14.4 against 23.9 at 16,384 tokens and 1.2 against 1.9 for 4 rows of 2,048; at 1,024 tokens it was slower
(0.41 against 0.32). Both are within the same distance of fp32 (2-3e-3). This path gives cuDNN no document
offsets, so packed layouts stay on flash.

A window at least as long as the row is plain causal attention, and runs the same way (4 x 2,048-token rows of
Trinity-Mini's 2,048-token window). PyTorch's cuDNN op takes no window, only an additive bias: Trinity-Mini's window
at 4,096 tokens given to it as a (seq, seq) bias of 0 and -inf took 2.15 ms forward + backward against flash's 1.47
(benchmarks/bench_sliding_window_attention.py), so shorter windows stay on flash.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.utils._pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from fastmoe import kept_attention
from fastmoe.graphed_checkpointing import as_graph_data
from fastmoe.host_copies import on_host, to_device
from fastmoe.patching import ForwardPatch

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


@dataclasses.dataclass(frozen=True)
class FlashCausal:
    """What a layer's attention mask would say for a batch with no padding and no cache, without the mask: causal
    within each document, keys limited to `window` positions back (None: no limit). `document_offsets`, for packed
    rows only, holds where each document starts in the flattened (batch x seq) tokens and, last, their total (int32,
    on the device); `longest_document` bounds their longest (flash's maximum length, see packed_documents). Unpacked,
    each row is one document and both are None."""

    window: int | None = None
    document_offsets: torch.Tensor | None = None
    longest_document: int | None = None


# Graphed checkpointing flattens a layer's arguments: the offsets are a tensor leaf (compared step to step like any
# integer argument), the window and longest document part of the call's structure (its signature).
pytree.register_pytree_node(
    FlashCausal,
    lambda layout: ([layout.document_offsets], (layout.window, layout.longest_document)),
    lambda children, context: FlashCausal(context[0], children[0], context[1]),
)


def flash_supports(config, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's flash kernel can run this model's attention: the same limits as
    can_use_flash_sliding_window, read from the config before any query exists."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256 and heads % kv_heads == 0 and torch.backends.cuda.flash_sdp_enabled()
            and _flash_takes_a_window())


# The flash kernels' grid spans offsets x longest document: a longest document that changes from batch to batch
# (trl's padded batches of a few examples of varied lengths: 4 x 2,048 and 2 x 4,096 pack into 4 or 8 offsets) makes
# one row length need graphs per longest. Given as the row's length it is one signature per length, for at most
# this many times the blocks of the row's tokens in the grid, the extra ones empty. Trinity-Mini's 8 layers on trl's
# padded batches (H100, bench_sft.py --data examples, 2026-12-07): 2 x 4096 +21-26% tokens/s, 4 x 2048 +5-8%, the
# replays both rules ran within 0.7% of each other; at 8 x 1024's 16 offsets the row's length took flash 9% longer
# (bench_sliding_window_attention.py --packed 8x1024) for one step in 40 more on graphs (graph_places.py), so 8.
ROW_AS_LONGEST_MAX_OFFSETS = 8


def packed_documents(position_ids: torch.Tensor | None, padding: torch.Tensor | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, int] | None:
    """(document offsets on `device` (position_ids' by default), a bound on the longest document, flash's maximum
    length: see below) of a batch whose position_ids restart where a document starts (a new document wherever the
    position does not follow the previous one by 1: transformers' rule for packed rows), or None when every row is
    one document. `padding` (batch, seq), boolean on the host, True at the padded tokens of right-padded rows: each
    row's padded tail is a document of its own, so no token of the row attends to it (the mask's rule), and it
    attends only to itself (its outputs go to no loss). Reads position_ids on the host: one sync, none where they
    have a host copy (fastmoe.host_copies)."""
    # position_ids may be one row for the whole batch (transformers' default, arange): as padding's rows then.
    batch, seq = (padding if padding is not None else position_ids).shape
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    starts[:, 0] = True
    if position_ids is not None:
        positions = on_host(position_ids).to(torch.int64).expand(batch, seq)
        starts[:, 1:] |= positions[:, 1:] - positions[:, :-1] != 1
    if padding is not None:
        starts[:, 1:] |= padding[:, 1:] != padding[:, :-1]
    flat_starts = starts.flatten().nonzero().flatten()
    documents = flat_starts.numel()
    if documents == batch:
        return None
    total = batch * seq
    # One form for every batch of as many tokens and up to as many documents, so that a layer's CUDA graph
    # (fastmoe.graphed_checkpointing, which copies the offsets in as data) replays for the next batch's documents:
    # the offsets padded with empty documents to a power of two, and the longest document given as the row's
    # length where there are at most ROW_AS_LONGEST_MAX_OFFSETS offsets, else rounded up to a power of two (at most
    # the tokens). Flash reads each document's length from the offsets: the empty documents' blocks, and those past
    # each document's end, return at once.
    count = _power_of_two_above(documents)
    offsets = torch.full((count,), total)
    offsets[:documents] = flat_starts
    if count <= ROW_AS_LONGEST_MAX_OFFSETS:
        longest = total
    else:
        longest = int(torch.diff(flat_starts, append=torch.tensor([total])).max())
        longest = min(_power_of_two_above(longest - 1), total)
    device = device if device is not None else position_ids.device
    return to_device(offsets.to(torch.int32), device), longest


def _power_of_two_above(n: int) -> int:
    """The least power of two greater than n >= 0."""
    return 1 << n.bit_length()


# True while a loss whose labels score padded positions runs (see the module's docstring).
_padding_is_scored = contextvars.ContextVar("padding_is_scored", default=False)


@contextlib.contextmanager
def masks_for_scored_padding(scored: bool):
    """While `scored` (the running loss scores padded positions), a right-padded batch gets transformers' masks,
    not layouts: only the masks give padded positions what transformers computes for them. Not scored changes
    nothing (torch.compile cannot trace a context variable's set; compiled forwards take the masks anyway)."""
    if not scored:
        yield
        return
    token = _padding_is_scored.set(True)
    try:
        yield
    finally:
        _padding_is_scored.reset(token)


def layouts_replace_masks(config, device: torch.device, dtype: torch.dtype, past_key_values, training: bool,
                          implementations: tuple[str, ...] = ("sdpa",)) -> bool:
    """Whether a forward of this model gets flash layouts instead of masks, its attention mask aside (see
    flash_causal_layout): one of `implementations` asked for, flash able to run it, no cache, no attention dropout
    while training, not under torch.compile."""
    return not (torch.compiler.is_compiling() or config._attn_implementation not in implementations
                or past_key_values is not None
                or (training and getattr(config, "attention_dropout", 0.0))
                or not flash_supports(config, device, dtype))


def flash_causal_layout(config, inputs_embeds: torch.Tensor, attention_mask, position_ids, past_key_values,
                        training: bool, implementations: tuple[str, ...] = ("sdpa",)
                        ) -> tuple[FlashCausal, FlashCausal] | None:
    """(full-attention layout, sliding-window layout) for a forward whose layers can skip the dense masks, else
    None (transformers' masks then): one of `implementations` asked for (the attention implementations whose
    result the family's flash path computes), flash able to run it, no cache, no attention dropout while
    training, and an attention mask that is absent, all ones or right padding (each row's tokens, then its padding,
    as trl's collators pad; read on the host, one sync unless it has a host copy: fastmoe.host_copies). Under
    torch.compile, None: the compiled graph traces transformers' masks (the offsets are read on the host)."""
    if not layouts_replace_masks(config, inputs_embeds.device, inputs_embeds.dtype, past_key_values, training,
                                 implementations):
        return None
    padding = None
    if attention_mask is not None:
        if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
                or attention_mask.shape != inputs_embeds.shape[:2]):
            return None
        keep = on_host(attention_mask).to(torch.bool)
        if not bool(keep.all()):
            # Right padding only: a padded tail, as a document of its own, is never attended by the row's tokens,
            # as under the mask. Padding before or between tokens, or padding a loss scores, keeps the masks.
            if not bool((keep[:, 1:] <= keep[:, :-1]).all()) or _padding_is_scored.get():
                return None
            padding = ~keep
    packed = None
    if position_ids is not None or padding is not None:
        packed = packed_documents(position_ids, padding, device=inputs_embeds.device)
    offsets, longest = packed if packed is not None else (None, None)
    if packed is not None:  # the layers only hand these to kernels (see packed_documents)
        as_graph_data(offsets, position_ids)
    window = getattr(config, "sliding_window", None)
    return FlashCausal(None, offsets, longest), FlashCausal(window, offsets, longest)


# Rows shorter than this keep flash for plain causal attention too (see the module's docstring).
CUDNN_MIN_SEQ = 2048


def _cudnn_runs(query: torch.Tensor, layout: FlashCausal) -> bool:
    """Whether cuDNN's fused attention takes the batch: plain causal rows (no documents, no window shorter than the
    rows) of at least CUDNN_MIN_SEQ tokens, a Hopper GPU (where it was measured), cuDNN attention enabled in
    torch.backends and head_dim up to 128."""
    seq = query.shape[2]
    return ((layout.window is None or layout.window >= seq) and layout.document_offsets is None and query.is_cuda
            and seq >= CUDNN_MIN_SEQ and query.shape[3] <= 128 and query.shape[3] % 8 == 0
            and torch.backends.cuda.cudnn_sdp_enabled() and _is_hopper(query.device.index))


@functools.cache
def _is_hopper(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def flash_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: FlashCausal,
                           scale: float) -> torch.Tensor:
    """Attention as `layout` describes it. query (batch, heads, seq, head_dim); key and value (batch, kv_heads,
    seq, head_dim). Returns (batch, seq, heads, head_dim), the layout transformers' attention functions return.
    Inside graphed checkpointing the recompute reuses the forward's output (fastmoe.kept_attention)."""
    batch, _, seq, _ = query.shape
    if _cudnn_runs(query, layout):
        def cudnn_forward(keep_lse: bool):
            # The log-sum-exp is the backward's: skipped where no gradient will be taken (the first, no-grad
            # forward of a checkpointed layer), unless kept for its recompute.
            needs_lse = keep_lse or (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
            output, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = \
                torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, needs_lse, 0.0, True,
                                                                   False, scale=scale)
            return output, (lse, seed, offset, cum_q, cum_k, max_q, max_k)

        def cudnn_backward(grad, q, k, v, output, aux):
            lse, seed, offset, cum_q, cum_k, max_q, max_k = aux
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad, q, k, v, output, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)

        return kept_attention.run(query, key, value, cudnn_forward, cudnn_backward).transpose(1, 2)
    window = {} if layout.window is None else dict(window_size_left=layout.window - 1, window_size_right=0)
    if layout.document_offsets is None:
        # The kernel reads (batch, seq, heads, head_dim) with a unit last stride: transposed views of our layout.
        tokens = [t.transpose(1, 2) for t in (query, key, value)]
        offsets, longest = None, seq
    else:
        # Variable-length form: every document a sequence of its own, the rows' tokens end to end.
        tokens = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3]) for t in (query, key, value)]
        offsets, longest = layout.document_offsets, layout.longest_document

    def flash_forward(keep_lse: bool):
        output, *aux = _flash_forward(*tokens, offsets, longest, scale, window)
        return output, tuple(aux)

    def flash_backward(grad, q, k, v, output, aux):
        return _flash_backward(grad, q, k, v, output, aux[0], offsets, longest, scale, window, *aux[1:])

    output = kept_attention.run(*tokens, flash_forward, flash_backward)
    return output.view(batch, seq, *output.shape[-2:])


def _layout_mask(layout: FlashCausal, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """The dense (batch, 1, seq, seq) boolean mask `layout` stands for (True = attend)."""
    position = torch.arange(batch * seq, device=device)
    if layout.document_offsets is None:
        document = position // seq
    else:
        document = torch.searchsorted(layout.document_offsets[1:-1].to(torch.int64), position, right=True)
    distance = position[:, None] - position[None, :]
    keep = (distance >= 0) & (document[:, None] == document[None, :])
    if layout.window is not None:
        keep &= distance < layout.window
    return keep.view(batch, seq, batch, seq).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[:, None]  # within each row


def reference_flash_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     layout: FlashCausal, scale: float) -> torch.Tensor:
    """SDPA with the dense mask `layout` stands for; the same layouts as flash_causal_attention."""
    batch, _, seq, _ = query.shape
    keep = _layout_mask(layout, batch, seq, query.device)
    groups = query.shape[1] // key.shape[1]
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), attn_mask=keep,
        scale=scale)
    return output.transpose(1, 2)


# Attention with sinks (gpt-oss): each head has a learned logit that joins every query's softmax and contributes no
# value. With o and lse the attention output and log-sum-exp over the keys, the output is
#     y = o * sigmoid(lse - sink),
# so the flash kernel computes it unchanged. For the backward, with Q = P * sigmoid(lse - sink) the probabilities
# with the sink in the denominator, d(score) = Q * (dy . v - dy . y). Flash's backward computes
# P * (do . v - do . out) from (do, out, lse); given do = dy * sigmoid(lse - sink) and out = y it is exactly that,
# and d(value) = P^T do = Q^T dy. The sink's gradient is -sum over queries of (1 - sigmoid(lse - sink)) * (dy . y).
# The kernels are PyTorch's flash forward and backward, called in their variable-length form (a batch without
# packing is rows of equal length), whose log-sum-exp is (heads, tokens).

def _flash_forward(query, key, value, offsets, longest, scale, window):
    """PyTorch's flash forward: (output, logsumexp, rng_state, unused). Variable-length form on token-major
    (tokens, heads, head_dim) inputs with their offsets (logsumexp (heads, tokens)), or rows (batch, seq, heads,
    head_dim) with offsets None and longest the rows' length."""
    output, logsumexp, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        query, key, value, offsets, offsets, longest, longest, 0.0, True, False, scale=scale, **window)
    return output, logsumexp, rng_state, unused


def _flash_backward(grad_output, query, key, value, output, logsumexp, offsets, longest, scale, window, rng_state,
                    unused):
    """PyTorch's flash backward for _flash_forward: (d query, d key, d value)."""
    return torch.ops.aten._flash_attention_backward(
        grad_output, query, key, value, output, logsumexp, offsets, offsets, longest, longest, 0.0, True, rng_state,
        unused, scale=scale, **window)


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, sinks, offsets, longest, scale, window):
        output, logsumexp, rng_state, unused = _flash_forward(query, key, value, offsets, longest, scale, window)
        if logsumexp.shape != query.shape[1::-1]:
            raise RuntimeError(f"this PyTorch's flash kernel gives a log-sum-exp of shape {tuple(logsumexp.shape)}, "
                               f"not (heads, tokens) = {tuple(query.shape[1::-1])}: attention with sinks cannot use it")
        # fp32 arithmetic for 16-bit inputs (fp64 stays fp64).
        wide = torch.promote_types(output.dtype, torch.float32)
        keep = torch.sigmoid(logsumexp.to(wide) - sinks.to(wide)[:, None]).t()[:, :, None]  # (tokens, heads, 1)
        output = (output.to(wide) * keep).to(output.dtype)
        ctx.save_for_backward(query, key, value, output, logsumexp, keep, offsets, rng_state, unused)
        ctx.longest, ctx.scale, ctx.window, ctx.sinks_dtype = longest, scale, window, sinks.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, logsumexp, keep, offsets, rng_state, unused = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        scaled = (grad_output.to(keep.dtype) * keep).to(grad_output.dtype)
        dq, dk, dv = _flash_backward(scaled, query, key, value, output, logsumexp, offsets, ctx.longest, ctx.scale,
                                     ctx.window, rng_state, unused)
        dot = (grad_output.to(keep.dtype) * output.to(keep.dtype)).sum(-1, keepdim=True)  # (tokens, heads, 1)
        dsinks = -((1.0 - keep) * dot).sum((0, 2))
        return dq, dk, dv, dsinks.to(ctx.sinks_dtype), None, None, None, None


def flash_causal_attention_with_sinks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                      sinks: torch.Tensor, layout: FlashCausal, scale: float) -> torch.Tensor:
    """flash_causal_attention with a sink logit per head (sinks (heads,), trainable): same layouts."""
    batch, heads, seq, head_dim = query.shape
    tokens = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], head_dim) for t in (query, key, value)]
    if layout.document_offsets is None:
        offsets = torch.arange(0, batch * seq + 1, seq, device=query.device, dtype=torch.int32)
        longest = seq
    else:
        offsets, longest = layout.document_offsets, layout.longest_document
    window = {} if layout.window is None else dict(window_size_left=layout.window - 1, window_size_right=0)
    output = _SinkAttention.apply(*tokens, sinks, offsets, longest, scale, window)
    return output.view(batch, seq, heads, head_dim)


def reference_flash_causal_attention_with_sinks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                                sinks: torch.Tensor, layout: FlashCausal,
                                                scale: float) -> torch.Tensor:
    """Eager attention with sinks (transformers' gpt-oss formula) under the dense mask `layout` stands for; the
    same layouts as flash_causal_attention_with_sinks."""
    batch, heads, seq, _ = query.shape
    groups = heads // key.shape[1]
    logits = query @ key.repeat_interleave(groups, dim=1).transpose(2, 3) * scale
    logits = logits.masked_fill(~_layout_mask(layout, batch, seq, query.device), float("-inf"))
    logits = torch.cat([logits, sinks.to(logits.dtype).view(1, heads, 1, 1).expand(batch, heads, seq, 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(value.dtype)
    return (probs @ value.repeat_interleave(groups, dim=1)).transpose(1, 2)


def _layout_instead(original: Callable, which: int, implementations: tuple[str, ...]) -> Callable:
    """transformers' mask function `original`, returning the layout flash_causal_layout gives (its `which`: 0 full,
    1 sliding window) instead of a mask wherever it gives one; custom mask functions, block ids, a cache or padding
    keep the original. Called once per forward, before the layers run."""

    @functools.wraps(original)
    def create(config, inputs_embeds, attention_mask, past_key_values, position_ids=None, **kwargs):
        custom = any(kwargs.get(name) is not None
                     for name in ("or_mask_function", "and_mask_function", "block_sequence_ids"))
        layouts = None if custom else flash_causal_layout(
            config, inputs_embeds, attention_mask, position_ids, past_key_values, training=True,
            implementations=implementations)
        if layouts is None:
            return original(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            past_key_values=past_key_values, position_ids=position_ids, **kwargs)
        return layouts[which]

    return create


def mask_layout_patches(modeling: ModuleType, implementations: tuple[str, ...] = ("sdpa",)) -> list:
    """ForwardPatches for a family whose model forward (transformers' own) builds its masks with the module-level
    `create_causal_mask` / `create_sliding_window_causal_mask` of `modeling`: those return FlashCausal layouts
    where flash runs the attention. They belong with the family's attention op, whose forward reads the layouts
    (an `isinstance(attention_mask, FlashCausal)` branch), so that switching that op off gives transformers'
    attention its masks back. `implementations`: the configured attention implementations that path stands in for
    (the others, flex attention or a flash kernel the user chose, keep their masks)."""
    return [ForwardPatch(modeling, name, _layout_instead(getattr(modeling, name), which, implementations))
            for which, name in enumerate(("create_causal_mask", "create_sliding_window_causal_mask"))
            if hasattr(modeling, name)]
