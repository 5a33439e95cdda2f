"""fastmoe's ops as ``torch.library`` custom ops, so that torch.compile sees each op as one node with a fake (meta)
implementation instead of tracing into a Triton launch (which it cannot: a launch reads data pointers).

``KernelOp`` makes one differentiable op from the pieces an op file writes once:

* ``forward(*inputs)`` and ``backward(*args)``: the launchers, functions of tensors, ints, floats, bools, dtypes,
  optional tensors and lists of ints (type-annotated: torch.library reads the schema from the annotations; a
  backward may also take lists of tensors, a forward may not, since autograd.Function and custom ops disagree on
  their gradients), each returning a tensor or a tuple of fresh tensors (never an input or a view of one);
* ``forward_fake`` / ``backward_fake``: the same outputs' shapes, dtypes and strides, computed without data (a
  compiled graph trusts the strides: a fake that says contiguous where the launcher returns a transposed view makes
  later views in the graph read the wrong elements);
* ``setup_context(ctx, inputs, output)``: saves what the backward needs (as ``torch.autograd.Function`` does);
* ``gradients(ctx, backward, *grads)``: calls ``backward`` and returns one gradient per forward input.

Eager calls run a ``torch.autograd.Function`` made of those pieces, with the launchers called directly; calls that
torch.compile traces run the custom ops, whose autograd calls the backward custom op. Both run the same launchers:
the custom-op dispatch costs tens of microseconds more per call on the host (benchmarks/bench_op_overhead.py), and
an eager training step is host-bound, so eager calls do not pay it.

Custom ops cannot return None: a backward launcher returns ``no_gradient(...)`` (an empty tensor) for a gradient it
was not asked for, and ``gradients`` passes None to autograd instead.

``ReferenceOp`` wraps a PyTorch reference whose shapes depend on the data (the MoE references loop over experts
with ``torch.where``), which dynamo would otherwise split into many graphs: under torch.compile it runs as one
custom op, forward without autograd and backward by recomputing it under torch.func.vjp. Eager calls run it
directly. References of plain shapes need none of this: dynamo traces them as they are.

``GraphOp`` is the same for a function without gradients (``dequantize_nf4``). ``always_custom_ops()`` sends eager
calls through the custom ops too, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

LIBRARY = "fastmoe"

_state = threading.local()


def _through_custom_ops() -> bool:
    return torch.compiler.is_compiling() or getattr(_state, "always", False)


@contextlib.contextmanager
def always_custom_ops():
    """Run every fastmoe op through its custom op inside this block, eager calls too (tests check the custom ops
    and their fakes without compiling)."""
    previous = getattr(_state, "always", False)
    _state.always = True
    try:
        yield
    finally:
        _state.always = previous


def no_gradient(like: torch.Tensor) -> torch.Tensor:
    """What a backward launcher returns for a gradient nobody asked for (custom ops cannot return None)."""
    return like.new_empty(0)


def unread_output(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, width) output in like's dtype that an op skipped because nobody reads it (a checkpointed layer's
    recompute): uninitialised on a GPU, NaN elsewhere, so that the CPU tests see any use of it."""
    if like.is_cuda:
        return like.new_empty(rows, width)
    return like.new_full((rows, width), float("nan"))


class KernelOp:
    """A differentiable op: ``torch.autograd.Function`` in eager mode, torch.library custom ops under torch.compile.

    ``backward`` may be None when the gradient is plain PyTorch that torch.compile can trace (``gradients`` then
    computes it itself and ignores its ``backward`` argument).
    """

    def __init__(
        self,
        name: str,
        forward: Callable,
        forward_fake: Callable,
        setup_context: Callable,
        gradients: Callable,
        backward: Callable | None = None,
        backward_fake: Callable | None = None,
    ):
        self.name = name
        self.forward_op = torch.library.custom_op(f"{LIBRARY}::{name}", forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = None
        if backward is not None:
            self.backward_op = torch.library.custom_op(f"{LIBRARY}::{name}_backward", backward, mutates_args=())
            self.backward_op.register_fake(backward_fake)
        backward_op = self.backward_op

        def op_gradients(ctx, *grads):
            return gradients(ctx, backward_op, *grads)

        # forward(ctx, ...) rather than a Function with setup_context: that style costs ~10 us more per call (it
        # goes through functorch's dispatch).
        def eager_forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            # The outputs after the first are what the backward keeps (the experts' pre-activations, a norm's rstd),
            # marked non-differentiable, or a second result often unused: autograd would fill each one's gradient
            # with zeros (a launch each, and a write as large as the output: the experts' (rows, 2 x intermediate)
            # pre-activations), which no backward reads. They arrive as None; the first output's stays a tensor.
            ctx.set_materialize_grads(False)
            if isinstance(output, tuple):
                ctx.first_output = (output[0].shape, output[0].dtype, output[0].device)
            return output

        def eager_gradients(ctx, *grads):
            if grads[0] is None and len(grads) > 1:  # only a later output was used
                shape, dtype, device = ctx.first_output
                grads = (torch.zeros(shape, dtype=dtype, device=device), *grads[1:])
            return gradients(ctx, backward, *grads)

        self.forward_op.register_autograd(op_gradients, setup_context=setup_context)
        self.function = type(f"{name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(eager_forward),
            "backward": staticmethod(eager_gradients),
        })

    def __call__(self, *inputs):
        if _through_custom_ops():
            return self.forward_op(*inputs)
        return self.function.apply(*inputs)


class GraphOp:
    """A function without gradients (``fn``, annotated as a launcher is) as a custom op under torch.compile; eager
    calls run it directly."""

    def __init__(self, name: str, fn: Callable, fake: Callable):
        self.fn = fn
        self.op = torch.library.custom_op(f"{LIBRARY}::{name}", fn, mutates_args=())
        self.op.register_fake(fake)

    def __call__(self, *inputs):
        if _through_custom_ops():
            return self.op(*inputs)
        return self.fn(*inputs)


class ReferenceOp:
    """A PyTorch reference as one opaque custom op under torch.compile (eager calls run it as it is).

    ``reference`` takes tensors, optional tensors, ints, floats and bools (annotated) and returns one tensor;
    ``fake`` gives that tensor's shape, dtype and strides. The backward op recomputes the reference with autograd
    and returns the gradients of the inputs that need one, in input order.
    """

    def __init__(self, name: str, reference: Callable[..., torch.Tensor], fake: Callable[..., torch.Tensor]):
        self.reference = reference

        schema = torch.library.infer_schema(reference, mutates_args=())  # "(Tensor x, float eps) -> Tensor"
        arguments = schema[1:schema.rindex(") ->")]
        self.forward_op = torch.library.custom_op(f"{LIBRARY}::{name}", reference, mutates_args=())
        self.forward_op.register_fake(fake)
        self.backward_op = torch.library.custom_op(
            f"{LIBRARY}::{name}_backward", self._recompute_gradients, mutates_args=(),
            schema=f"(Tensor grad, {arguments}, bool[] needs) -> Tensor[]",
        )
        self.backward_op.register_fake(self._fake_gradients)
        self.forward_op.register_autograd(self._gradients, setup_context=self._setup_context)

    def _recompute_gradients(self, grad, *args):
        *inputs, needs = args

        def of_wanted(*wanted):
            wanted = iter(wanted)
            return self.reference(*(next(wanted) if need else t for t, need in zip(inputs, needs)))

        # torch.func, not torch.autograd: a custom op runs below autograd's dispatch keys, where a recompute would
        # record no graph.
        _, vjp = torch.func.vjp(of_wanted, *(t for t, need in zip(inputs, needs) if need))
        # Contiguous whatever the inputs' layout, as the fake says: compiled graphs rely on the fake's strides.
        return [g.contiguous() for g in vjp(grad)]

    @staticmethod
    def _fake_gradients(grad, *args):
        *inputs, needs = args
        return [t.new_empty(t.shape) for t, need in zip(inputs, needs) if need]

    @staticmethod
    def _setup_context(ctx, inputs, output):
        # Every tensor, lists' included, goes through save_for_backward (saved-tensor hooks see them); the rest
        # stays on ctx.
        leaves, ctx.spec = pytree.tree_flatten(list(inputs))
        ctx.is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        ctx.save_for_backward(*(leaf for leaf, is_tensor in zip(leaves, ctx.is_tensor) if is_tensor))
        ctx.others = [None if is_tensor else leaf for leaf, is_tensor in zip(leaves, ctx.is_tensor)]

    def _gradients(self, ctx, grad):
        saved = iter(ctx.saved_tensors)
        leaves = [next(saved) if is_tensor else leaf for leaf, is_tensor in zip(ctx.others, ctx.is_tensor)]
        inputs = pytree.tree_unflatten(leaves, ctx.spec)
        needs = [bool(need) and isinstance(t, torch.Tensor) for need, t in zip(ctx.needs_input_grad, inputs)]
        grads = iter(self.backward_op(grad, *inputs, needs))
        return tuple(next(grads) if need else None for need in needs)

    def __call__(self, *inputs):
        if _through_custom_ops():
            return self.forward_op(*inputs)
        return self.reference(*inputs)
