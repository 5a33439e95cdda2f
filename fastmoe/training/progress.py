"""The progress bar of `fastmoe train`: the latest loss beside the bar, instead of one printed dict per logged step."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class LossProgressBar(TrainerCallback):
    """A tqdm bar over the training steps (on the main process only), with the latest logged loss beside it."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
