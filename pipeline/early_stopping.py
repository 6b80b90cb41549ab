"""Early stopping on a validation metric: stop after `patience` epochs without improvement.

The rule is Keras's and Lightning's `EarlyStopping` with `min_delta=0`: an epoch improves
when its monitored value is strictly better than the best so far (lower for a loss, higher
for an accuracy); after `patience` epochs in a row that do not, training stops. A value that
is not finite never improves. The best epoch's weights are kept (a copy on the CPU), so the
logged model can be the best one rather than the last. Its whole state is part of
`loop.TrainState`, so a resumed run stops exactly where the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


def mode(monitor: str) -> str:
    """'min' for a loss, 'max' for the rest (accuracy): the direction the name implies."""
    return "min" if "loss" in monitor else "max"


@dataclass
class EarlyStopping:
    """State of early stopping on `monitor`; `update` once per validated epoch."""

    patience: int
    monitor: str = "val/loss"
    best: float | None = None  # the best value so far; None before the first finite one
    best_epoch: int = 0  # 0: no epoch improved yet
    bad_epochs: int = 0  # epochs in a row without improvement
    stopped_epoch: int = 0  # the epoch after which training stopped; 0 while it goes on
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if mode(self.monitor) == "min" else value > self.best

    def update(self, epoch: int, value: float, model: nn.Module) -> bool:
        """Record epoch `epoch`'s monitored `value`; True when training should stop now."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_weights = {k: v.detach().to("cpu", copy=True)
                                 for k, v in model.state_dict().items()}  # fmt: skip
        else:
            self.bad_epochs += 1
        if self.patience > 0 and self.bad_epochs >= self.patience:
            self.stopped_epoch = epoch
        return self.stopped_epoch > 0

    def state_dict(self) -> dict:
        return {
            "patience": self.patience,
            "monitor": self.monitor,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
