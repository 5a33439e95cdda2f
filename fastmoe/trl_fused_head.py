"""trl's fused LM head computed by fastmoe's kernel.

trl's trainers (SFT, GRPO, RLOO, KTO, DPO) call ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
outputs)`` before training. It gives the model an instance ``forward`` which, called with ``fused_lm_head=True``,
runs the backbone and computes per-token log-probabilities (and entropy, top-1, ...) from ``lm_head.weight`` with
trl's own chunked function, so fastmoe's fused loss never sees the user's training step. The shared op
``trl_fused_head`` (fastmoe.models.SHARED_OPS, patched with any family) therefore replaces the name
``add_fused_lm_head`` in the trl modules that bind it. On a model whose causal-LM forward is
fastmoe's, the replacement installs ``fused_lm_head_forward``: trl's contract (``FusedCausalLMOutput`` with its
``label_mask``, ``loss`` and ``aux_loss``; temperature, logit_scale, ``shift_labels``, ``num_items_in_batch``,
-100 labels, a DTensor head) with the per-token fields from ``linear_log_probs``
(fastmoe/kernels/linear_cross_entropy.py). Any other model gets trl's own head. Where the kernel does not apply to
a call (no Triton for these tensors, a soft-capped head, a head cast to fp32 or recast by autocast, DeepSpeed
ZeRO-3's partitioned weights), that call computes the fields with trl's function, as trl would.
"""

from __future__ import annotations

import functools
import importlib
import types
import warnings

import torch
from packaging.version import Version

from fastmoe.host_copies import on_host, remember, to_device, with_host_copy
from fastmoe.kernels.dispatch import use_triton
from fastmoe.kernels.linear_cross_entropy import linear_log_probs
from fastmoe.kernels.linear_cross_entropy import shift_labels as next_token_labels
from fastmoe.models.causal_lm import is_fastmoe_causal_lm
from fastmoe.padding_free import PackedRows, pack_padded_rows, scores_padding
from fastmoe.sliding_window_attention import masks_for_scored_padding
from fastmoe import patching
from fastmoe.patching import ForwardPatch

# The trl releases whose add_fused_lm_head (its forward's contract and its chunked function's arguments) this
# module was written against and tested with.
TESTED_TRL = (Version("1.16.0"), Version("1.17.0"))
# trl's trainer modules do `from .utils import add_fused_lm_head`: each binds its own name, so each is patched.
TRL_MODULES = (
    "trl.trainer.utils",
    "trl.trainer.sft_trainer",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.kto_trainer",
    "trl.trainer.dpo_trainer",
)
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@functools.cache
def _trl() -> tuple[tuple[types.ModuleType, ...], object]:
    """(the trl modules that bind add_fused_lm_head, trl's own add_fused_lm_head); ((), None) without a tested trl.

    Imports those modules now: one imported after the patch would bind fastmoe's function with nothing to restore.
    """
    try:
        import trl
    except ImportError:
        return (), None
    low, high = TESTED_TRL
    found = Version(trl.__version__)
    if not low <= found < high:
        warnings.warn(
            f"fastmoe computes trl's fused LM head with trl >={low},<{high}; trl {found} keeps its own head (the "
            f"same numbers, slower). Install a tested release for the faster head: pip install \"trl>={low},<{high}\"",
            stacklevel=3,
        )
        return (), None
    try:
        utils = importlib.import_module("trl.trainer.utils")
    except Exception as error:  # a trl that cannot import must not stop the model from loading
        warnings.warn(f"fastmoe could not import trl.trainer.utils ({error.__class__.__name__}: {error}); trl's "
                      "fused LM head is left as it is", stacklevel=3)
        return (), None
    modules = (utils, *patching.modules_binding("add_fused_lm_head", TRL_MODULES[1:]))
    # trl's own function, also if this runs again while the patch is in place.
    return modules, patching.original(utils, "add_fused_lm_head")


def fused_lm_head_patches() -> list[ForwardPatch]:
    """``add_fused_lm_head`` -> fastmoe's, in every trl module that binds it (none without a tested trl)."""
    modules, _ = _trl()
    return [ForwardPatch(module, "add_fused_lm_head", add_fused_lm_head) for module in modules]


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """trl's ``add_fused_lm_head``: fastmoe's fused head on a model of a patched family, trl's on any other."""
    if not is_fastmoe_causal_lm(model):
        _, trl_add_fused_lm_head = _trl()
        return trl_add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                     outputs=outputs)
    if not temperature > 0:
        raise ValueError(f"the fused LM head's temperature must be positive, got {temperature}")
    model.forward = types.MethodType(fused_lm_head_forward(model, temperature, cast_lm_head_to_fp32, outputs), model)


def fused_lm_head_forward(model, temperature: float, cast_lm_head_to_fp32: bool, outputs: tuple[str, ...]):
    """The forward ``add_fused_lm_head`` installs on ``model``: without ``fused_lm_head=True``, the model's own."""
    from trl.trainer.utils import FusedCausalLMOutput

    original_forward = model.forward
    text_config = model.config.get_text_config()
    # Cohere's scale, read where trl and transformers read it; None means unscaled.
    logit_scale = getattr(text_config, "logit_scale", None)
    logit_scale = 1.0 if logit_scale is None else float(logit_scale)
    softcap = getattr(text_config, "final_logit_softcapping", None)

    # generate() validates its model kwargs against this signature, so keep the class forward's.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return original_forward(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        if labels is None and shift_labels is None:
            raise ValueError("model(..., fused_lm_head=True) scores next-token labels: pass labels= or shift_labels=")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        head = self.get_output_embeddings()
        device = head.weight.device
        # Every position's next-token label, the last one of each row scoring nothing (what trl's shift gives).
        targets = shift_labels if shift_labels is not None else with_host_copy(next_token_labels, labels)
        # Padding that no label scores never reaches the layers (fastmoe.padding_free).
        packed = None if args else pack_padded_rows(self, kwargs, targets, aux_loss_masks_filler=True)
        row_targets, scored, mask, mask_index = scored_positions(labels, shift_labels, targets, packed, device)
        # A loss over padded positions needs what transformers' masks give them (fastmoe.sliding_window_attention).
        with masks_for_scored_padding(packed is None and scores_padding(kwargs.get("attention_mask"), targets)):
            backbone_outputs = self.base_model(*args, **(kwargs if packed is None else packed.inputs))
        hidden = backbone_outputs.last_hidden_state
        hidden = (hidden.flatten(0, 1) if packed is None else hidden[0]).to(device)
        # Only the scored positions go through the head, in the mask's order; an all-masked micro-batch scores zero
        # rows and still returns a loss connected to the model (a differentiable zero), as trl's does.
        fields = _per_token_fields(hidden[scored], head.weight, head.bias, row_targets[scored], temperature,
                                   logit_scale, softcap, cast_lm_head_to_fp32, outputs)
        per_token = {name: None if x is None else x.new_zeros(mask.numel()).index_copy(0, mask_index, x).view_as(mask)
                     for name, x in zip(PER_TOKEN_FIELDS, fields)}
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -per_token["log_probs"].sum() / divisor

        aux_loss = None
        if kwargs.get("output_router_logits"):
            # trl weighs Mixtral's load-balancing loss for every MoE family; the same here, so trainers see the same
            # aux_loss. trl reads num_experts only; JetMoe calls it num_local_experts.
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
            # The packed row holds the tokens the attention mask keeps, and the filler that rounds it up for the
            # graphs, which the mask leaves out.
            attention_mask = kwargs.get("attention_mask") if packed is None else (
                packed.filler_mask() if packed.filler else None)
            aux_loss = load_balancing_loss_func(backbone_outputs.router_logits, num_experts,
                                                text_config.num_experts_per_tok, attention_mask)
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)

    return forward


def scored_positions(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, targets: torch.Tensor,
                     packed: PackedRows | None, device: torch.device) -> tuple[torch.Tensor, ...]:
    """What the fused head scores, on `device`: (each backbone output row's target (rows,), the scored rows'
    indices, trl's label mask (batch, seq - 1) or shift_labels' shape, the indices of its True positions).

    targets: labels shifted for next-token scoring (or shift_labels), packed: the backbone's packed row if any. The
    indices are found on the host, from the labels' host copies where they have them (fastmoe.host_copies: no sync
    where the Trainer copied the batch), and before the backbone is queued: read from the GPU after it, their counts
    would wait for the whole forward and leave the GPU idle while the head is launched. The mask's indices place the
    per-token values without masked_scatter, whose backward (masked_select) reads its count on the host at the
    backward's start. Both index the same positions in the same order."""
    row_targets = with_host_copy(_flattened if packed is None else packed.take, targets).to(device)
    scored = to_device((on_host(row_targets) != -100).nonzero().squeeze(1), device)
    mask = (labels[:, 1:] if shift_labels is None else shift_labels).to(device) != -100
    host_mask = (on_host(labels)[:, 1:] if shift_labels is None else on_host(shift_labels)) != -100
    remember(mask, host_mask)
    return row_targets, scored, mask, to_device(host_mask.reshape(-1).nonzero().squeeze(1), device)


def _flattened(labels: torch.Tensor) -> torch.Tensor:
    return labels.reshape(-1)


def _per_token_fields(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                      temperature: float, logit_scale: float, softcap: float | None, cast_lm_head_to_fp32: bool,
                      outputs: tuple[str, ...]) -> tuple[torch.Tensor | None, ...]:
    """hidden (tokens, hidden), labels (tokens,) of scored positions -> PER_TOKEN_FIELDS, None where not asked for."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        # FSDP2 leaves a head that is its own unit sharded here (its module is never called): gather it once, with
        # autograd, as trl does.
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
    device_type = hidden.device.type
    if cast_lm_head_to_fp32:
        hidden = hidden.float()
        compute_dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    # The kernel takes the head in its own dtype: casting the whole lm_head (GBs) is what it must not do.
    fits = weight.dtype == compute_dtype and (bias is None or bias.dtype == compute_dtype)
    if fits and softcap is None and not is_deepspeed_zero3_enabled() and use_triton(weight, bias):
        with torch.autocast(device_type, enabled=False):
            fields = linear_log_probs(hidden.to(compute_dtype), weight, labels, bias=bias, logit_scale=logit_scale,
                                      temperature=temperature)
        return tuple(x if name == "log_probs" or name in outputs else None for name, x in zip(PER_TOKEN_FIELDS, fields))
    return _trl_per_token_fields(hidden, weight, bias, labels, temperature, logit_scale, softcap,
                                 cast_lm_head_to_fp32, outputs)


def _trl_per_token_fields(hidden, weight, bias, labels, temperature, logit_scale, softcap, cast_lm_head_to_fp32,
                          outputs):
    """trl's chunked function with trl's arguments, for the calls the kernel does not take (hidden as trl passes
    it: already fp32 with cast_lm_head_to_fp32, otherwise cast by trl tile by tile)."""
    from contextlib import nullcontext

    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, maybe_gather_lm_head_ctx

    autocast = torch.autocast(hidden.device.type, enabled=False) if cast_lm_head_to_fp32 else nullcontext()
    with autocast, maybe_gather_lm_head_ctx(weight, bias):
        return ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                            softcap, logit_scale, outputs)
