"""The training loop: plain PyTorch over in-memory tensors, reporting to a tracker.

The loop knows nothing about MLflow. It hands logged steps to a `Tracker` in batches, so on
a GPU the host waits for the device only once per `SYNC_EVERY` steps, not on every step.
A loss that is not finite (NaN or inf) stops training with `Diverged`, found in those same
transfers: no extra wait for the device.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from pipeline import signals
from pipeline.early_stopping import EarlyStopping
from pipeline.losses import LossFn

SYNC_EVERY = 50  # logged steps kept on the device before one host transfer


class StepLog(NamedTuple):
    epoch: int
    epoch_step: int  # 0-based index of the batch within its epoch, as the notebook counts
    step: int  # global step, 1-based: the x axis of every train/* curve
    time: float
    loss: float
    accuracy: float
    lr: float


class Diverged(Exception):  # noqa: N818 - an outcome of training, not an error
    """Training stopped: `key` (a loss) was `loss`, not a finite number, at global step `step`.

    Raised by `train_epoch` once the rows up to and including that step have gone to the
    tracker. Found among the logged steps only (every `log_every`-th), at most `SYNC_EVERY`
    logged steps after it happened: the loop reads losses in batches (see the module doc).
    """

    def __init__(self, step: int, loss: float, key: str = "train/loss") -> None:
        super().__init__(f"{key} is {loss} at step {step}")
        self.step, self.loss, self.key = step, loss, key


class Tracker(Protocol):
    def log_steps(self, rows: list[StepLog]) -> None: ...

    # timestamp: seconds since the epoch the values were measured at; None: now.
    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None: ...


@dataclass
class TrainState:
    """Everything a resumed run needs: weights, optimizer moments, lr schedule, counters,
    early stopping and every RNG, so that training on from `state_dict()` gives bit for bit
    what training on without the interruption would have (same device and thread count).

    Counters: `epoch` is the epoch in progress, or the last one completed when `batch` is 0;
    `batch` the batches of `epoch` trained so far (all of them: its validation is pending).
    `epoch_rng` is the shuffling generator's state when `epoch` drew its order, so a resumed
    epoch draws the same order again and goes on from batch `batch`.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # shuffling order; model init uses the global RNG
    # Stepped once after every optimizer step; None: the lr stays as the optimizer has it.
    scheduler: LRScheduler | None = None
    epoch: int = 0
    step: int = 0
    batch: int = 0
    epoch_rng: torch.Tensor | None = field(default=None, repr=False)
    early_stopping: EarlyStopping | None = None
    # A faster stand-in for model(x) with the same result (compiled, or collapsed), if any.
    forward: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "batch": self.batch,
            "epoch_rng": self.epoch_rng,
            "early_stopping": None if self.early_stopping is None
            else self.early_stopping.state_dict(),
            # Not drawn from while training today (no dropout, no augmentation), kept so
            # that a model or loss that does draw resumes exactly too.
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "python_rng": random.getstate(),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.scheduler is None) != (state["scheduler"] is None):
            raise ValueError("the saved state and this one differ in having an lr scheduler")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch, self.epoch_rng = state.get("batch", 0), state.get("epoch_rng")
        if (self.early_stopping is None) != (state.get("early_stopping") is None):
            raise ValueError("the saved state and this one differ in early stopping")
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("python_rng") is not None:
            version, internal, gauss = state["python_rng"]
            random.setstate((version, tuple(internal), gauss))


class StepHook(Protocol):
    """Called between training steps (checkpointing): `due` after every step, cheaply;
    when it says so, the pending rows go to the tracker first, then `__call__`."""

    def due(self, state: TrainState) -> bool: ...

    def __call__(self, state: TrainState) -> None: ...


@dataclass
class Evaluation:
    """Mean loss and accuracy (fractions in [0, 1]) of a model on a split.

    Accuracy is NaN when the loss is not finite (NaN or inf): the model's outputs are then
    not numbers, and the classes their argmax picks say nothing about it.
    """

    loss: float
    accuracy: float
    confusion: list[list[int]]  # confusion[true][predicted]

    def per_class_accuracy(self) -> list[float]:
        if math.isnan(self.accuracy):
            return [math.nan] * len(self.confusion)
        return [row[i] / max(sum(row), 1) for i, row in enumerate(self.confusion)]


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_epoch(
    state: TrainState,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    tracker: Tracker,
    batch_size: int = 128,
    log_every: int = 1,
    amp: bool = False,
    on_step: StepHook | None = None,
    shard: Callable[[torch.Tensor], tuple[torch.Tensor, float]] | None = None,
) -> None:
    """One pass over (x, y) in a fresh shuffled order, batches sliced from device tensors;
    or, when `state` stopped inside an epoch (0 < batch < batches), the rest of that one.

    `shard`, if given, maps each batch's indices to the part this process trains on and the
    weight of its loss (see pipeline.distributed.BatchSplit); `batch_size` is then the
    batch of all processes together.

    Raises `Diverged` when a logged step's loss is NaN or infinite; the state is then
    mid-epoch, its weights most likely not finite. A stop signal (`signals.Terminated`)
    leaves the state between two steps (see `signals.deferred`).
    """
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    forward = state.forward or model
    model.train()
    batches = -(-len(x) // batch_size)
    drawn = None  # a new epoch's generator, past the draw of its order, until it begins
    if 0 < state.batch < batches:  # resumed inside the epoch: its order again
        order = torch.randperm(len(x), generator=_generator_at(state.epoch_rng))
        first = state.batch
    else:
        # The new epoch counts from its first step on, committed with it: a stop signal
        # before then leaves the state as the last epoch left it, generator included, so
        # a resume does not take this epoch for done and skip it.
        epoch_rng = state.generator.get_state()
        drawn = _generator_at(epoch_rng)
        order = torch.randperm(len(x), generator=drawn)
        first = 0
        if batches == 0:
            _begin_epoch(state, epoch_rng, drawn)
            drawn = None
    order = order.to(x.device)
    pending = _Pending(batch_size)
    autocast = _autocast(x.device, amp)  # made once, entered every step
    try:
        for i in range(first, batches):
            idx, weight = order[i * batch_size : (i + 1) * batch_size], 1.0
            if shard is not None:
                idx, weight = shard(idx)
            # index_select gathers the same rows as x[idx] at half the cost of advanced indexing.
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            with autocast:
                logits = forward(xb)
                # Under autocast the logits are bf16; the loss is taken in float32.
                loss = loss_fn(logits.float() if amp else logits, yb)
            optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            lr = optimizer.param_groups[0]["lr"]  # the lr this step trains at
            with signals.deferred:  # the update, its count and its row, whole
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if drawn is not None:
                    _begin_epoch(state, epoch_rng, drawn)
                    drawn = None
                state.step += 1
                state.batch = i + 1
                if state.step % log_every == 0:
                    pending.add(i, state.step, time.time(), loss, logits, yb, lr)
                    if len(pending) >= SYNC_EVERY:
                        _report(state, pending, tracker)
            if on_step is not None and on_step.due(state):
                _report(state, pending, tracker)  # a checkpoint never runs ahead of the log
                on_step(state)
    finally:
        # Also on the way out of an interrupted epoch: every completed step is reported.
        _report(state, pending, tracker)


def _begin_epoch(state: TrainState, epoch_rng: torch.Tensor, drawn: torch.Generator) -> None:
    """Count the next epoch as begun: it drew its order from a generator in state
    `epoch_rng`; `drawn` is that generator after the draw."""
    state.epoch, state.epoch_rng, state.batch = state.epoch + 1, epoch_rng, 0
    state.generator.set_state(drawn.get_state())


def _generator_at(rng_state: torch.Tensor | None) -> torch.Generator:
    if rng_state is None:
        raise ValueError("a state inside an epoch without the epoch's generator state")
    generator = torch.Generator()
    generator.set_state(rng_state)
    return generator


class _Pending:
    """The logged steps not handed to the tracker yet, at most `SYNC_EVERY`: their logits
    and labels copied into device buffers made at the epoch's first logged step, their
    losses kept (detached, 0-dim). `_report` reads them in one transfer each, and computes
    the accuracies there, for all of them at once, not with small ops per step.

    Logits and labels are copied, not kept: keeping each step's tensors alive until the
    report made the memory allocator place every next step's tensors elsewhere (page
    faults, cold caches), ~3% of a 1.4 ms step (mlp, one CPU thread). The 0-dim loss is
    kept instead: with `.shape[0]` for `len()` and the autocast context made once, that
    took logging from ~39 to ~30 us a step (seed_cnn, one thread, 50 paired epochs; the
    three were measured together, not one by one).
    """

    def __init__(self, batch_size: int) -> None:
        self.width = batch_size  # a step's batch is at most this (a rank's part: less)
        self.steps: list[tuple[int, int, float, int, float]] = []  # (i, step, time, n, lr)
        self.losses: list[torch.Tensor] = []
        self.logits = self.labels = torch.empty(0)
        # Each buffer's rows as views made once: a copy into one takes half the time of an
        # indexed assignment.
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, i: int, step: int, t: float, loss: torch.Tensor, logits: torch.Tensor,
            labels: torch.Tensor, lr: float) -> None:  # fmt: skip
        j, n = len(self.steps), labels.shape[0]  # shape[0]: len() is Python code in torch
        if not self._rows:  # the epoch's first logged step: its shapes and dtypes
            device = logits.device
            self.logits = torch.empty(SYNC_EVERY, self.width, *logits.shape[1:],
                                      dtype=logits.dtype, device=device)  # fmt: skip
            # -1 past a step's own samples: a class no prediction equals.
            self.labels = torch.full((SYNC_EVERY, self.width), -1, dtype=labels.dtype,
                                     device=device)  # fmt: skip
            self._rows = list(zip(self.logits.unbind(), self.labels.unbind(), strict=True))
        logits_row, labels_row = self._rows[j]
        if n == self.width:
            logits_row.copy_(logits.detach())  # detached: no autograd history for buffers
            labels_row.copy_(labels)
        else:
            logits_row[:n].copy_(logits.detach())
            labels_row[:n].copy_(labels)
            labels_row[n:] = -1
        self.losses.append(loss.detach())
        self.steps.append((i, step, t, n, lr))

    def read(self) -> tuple[list[float], list[int]]:
        """The pending steps' losses and correct predictions, in one transfer each."""
        k = len(self.steps)
        # max's indices are argmax's (the first maximum) at 2/3 of its time on a CPU, where
        # the classes, the inner dimension, are too few for argmax's vectorised path.
        hits = (self.logits[:k].max(2).indices == self.labels[:k]).sum(1)
        return torch.stack(self.losses).tolist(), hits.tolist()

    def clear(self) -> None:
        self.steps.clear()
        self.losses.clear()


def _report(state: TrainState, pending: _Pending, tracker: Tracker) -> None:
    """Move the pending losses to the host in one transfer and hand them to the tracker.

    Rows go up to and including the first step whose loss is not finite, then `Diverged`
    is raised: the steps after it would only log NaN. That step's accuracy is NaN, as the
    argmax of logits that are not numbers means nothing.
    """
    if not pending:
        return
    losses, correct = pending.read()
    rows = []
    for (i, step, t, n, lr), loss, c in zip(pending.steps, losses, correct, strict=True):
        finite = math.isfinite(loss)
        rows.append(StepLog(state.epoch, i, step, t, loss, c / n if finite else math.nan, lr))
        if not finite:
            break
    # Cleared first: the caller's final _report must not hand these rows over again (metric
    # points can never be deleted), even if a tracker raises; and no stop signal may come
    # between the two and drop them.
    with signals.held():
        pending.clear()
        tracker.log_steps(rows)
    if not math.isfinite(rows[-1].loss):
        raise Diverged(rows[-1].step, rows[-1].loss)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    num_classes: int,
    batch_size: int = 1000,
) -> Evaluation:
    """Mean loss, accuracy and confusion matrix over (x, y); fixed batches keep it repeatable.

    A loss that is not finite makes the accuracy NaN (see `Evaluation`).
    """
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb).float()
        total_loss += loss_fn(logits, yb) * len(yb)
        confusion += torch.bincount(yb * num_classes + logits.argmax(1), minlength=num_classes**2)
    matrix = confusion.view(num_classes, num_classes).tolist()
    correct = sum(matrix[i][i] for i in range(num_classes))
    loss = total_loss.item() / len(x)
    if not math.isfinite(loss):
        return Evaluation(loss, math.nan, matrix)
    return Evaluation(loss, correct / len(x), matrix)
