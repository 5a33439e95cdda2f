"""Padded training batches run padding-free: their tokens end to end, as one packed row.

trl's SFTTrainer pads each batch on the right to its longest row at its defaults (8 rows, `padding_free=False`);
GRPO and RLOO score left-padded prompts followed by right-padded completions. Every layer then spends its norms,
projections, routing and experts on the padding, whose outputs go to no loss. Where a family runs packed rows on
flash layouts (documents told apart by their position_ids, no seq^2 masks: fastmoe.sliding_window_attention), the
forwards that compute the loss (fastmoe's fused loss, and trl's fused LM head on fastmoe's kernel) hand the backbone
the batch's real tokens as one row instead, each padded row a document keeping its positions, and score each token
against its row's shifted label. Every token sees what it saw in its padded row: attention over its row's tokens,
RoPE at its position, LFM2's short convolution from the row's first token (transformers zeroes the padding before
it). transformers' router load-balancing loss averages over the tokens its attention mask keeps, which are the
packed row's tokens. So the loss and every gradient are the padded batch's.

Only padding around one run of tokens per row, which no label scores, is dropped: a batch whose shifted labels score
a padded position (labels copied from input_ids with the pad token left in, as transformers' loss would then train
on) keeps its padding, and so do rows with gaps, calls that ask for per-position outputs (hidden states, attentions),
carry other per-position inputs, a cache, or run under torch.compile, and families whose packed-row ops are switched
off (`Family.packed_row_ops`).

Under graphed checkpointing (fastmoe.graphed_checkpointing) the packed row, a row that trl's padding-free collator
packed already, and a batch of one row without padding (one example a step) are rounded up with a filler document
that no label scores (`filler_for_graphs`), so that batches of nearby lengths give the layers one shape and replay
the same CUDA graphs. Where the router's load-balancing loss is asked for, the callers that leave the filler out of
it round rows: trl's fused head (fastmoe.trl_fused_head) and fastmoe's loss forward (fastmoe.models.causal_lm), both
with `PackedRows.filler_mask`.
"""

from __future__ import annotations

import dataclasses

import torch

from fastmoe import patching
from fastmoe.host_copies import on_host, to_device
from fastmoe.sliding_window_attention import layouts_replace_masks

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """A padded batch as one packed row: `inputs` are the backbone's keyword arguments for it (tokens (1, length),
    position_ids, no attention mask); `kept` (tokens,), on the device, indexes the flattened (batch x seq) positions
    the row holds, in order; `filler` tokens follow them (see filler_for_graphs)."""

    inputs: dict
    kept: torch.Tensor
    filler: int = 0

    def filler_mask(self) -> torch.Tensor:
        """(1, length) on the device: 1 for the row's tokens, 0 for the filler; as an attention mask, what
        transformers' load-balancing loss averages over."""
        length = self.kept.numel() + self.filler
        return (torch.arange(length, device=self.kept.device) < self.kept.numel()).long()[None]

    def take(self, shifted_labels: torch.Tensor) -> torch.Tensor:
        """(batch, seq) or (batch * seq,) shifted labels -> the packed row's (length,), the filler scoring nothing.
        Labels on the host are taken there (by `kept`'s host copy where it has one)."""
        kept_index = self.kept if shifted_labels.device == self.kept.device else on_host(self.kept)
        kept = shifted_labels.reshape(-1)[kept_index]
        return torch.cat([kept, kept.new_full((self.filler,), IGNORE_INDEX)]) if self.filler else kept


def _family_packs_rows(model, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `model`'s backbone runs a packed row on flash layouts: its family's packed-row ops are patched in
    and its layers would get layouts instead of masks."""
    from fastmoe.models import family

    config = model.config
    described = family(config.model_type)
    if described is None:
        return False
    ops = [patch for op in described.packed_row_ops for patch in described.ops[op]]
    return patching.is_patched(ops) and layouts_replace_masks(config, device, dtype, None, model.training,
                                                              described.layout_implementations)


# Triton specializes a kernel's integer arguments by whether they divide by 16 (and equal 1), so rows of any length
# compile each kernel taking token counts once more for each new combination: an eager step of Trinity-Mini's 8
# layers at 3,797 tokens took 7.2 s, ~8 s of compiles printed around it (H100, benchmarks/triton_compiles.py), and
# 0.8 s once rounded. Rows that no graph runs are rounded to this multiple, as graphed lengths of 128 tokens or more
# are.
EAGER_ROW_MULTIPLE = 16


def filler_for_graphs(model, inputs: dict, tokens: int, aux_loss_masks_filler: bool = False) -> int:
    """How many filler tokens round a packed row of `tokens` up for fastmoe's graphed checkpointing: to the next
    multiple of a quarter of the power of two below it (at most 25% more, ~12% on average; half of it, at most 50%,
    for rows of up to 4,096 tokens while the places fill: COARSE_ROUNDING_ROWS), so that batches of
    nearby lengths give the layers one shape and replay the same CUDA graphs (the offsets and position ids are their
    data, fastmoe.graphed_checkpointing); once the graphs' places are all taken by other lengths, up to the
    shortest of them within twice its own (GraphedCheckpoint.row_tokens_for_graphs). A row whose layers run eagerly
    all the same (no followed length near enough, beyond max_tokens) is rounded up to a multiple of 16 only. Zero
    without graphed checkpointing, and where the router's load-balancing loss is asked for unless the caller leaves
    the filler out of it (`aux_loss_masks_filler`; transformers' forwards average it over every token of a row
    without an attention mask)."""
    graphed = model.__dict__.get("_fastmoe_graphed_checkpoint")
    asks_router_logits = inputs.get("output_router_logits")
    if asks_router_logits is None:
        asks_router_logits = getattr(model.config, "output_router_logits", False)
    # transformers 5.23 renamed is_gradient_checkpointing to is_activation_checkpointing (the old name warns).
    checkpointing = getattr(type(model), "is_activation_checkpointing", None) or type(model).is_gradient_checkpointing
    if (graphed is None or not model.training or (asks_router_logits and not aux_loss_masks_filler)
            or not checkpointing.fget(model)):
        return 0
    return row_length_for_graphs(graphed, tokens) - tokens


# While the graphs' places fill (a graphed checkpoint's first COARSE_ROUNDING_ROWS rows), rows of up to
# COARSE_ROUNDING_MAX_TOKENS round up to a multiple of half the power of two below them instead of a quarter (at most
# 50% filler instead of 25%), so that fewer lengths need graphs: each costs an eager step and a capture
# (Trinity-Mini's 8 layers on an H100: ~170 and ~330 ms against a replay's 18 ms + 16 us a token, fitted to bench_sft
# --data examples' steps of 2026-12-07), which a short run (fastmoe's notebooks and `fastmoe train` stop at 60 steps)
# pays for most of its places. Later rows round to a quarter, and their lengths take places from the coarse ones where
# the cost rule finds the filler saved worth it (GraphedCheckpoint.row_tokens_for_graphs). Rows of up to 4,096 tokens
# round up to at most 4,096 either way, so the longest rows of a run, and its peak memory, stay as they were wherever
# its longest row is 3,585 tokens or more. Modeled with those costs (benchmarks/graph_places.py --step-costs,
# FITTED_STEP_COSTS there; time over an ideal run, quarter rounding throughout -> this; 60 / 200 / 1,000 / 3,000
# steps): 2 x 2,048 (the notebooks') 3.31 -> 2.58, 1.78 -> 1.55, 1.28 -> 1.22, 1.15 -> 1.13; 8 x 1,024 2.24 -> 1.96,
# 1.56 -> 1.41, 1.18 -> 1.20, 1.11 -> 1.11; 2 x 4,096 2.58 -> 2.15, 1.55 -> 1.45, 1.22 -> 1.21, 1.15 -> 1.15; 1 x
# 4,096 3.24 -> 2.86, 1.77 -> 1.58, 1.29 -> 1.21, 1.17 -> 1.15; 16 x 512 1.86 -> 1.87, 1.36 -> 1.36, 1.15 -> 1.19,
# 1.10 -> 1.11.
COARSE_ROUNDING_ROWS = 300
COARSE_ROUNDING_MAX_TOKENS = 4096


def row_length_for_graphs(graphed, tokens: int) -> int:
    """The length a packed row of `tokens` tokens trains at under `graphed` (a GraphedCheckpoint): see
    filler_for_graphs and COARSE_ROUNDING_ROWS."""
    coarse = graphed.rows_asked < COARSE_ROUNDING_ROWS and tokens <= COARSE_ROUNDING_MAX_TOKENS
    step = 1 << max(tokens.bit_length() - (2 if coarse else 3), 0)
    length = graphed.row_tokens_for_graphs(-(-tokens // step) * step)
    if length is None:  # eager layers: a multiple of EAGER_ROW_MULTIPLE
        length = -(-tokens // EAGER_ROW_MULTIPLE) * EAGER_ROW_MULTIPLE
    return length


def _asks_per_position_outputs(config, inputs: dict) -> bool:
    """Whether the call returns hidden states or attentions: those are per position of the padded batch."""
    for name in ("output_hidden_states", "output_attentions"):
        asked = inputs.get(name)
        if asked if asked is not None else getattr(config, name, False):
            return True
    return False


def scores_padding(attention_mask, shifted_labels: torch.Tensor) -> bool:
    """Whether a shifted label ((batch, seq) or (batch * seq,)) scores a position a (batch, seq) attention mask pads,
    read on the host (fastmoe.host_copies: one sync each for the mask and, where it pads, the labels, unless they
    have host copies). Under torch.compile, False: a compiled forward takes transformers' masks whatever its labels
    score."""
    if torch.compiler.is_compiling() or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return False
    return _labels_score(on_host(attention_mask) == 0, shifted_labels)


def _labels_score(padding: torch.Tensor, shifted_labels: torch.Tensor) -> bool:
    """scores_padding for `padding` (batch, seq) on the host, True where padded."""
    if shifted_labels.numel() != padding.numel() or not bool(padding.any()):
        return False
    return bool((on_host(shifted_labels).reshape(padding.shape)[padding] != IGNORE_INDEX).any())


# trl's padding-free collator also describes its packed row for flash-attention's variable-length kernels (and
# LFM2's convolution); fastmoe's layouts and convolution read the documents from position_ids alone, and a rounded
# row would no longer match these.
VARLEN_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def pack_padded_rows(model, inputs: dict, shifted_labels: torch.Tensor,
                     aux_loss_masks_filler: bool = False) -> PackedRows | None:
    """The packed row for a call of `model`'s backbone with keyword arguments `inputs`, whose shifted labels
    (batch, seq) or (batch * seq,) score each position's next token: a padded batch's tokens end to end, or a row
    packed already (trl's padding_free) rounded up for graphed checkpointing; None where the call keeps its rows (see
    the module's docstring). Reads the attention mask, the labels and any position_ids on the host (one sync each,
    none for those with host copies: fastmoe.host_copies), and hands the row's index tensors to the device without
    waiting for it. `aux_loss_masks_filler`: the caller computes the router's load-balancing loss with the filler
    masked out (PackedRows.filler_mask), so rows are rounded up for the graphs also where it is asked for."""
    if torch.compiler.is_compiling():  # shapes that depend on the mask's values: the compiled graph keeps the padding
        return None
    input_ids, inputs_embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    attention_mask, position_ids = inputs.get("attention_mask"), inputs.get("position_ids")
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None or tokens.dim() < 2:
        return None
    batch, seq = tokens.shape[:2]
    handled = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", *VARLEN_INPUTS)
    other_tensors = any(isinstance(value, torch.Tensor) and value.dim() > 0
                        for name, value in inputs.items() if name not in handled)
    if (shifted_labels.numel() != batch * seq or inputs.get("past_key_values") is not None or other_tensors
            or _asks_per_position_outputs(model.config, inputs)):
        return None
    embedding = model.get_input_embeddings().weight
    if not _family_packs_rows(model, embedding.device, embedding.dtype):
        return None
    if attention_mask is None:
        if position_ids is None and batch == 1:  # one example, as a plain loop passes it
            return _one_example(model, inputs, input_ids, None, embedding.shape[0], aux_loss_masks_filler)
        return _rounded_packed_row(model, inputs, input_ids, position_ids, embedding.shape[0], aux_loss_masks_filler)
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, seq)
            or any(inputs.get(name) is not None for name in VARLEN_INPUTS)):
        return None

    keep = on_host(attention_mask).to(torch.bool)
    nothing_padded = bool(keep.all())
    if batch == 1 and nothing_padded:  # one example a step (trl's collator pads nothing): rounded up all the same
        return _one_example(model, dict(inputs, attention_mask=None), input_ids, position_ids, embedding.shape[0],
                            aux_loss_masks_filler)
    run_starts = keep.clone()
    run_starts[:, 1:] &= ~keep[:, :-1]
    if nothing_padded or not bool(keep.any()) or bool((run_starts.sum(1) > 1).any()):
        return None  # nothing to drop, nothing left, or a row whose tokens have gaps between them
    if _labels_score(~keep, shifted_labels):
        return None  # transformers' loss trains on the padding's outputs
    if position_ids is None:  # transformers' default: the index in the padded row, left padding counted
        positions = torch.arange(seq).expand(batch, seq)
    else:
        positions = on_host(position_ids).to(torch.int64).expand(batch, seq)
    packed_positions = positions[keep]
    # The layouts start a document wherever a position does not follow the one before by 1: each row's first token
    # must not continue the row before it (position_ids passed in that happen to).
    lengths = keep.sum(1)
    row_starts = (lengths.cumsum(0) - lengths)[lengths > 0][1:]
    if bool((packed_positions[row_starts] == packed_positions[row_starts - 1] + 1).any()):
        return None

    device = tokens.device
    kept = to_device(keep.flatten().nonzero().flatten(), device)
    filler = (filler_for_graphs(model, inputs, packed_positions.numel(), aux_loss_masks_filler)
              if input_ids is not None else 0)
    packed_positions = torch.cat([packed_positions, torch.arange(filler)])
    packed = dict(inputs, attention_mask=None, position_ids=to_device(packed_positions[None], device))
    if input_ids is not None:
        packed["input_ids"] = torch.cat([input_ids.reshape(-1)[kept], _filler_ids(filler, input_ids,
                                                                                  embedding.shape[0])])[None]
    else:
        packed["inputs_embeds"] = inputs_embeds.reshape(batch * seq, -1)[kept][None]
    return PackedRows(packed, kept, filler)


def _one_example(model, inputs: dict, input_ids, position_ids, vocab_size: int,
                 aux_loss_masks_filler: bool) -> PackedRows | None:
    """A batch of one row without padding (`inputs` without an attention mask): rounded up with filler like a packed
    row, so that examples of nearby lengths replay the same graphs; None (its exact length) where the batch before was
    one row of as many tokens, as data of one fixed length has, whose own length then takes graphs without filler."""
    graphed = model.__dict__.get("_fastmoe_graphed_checkpoint")
    if input_ids is None or graphed is None:
        return None
    repeated = graphed.last_example_tokens == input_ids.shape[1]
    graphed.last_example_tokens = input_ids.shape[1]
    return None if repeated else _rounded_packed_row(model, inputs, input_ids, position_ids, vocab_size,
                                                     aux_loss_masks_filler)


def _rounded_packed_row(model, inputs: dict, input_ids, position_ids, vocab_size: int,
                        aux_loss_masks_filler: bool) -> PackedRows | None:
    """One row without padding, packed already (position_ids restarting) or a single example (position_ids None:
    0, 1, ...), with filler for graphed checkpointing; None where there is none to add. `inputs` hold no attention
    mask."""
    if (input_ids is None or input_ids.shape[0] != 1
            or (position_ids is not None and position_ids.numel() != input_ids.numel())):
        return None
    tokens = input_ids.shape[1]
    filler = filler_for_graphs(model, inputs, tokens, aux_loss_masks_filler)
    if not filler:
        return None
    device = input_ids.device
    packed = {name: value for name, value in inputs.items() if name not in VARLEN_INPUTS}
    # Built on the host, where the layouts read them (fastmoe.host_copies).
    positions = torch.arange(tokens) if position_ids is None else on_host(position_ids).reshape(-1)
    positions = torch.cat([positions, torch.arange(filler, dtype=positions.dtype)])
    packed["position_ids"] = to_device(positions[None], device)
    packed["input_ids"] = torch.cat([input_ids.reshape(-1), _filler_ids(filler, input_ids, vocab_size)])[None]
    return PackedRows(packed, to_device(torch.arange(tokens), device), filler)


def _filler_ids(filler: int, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The filler's token ids, a document of its own after the row's (its positions restart at 0): varied, so that
    the router spreads the filler over the experts as it does text, rather than sending it all to the same few."""
    return (torch.arange(filler, device=input_ids.device) * 7919 % vocab_size).to(input_ids.dtype)
