"""The Trainer's own host work per step, without walking the whole model, for fastmoe models.

A transformers Trainer (trl's trainers are subclasses) walks every module of the model several times per
optimizer step: `floating_point_ops` counts all parameters (`num_parameters`) to add to `total_flos`,
`_clip_grad_norm` hands `model.parameters()` to accelerate, which lists them all to find the few that have
gradients, and `model.zero_grad()` walks them again. A LoRA model of an MoE family has thousands of modules, and
those walks take 15-45 ms per step, time in which the GPU, done with the step's work, waits
(benchmarks/host_gaps.py over bench_sft.py's traces). The shared op ``trainer_step`` (fastmoe.models.SHARED_OPS)
replaces the three with ones that, for a model of a patched family, give the same results from what they computed
on the first step, and one check of accelerate's, for any model, with one that gives its answer from the first call:

* ``floating_point_ops``: 6 x tokens x ``num_parameters(exclude_embeddings=True)``, the count taken once per
  model and optimizer (a new `train()` call creates a new optimizer, so a model changed between two calls is
  counted again);
* ``_clip_grad_norm``: accelerate's clipping over the optimizer's parameters, which hold every parameter that
  receives a gradient: checked on the first step (any parameter with a gradient that the optimizer lacks keeps
  transformers' method for that trainer), and only where accelerate's clipping is the plain one (one process or
  DDP; FSDP, DeepSpeed and XLA clip otherwise); for parameters of one device and dtype (a LoRA's), accelerate's
  arithmetic without its grouping passes (``clip_one_group``);
* peft's ``PeftModel.zero_grad`` (torch's ``Module.zero_grad``): the same loop over every parameter, through the
  model's parameters as fastmoe.module_structure keeps them (walked again after any module, parameter or buffer is
  registered);
* accelerate's ``is_lomo_available`` as its optimizer wrapper calls it, twice per ``step``: each call searches
  sys.path for the `lomo_optim` package (``importlib.util.find_spec``), 0.6 ms of host time per step on an H100
  machine (benchmarks/host_gaps.py over an LFM2-8B-A1B step), in which the GPU, drained by the Trainer's loss check,
  waits. Asked once per process instead: whether a package is installed does not change while it trains.

* the Trainer's nan/inf loss filter (``logging_nan_inf_filter``, on by default): after every training step the
  loop asks whether the step's loss is nan or inf, a sync that waits for the backward just queued, so that clipping,
  AdamW, zero_grad, logging and the next batch's host work all run while the GPU has nothing left to do. For a
  fastmoe model the filter runs on the device instead: while an epoch runs, the step's loss reaches the loop as
  ``where(isfinite(loss), loss, the mean of the losses since the last log)``, the value the loop would have added,
  and the loop's own check is off (``args.logging_nan_inf_filter`` reads False inside the epoch loop only; logging,
  evaluation and checkpoint saving see the user's setting). With it (and the fused LM head's syncs moved before the
  forward, fastmoe.trl_fused_head), LFM2-8B-A1B's traced step on an H100 went from 143 to 133 ms and its host-bound
  time from 14.5 to 7.8 ms (benchmarks/host_gaps.py over bench_sft.py's traces).
* accelerate's batch copies: its loader moves each batch to the GPU with non_blocking=False unless the user's
  `accelerator_config` asks otherwise, a copy and a stream sync that wait for the previous step's work; for a
  fastmoe model it copies from pinned memory without the sync while an epoch runs, remembering each tensor's host
  tensor (fastmoe.host_copies): the forward reads the attention mask and labels there, so a step between two logging
  steps need not wait for the GPU at all.
* the log of a logging step: its values are copied to the host without waiting and the log is written at the next
  step's log call, once that step's work is queued, where nothing but the time can tell (fastmoe.deferred_log).

Any other model, and every case not named here, runs the Trainer's own methods.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Mapping

import torch

from fastmoe import deferred_log, host_copies
from fastmoe.models.causal_lm import is_fastmoe_causal_lm
from fastmoe.module_structure import structure_of, track_registrations
from fastmoe.patching import ForwardPatch, original


def trainer_step_patches() -> list[ForwardPatch]:
    import accelerate.optimizer
    from peft import PeftModel
    from transformers import Trainer

    track_registrations()
    patches = [ForwardPatch(Trainer, "_clip_grad_norm", clip_grad_norm),
               ForwardPatch(Trainer, "floating_point_ops", floating_point_ops),
               ForwardPatch(PeftModel, "zero_grad", zero_grad)]
    if hasattr(accelerate.optimizer, "is_lomo_available"):  # the accelerate versions that check at every step
        patches.append(ForwardPatch(accelerate.optimizer, "is_lomo_available", is_lomo_available))
    if hasattr(Trainer, "_run_epoch") and hasattr(Trainer, "_maybe_log_save_evaluate"):  # an epoch loop of its own
        patches += [ForwardPatch(Trainer, "_run_epoch", run_epoch),
                    ForwardPatch(Trainer, "_maybe_log_save_evaluate", maybe_log_save_evaluate)]
    return patches


@functools.cache
def is_lomo_available() -> bool:
    """accelerate's is_lomo_available, its answer taken once per process."""
    import accelerate.optimizer

    return original(accelerate.optimizer, "is_lomo_available")()


def zero_grad(self, set_to_none: bool = True) -> None:
    """torch's Module.zero_grad over a fastmoe model's cached parameter list."""
    if getattr(self, "_is_replica", False) or not _is_fastmoe_model(self):
        return torch.nn.Module.zero_grad(self, set_to_none)
    for _, p in structure_of(self).named_parameters:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def _is_fastmoe_model(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return is_fastmoe_causal_lm(base)


def _step_cache(trainer, model) -> dict:
    """What was computed on the first step of this model with this optimizer."""
    key = (id(model), id(trainer.optimizer))
    cache = trainer.__dict__.get("_fastmoe_step_cache")
    if cache is None or cache["key"] != key:
        cache = trainer.__dict__["_fastmoe_step_cache"] = {"key": key}
    return cache


def floating_point_ops(self, inputs) -> int:
    """transformers' Trainer.floating_point_ops, with the parameter count of a fastmoe model taken once."""
    if not _is_fastmoe_model(self.model):
        from transformers import Trainer

        return original(Trainer, "floating_point_ops")(self, inputs)
    main_input = getattr(self.model, "main_input_name", "input_ids")
    if main_input not in inputs or not hasattr(self.model, "num_parameters"):
        return 0
    cache = _step_cache(self, self.model)
    if "num_parameters" not in cache:
        cache["num_parameters"] = self.model.num_parameters(exclude_embeddings=True)
    return 6 * inputs[main_input].numel() * cache["num_parameters"]


def _optimizer_parameters(trainer, model) -> list | None:
    """The optimizer's parameters when they include every parameter of `model` with a gradient and accelerate
    clips them the plain way; else None."""
    from accelerate.utils import DistributedType
    from transformers.utils import is_sagemaker_mp_enabled

    if trainer.optimizer is None or not _is_fastmoe_model(model):
        return None
    if trainer.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        return None
    if is_sagemaker_mp_enabled() and trainer.args.fp16:
        return None  # sagemaker's model parallelism clips its master weights' gradients
    has_mixed_mesh = getattr(trainer, "_has_mixed_mesh_grads", None)
    if has_mixed_mesh is not None and has_mixed_mesh(model):
        return None
    cache = _step_cache(trainer, model)
    parameters = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    if "optimizer_has_every_gradient" not in cache:
        held = {id(p) for p in parameters}
        cache["optimizer_has_every_gradient"] = all(
            id(p) in held for p in model.parameters() if p.grad is not None)
    return parameters if cache["optimizer_has_every_gradient"] else None


def clip_grad_norm(self, model):
    """transformers' Trainer._clip_grad_norm over the optimizer's parameters of a fastmoe model."""
    parameters = _optimizer_parameters(self, model)
    if parameters is None:
        from transformers import Trainer

        return original(Trainer, "_clip_grad_norm")(self, model)
    cache = _step_cache(self, model)
    if "one_group" not in cache:
        cache["one_group"] = _one_group(parameters)
    if cache["one_group"]:
        self.accelerator.unscale_gradients()
        return clip_one_group(parameters, self.args.max_grad_norm)
    return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)


def _one_group(parameters: list) -> bool:
    """Whether the parameters (and so their gradients: torch keeps a gradient's device and dtype those of its
    parameter) are plain tensors of one device and dtype, which accelerate's and torch's clipping put in one group."""
    from torch.distributed.tensor import DTensor

    return (bool(parameters) and len({(p.device, p.dtype) for p in parameters}) == 1
            and not any(isinstance(p, DTensor) for p in parameters))


@torch.no_grad()
def clip_one_group(parameters: list, max_norm: float) -> torch.Tensor:
    """accelerate's clip_grad_norm_ (its DTensor-aware form, norm 2) for gradients of one device and dtype, without its
    per-step grouping passes over every gradient (clip_grad_norm_ groups them twice by device and dtype, accelerate
    once more by mesh): 10 ms of host time per step at Trinity-Mini's 32 layers, in which the GPU, waiting on the
    Trainer's loss check, has nothing to run. The same operations on the same values, so the same norm and gradients
    bit for bit: each gradient's norm (foreach where the device has it), their norm as torch's get_total_norm takes
    it, that as the one group accelerate stacks, then each gradient times min(1, max_norm / (norm + 1e-6))."""
    from torch.utils._foreach_utils import _device_has_foreach_support

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    foreach = _device_has_foreach_support(grads[0].device)
    norms = torch._foreach_norm(grads, 2.0) if foreach else [torch.linalg.vector_norm(g, 2.0) for g in grads]
    group_norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    total_norm = torch.linalg.vector_norm(torch.stack([group_norm]), 2.0)
    if max_norm != float("inf"):
        coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        if foreach:
            torch._foreach_mul_(grads, coefficient)
        else:
            for g in grads:
                g.mul_(coefficient)
    return total_norm


# Set on a trainer while its epoch loop runs with the nan/inf filter on the device.
_FILTERING = "_fastmoe_filters_loss_on_device"


def _filters_loss_on_device(trainer) -> bool:
    from transformers.utils import is_torch_xla_available

    return (trainer.args.logging_nan_inf_filter and not is_torch_xla_available()
            and hasattr(trainer, "_tr_loss") and _is_fastmoe_model(trainer.model))


def run_epoch(self, *args, **kwargs):
    """transformers' Trainer._run_epoch for a fastmoe model with its nan/inf loss filter on the device, its batches
    copied to the GPU without waiting for it and its logs written a step later (module docstring)."""
    from transformers import Trainer

    run = original(Trainer, "_run_epoch")
    train_dataloader = kwargs.get("train_dataloader", args[2] if len(args) > 2 else None)
    with (_loss_filtered_on_device(self), _batches_copied_asynchronously(self, train_dataloader),
          _logs_deferred(self)):
        return run(self, *args, **kwargs)


# Set on a trainer while its epoch loop may write logs a step later (fastmoe.deferred_log).
_DEFERRING = "_fastmoe_defers_logs"


@contextlib.contextmanager
def _logs_deferred(trainer):
    """While the epoch runs, a fastmoe model's logging steps may write their log at the next step's log call
    (fastmoe.deferred_log); one still pending is written when the loop ends."""
    if not _is_fastmoe_model(trainer.model):
        yield
        return
    trainer.__dict__[_DEFERRING] = True
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the loop's own error is the one to see
            deferred_log.write_pending(trainer)
        raise
    else:
        deferred_log.write_pending(trainer)
    finally:
        del trainer.__dict__[_DEFERRING]


@contextlib.contextmanager
def _loss_filtered_on_device(trainer):
    """While the epoch runs, the loop receives each step's loss through nan_inf_filtered and its own check is off."""
    if not _filters_loss_on_device(trainer):
        yield
        return
    # The outermost training_step, whichever trainer subclass defines it: what the loop adds is what it returns.
    own_step = trainer.__dict__.get("training_step")
    step = trainer.training_step

    def training_step(*step_args, **step_kwargs):
        return nan_inf_filtered(trainer, step(*step_args, **step_kwargs))

    trainer.training_step = training_step
    trainer.__dict__[_FILTERING] = True
    trainer.args.logging_nan_inf_filter = False
    try:
        yield
    finally:
        trainer.args.logging_nan_inf_filter = True
        del trainer.__dict__[_FILTERING]
        if own_step is None:
            del trainer.__dict__["training_step"]
        else:
            trainer.training_step = own_step


def _copies_batches_asynchronously(trainer, dataloader) -> bool:
    """Whether the epoch's batches can be copied to the GPU without a sync: accelerate's loader that moves them
    (`_non_blocking`), from pinned memory (whose blocks torch's host allocator keeps until their copy has run), to a
    CUDA device, for a fastmoe model."""
    return (dataloader is not None and hasattr(dataloader, "_non_blocking") and not dataloader._non_blocking
            and getattr(dataloader, "pin_memory", False) and getattr(dataloader, "device", None) is not None
            and torch.device(dataloader.device).type == "cuda" and _is_fastmoe_model(trainer.model))


@contextlib.contextmanager
def _batches_copied_asynchronously(trainer, dataloader):
    """accelerate's loader copies each batch with non_blocking=False unless asked (`accelerator_config`'s
    non_blocking): from pinned memory that is a copy followed by a stream sync, so every step's first batch copy
    waits for the previous step's backward, clipping and optimizer to finish, and the GPU then idles while the host
    collates the next batch and runs the forward's Python up to its first kernels. While the epoch runs, a fastmoe
    model's loader copies them asynchronously: the same values, queued behind the previous step's work; and each
    copied tensor's host tensor is remembered (fastmoe.host_copies), so that the forward reads the attention mask
    and labels on the host without waiting for the GPU either."""
    if not _copies_batches_asynchronously(trainer, dataloader):
        yield
        return
    import accelerate.data_loader

    send_to_device = accelerate.data_loader.send_to_device
    dataloader._non_blocking = True
    accelerate.data_loader.send_to_device = remembering_host_copies(send_to_device)
    try:
        yield
    finally:
        dataloader._non_blocking = False
        accelerate.data_loader.send_to_device = send_to_device


def remembering_host_copies(send_to_device):
    """accelerate's send_to_device(batch, device, ...), remembering each moved tensor of a batch (a mapping of names to
    tensors) as a copy of the host tensor it came from (fastmoe.host_copies)."""

    def send(batch, *args, **kwargs):
        host = dict(_tensors_by_key(batch))  # first: a BatchEncoding's .to() replaces its tensors in place
        moved = send_to_device(batch, *args, **kwargs)
        for key, tensor in _tensors_by_key(moved):
            if key in host and tensor is not host[key]:
                host_copies.remember(tensor, host[key])
        return moved

    return send


def _tensors_by_key(batch) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a batch as a loader yields it (a mapping of names to tensors), by name; none otherwise."""
    if isinstance(batch, Mapping):
        return [(key, value) for key, value in batch.items() if isinstance(value, torch.Tensor)]
    return []


def nan_inf_filtered(trainer, loss: torch.Tensor) -> torch.Tensor:
    """What transformers' loop adds to its running loss for this step's loss with logging_nan_inf_filter on: the
    loss, or where it is nan or inf, the mean of the running loss over the steps since the last log. Computed on the
    loss's device: the same operations on the same values, without reading the loss on the host."""
    running = trainer._tr_loss
    if not isinstance(loss, torch.Tensor) or loss.device != running.device:
        return loss  # the loop's own device check says what is wrong
    steps = 1 + trainer.state.global_step - trainer._globalstep_last_logged
    return torch.where(torch.isfinite(loss), loss, running / steps)


def maybe_log_save_evaluate(self, *args, **kwargs):
    """transformers' Trainer._maybe_log_save_evaluate inside a fastmoe model's epoch loop: the previous step's log
    first if it is pending, this step's left for the next call where it may be (fastmoe.deferred_log), else
    transformers' method, run with the user's logging_nan_inf_filter (evaluation filters its losses by it and
    checkpoints save the arguments)."""
    from transformers import Trainer

    run = original(Trainer, "_maybe_log_save_evaluate")
    if self.__dict__.get(_DEFERRING):
        deferred_log.write_pending(self)
        call = inspect.signature(run).bind(self, *args, **kwargs).arguments if self.control.should_log else {}
        if call and deferred_log.defers(self, call.get("tr_loss")):
            return deferred_log.defer(self, call["tr_loss"], call.get("grad_norm"), call.get("learning_rate"),
                                      call.get("start_time"))
    if not self.__dict__.get(_FILTERING):
        return run(self, *args, **kwargs)
    self.args.logging_nan_inf_filter = True
    try:
        return run(self, *args, **kwargs)
    finally:
        self.args.logging_nan_inf_filter = False
