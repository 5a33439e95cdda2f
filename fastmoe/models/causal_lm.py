"""The causal-LM forward every family shares: transformers' own, except that a training step with labels
computes its loss with fastmoe's chunked linear cross-entropy instead of materialising (tokens, vocab) logits."""

from __future__ import annotations

import functools
import sys

import torch

from fastmoe.host_copies import with_host_copy
from fastmoe.kernels.linear_cross_entropy import linear_cross_entropy, shift_labels
from fastmoe.padding_free import pack_padded_rows, scores_padding
from fastmoe.sliding_window_attention import masks_for_scored_padding


def check_sequence_length(model, input_ids, inputs_embeds) -> None:
    limit = getattr(model, "max_seq_length", None)
    source = input_ids if input_ids is not None else inputs_embeds
    if limit is None or source is None or source.dim() < 2:
        return
    length = source.shape[1]
    if length > limit:
        raise ValueError(
            f"input of {length} tokens is longer than max_seq_length={limit} given to FastModel.from_pretrained; "
            "truncate the inputs or load the model with a larger max_seq_length"
        )


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def _check_head_unsharded(weight: torch.Tensor) -> None:
    """The fused loss reads lm_head.weight after the head's own (empty) call. FSDP2 gathers a unit's weights for its
    forward; accelerate keeps the head's unit gathered until the backward (reshard_after_forward=False), but a layout
    that reshards the head right after its call would hand the loss a shard."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            raise RuntimeError(
                "lm_head.weight is still sharded (a DTensor) after the head's forward: fastmoe's fused loss needs the "
                "whole weight. Shard lm_head with reshard_after_forward=False (as accelerate's FSDP2 does), or put it "
                "in the root FSDP unit"
            )


def _load_balancing_loss(model):
    """The router load-balancing loss transformers' forward of `model`'s class computes (its modeling module's
    `load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`, which the forward calls with the
    model's num_experts and num_experts_per_tok), or None."""
    function = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    has_counts = hasattr(model, "num_experts") and hasattr(model, "num_experts_per_tok")
    return function if callable(function) and has_counts else None


def is_fastmoe_causal_lm(model) -> bool:
    """Whether ``model``'s class forward is fastmoe's (``fused_loss_forward``): its family is patched."""
    return getattr(type(model).forward, "fastmoe_fused_loss", False)


def fused_loss_forward(original_forward):
    """Wrap a transformers *ForCausalLM.forward so training steps with labels use the chunked fused loss.

    Inference, evaluation and calls without labels run transformers' forward unchanged (logits included).
    """

    @functools.wraps(original_forward)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        check_sequence_length(self, input_ids, inputs_embeds)
        common = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        # Its host copy, where the batch's labels have one, is what the padding checks read (fastmoe.host_copies).
        targets = None if labels is None else with_host_copy(shift_labels, labels.to(self.lm_head.weight.device))
        # A loss over padded positions needs what transformers' masks give them (fastmoe.sliding_window_attention).
        with masks_for_scored_padding(targets is not None and scores_padding(attention_mask, targets)):
            return loss_forward(self, labels, targets, common, logits_to_keep, kwargs)

    def loss_forward(self, labels, targets, common, logits_to_keep, kwargs):
        # An adapter on lm_head (or a quantized head) is applied by its module's forward, not by its .weight.
        plain_head = type(self.lm_head) is torch.nn.Linear
        if targets is None or not self.training or not plain_head or not _keeps_all(logits_to_keep):
            return original_forward(self, labels=labels, logits_to_keep=logits_to_keep, **common, **kwargs)

        return_dict = kwargs.pop("return_dict", None)
        num_items_in_batch = kwargs.get("num_items_in_batch")
        # Padding that no label scores never reaches the layers (fastmoe.padding_free); a row rounded up for the
        # graphs has its filler left out of the load-balancing loss, recomputed below.
        balance = _load_balancing_loss(self)
        packed = pack_padded_rows(self, {**common, **kwargs}, targets, aux_loss_masks_filler=balance is not None)
        if packed is not None:
            kwargs = {name: value for name, value in packed.inputs.items() if name not in common}
            common = {name: packed.inputs[name] for name in common}
            targets = packed.take(targets)
        captured = {}

        def keep_last_hidden(module, args, output):
            captured["hidden"] = output.last_hidden_state

        # Run transformers' own forward for everything but the head: it keeps zero positions for the logits
        # (an empty index), and the hook hands us the final hidden states.
        handle = self.model.register_forward_hook(keep_last_hidden)
        try:
            empty = torch.empty(0, dtype=torch.long, device=self.lm_head.weight.device)
            outputs = original_forward(self, labels=None, logits_to_keep=empty, return_dict=True, **common, **kwargs)
        finally:
            handle.remove()
        hidden = captured["hidden"]
        _check_head_unsharded(self.lm_head.weight)
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            self.lm_head.weight,
            targets.to(hidden.device),
            bias=self.lm_head.bias,
            logit_scale=float(getattr(self, "logit_scale", 1.0)),
            num_items_in_batch=num_items_in_batch,
        )
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None and packed is not None and packed.filler:
            # transformers averaged it over every token of the row, the filler's included
            aux_loss = outputs.aux_loss = balance(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                                  packed.filler_mask())
        if aux_loss is not None:
            # JetMoe names the coefficient aux_loss_coef, Qwen3-MoE router_aux_loss_coef.
            coefficient = getattr(self, "aux_loss_coef", None)
            coefficient = self.router_aux_loss_coef if coefficient is None else coefficient
            loss = loss + coefficient * aux_loss.to(loss.device)
        outputs.loss = loss
        outputs.logits = None
        return outputs if return_dict is not False else outputs.to_tuple()

    forward.fastmoe_fused_loss = True
    return forward
