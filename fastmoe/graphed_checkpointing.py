"""Gradient checkpointing whose decoder layers replay CUDA graphs.

Why: a LoRA training step of an MoE model at a few thousand tokens is bound by the host. Each decoder layer
launches a few hundred kernels (peft's LoRA layers, norms, routing, the grouped GEMMs, their backward, and the
recompute that checkpointing adds), and Python spends longer issuing them than the GPU spends running them.
A CUDA graph issues a whole layer with one launch.

What: with checkpointing on, transformers calls `gradient_checkpointing_func(layer_call, *args)` for every
decoder layer (`GradientCheckpointingLayer`). `GraphedCheckpoint` is such a function. It runs the layer as one
autograd Function that is exactly checkpointing: the forward runs the layer without autograd and keeps only its
inputs; the backward recomputes the layer with autograd and differentiates it with respect to its input and its
trainable parameters (LoRA). Each of the two is captured once as a CUDA graph per input signature and replayed
from then on, so the same kernels run on the same data as in eager mode and the results are the same.

A signature holds what decides which kernels the layer runs: the shapes, dtypes and devices of its tensor
arguments, which ones need gradients, the non-tensor arguments, autocast and train/eval state, the peft adapter
state of the layer (active, disabled, merged), and which of its parameters train. Integer and boolean tensor
arguments (attention masks, position ids) can steer Python-side decisions inside the layer (fastmoe's sliding
window path inspects the mask), so their values are part of the signature too: they are compared with the
values the graph was captured with (once per tensor object, a host sync), never copied into a captured graph.
Floating-point arguments are data: they are copied into the graph's input buffers, and so are the integer tensors
declared with `as_graph_data`: a packed row's position ids and its flash layout's document offsets, which the
layers only hand to kernels. Packed rows of as many tokens (fastmoe.padding_free rounds them up) and up to as many
documents (fastmoe.sliding_window_attention pads the offsets) then replay one graph whatever their documents.

A signature is captured the second time it is seen (the first call runs torch's checkpoint, which also compiles
every Triton kernel for those shapes), and signatures of at most `max_shapes` hidden-state shapes per model are
kept: a data set of variable lengths would otherwise capture on every step. A shape takes its place when it comes
back, so that a length seen once holds none; once the places are taken, a packed row's length takes a followed one's
place where the rows asked for so far would have cost less that way (`row_tokens_for_graphs`, which also pads rows
up to followed lengths). The cap counts shapes, not signatures: the layers of one model differ in kind (dense and
MoE layers, sliding-window and full attention), each kind a signature of its own for the same batch, and the
buffers, which cost the memory, are shared by the signatures of one shape.
Anything the graphs cannot honour falls back, call by call, to torch's checkpoint: CPU tensors, dropout, hooks on the
layer (FSDP, recording hidden states), torch.compile, a capture that fails (a host sync inside the layer).

Recorded outputs: transformers collects router logits (and attention weights) with forward hooks that append a
module's output to the collector of the running forward (`transformers.utils.output_capturing`). trl's SFTTrainer
asks for router logits at its defaults on every MoE whose config has a `router_aux_loss_coef` (Qwen3-MoE, Mixtral),
for the load-balancing loss. A hook would run once, at capture; so a graphed call runs the layer under a collector
of its own with the same keys, returns what the hooks appended as extra outputs of the graphs (differentiable: the
aux loss's gradient flows back through them), and appends those to the caller's collector. The collector's keys are
part of the signature. Hidden states are not recorded this way (their first entry is the first layer's input): a
forward that asks for them falls back. A parameter or buffer of the layer moved to new memory (a new
adapter, `model.to`) drops that layer's graphs.

Memory: the graphs of all layers share one pool and are captured on one stream, so what a layer's recompute and
backward allocate is reused by the next layer, as the caching allocator does in eager mode. (The caching allocator
reuses a freed block only on the stream it was allocated on, and cuBLAS keeps a workspace per stream: a stream per
capture would give every layer its own copy of both.) Input, output and input-gradient buffers are shared by all
layers of one signature (every decoder layer has the same shapes), and so are those of the trainable parameters'
gradients, which are cloned out after each replay for autograd to keep as `.grad`. The captured values of the
control arguments (the mask every layer receives) are kept once, not once per layer.

Attention: the recompute reuses the output and log-sum-exp of each attention call of the layer's forward
(fastmoe.kept_attention) instead of running attention's forward kernel again, at the cost of keeping them from the
forward to the backward (the attention output's size per layer: 32 MB at 4,096 tokens of Trinity-Mini).

Casts: the layer's ops cast peft's float32 LoRA factors to the activations' dtype where they use them, some fifty
small copy kernels per layer and step for Trinity-Mini; each body instead casts them all by one multi-tensor copy and
the ops take views of those (kernels/reused_casts.py layer_casts): the same values, two launches per layer.

Recompute: the backward body's forward only rebuilds what the layer's backward reads; the layer's output values are
never read (its gradient comes from the caller). Decoder layers whose feed-forward output goes straight into that
output (fastmoe.models.shared.residual_plus_feed_forward; Cohere's parallel block, its attention's output too) let
those blocks skip their output products there (fastmoe.recompute `recomputing_for_backward`, fastmoe.models.shared
`unread_in_recompute`): the routed experts' down projection (kernels/moe/experts.py `output_unused`), a dense MLP's
down projection and Cohere's output projection (kernels/lora_linear.py `output_unused`). torch's checkpoint, where
fastmoe installs it, marks its recompute the same way (fastmoe.recompute `marking_recompute`).

Long sequences: a call of more than `max_tokens` tokens (8,192) takes torch's checkpoint. There the GPU is busy
whatever issues the kernels (Trinity-Mini's 8 layers at 16,384 tokens: 44.0k tokens/s eager, 44.4k graphed, H200),
and graphs cost memory that grows with the tokens: their private pool holds the layer's working memory beside what
the eager warm-up left in the caching allocator (a 24 GB budget fitted 32,768 tokens instead of 49,152 with graphs),
and every layer's forward graph keeps its attention output. Trinity-Mini's 32 layers at 16,384 tokens held an 8.1
GiB pool and 4.5 GiB more between steps than eager layers, and the step's footprint was 64.2 GB, above
transformers' 61.7 and above fastmoe's own eager step at 24,576 tokens (56.8; H100, benchmarks/results.jsonl).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary
from torch.utils.checkpoint import checkpoint

from fastmoe.kernels.reused_casts import layer_casts
from fastmoe.kept_attention import KeptAttention, keeping, reusing
from fastmoe.offloaded_checkpointing import HostCopy, copy_stream_of, offload_to_host, reload_to_device
from fastmoe.recompute import recomputing
from fastmoe.module_structure import Structure, structure_of

# The default torch checkpoint transformers uses when nothing else is asked for.
standard_checkpoint = functools.partial(checkpoint, use_reentrant=False)

# Longer calls (tokens = batch x seq) run torch's checkpoint: see "Long sequences" above.
MAX_GRAPH_TOKENS = 8192
# Hidden-state shapes whose layers run as graphs, and those of them whose graphs keep the attention outputs (the
# first to come back). A shape's kept outputs cost each layer its attention output's size (Trinity-Mini: 32 MB at
# 4,096 tokens, 1 GB over 32 layers) for a few percent of a step, a shape without them only its shared buffers; its
# recompute then runs attention's forward again. With four shapes keeping them, Trinity-Mini's 32 layers on examples
# of varied lengths (8 x 1,024) held 4.2 GB more than transformers between steps and peaked above it (H100). Eight
# shapes rather than four: those examples' steps at 8 layers ran 21.4k tokens/s instead of 13.7k (4 x 2,048: 16.7k,
# 14.6k), the rest of the steps on eager layers; at 32 layers 0.4 GB more, below transformers' peak.
MAX_GRAPH_SHAPES = 8
KEPT_ATTENTION_SHAPES = 1
# Once every place is taken, a packed row of another length is padded up to a followed one of at most this many times
# its tokens rather than run eager layers, which cost more than that: a step of eager layers at 2,000-4,500 tokens
# took 3-4x as long as a graphed one (Trinity-Mini 8 layers, bound by the host; 1.9x at 32 layers at 4,096 tokens).
PAD_UP_TO_GRAPHS = 2
# Once every place is taken, a packed row's length takes a followed one's place where the lengths asked for so far
# would have cost less that way by more than PLACE_SWAP_STEPS eager steps of its own (its capture and the dropped
# length's, should it come back), counted as: a graphed step GRAPHED_STEP_FIXED_TOKENS + its (padded) tokens, an eager
# one EAGER_STEP_COST times its own length's graphed one. A length asked for often takes the place of one asked for
# little, and a row longer than every followed length takes one where the long rows together (each rare, but padding
# up to it) cost more eagerly than the place's length saves. The fixed part: Trinity-Mini's 8 layers on an H100 took
# 12 ms + 18.5 us a token graphed (bench_sft --data examples, 2026-12-07); the eager cost the lower end of what was
# measured (above). benchmarks/graph_places.py, over 2,000 steps of bench_sft's example lengths with eight places:
# modeled time over an ideal run 1.39 -> 1.18 at 2 x 4,096 (replays 91.5% -> 98.0%), 1.16 -> 1.12 at 4 x 2,048, 1.11
# at 8 x 1,024 either way, 1.74 -> 1.17 at one example a step (1 x 4,096), against a rule that let a length take the
# rarest followed one's place when asked for more than twice as often; a best set of eight chosen with hindsight:
# 1.13, 1.10, 1.08. Insensitive to the constants (eager cost 2 or 3, 1 to 4 steps: 1.18-1.20 at 2 x 4,096).
GRAPHED_STEP_FIXED_TOKENS = 650
EAGER_STEP_COST = 2
PLACE_SWAP_STEPS = 2
# The lengths asked for count with a weight that halves every REQUESTS_HALF_LIFE requests (one a forward), so
# that after a shift in the data's lengths (a curriculum, a second data set) the new ones take places from the old.
# benchmarks/graph_places.py --then, eight places, 2,000 steps of one shape then 2,000 of another, steps 200-499 after
# the shift (replayed, modeled time over ideal) without the decay -> with it: 4 x 2,048 then 1 x 4,096 69.7% 1.49 ->
# 96.0% 1.20 (steps 500 on: 1.20 -> 1.17); 1 x 4,096 then 4 x 2,048 95.3% 1.26 -> 96.3% 1.24; 8 x 1,024 then 2 x 4,096
# and back within 0.01 either way; data of unchanging lengths (2,000 steps) within 0.01 of ideal.
REQUESTS_HALF_LIFE = 500


def layer_of(function: Callable) -> torch.nn.Module | None:
    """The decoder layer behind transformers' checkpointed call: `partial(forward, layer, **kwargs)` (transformers
    5.18+) or `partial(layer.__call__, **kwargs)` (5.17)."""
    if not isinstance(function, functools.partial):
        return None
    if function.args and isinstance(function.args[0], torch.nn.Module):
        return function.args[0]
    owner = getattr(function.func, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


# Integer tensors declared to steer no host-side decision inside a layer (as_graph_data): copied into the graphs'
# input buffers like floating-point data, instead of compared with the values a graph was captured with.
_declared_data = WeakIdKeyDictionary()  # keyed by identity: a tensor's == is elementwise


def as_graph_data(*tensors: torch.Tensor | None) -> None:
    """Declare integer tensors that the layers only hand to kernels (flash layouts' document offsets, packed rows'
    position ids) as data: a graph captured with one batch's values replays with the next batch's."""
    for tensor in tensors:
        if tensor is not None:
            _declared_data[tensor] = True


def _is_data(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex() or tensor in _declared_data


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device, tensor.requires_grad)


def _hidden_shape(signature: tuple) -> tuple:
    """A call signature's hidden-state shape: its first leaf's, the layer's hidden states (what the places count)."""
    return signature[1][0][0]


def _tokens(shape: tuple) -> int:
    """The tokens of a hidden-state shape (batch, seq, hidden)."""
    return shape[0] * shape[1]


def _adapter_state(modules: tuple[torch.nn.Module, ...]) -> tuple:
    """What peft decides per call: which adapters run, and whether they are disabled or merged."""
    state = []
    for module in modules:
        if hasattr(module, "active_adapters") and hasattr(module, "merged"):
            state.append((tuple(module.active_adapters), bool(module.disable_adapters), bool(module.merged)))
    return tuple(state)


@dataclass(frozen=True)
class _LayerParts:
    """What the per-call checks read of a layer, found once per module structure (fastmoe.module_structure): a
    call costs attribute reads, not walks of the layer's modules."""

    structure: Structure
    adapter_layers: tuple[torch.nn.Module, ...]  # peft's tuner layers: their adapter state decides what runs
    dropouts: tuple[torch.nn.Module, ...]  # dropout modules, and modules with an attention_dropout probability

    @classmethod
    def of(cls, layer: torch.nn.Module) -> "_LayerParts":
        structure = structure_of(layer)
        cached = layer.__dict__.get("_fastmoe_layer_parts")  # on the layer, not in a table: see structure_of
        if cached is None or cached.structure is not structure:
            modules = structure.modules
            cached = layer.__dict__["_fastmoe_layer_parts"] = cls(
                structure,
                tuple(m for m in modules if hasattr(m, "active_adapters") and hasattr(m, "merged")),
                tuple(m for m in modules if isinstance(m, torch.nn.modules.dropout._DropoutNd)
                      or hasattr(m, "attention_dropout")))
        return cached

    def trainable(self) -> tuple[str, ...]:
        return tuple(name for name, p in self.structure.named_parameters if p.requires_grad)

    def memory(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*(p for _, p in self.structure.named_parameters),
                                            *self.structure.buffers))




def _is_output_recorder(hook: Callable) -> bool:
    """transformers installs forward hooks that record attentions, router logits or hidden states once such an
    output is asked for, and leaves them on the modules; they do nothing while no collector is active."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def _recorded_keys(modules: tuple[torch.nn.Module, ...]) -> tuple[str, ...] | None:
    """What the hooks of a layer's modules ask of a graphed call: () when none is active, the keys of the running
    forward's output collector when output recorders are the only hooks (see "Recorded outputs" above), None when a
    graph cannot honour them (other hooks would run once, at capture, instead of on every call)."""
    from torch.nn.modules import module as module_globals
    from transformers.utils.output_capturing import _active_collector

    if (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
            or module_globals._global_backward_hooks):
        return None
    for module in modules:
        if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return None
        if not all(_is_output_recorder(hook) for hook in module._forward_hooks.values()):
            return None
    collector = _active_collector.get()
    if not collector:
        return ()
    keys = tuple(sorted(key for key in collector if not key.startswith("_")))
    return None if "hidden_states" in keys else keys


def _recording(function: Callable, keys: tuple[str, ...]) -> Callable:
    """`function` run under an output collector of its own with `keys`: returns (its output, {key: what the output
    recorders appended})."""
    from transformers.utils.output_capturing import _active_collector

    def run(*args, **kwargs):
        recorded = {key: [] for key in keys}
        token = _active_collector.set(recorded)
        try:
            output = function(*args, **kwargs)
        finally:
            _active_collector.reset(token)
        return output, recorded

    return run


def _uses_dropout(dropouts: tuple[torch.nn.Module, ...]) -> bool:
    """Random masks would be frozen into the graph."""
    for module in dropouts:
        if not module.training:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        attention_dropout = getattr(module, "attention_dropout", 0.0)
        if isinstance(attention_dropout, float) and attention_dropout > 0:
            return True
    return False


@dataclass
class _Call:
    """One checkpointed call, flattened: its tensor leaves split into data (copied into the graph's buffers) and
    control (compared with the captured values), and the signature graphs are cached under."""

    leaves: list
    spec: pytree.TreeSpec
    data_index: list[int]
    control_index: list[int]
    signature: tuple


def _flatten_call(layer: torch.nn.Module, parts: _LayerParts, args: tuple, kwargs: dict, on_cuda: bool,
                  recorded_keys: tuple[str, ...] = ()) -> _Call | None:
    """None when the call cannot be graphed: a tensor off the GPU (with on_cuda) or on two devices, or an argument
    that cannot be part of a signature."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    data_index, control_index, leaf_keys = [], [], []
    devices = set()
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            devices.add(leaf.device)
            data = _is_data(leaf)
            (data_index if data else control_index).append(index)
            leaf_keys.append((*_tensor_key(leaf), data))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            leaf_keys.append(("value", type(leaf), leaf))
    if len(devices) != 1 or (on_cuda and next(iter(devices)).type != "cuda"):
        return None
    trainable = parts.trainable()
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) if on_cuda else (False, None)
    signature = (str(spec), tuple(leaf_keys), trainable, autocast, layer.training,
                 _adapter_state(parts.adapter_layers), recorded_keys)
    return _Call(leaves, spec, data_index, control_index, signature)


class _BufferStore:
    """Input, output and gradient buffers, shared by every signature whose tensors at the same place have the same
    layout (the layers of a model differ in their parameters and control values, rarely in these): replays never
    overlap, and every result is copied out before the next replay."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def like(self, role: str, index: int, tensor: torch.Tensor, zeros: bool = False) -> torch.Tensor:
        key = (role, index, *_tensor_key(tensor))
        if key not in self.tensors:
            buffer = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
            self.tensors[key] = (buffer.zero_() if zeros else buffer).requires_grad_(tensor.requires_grad)
        return self.tensors[key]


@dataclass
class _SharedBuffers:
    """Buffers every layer of one signature reads and writes (from the _BufferStore)."""

    store: _BufferStore
    inputs: list[torch.Tensor]  # the data leaves, in order; those whose caller needs a gradient require grad
    grad_inputs: list[torch.Tensor | None]  # one per input, None where no gradient is needed
    outputs: list[torch.Tensor] = field(default_factory=list)
    grad_outputs: list[torch.Tensor] = field(default_factory=list)
    # The layer's trainable parameters' gradients (every layer of a signature has the same parameter shapes), cloned
    # for autograd after each replay: autograd keeps the clone as `.grad`, so the layers share one set of buffers.
    param_grads: list[torch.Tensor | None] | None = None

    @classmethod
    def like(cls, call: _Call, store: _BufferStore) -> "_SharedBuffers":
        inputs = [store.like("input", n, call.leaves[i]) for n, i in enumerate(call.data_index)]
        grad_inputs = [store.like("grad_input", n, t.detach()) if t.requires_grad else None
                       for n, t in enumerate(inputs)]
        return cls(store, inputs, grad_inputs)


@torch.no_grad()
def _copy_into(buffers: list[torch.Tensor], tensors: list[torch.Tensor | None]) -> None:
    for buffer, tensor in zip(buffers, tensors):
        if tensor is None:
            buffer.zero_()
        else:
            buffer.copy_(tensor)


class _LayerGraphs:
    """The forward and backward graphs of one layer for one signature (or, with capture off, the same two
    computations run eagerly on the same buffers)."""

    def __init__(self, function: Callable, call: _Call, layer: torch.nn.Module, buffers: _SharedBuffers,
                 control_values: list[torch.Tensor], recorded_keys: tuple[str, ...] = (), keep_attention: bool = True):
        # With recorded keys the graphs' outputs are (the layer's output, {key: recorded tensors}).
        self.recorded_keys = recorded_keys
        # Whether the forward keeps its attention outputs for the recompute (see "Attention" above).
        self.keep_attention = keep_attention
        self.function = _recording(function, recorded_keys) if recorded_keys else function
        self.memory = _LayerParts.of(layer).memory()
        self.call_spec = call.spec
        self.data_index = call.data_index
        self.control_index = call.control_index
        self.control_values = control_values  # copies of the control leaves, equal to the caller's values
        # The graphs read the captured copies of the control leaves and the shared input buffers, never the caller's
        # tensors (which the template must not keep alive).
        self.template = list(call.leaves)
        for i, value in zip(self.control_index, self.control_values):
            self.template[i] = value
        for i in self.data_index:
            self.template[i] = None
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.buffers = buffers
        self.autocast = call.signature[3]
        # The trainable tensors the layer's ops cast to the activations' dtype (peft's float32 LoRA factors): cast
        # together once per body (kernels/reused_casts.py layer_casts).
        enabled, autocast_dtype = self.autocast
        self.compute_dtype = autocast_dtype if enabled else next(
            (t.dtype for t in buffers.inputs if t.is_floating_point()), None)
        self.cast_sources = [p for p in self.params if type(p.detach()) is torch.Tensor and p.is_floating_point()
                             and p.dtype != self.compute_dtype and p.is_contiguous()
                             ] if self.compute_dtype is not None else []
        self.output_spec: pytree.TreeSpec | None = None
        self.output_is_data: list[bool] = []
        self.forward_graph: torch.cuda.CUDAGraph | None = None
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        self.kept = KeptAttention()  # this layer's attention outputs, from its forward to its recompute

    def _run(self):
        leaves = list(self.template)
        for i, tensor in zip(self.data_index, self.buffers.inputs):
            leaves[i] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.call_spec)
        enabled, dtype = self.autocast
        if not enabled:
            return self.function(*args, **kwargs)
        # Autocast's cache of cast weights would hand the graph tensors that are freed after the capture.
        with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            return self.function(*args, **kwargs)

    def _casts(self):
        return layer_casts(self.cast_sources, self.compute_dtype) if self.cast_sources else contextlib.nullcontext()

    def _forward_body(self) -> None:
        with torch.no_grad(), (keeping(self.kept) if self.keep_attention else contextlib.nullcontext()), self._casts():
            outputs, spec = pytree.tree_flatten(self._run())
        if self.output_spec is None:
            if not all(isinstance(o, torch.Tensor) for o in outputs):
                raise _Ungraphable("the layer returns something other than tensors")
            self.output_spec = spec
            self.output_is_data = [_is_data(o) for o in outputs]
            if not self.buffers.outputs:
                store = self.buffers.store
                self.buffers.outputs = [store.like("output", n, o) for n, o in enumerate(outputs)]
                self.buffers.grad_outputs = [store.like("grad_output", n, o, zeros=True) for n, o in enumerate(outputs)]
        _copy_into(self.buffers.outputs, outputs)

    def _backward_body(self, reuse_attention: bool | None = None) -> None:
        reuse_attention = self.keep_attention if reuse_attention is None else reuse_attention
        with (torch.enable_grad(), (reusing(self.kept) if reuse_attention else contextlib.nullcontext()),
              self._casts()):
            with recomputing():
                outputs = pytree.tree_leaves(self._run())
            pairs = [(o, g) for o, g, data in zip(outputs, self.buffers.grad_outputs, self.output_is_data)
                     if data and o.requires_grad]
            wrt = [t for t in self.buffers.inputs if t.requires_grad] + self.params
            if pairs and wrt:
                grads = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                                 allow_unused=True))
            else:
                grads = [None] * len(wrt)
        num_inputs = len(wrt) - len(self.params)
        _copy_into([b for b in self.buffers.grad_inputs if b is not None], grads[:num_inputs])
        param_grads = grads[num_inputs:]
        if self.buffers.param_grads is None:
            self.buffers.param_grads = [None if g is None else torch.empty_like(g) for g in param_grads]
        _copy_into([b for b in self.buffers.param_grads if b is not None],
                   [g for g, b in zip(param_grads, self.buffers.param_grads) if b is not None])

    def prepare(self, data: list[torch.Tensor], pool, stream: torch.cuda.Stream | None) -> None:
        """Run both bodies once on the caller's data (output shapes; lazy initialisation such as Triton's
        specialisations for these buffers stays out of the capture), then capture them on `stream` (None: no
        capture)."""
        _copy_into(self.buffers.inputs, data)
        if stream is None:
            self._forward_body()
            return
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward_body()
            self._backward_body()
        torch.cuda.current_stream().wait_stream(stream)
        self.forward_graph = _capture(self._forward_body, pool, stream)
        self.backward_graph = _capture(self._backward_body, pool, stream)

    def forward(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        _copy_into(self.buffers.inputs, data)
        self.kept.generation += 1
        if self.forward_graph is not None:
            self.forward_graph.replay()
        else:
            self._forward_body()
        return [o.clone() for o in self.buffers.outputs]

    def backward(self, data: list[torch.Tensor], grad_outputs: list[torch.Tensor | None], generation: int):
        """The backward of the forward that kept `generation`: when the layer keeps attention outputs and a later
        forward of it has replaced them (two forwards before their backwards), an eager recompute that runs attention
        again."""
        _copy_into(self.buffers.inputs, data)
        _copy_into(self.buffers.grad_outputs, grad_outputs)
        own_kept = generation == self.kept.generation
        if self.backward_graph is not None and (own_kept or not self.keep_attention):
            self.backward_graph.replay()
        else:
            self._backward_body(reuse_attention=self.keep_attention and own_kept)
        grad_data = [None if g is None else g.clone() for g in self.buffers.grad_inputs]
        grad_params = [None if g is None else g.clone() for g in self.buffers.param_grads]
        return grad_data, grad_params

    def weights_moved(self, layer: torch.nn.Module) -> bool:
        return _LayerParts.of(layer).memory() != self.memory

    def same_control_values(self, call: _Call) -> bool:
        return all(_same_values(call.leaves[i], value) for i, value in zip(self.control_index, self.control_values))


class _Ungraphable(RuntimeError):
    pass


def _capture(body: Callable[[], None], pool, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """torch.cuda.graph without its context manager, whose exit leaves the capture stream current when ending an
    invalidated capture raises: here a failed capture returns the caller to its own stream."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


# Verdicts of _same_values per caller tensor: transformers builds a mask once per forward and hands the same tensor
# to every layer, so one comparison (one host sync) serves all of them.
_same_values_cache = WeakIdKeyDictionary()  # keyed by identity: a tensor's == is elementwise


def _same_values(tensor: torch.Tensor, captured: torch.Tensor) -> bool:
    verdicts = _same_values_cache.setdefault(tensor, {})
    key = id(captured)
    if key not in verdicts:
        verdicts[key] = bool(torch.equal(tensor, captured))
    return verdicts[key]


class _GraphedLayer(torch.autograd.Function):
    """A checkpointed layer: forward without autograd keeping the inputs (the hidden states in host memory when
    `host_inputs` is given), backward recomputing with autograd."""

    @staticmethod
    def forward(ctx, graphs: _LayerGraphs, host_inputs: HostInputs | None, num_data: int, *tensors: torch.Tensor):
        data = list(tensors[:num_data])
        ctx.graphs = graphs
        ctx.host_inputs = host_inputs
        if host_inputs is None:
            ctx.save_for_backward(*data)
        else:
            ctx.hidden = host_inputs.offload(data[0])
            ctx.save_for_backward(*data[1:])
        outputs = graphs.forward(data)
        ctx.generation = graphs.kept.generation
        for output, is_data in zip(outputs, graphs.output_is_data):
            if not is_data:
                ctx.mark_non_differentiable(output)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor | None):
        data = list(ctx.saved_tensors)
        if ctx.host_inputs is not None:
            data.insert(0, ctx.host_inputs.reload(ctx.hidden))
            del ctx.hidden
        grad_data, grad_params = ctx.graphs.backward(data, list(grad_outputs), ctx.generation)
        return (None, None, None, *grad_data, *grad_params)


class HostInputs:
    """The hidden states a graphed step's layers wait with in pinned host memory (fastmoe.offloaded_checkpointing's
    copies): each goes to the host as its layer's forward returns, on the copy stream, and the backward of a layer
    starts bringing back the next one it will need (the layer below, whose forward came before) on that stream while
    the layer's own graphs replay, so the copies overlap the GPU's work instead of waiting in front of it."""

    def __init__(self) -> None:
        # The inputs offloaded and not yet reloaded, in the order their forwards ran (weak: an autograd graph dropped
        # without a backward takes its copies with it).
        self.waiting: list[weakref.ref] = []

    def offload(self, hidden: torch.Tensor) -> HostCopy | torch.Tensor:
        copy = offload_to_host(hidden)
        if isinstance(copy, HostCopy):
            self.waiting.append(weakref.ref(copy))
        return copy

    def reload(self, copy: HostCopy | torch.Tensor) -> torch.Tensor:
        if not isinstance(copy, HostCopy):
            return copy
        self.waiting = [ref for ref in self.waiting if ref() is not None and ref() is not copy]
        tensor = self._prefetched(copy) if copy.prefetch is not None else reload_to_device(copy)
        if self.waiting:
            self._start_prefetch(self.waiting[-1]())
        return tensor

    @staticmethod
    def _start_prefetch(copy: HostCopy) -> None:
        if copy.prefetch is not None:
            return
        compute_stream = torch.cuda.current_stream(copy.device)
        # Allocated on the compute stream, which reads it; the copy stream writes it after the copy to the host.
        tensor = torch.empty(copy.host.shape, dtype=copy.host.dtype, device=copy.device)
        copy_stream = copy_stream_of(copy.device)
        copy_stream.wait_stream(compute_stream)
        with torch.cuda.stream(copy_stream):
            tensor.copy_(copy.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        tensor.record_stream(copy_stream)
        copy.prefetch = (tensor, ready)

    @staticmethod
    def _prefetched(copy: HostCopy) -> torch.Tensor:
        tensor, ready = copy.prefetch
        copy.prefetch = None
        torch.cuda.current_stream(copy.device).wait_event(ready)
        return tensor


class GraphedCheckpoint:
    """`gradient_checkpointing_func` for transformers' decoder layers: CUDA-graphed checkpointing where it can,
    `fallback` (torch's checkpoint) call by call where it cannot.

    capture=False runs the same path without CUDA graphs, on any device (what the CPU tests check).
    offload_inputs=True (use_gradient_checkpointing="fastmoe" with graphs): each layer's hidden states wait in host
    memory (HostInputs), and the forward keeps no attention outputs for the recompute (they would stay on the GPU
    from the forward to the backward, twice the inputs' size for Trinity-Mini or Qwen3-30B-A3B)."""

    def __init__(self, fallback: Callable = standard_checkpoint, max_shapes: int | None = None, capture: bool = True,
                 max_tokens: int = MAX_GRAPH_TOKENS, offload_inputs: bool = False,
                 kept_attention_shapes: int | None = None):
        self.fallback = fallback
        self.host_inputs = HostInputs() if offload_inputs else None
        self.max_shapes = MAX_GRAPH_SHAPES if max_shapes is None else max_shapes
        self.kept_attention_shapes = KEPT_ATTENTION_SHAPES if kept_attention_shapes is None else kept_attention_shapes
        self.kept_shapes: set[tuple] = set()  # the followed shapes whose graphs keep attention outputs
        # Once a kept shape is dropped, the most tokens a kept shape had: a shape taking its kept place keeps attention
        # outputs only up to as many (a length that took a place by cost may be the long rows' catch-all, whose kept
        # outputs would hold the most memory). None until then.
        self.kept_tokens_bound: int | None = None
        self.max_tokens = max_tokens
        self.capture = capture
        self.pool = None
        self.stream: torch.cuda.Stream | None = None  # every warm-up and capture runs on this one
        # signature -> ids of the layers seen with it; a layer seen again means the signature came back (a step
        # calls each layer once).
        self.seen: dict[tuple, set[int]] = {}
        self.seen_shapes: set[tuple] = set()  # the hidden-state shapes followed: those that came back
        # packed rows' lengths asked for, each request weighed by how recent it is (see REQUESTS_HALF_LIFE)
        self.row_requests: dict[int, float] = {}
        self.request_weight = 1.0  # the next request's weight
        self.rows_asked = 0  # rows asked for (fastmoe.padding_free rounds the first ones coarser)
        self.last_example_tokens: int | None = None  # the last batch of one unpadded row's (fastmoe.padding_free)
        self.graphs: dict[tuple[int, tuple], _LayerGraphs] = {}
        self.buffers: dict[tuple, _SharedBuffers] = {}
        self.store = _BufferStore()
        # Copies of control leaves taken at capture, keyed by the caller's tensor: transformers hands the same mask and
        # position ids to every layer, so the layers (of every signature) share one copy, and a step compares each
        # caller tensor with it once (one host sync per tensor, not per signature).
        self.control_copies = WeakIdKeyDictionary()
        self.ungraphable: dict[tuple, str] = {}

    def row_tokens_for_graphs(self, tokens: int) -> int | None:
        """The length a packed row of `tokens` tokens is padded to so that its layers run as graphs
        (fastmoe.padding_free.filler_for_graphs): its own where that shape is followed already or a place is free
        (the first call runs eagerly; the shape takes its place when it comes back); once every place is taken, the
        shortest followed length up to PAD_UP_TO_GRAPHS times its own; None where none is (eager layers at its own
        length) or beyond max_tokens. A length takes a followed one's place where the lengths asked for so far (the
        recent ones weighing more: REQUESTS_HALF_LIFE) would have cost less that way (see PLACE_SWAP_STEPS)."""
        self.rows_asked += 1
        if tokens > self.max_tokens:
            return None
        followed = {shape[1]: shape for shape in self.seen_shapes if shape[0] == 1}  # one-row shapes by length
        weight = self._count_request(tokens)
        if tokens in followed or len(self.seen_shapes) < self.max_shapes:
            return tokens
        replaced = self._length_to_replace(sorted(followed), tokens, weight)
        if replaced is not None:
            # The first lengths to come back need not be those that pay: the least useful gives its place up.
            self._drop_shape(followed[replaced])
            return tokens
        return min((length for length in followed if tokens < length <= PAD_UP_TO_GRAPHS * tokens), default=None)

    def _count_request(self, tokens: int) -> float:
        """Count a request for a row of `tokens`; its weight (see REQUESTS_HALF_LIFE: later requests weigh more)."""
        weight = self.request_weight
        self.row_requests[tokens] = self.row_requests.get(tokens, 0.0) + weight
        self.request_weight *= 2 ** (1 / REQUESTS_HALF_LIFE)
        if self.request_weight > 1e100:  # the same proportions, rescaled
            self.row_requests = {length: count / self.request_weight for length, count in self.row_requests.items()}
            self.request_weight = 1.0
        return weight

    def _length_to_replace(self, followed: list[int], tokens: int, weight: float) -> int | None:
        """The followed length (of `followed`, sorted) whose place `tokens` takes, if any (see PLACE_SWAP_STEPS); a
        step now weighs `weight` in the requests' counts."""
        swap_cost = weight * PLACE_SWAP_STEPS * EAGER_STEP_COST * (GRAPHED_STEP_FIXED_TOKENS + tokens)
        now = self._requests_cost(followed)
        best, replaced = swap_cost, None
        for length in followed:
            saving = now - self._requests_cost(sorted({*followed, tokens} - {length}))
            if saving > best:
                best, replaced = saving, length
        return replaced

    def _requests_cost(self, followed: list[int]) -> float:
        """What the rows asked for so far cost with graphs for these lengths (sorted), in tokens: a row replays the
        shortest followed length within PAD_UP_TO_GRAPHS times its own, or runs eager layers."""
        cost = 0.0
        for length, count in self.row_requests.items():
            index = bisect.bisect_left(followed, length)
            if index < len(followed) and followed[index] <= PAD_UP_TO_GRAPHS * length:
                cost += count * (GRAPHED_STEP_FIXED_TOKENS + followed[index])
            else:
                cost += count * EAGER_STEP_COST * (GRAPHED_STEP_FIXED_TOKENS + length)
        return cost

    def _drop_shape(self, shape: tuple) -> None:
        """Stop following a hidden-state shape: its signatures' graphs and the buffers only they used go (a graph an
        unfinished backward still holds lives until that backward is done), and its place is free."""
        self.seen_shapes.discard(shape)
        if shape in self.kept_shapes:
            self.kept_tokens_bound = max(self.kept_tokens_bound or 0, *map(_tokens, self.kept_shapes))
            self.kept_shapes.discard(shape)
        signatures = {signature for signature in self.seen if _hidden_shape(signature) == shape}
        for signature in signatures:
            del self.seen[signature]
            self.buffers.pop(signature, None)
        for key in [key for key in self.graphs if key[1] in signatures]:
            del self.graphs[key]
        used = {id(tensor) for buffers in self.buffers.values()
                for tensor in (*buffers.inputs, *buffers.grad_inputs, *buffers.outputs, *buffers.grad_outputs,
                               *(buffers.param_grads or ())) if tensor is not None}
        self.store.tensors = {key: tensor for key, tensor in self.store.tensors.items() if id(tensor) in used}

    def release(self) -> None:
        """Drop every graph and buffer; their memory goes back to the caching allocator."""
        self.graphs.clear()
        self.buffers.clear()
        self.store = _BufferStore()
        self.control_copies = WeakIdKeyDictionary()
        self.seen.clear()
        self.seen_shapes.clear()
        self.kept_shapes.clear()
        self.kept_tokens_bound = None
        self.row_requests.clear()
        self.request_weight = 1.0
        self.rows_asked = 0
        self.last_example_tokens = None
        self.pool = None
        self.stream = None

    def __call__(self, function: Callable, *args: Any, **kwargs: Any):
        graphs, call = self._graphs_for(function, args, kwargs)
        if graphs is None:
            return self.fallback(function, *args, **kwargs)
        data = [call.leaves[i] for i in call.data_index]
        outputs = _GraphedLayer.apply(graphs, self.host_inputs, len(data), *data, *graphs.params)
        result = pytree.tree_unflatten(list(outputs), graphs.output_spec)
        if not graphs.recorded_keys:
            return result
        from transformers.utils.output_capturing import _active_collector

        result, recorded = result
        collector = _active_collector.get()
        for key, tensors in recorded.items():
            collector[key].extend(tensors)
        return result

    def _graphs_for(self, function: Callable, args: tuple, kwargs: dict):
        layer = layer_of(function)
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else None
        if hidden is None or hidden.numel() > self.max_tokens * hidden.shape[-1]:
            return None, None
        if (layer is None or kwargs or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
            return None, None
        parts = _LayerParts.of(layer)
        recorded_keys = _recorded_keys(parts.structure.modules)
        if recorded_keys is None:
            return None, None
        call = _flatten_call(layer, parts, args, dict(function.keywords), on_cuda=self.capture,
                             recorded_keys=recorded_keys)
        if call is None or call.signature in self.ungraphable or _uses_dropout(parts.dropouts):
            return None, None
        key = (id(layer), call.signature)
        graphs = self.graphs.get(key)
        if graphs is not None and graphs.weights_moved(layer):
            del self.graphs[key]
            graphs = None
        if graphs is None:
            graphs = self._capture_on_return(function, call, layer)
            if graphs is None:
                return None, None
        if not graphs.same_control_values(call):
            return None, None
        return graphs, call

    def _capture_on_return(self, function: Callable, call: _Call, layer: torch.nn.Module) -> _LayerGraphs | None:
        """Capture a signature the second time a layer is called with it: the first call (torch's checkpoint)
        compiled every kernel for it. Signatures of at most max_shapes hidden-state shapes are followed, a shape
        taking its place when it comes back: with data of varied lengths, a length seen once (the first batch's, an
        outlier) would otherwise hold one of the few places for good while lengths that recur ran eagerly."""
        shape = _hidden_shape(call.signature)
        followed = shape in self.seen_shapes
        if call.signature not in self.seen:
            if not followed and len(self.seen_shapes) >= self.max_shapes:
                return None
            self.seen[call.signature] = set()
        layers = self.seen[call.signature]
        if id(layer) not in layers:
            layers.add(id(layer))
            return None
        if not followed:
            if len(self.seen_shapes) >= self.max_shapes:
                return None
            self.seen_shapes.add(shape)
            if len(self.kept_shapes) < self.kept_attention_shapes and (
                    self.kept_tokens_bound is None or _tokens(shape) <= self.kept_tokens_bound):
                self.kept_shapes.add(shape)
        if call.signature not in self.buffers:
            self.buffers[call.signature] = _SharedBuffers.like(call, self.store)
        copies = self.control_copies
        control_values = []
        for i in call.control_index:
            leaf = call.leaves[i]
            copy = copies.get(leaf)
            if copy is None or not torch.equal(copy, leaf):  # a tensor modified in place since it was copied
                copy = copies[leaf] = leaf.clone()
            control_values.append(copy)
        graphs = _LayerGraphs(function, call, layer, self.buffers[call.signature], control_values,
                              recorded_keys=call.signature[-1],
                              keep_attention=self.host_inputs is None and shape in self.kept_shapes)
        try:
            if self.capture and (self.pool is None or not self.graphs):
                # A pool lives while a graph captured into it does: once the last is gone (its shape dropped, a
                # failed capture's), torch releases it and refuses further captures into it.
                self.pool = torch.cuda.graph_pool_handle()
                self.stream = self.stream or torch.cuda.Stream()
            graphs.prepare([call.leaves[i] for i in call.data_index], self.pool, self.stream if self.capture else None)
        except Exception as error:  # noqa: BLE001 - whatever stops a capture, this signature runs eagerly
            reason = capture_failure_reason(error)
            self.ungraphable[call.signature] = reason
            _warn_once(type(layer).__name__, reason)
            return None
        self.graphs[(id(layer), call.signature)] = graphs
        return graphs


def capture_failure_reason(error: Exception) -> str:
    """One line on why a capture failed, for the fallback warning. A CUDA error during capture most often comes from
    the previous step's autograd graph still alive while this step's forward runs (a plain loop's `loss` variable
    keeps it until reassigned): torch then warns that an AccumulateGrad node's stream does not match, its gradient
    enters the capture through a stream wait, and the capture fails, for every later capture of the process too.
    Seen on an H200 (2026-12-03); `del loss` after each step kept the graphs."""
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    if "capture" in reason:
        reason += ("; if the previous step's loss was still alive during this forward (a loop's `loss` variable), "
                   "`del loss` after each step keeps the graphs")
    return reason


_warned: set[str] = set()


def _warn_once(layer_name: str, reason: str) -> None:
    import warnings

    if layer_name not in _warned:
        _warned.add(layer_name)
        warnings.warn(f"fastmoe: {layer_name} runs without CUDA graphs ({reason}); training is correct, only slower",
                      stacklevel=3)
