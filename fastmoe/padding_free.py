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
"""

from __future__ import annotations

import dataclasses

import torch

from fastmoe import patching
from fastmoe.sliding_window_attention import layouts_replace_masks

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """A padded batch as one packed row: `inputs` are the backbone's keyword arguments for it (tokens (1,
    tokens), position_ids, no attention mask); `kept` (tokens,), on the device, indexes the flattened (batch x seq)
    positions the row holds, in order."""

    inputs: dict
    kept: torch.Tensor

    def take(self, per_position: torch.Tensor) -> torch.Tensor:
        """(batch, seq) or (batch * seq,) -> (tokens,): the packed row's entries, e.g. its shifted labels."""
        return per_position.reshape(-1)[self.kept]


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


def _asks_per_position_outputs(config, inputs: dict) -> bool:
    """Whether the call returns hidden states or attentions: those are per position of the padded batch."""
    for name in ("output_hidden_states", "output_attentions"):
        asked = inputs.get(name)
        if asked if asked is not None else getattr(config, name, False):
            return True
    return False


def scores_padding(attention_mask, shifted_labels: torch.Tensor) -> bool:
    """Whether a shifted label ((batch, seq) or (batch * seq,)) scores a position a (batch, seq) attention mask pads
    (one sync each for the mask and, where it pads, the labels). Under torch.compile, False: a compiled forward
    takes transformers' masks whatever its labels score."""
    if torch.compiler.is_compiling() or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return False
    padding = attention_mask.to("cpu") == 0
    if shifted_labels.numel() != padding.numel() or not bool(padding.any()):
        return False
    return bool((shifted_labels.to("cpu").reshape(padding.shape)[padding] != IGNORE_INDEX).any())


def pack_padded_rows(model, inputs: dict, shifted_labels: torch.Tensor) -> PackedRows | None:
    """The packed row for a call of `model`'s backbone with keyword arguments `inputs`, whose shifted labels
    (batch, seq) or (batch * seq,) score each position's next token; None where the call keeps its padding (see the
    module's docstring). Reads the attention mask, the labels and any position_ids on the host (one sync each)."""
    if torch.compiler.is_compiling():  # shapes that depend on the mask's values: the compiled graph keeps the padding
        return None
    input_ids, inputs_embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    attention_mask, position_ids = inputs.get("attention_mask"), inputs.get("position_ids")
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    batch, seq = attention_mask.shape
    handled = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
    other_tensors = any(isinstance(value, torch.Tensor) and value.dim() > 0
                        for name, value in inputs.items() if name not in handled)
    if (tokens.shape[:2] != (batch, seq) or shifted_labels.numel() != batch * seq
            or inputs.get("past_key_values") is not None or other_tensors
            or _asks_per_position_outputs(model.config, inputs)):
        return None
    embedding = model.get_input_embeddings().weight
    if not _family_packs_rows(model, embedding.device, embedding.dtype):
        return None

    keep = attention_mask.to("cpu", torch.bool)
    run_starts = keep.clone()
    run_starts[:, 1:] &= ~keep[:, :-1]
    if bool(keep.all()) or not bool(keep.any()) or bool((run_starts.sum(1) > 1).any()):
        return None  # nothing to drop, nothing left, or a row whose tokens have gaps between them
    if scores_padding(attention_mask, shifted_labels):
        return None  # transformers' loss trains on the padding's outputs
    if position_ids is None:  # transformers' default: the index in the padded row, left padding counted
        positions = torch.arange(seq).expand(batch, seq)
    else:
        positions = position_ids.to("cpu", torch.int64).expand(batch, seq)
    packed_positions = positions[keep]
    # The layouts start a document wherever a position does not follow the one before by 1: each row's first token
    # must not continue the row before it (position_ids passed in that happen to).
    lengths = keep.sum(1)
    row_starts = (lengths.cumsum(0) - lengths)[lengths > 0][1:]
    if bool((packed_positions[row_starts] == packed_positions[row_starts - 1] + 1).any()):
        return None

    device = tokens.device
    kept = keep.flatten().nonzero().flatten().to(device)
    packed = dict(inputs, attention_mask=None, position_ids=packed_positions[None].to(device))
    if input_ids is not None:
        packed["input_ids"] = input_ids.reshape(-1)[kept][None]
    else:
        packed["inputs_embeds"] = inputs_embeds.reshape(batch * seq, -1)[kept][None]
    return PackedRows(packed, kept)
