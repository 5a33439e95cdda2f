"""A logging step's log, taken one step later, so that logging does not drain the GPU.

At a logging step transformers' Trainer reads the step's loss and gradient norm on the host (trl's SFTTrainer its
metrics too, fastmoe.trl_sft_metrics): reads that wait for the step's backward and optimizer to finish, after which
the GPU idles while the host logs, collates the next batch and runs the next forward's Python up to its first
kernel. At logging_steps=1 that is every step. For a fastmoe model trained on one process (fastmoe.trainer_step's
epoch loop), the values are instead copied to the host without waiting (from the device to pinned memory, behind
the step's work) and the log is written at the next step's log call, once that step's work is queued: the GPU
works through it while the host waits for the copy. The log is the one transformers would have written: the same
values, the same entry in `state.log_history` (its step and epoch those of the logged step), the same calls of
`Trainer.log` and the callbacks' `on_log`, one step later. A pending log is written before anything else logs,
evaluates or saves, and at the end of the epoch loop.

Only where nothing can tell the difference but the time: every callback's `on_log` is transformers' own (its
printers, progress bars and reporting integrations only record what they are given), fastmoe's (`fastmoe train`'s
progress bar) or not overridden (a callback of the user's could act on a log: stop, evaluate, save); the trainer's
`log` transformers' or trl's SFTTrainer's (GRPO's, say, keeps tables per step besides); a single process; no
input-token counting (its speed figures read the clock at the log); a transformers release whose
`_maybe_log_save_evaluate` this was written against (TESTED_TRANSFORMERS). Anything else logs as transformers does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from packaging.version import Version

from fastmoe import trl_sft_metrics

# The transformers releases whose Trainer._maybe_log_save_evaluate and Trainer.log this module's log repeats.
TESTED_TRANSFORMERS = (Version("5.17.0"), Version("5.24.0"))
# The trainer's pending log, if any.
_PENDING = "_fastmoe_deferred_log"


@dataclasses.dataclass
class _PendingLog:
    step: int
    epoch: float | None
    steps: int  # optimizer steps the loss sums over
    learning_rate: float
    grad_norm: float | None  # a gradient norm given as a number (a tensor's is in `values`)
    grad_norm_on_device: bool
    metrics: trl_sft_metrics.TakenMetrics | None
    start_time: float | None
    values: torch.Tensor  # on the host: the loss sum, the gradient norm, then `metrics`' device values
    copied: torch.cuda.Event | None  # recorded after the copy into `values`


@functools.cache
def _tested_transformers() -> bool:
    import transformers

    return TESTED_TRANSFORMERS[0] <= Version(transformers.__version__) < TESTED_TRANSFORMERS[1]


def _passive_on_log(callback) -> bool:
    from transformers import TrainerCallback

    on_log = type(callback).on_log
    # transformers' printers, progress bars and reporting integrations, and fastmoe's own (`fastmoe train`'s bar)
    return on_log is TrainerCallback.on_log or on_log.__module__.startswith(("transformers.", "fastmoe."))


def defers(trainer, tr_loss) -> bool:
    """Whether this call of _maybe_log_save_evaluate logs, and may do so one step later (module docstring)."""
    from transformers.utils import is_torch_xla_available

    control, state = trainer.control, trainer.state
    return (control.should_log and state.global_step > trainer._globalstep_last_logged
            and not control.should_evaluate and not control.should_save and _tested_transformers()
            and isinstance(tr_loss, torch.Tensor) and trainer.args.world_size == 1
            and trainer.args.include_num_input_tokens_seen in ("no", False, None) and not is_torch_xla_available()
            and trl_sft_metrics.logs_like_sft_trainer(trainer)
            and all(_passive_on_log(callback) for callback in trainer.callback_handler.callbacks))


def defer(trainer, tr_loss: torch.Tensor, grad_norm, learning_rate: float | None, start_time: float | None) -> None:
    """What transformers' _maybe_log_save_evaluate does at a logging step before its `log` call, with the values
    copied to the host without waiting; the log itself is left for `write_pending`."""
    loss_sum = tr_loss.detach().clone()
    tr_loss -= tr_loss  # reset, as transformers does once it has read it
    grad_norm_on_device = isinstance(grad_norm, torch.Tensor)
    metrics = trl_sft_metrics.take_metrics(trainer)
    tensors = [loss_sum, *([grad_norm] if grad_norm_on_device else []), *(metrics.tensors if metrics else [])]
    # float64 holds every fp32 value and every count below 2**53 exactly: .item() of each gives the same numbers.
    stacked = torch.stack([t.detach().double().reshape(()) for t in tensors])
    copied = None
    if stacked.is_cuda:
        values = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        values.copy_(stacked, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    else:
        values = stacked
    trainer.__dict__[_PENDING] = _PendingLog(
        step=trainer.state.global_step, epoch=trainer.state.epoch,
        steps=trainer.state.global_step - trainer._globalstep_last_logged,
        learning_rate=learning_rate if learning_rate is not None else trainer._get_learning_rate(),
        grad_norm=None if grad_norm_on_device else grad_norm, grad_norm_on_device=grad_norm_on_device,
        metrics=metrics, start_time=start_time, values=values, copied=copied)
    trainer._globalstep_last_logged = trainer.state.global_step
    trainer.store_flos()
    trainer.control.should_log = False  # as the callbacks' on_log would


def write_pending(trainer) -> None:
    """The pending log, if any, as transformers would have written it at its step."""
    pending = trainer.__dict__.pop(_PENDING, None)
    if pending is None:
        return
    if pending.copied is not None:
        pending.copied.synchronize()  # the logged step's work and the copy: not what was queued after them
    numbers = pending.values.tolist()
    loss_sum = numbers[0]
    grad_norm = numbers[1] if pending.grad_norm_on_device else pending.grad_norm
    logs = {"loss": loss_sum / pending.steps}
    if grad_norm is not None:
        logs["grad_norm"] = grad_norm
    logs["learning_rate"] = pending.learning_rate
    trainer._total_loss_scalar += loss_sum
    with _state_of_the_logged_step(trainer, pending), trl_sft_metrics.metrics_in_place(
            trainer, pending.metrics, numbers[1 + pending.grad_norm_on_device:]):
        trainer.log(logs, pending.start_time)


@contextlib.contextmanager
def _state_of_the_logged_step(trainer, pending: _PendingLog):
    """The step and epoch of the logged step, and the control's should_log of the current one kept, while the log is
    written."""
    state, control = trainer.state, trainer.control
    step, epoch, should_log = state.global_step, state.epoch, control.should_log
    state.global_step, state.epoch = pending.step, pending.epoch
    try:
        yield
    finally:
        state.global_step, state.epoch = step, epoch
        trainer.control.should_log = should_log
