"""trl's SFTTrainer metrics read on the host at logging steps instead of at every step, for fastmoe models.

trl's ``SFTTrainer.compute_loss`` logs the entropy and the mean token accuracy of every training step (and the number
of tokens seen, and the router's aux loss where it is on) as Python floats: five host reads of GPU values right after
the forward is queued (``num_valid > 0`` twice, the two metrics' ``.item()`` and the token count's; six with the aux
loss). The first waits for the forward to finish, and the GPU then idles while the host launches the backward
(about 2.7 ms of LFM2-8B-A1B's 133 ms H100 step; benchmarks/host_gaps.py over bench_sft.py's traces).

The shared op ``trl_sft_metrics`` (fastmoe.models.SHARED_OPS) runs trl's training branch of ``compute_loss`` for a
fastmoe model with the same operations on the same values, and keeps each metric as a 0-d tensor on its device;
``SFTTrainer.log`` reads them all in one transfer before trl averages them, where the Trainer reads its own loss
anyway. The logged numbers are trl's, bit for bit. Evaluation, ``return_outputs``, a ``compute_loss_func``, label
smoothing, Ulysses sequence parallelism, other loss types and other models run trl's own method.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from packaging.version import Version

from fastmoe.patching import ForwardPatch, original
from fastmoe.trl_fused_head import TESTED_TRL

# Token counts of the steps since the last log, on their device, per trainer.
_PENDING_TOKENS = "_fastmoe_pending_token_counts"


def sft_metrics_patches() -> list[ForwardPatch]:
    """SFTTrainer's compute_loss and log -> the ones below (none without a tested trl)."""
    try:
        import trl
        from trl import SFTTrainer
    except ImportError:
        return []
    if not TESTED_TRL[0] <= Version(trl.__version__) < TESTED_TRL[1]:
        return []
    return [ForwardPatch(SFTTrainer, "compute_loss", compute_loss), ForwardPatch(SFTTrainer, "log", log)]


def _keeps_metrics_on_device(trainer, return_outputs: bool) -> bool:
    from fastmoe.trainer_step import _is_fastmoe_model

    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    ulysses = (parallelism is not None and getattr(parallelism, "sp_enabled", False)
               and getattr(parallelism, "sp_backend", None) == "deepspeed")
    return (trainer.model.training and not return_outputs and trainer.compute_loss_func is None
            and trainer.label_smoother is None and trainer.args.loss_type in ("nll", "dft") and not ulysses
            and _is_fastmoe_model(trainer.model))


def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """trl's SFTTrainer.compute_loss (1.16) in training, its metrics kept on the device (module docstring)."""
    from trl import SFTTrainer

    if not _keeps_metrics_on_device(self, return_outputs):
        return original(SFTTrainer, "compute_loss")(self, model, inputs, return_outputs=return_outputs,
                                                    num_items_in_batch=num_items_in_batch)
    inputs["use_cache"] = False
    if self.aux_loss_enabled:
        inputs["output_router_logits"] = True
    outputs = model(**inputs, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    if self.args.loss_type == "dft":
        per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    weighted_aux_loss = self.router_aux_loss_coef * outputs.aux_loss if self.aux_loss_enabled else None
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())
    if weighted_aux_loss is not None:
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + weighted_aux_loss / steps

    gather = self.accelerator.gather_for_metrics
    metrics = self._metrics["train"]
    num_valid = gather(outputs.label_mask.sum()).sum()
    entropy_sum = gather(outputs.entropy.detach().sum()).sum()
    num_correct = gather(outputs.is_top1.sum()).sum()
    # trl: (sum / num_valid).item() if num_valid > 0 else 0.0; the division's value where it is taken.
    any_valid = num_valid > 0
    metrics["entropy"].append(torch.where(any_valid, entropy_sum / num_valid, 0.0))
    metrics["mean_token_accuracy"].append(torch.where(any_valid, num_correct / num_valid, 0.0))
    if "attention_mask" in inputs:
        count = gather(inputs["attention_mask"].sum()).sum()
    elif "position_ids" in inputs:
        local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        count = gather(local).sum()
    else:
        raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
    self.__dict__.setdefault(_PENDING_TOKENS, []).append(count // self._tp_size)
    metrics["num_tokens"] = [self._total_train_tokens]  # in trl's key order; the total is read at the log
    if self.aux_loss_enabled:
        metrics["aux_loss"].append(gather(outputs.aux_loss.detach()).mean())
    return loss


def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
    """trl's SFTTrainer.log, after the metrics kept on the device are read (one transfer)."""
    from trl import SFTTrainer

    read_device_metrics(self)
    return original(SFTTrainer, "log")(self, logs, start_time)


def read_device_metrics(trainer) -> None:
    """The metrics compute_loss kept as tensors -> the Python numbers trl would have appended, and the pending token
    counts into trl's running total (its "num_tokens" metric)."""
    metrics = trainer._metrics["train"]
    pending = trainer.__dict__.pop(_PENDING_TOKENS, [])
    kept = [(key, i) for key, values in metrics.items() for i, value in enumerate(values)
            if isinstance(value, torch.Tensor)]
    if not kept and not pending:
        return
    # float64 holds every fp32 value and every count below 2**53 exactly: one transfer for all of them.
    numbers = torch.stack([metrics[key][i].double() for key, i in kept]
                          + [count.double() for count in pending]).tolist()
    for (key, i), number in zip(kept, numbers):
        metrics[key][i] = number
    for number in numbers[len(kept):]:
        trainer._total_train_tokens += int(number)
    if pending:
        metrics["num_tokens"] = [trainer._total_train_tokens]


@dataclasses.dataclass
class TakenMetrics:
    """trl's training metrics and the token counts not yet read, taken out of a trainer for a log written later
    (fastmoe.deferred_log): what its next log would have read."""

    metrics: dict[str, list]  # trl's, in its key order: numbers, or 0-d tensors kept on the device
    counts: list[torch.Tensor]  # the token counts of the steps since the last log, on the device

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The values still on the device, in the order metrics_in_place takes their numbers."""
        return [v for values in self.metrics.values() for v in values if isinstance(v, torch.Tensor)] + self.counts


def logs_like_sft_trainer(trainer) -> bool:
    """Whether the trainer's log is transformers' Trainer.log or trl's SFTTrainer.log (fastmoe's or trl's own): one
    that logs what it is given and trl's averaged metrics, nothing kept per step besides (as GRPO's tables are)."""
    from transformers import Trainer

    logs = {Trainer.log, log}
    try:
        from trl import SFTTrainer

        logs.add(original(SFTTrainer, "log"))
    except ImportError:
        pass
    return type(trainer).log in logs


def take_metrics(trainer) -> TakenMetrics | None:
    """The trainer's training metrics and pending token counts, moved out (its next log starts from none, as after
    trl's log); None for a trainer without trl's metrics."""
    store = getattr(trainer, "_metrics", None)
    if not isinstance(store, dict) or "train" not in store:
        return None
    train = store["train"]
    taken = TakenMetrics({key: list(values) for key, values in train.items()},
                         trainer.__dict__.pop(_PENDING_TOKENS, []))
    train.clear()
    return taken


@contextlib.contextmanager
def metrics_in_place(trainer, taken: TakenMetrics | None, numbers: list[float]):
    """While a log taken earlier is written: its metrics, with `numbers` for the values that were on the device (in
    `taken.tensors`' order), and its token counts, as host tensors for read_device_metrics to add at the log (no
    device read), in the trainer's place; the trainer's own metrics since then back afterwards."""
    if taken is None:
        yield
        return
    values = iter(numbers)
    metrics = {key: [next(values) if isinstance(v, torch.Tensor) else v for v in entries]
               for key, entries in taken.metrics.items()}
    counts = [torch.tensor(next(values), dtype=torch.float64) for _ in taken.counts]
    train = trainer._metrics["train"]
    current, current_counts = dict(train), trainer.__dict__.pop(_PENDING_TOKENS, None)
    train.clear()
    train.update(metrics)
    if counts:
        trainer.__dict__[_PENDING_TOKENS] = counts
    try:
        yield
    finally:
        train.clear()
        train.update(current)
        trainer.__dict__.pop(_PENDING_TOKENS, None)
        if current_counts is not None:
            trainer.__dict__[_PENDING_TOKENS] = current_counts
