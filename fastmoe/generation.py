"""Decoding after the prompt: a static KV cache and the decode step replayed from CUDA graphs.

`FastModel.for_inference` puts a `DecodeForward` in front of the causal LM's forward. transformers' `generate` drives
it unchanged: sampling, stop tokens, streamers and left padding stay transformers'.

- The prompt (prefill) runs as transformers runs it, on fastmoe's training kernels with a DynamicCache. Its keys and
  values then move into a `DecodeCache` of fixed buffers: full-attention layers hold `capacity` positions,
  sliding-window layers a ring of `window` slots (the token at index j in slot j % window). A decode step therefore
  reads and writes the same addresses every time.
- A decode step (one new token per row) builds its masks and positions on the device, from the cache's record of
  which indices are padding. Its attention reads the buffers in place (fastmoe.kernels.decode_attention: grouped
  heads without transformers' copies of keys and values per query head). Nothing in it reads a value back to the
  host, so on CUDA it is captured once per (batch size, capacity) in a CUDA graph and replayed: one launch per token
  instead of the hundreds of kernels Python issues one by one. On the CPU the same step runs eagerly; that is what the
  CPU tests compare with transformers.
- When a sequence outgrows the capacity, the buffers grow by `CAPACITY_STEP` (contents copied) and the step is
  captured again for the new size. Buffers and graphs are kept per (batch size, capacity), so that later `generate`
  calls of the same shapes (evaluation, RL rollouts) replay without capturing. `FastModel.for_training` keeps them
  for the next `for_inference` (or frees them: keep_decode_graphs=False); parameters that moved since (an adapter
  loaded) start them over.

On CUDA the loop does not wait for each step before queueing the next: transformers' `generate` reads its stop flag
back from the device at every step, so that the host's Python between two steps (preparing inputs, processing
logits) leaves the GPU idle: 0.35-0.46 ms of a 1.8-1.9 ms batch-1 step on an H200's host. transformers has the
remedy, a stop check one step late (DeferredStopCheck: the flag copied asynchronously and read a step later, one
extra step undone at an end of sequence), enabled on Apple's mps only; `install` enables it for this decode cache on
CUDA when the cache is not returned to the caller (it cannot be cropped back). The tokens are the same.

LFM2's short convolutions keep their last inputs in the cache beside the attention layers' keys and values; the
family's patched convolution forward runs the decode step's update against them (fastmoe.models.lfm2_moe).

Prefills it does not take over stay transformers' (their cache stays a DynamicCache): caches with other layer kinds
(recurrent states), several sliding windows, attention implementations other than SDPA and eager, requests for
attentions or hidden states, offloaded caches.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import torch
import transformers.generation.utils
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import AttentionInterface

from fastmoe import patching
from fastmoe.kernels.decode_attention import decode_attention
from fastmoe.kernels.reused_casts import CastCache, reused_casts
from fastmoe.module_structure import structure_of

# Full-attention capacity is the prompt plus new tokens rounded up to a multiple of this: a handful of graph shapes.
CAPACITY_STEP = 256
# The attention implementations whose prefills a decode step continues (its steps run decode_attention_forward).
MASKED_ATTENTION = ("sdpa", "eager")
# Keyword arguments that change nothing in one decode step's logits (others may come only as None or False).
_INERT_KWARGS = {"return_dict", "use_cache", "logits_to_keep", "cache_position"}


CONV = "conv"  # a layer kind beside None (full attention) and a window (sliding attention): a short convolution

# The attention implementation a decode step runs under (config._attn_implementation for the step's duration).
DECODE_ATTENTION = "fastmoe_decode"
# Attention-function arguments that change the result beyond scaled dot-product attention under a mask (s_aux,
# gpt-oss's learned sinks, is one decode_attention takes).
_OTHER_ATTENTION = ("sinks", "softcap")


def decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, s_aux=None,
                             **kwargs):
    """The attention function of a decode step (registered in transformers' AttentionInterface): one query per row
    over the decode buffers' keys and values, grouped heads read in place (fastmoe.kernels.decode_attention), under
    the step's boolean mask (batch, 1, 1, positions), with per-head sink logits (s_aux) when the model has them.
    Anything else goes to transformers' SDPA function, which takes the same boolean masks but no sinks: a
    call with sinks that the decode kernel cannot take is refused rather than computed without them."""
    if (query.shape[2] != 1 or dropout or attention_mask is None or attention_mask.dtype != torch.bool
            or attention_mask.shape[1:3] != (1, 1) or any(kwargs.get(name) is not None for name in _OTHER_ATTENTION)):
        if s_aux is not None:
            raise NotImplementedError("fastmoe's decode step takes attention sinks (s_aux) for one new token per row "
                                      "only; call FastModel.for_training(model) to generate with transformers' forward")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return decode_attention(query, key, value, attention_mask[:, 0, 0, :], scaling, s_aux), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """config._attn_implementation is `name` within (the attention forwards look it up at each call)."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


def _layer_kind(layer) -> int | str | None:
    """What a prefilled DynamicCache layer is: None (full attention), its window (sliding attention), CONV (a short
    convolution's state alone, LFM2); anything else raises KeyError (its prefill stays transformers')."""
    if type(layer) is DynamicLayer:
        return None
    if type(layer) is DynamicSlidingWindowLayer:
        return layer.sliding_window
    if (isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, DynamicLayer)
            and isinstance(layer.conv_states.get(0), torch.Tensor) and len(layer.conv_states) == 1
            and not any(isinstance(s, torch.Tensor) for s in getattr(layer, "recurrent_states", {}).values())):
        return CONV
    raise KeyError(type(layer).__name__)


class _DecodeLayer(CacheLayerMixin):
    """One layer's state in fixed buffers: keys and values (batch, kv_heads, capacity or window, head_dim) of an
    attention layer, or a short convolution's last inputs (batch, hidden, kernel size)."""

    is_compileable = False  # transformers must not torch.compile the forward around it: fastmoe graphs the step

    def __init__(self, buffers: DecodeBuffers, layer: int):
        super().__init__()
        self.buffers, self.layer = buffers, layer
        self.kind = buffers.kinds[layer]
        self.keys, self.values = buffers.keys[layer], buffers.values[layer]
        self.conv_state = buffers.conv_states[layer]
        self.is_sliding = self.kind is not None and self.kind != CONV
        self.is_initialized = True

    def rebind(self, buffers: DecodeBuffers) -> None:
        self.buffers = buffers
        self.keys, self.values = buffers.keys[self.layer], buffers.values[self.layer]
        self.conv_state = buffers.conv_states[self.layer]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a decode layer is created with its buffers")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("fastmoe's decode cache takes one new token per row; for several at once (assisted or "
                             "chunked decoding) call FastModel.for_training(model) first to generate with "
                             "transformers' own cache")
        slot = self.buffers.slot if self.kind is None else self.buffers.ring_slots[self.kind]
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return (self.keys.shape[2] if self.keys is not None else query_length), 0

    def get_seq_length(self, *args) -> int:
        return self.buffers.length

    def get_max_length(self) -> int:
        return self.keys.shape[2] if self.kind is None else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for state in (self.keys, self.values, self.conv_state):
            if state is not None:
                state.copy_(state.index_select(0, beam_idx.to(state.device)))


class DecodeCache(Cache):
    """The cache `generate` carries between decode steps once fastmoe has taken the prefill over: a view of one
    `DecodeBuffers`, whose tensors the captured graphs read and write."""

    def __init__(self, buffers: DecodeBuffers):
        super().__init__(layers=[_DecodeLayer(buffers, i) for i in range(len(buffers.kinds))])
        self.buffers = buffers

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0, *args) -> int:
        return self.buffers.length

    def rebind(self, buffers: DecodeBuffers) -> None:
        self.buffers = buffers
        for layer in self.layers:
            layer.rebind(buffers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.buffers.valid.copy_(self.buffers.valid.index_select(0, beam_idx.to(self.buffers.valid.device)))

    def crop(self, max_length: int) -> None:
        raise ValueError("fastmoe's decode cache cannot be cropped (assisted decoding); call "
                         "FastModel.for_training(model) first to generate with transformers' own cache")


@dataclass(eq=False)
class DecodeBuffers:
    """Everything one captured decode step reads and writes, for one (batch size, capacity)."""

    kinds: tuple[int | str | None, ...]  # per layer, as _layer_kind gives it
    keys: list[torch.Tensor | None]  # attention layers' (batch, kv_heads, capacity or window, head_dim)
    values: list[torch.Tensor | None]
    conv_states: list[torch.Tensor | None]  # convolution layers' (batch, hidden, kernel size)
    valid: torch.Tensor  # (batch, capacity) bool: index j of row b holds a token (not padding, not yet unwritten)
    input_ids: torch.Tensor  # (batch, 1) the step's tokens
    new_valid: torch.Tensor  # (batch,) bool: the step's tokens are not padding
    index: torch.Tensor  # (1,) int64: the index the step writes
    length: int = 0  # indices written so far, on the host
    # Written inside the step, read by the layers' updates.
    slot: torch.Tensor | None = None
    ring_slots: dict[int, torch.Tensor] = field(default_factory=dict)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def windows(self) -> set[int]:
        return {kind for kind in self.kinds if kind is not None and kind != CONV}

    @classmethod
    def like(cls, layers: list, kinds: tuple, batch: int, capacity: int) -> DecodeBuffers:
        keys, values, conv_states = [], [], []
        for kind, layer in zip(kinds, layers):
            if kind == CONV:
                state = layer.conv_states[0]
                keys.append(None), values.append(None)
                conv_states.append(state.new_zeros(batch, *state.shape[1:]))
                continue
            positions = capacity if kind is None else kind
            _, heads, _, key_dim = layer.keys.shape
            keys.append(layer.keys.new_zeros(batch, heads, positions, key_dim))
            values.append(layer.values.new_zeros(batch, heads, positions, layer.values.shape[-1]))
            conv_states.append(None)
        device = next(t for t in (*keys, *conv_states) if t is not None).device
        return cls(kinds, keys, values, conv_states, valid=torch.zeros(batch, capacity, dtype=torch.bool,
                                                                       device=device),
                   input_ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
                   new_valid=torch.ones(batch, dtype=torch.bool, device=device),
                   index=torch.zeros(1, dtype=torch.long, device=device))

    def fill_from_prefill(self, layers: list, attention_mask: torch.Tensor | None, length: int) -> None:
        """The prompt's state (indices 0..length-1) from transformers' DynamicCache layers."""
        self.valid.zero_()
        self.valid[:, :length] = True if attention_mask is None else attention_mask[:, -length:].bool()
        for kind, keys, values, conv_state, layer in zip(self.kinds, self.keys, self.values, self.conv_states,
                                                         layers):
            if kind == CONV:
                conv_state.copy_(layer.conv_states[0])
            elif kind is None:
                keys[:, :, :length].copy_(layer.keys)
                values[:, :, :length].copy_(layer.values)
            else:
                held = layer.keys.shape[2]  # a sliding layer holds only the last tokens (the window or a little less)
                kept = min(held, kind)
                slots = torch.arange(length - kept, length, device=keys.device) % kind
                keys.index_copy_(2, slots, layer.keys[:, :, held - kept:])
                values.index_copy_(2, slots, layer.values[:, :, held - kept:])
        self.length = length

    def grown(self, capacity: int) -> DecodeBuffers:
        """New buffers of a larger capacity holding these contents (ring buffers and convolution states keep their
        size). Nothing is shared with these, whose graph keeps reading them."""
        def larger(old: torch.Tensor | None, kind) -> torch.Tensor | None:
            if old is None or kind is not None:
                return None if old is None else old.clone()
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, :old.shape[2]] = old
            return new

        valid = self.valid.new_zeros(self.valid.shape[0], capacity)
        valid[:, :self.capacity] = self.valid
        return DecodeBuffers(self.kinds, [larger(k, kind) for k, kind in zip(self.keys, self.kinds)],
                             [larger(v, kind) for v, kind in zip(self.values, self.kinds)],
                             [None if c is None else c.clone() for c in self.conv_states], valid,
                             self.input_ids.clone(), self.new_valid.clone(), self.index.clone(), length=self.length)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of what a step changes other than by rewriting its own slot (the convolution states shift)."""
        return [c.clone() for c in self.conv_states if c is not None]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for state, saved in zip((c for c in self.conv_states if c is not None), snapshot):
            state.copy_(saved)


def _capacity_for(length: int) -> int:
    return (length // CAPACITY_STEP + 1) * CAPACITY_STEP


class DecodeForward:
    """Stands in for a causal LM's forward (an instance attribute, so the class's forward stays untouched): takes
    `generate`'s prefill and decode calls over as the module docstring says, and passes every other call through."""

    def __init__(self, model: torch.nn.Module, use_cuda_graphs: bool = True, inner=None):
        self.model = model
        self.use_cuda_graphs = use_cuda_graphs
        # An instance forward that stood on the model before this one (trl's fused LM head, which its trainers install
        # on the base model): every call goes through it, and `uninstall` puts it back.
        self.inner = inner
        self.buffers: dict[tuple[int, int], DecodeBuffers] = {}
        # The LoRA factors' casts to the activations' dtype, made once (kernels/reused_casts.py): without grad only,
        # refreshed in place at the next prefill when an optimizer step changed the factors.
        self.casts = CastCache()
        self.decode_steps = 0  # steps taken through the decode cache (the tests check that this path ran)
        self.parameter_addresses: tuple[int, ...] | None = None  # where the parameters were when buffers were made

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if torch.compiler.is_compiling():
            # generate compiling the forward (a static cache): the class's forward as it is, which torch.compile traces
            # (fastmoe's ops are custom ops) and whose casts it fuses itself.
            return self.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, **kwargs)
        if isinstance(past_key_values, DecodeCache):
            with reused_casts(self.casts):
                return self._decode(past_key_values, input_ids, attention_mask, kwargs)
        with reused_casts(self.casts) if not torch.is_grad_enabled() else contextlib.nullcontext():
            out = self.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, **kwargs)
        kinds = self._takes_over(input_ids, attention_mask, past_key_values, out, kwargs)
        if kinds is not None:
            out.past_key_values = self._decode_cache(out.past_key_values, kinds, input_ids, attention_mask)
        return out

    def __deepcopy__(self, memo):
        # A copy of the model (or a pickled one, below) decodes from scratch: buffers, graphs and casts belong to
        # this model's tensors.
        return DecodeForward(copy.deepcopy(self.model, memo), self.use_cuda_graphs, copy.deepcopy(self.inner, memo))

    def __reduce__(self):
        return DecodeForward, (self.model, self.use_cuda_graphs, self.inner)

    def forward(self, **kwargs):
        """The forward this one stands in front of: the instance forward installed before it, else the class's,
        looked up at each call (patches switched on or off later apply)."""
        if self.inner is not None:
            return self.inner(**kwargs)
        return type(self.model).forward(self.model, **kwargs)

    # -- prefill --------------------------------------------------------------------------------------------------

    def _takes_over(self, input_ids, attention_mask, cache_in, out, kwargs) -> tuple | None:
        """The cache layers' kinds (_layer_kind) if this was a prefill by `generate` (an empty DynamicCache came in)
        that the decode step can continue (attention, full or one sliding window; short convolutions), else None."""
        cache = getattr(out, "past_key_values", None)
        config = self.model.config
        if not (type(cache_in) is DynamicCache and cache is cache_in and not cache.offloading
                and not torch.is_grad_enabled() and input_ids is not None and input_ids.dim() == 2
                and input_ids.shape[1] == cache.get_seq_length() and len(cache.layers) > 0
                and (attention_mask is None
                     or (attention_mask.dim() == 2 and attention_mask.shape == input_ids.shape))
                and config._attn_implementation in MASKED_ATTENTION
                and not any(kwargs.get(flag) for flag in ("output_attentions", "output_hidden_states"))):
            return None
        try:
            kinds = tuple(_layer_kind(layer) for layer in cache.layers)
        except KeyError:
            return None
        if len({k for k in kinds if k is not None and k != CONV}) > 1 or not all(
                layer.is_initialized for layer, kind in zip(cache.layers, kinds) if kind != CONV):
            return None
        return kinds

    def _decode_cache(self, cache: DynamicCache, kinds: tuple, input_ids, attention_mask) -> DecodeCache:
        # Captured graphs read the parameters where they were at capture: if any moved since (an adapter loaded or
        # swapped, a .to()), buffers, graphs and casts start over. An optimizer's in-place steps move nothing.
        addresses = tuple(p.data_ptr() for _, p in structure_of(self.model).named_parameters)
        if addresses != self.parameter_addresses:
            self.buffers.clear()
            self.casts = CastCache()
            self.parameter_addresses = addresses
        batch, length = input_ids.shape
        key = (batch, _capacity_for(length))
        if key not in self.buffers:
            self.buffers[key] = DecodeBuffers.like(cache.layers, kinds, batch, key[1])
        buffers = self.buffers[key]
        buffers.fill_from_prefill(cache.layers, attention_mask, length)
        return DecodeCache(buffers)

    # -- decode ---------------------------------------------------------------------------------------------------

    def _decode(self, cache: DecodeCache, input_ids, attention_mask, kwargs) -> CausalLMOutputWithPast:
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError("fastmoe's decode cache takes input_ids of one new token per row; to generate from "
                             "embeddings or several tokens at once call FastModel.for_training(model) first")
        other = {name for name, value in kwargs.items()
                 if name not in _INERT_KWARGS and value is not None and value is not False}
        if other:
            raise ValueError(f"fastmoe's decode step does not take {sorted(other)}; call "
                             "FastModel.for_training(model) first to generate with transformers' forward")
        buffers = cache.buffers
        if buffers.length + 1 > buffers.capacity:
            grown = buffers.grown(_capacity_for(buffers.length + 1))
            self.buffers[(buffers.valid.shape[0], grown.capacity)] = grown
            cache.rebind(grown)
            buffers = grown
        buffers.input_ids.copy_(input_ids)
        buffers.new_valid.copy_(True if attention_mask is None else attention_mask[:, -1].bool())
        buffers.index.fill_(buffers.length)
        logits = self._run(buffers, cache)
        buffers.length += 1
        self.decode_steps += 1
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _run(self, buffers: DecodeBuffers, cache: DecodeCache) -> torch.Tensor:
        if not (self.use_cuda_graphs and buffers.valid.is_cuda):
            return self._step(buffers, cache)
        if buffers.graph is None:
            try:
                buffers.logits, buffers.graph = _capture(lambda: self._step(buffers, cache), buffers)
            except Exception as error:  # an op that cannot be captured: decode on, eagerly
                warnings.warn(f"fastmoe: the decode step could not be captured in a CUDA graph ({error}); it runs "
                              "eagerly", stacklevel=3)
                self.use_cuda_graphs = False
                return self._step(buffers, cache)
            return buffers.logits
        buffers.graph.replay()
        return buffers.logits

    def _step(self, buffers: DecodeBuffers, cache: DecodeCache) -> torch.Tensor:
        """One decode step from the buffers alone (what the graph captures): write the new tokens' padding record,
        derive positions and masks from it, and run the model with the cache's slots for this index."""
        index = buffers.index
        buffers.valid.index_copy_(1, index, buffers.new_valid[:, None])
        buffers.slot = index
        indices = torch.arange(buffers.capacity, device=index.device)
        seen = buffers.valid & (indices <= index)
        # transformers' positions for left-padded rows: the count of real tokens before this one.
        position_ids = (seen.sum(dim=-1, keepdim=True) - 1).clamp_min(0)
        masks = {None: seen}
        for window in buffers.windows:
            slots = torch.arange(window, device=index.device)
            held = index - (index - slots) % window  # the index in each ring slot: the latest j <= index, j % w == s
            buffers.ring_slots[window] = index % window
            masks[window] = (held >= 0) & buffers.valid.gather(1, held.clamp_min(0).expand(len(seen), window))
        # A decode step computes no loss: router logits the config asks for (trl's SFTTrainer turns them on for the
        # load-balancing loss) would only cost time, and the aux loss would read the step's prepared masks (a mapping
        # per layer type, with sliding and full layers) as a padding mask.
        no_router_logits = {"output_router_logits": False} if getattr(self.model.config, "output_router_logits",
                                                                      False) else {}
        with _attention_implementation(self.model.config, DECODE_ATTENTION):
            out = self.forward(input_ids=buffers.input_ids, attention_mask=self._mask_argument(masks, buffers.kinds),
                               position_ids=position_ids, past_key_values=cache, use_cache=True, return_dict=True,
                               **no_router_logits)
        return out.logits

    def _mask_argument(self, masks: dict, kinds: tuple):
        """Boolean masks (decode_attention_forward's) in the form the model forward takes prepared masks: one 4D mask
        where every layer is alike, else one per entry of config.layer_types ("full_attention", "sliding_attention",
        and "conv", whose layers take none while decoding), the mapping the models with several kinds of layers
        accept."""
        config = self.model.config
        masks = {w: m[:, None, None, :] for w, m in masks.items()}
        masks[CONV] = None
        if len(set(kinds)) == 1:
            return masks[kinds[0]]
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None or len(layer_types) != len(kinds):
            raise ValueError("fastmoe's decode step needs config.layer_types for a model with several layer kinds")
        return {layer_type: masks[kind] for layer_type, kind in zip(layer_types, kinds)}


def _capture(step, buffers: DecodeBuffers):
    """(output, graph): `step` run once eagerly on a side stream (Triton compiles and autotunes, libraries set up
    their workspaces), then captured and replayed. Running it twice for one token changes nothing: the attention
    layers rewrite the same slots with the same values, and the convolution states are put back in between."""
    saved = buffers.snapshot()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    buffers.restore(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    graph.replay()
    return output, graph


# transformers' stop check one step late (absent before transformers 5.17).
_DEFERRED_STOP_CHECK = getattr(transformers.generation.utils, "DeferredStopCheck", None)


def _deferred_stop_check_supported(device: torch.device, cache, cache_is_returned: bool, is_assistant: bool) -> bool:
    """DeferredStopCheck.is_supported, and also true on CUDA for a decode cache that `generate` does not return (see
    the module docstring)."""
    if isinstance(cache, DecodeCache) and device.type == "cuda" and not cache_is_returned and not is_assistant:
        return True
    return patching.original(_DEFERRED_STOP_CHECK, "is_supported")(device, cache, cache_is_returned, is_assistant)


def _deferred_stop_check_patches() -> list[patching.ForwardPatch]:
    if _DEFERRED_STOP_CHECK is None:
        return []
    return [patching.ForwardPatch(_DEFERRED_STOP_CHECK, "is_supported", staticmethod(_deferred_stop_check_supported))]


# Where `uninstall(model, keep=True)` leaves the DecodeForward (a plain attribute, not a submodule), for `install`.
_KEPT = "_fastmoe_decode_forward"


def install(model: torch.nn.Module, use_cuda_graphs: bool = True) -> DecodeForward:
    """Put a DecodeForward in front of `model`'s forward (a transformers causal LM): the one there, else the one an
    `uninstall(keep=True)` kept (its buffers, graphs and casts reused), else a new one."""
    # Changes nothing but for a DecodeCache: left in place by uninstall (fastmoe.unpatch() removes it with the rest).
    patching.apply_patches(_deferred_stop_check_patches())
    current = model.__dict__.get("forward")
    if not isinstance(current, DecodeForward):
        decode = model.__dict__.pop(_KEPT, None) or DecodeForward(model, use_cuda_graphs)
        decode.inner = current  # the instance forward there now (trl's fused head), or None: the class's
        model.forward = current = decode
    current.use_cuda_graphs = use_cuda_graphs
    return current


def uninstall(model: torch.nn.Module, keep: bool = True) -> None:
    """Back to the forward that was there before `install` (the class's, or an instance forward such as trl's fused
    head). keep: the DecodeForward, with its buffers, graphs and casts, is kept on the model
    for the next `install` (an RL loop switching between generation and training captures each shape once);
    otherwise all of it is freed."""
    current = model.__dict__.get("forward")
    if isinstance(current, DecodeForward):
        if current.inner is None:
            del model.forward
        else:
            model.forward = current.inner
        if keep:
            model.__dict__[_KEPT] = current
    if not keep:
        model.__dict__.pop(_KEPT, None)
