"""What a person watching the terminal sees: a progress bar, and the notebook's print line."""

from __future__ import annotations

import math
import sys
import time

import click

from pipeline.loop import StepLog, Tracker

REDRAW_S = 0.2  # a bar redrawn more often only costs the loop: nobody reads it faster


class ConsoleReporter:
    """A progress bar on stderr with the latest loss and accuracy, redrawn every `REDRAW_S`.

    With `print_every` > 0 it also prints the seed notebook's line,
    `Epoch e, step i: loss=..., acc=...`, for every epoch step i divisible by it.
    """

    def __init__(self, total_steps: int, print_every: int = 0) -> None:
        self.print_every = print_every
        # Off a terminal (CI, `mlflow run` logs) a bar only repeats itself: show epochs only.
        self._show_bar = sys.stderr.isatty()
        self._bar = click.progressbar(
            length=total_steps, label="training", file=sys.stderr, show_pos=True, width=24
        )
        if self._show_bar:
            self._bar.__enter__()
        self._done = 0
        self._drawn = -math.inf  # time.monotonic() of the last redraw
        self._last: StepLog | None = None  # the latest row, drawn or not yet

    def log_steps(self, rows: list[StepLog]) -> None:
        if self.print_every:
            for r in rows:
                if r.epoch_step % self.print_every == 0:
                    click.echo(
                        f"Epoch {r.epoch}, step {r.epoch_step}: "
                        f"loss={r.loss:.4f}, acc={r.accuracy:.4f}"
                    )
        self._last = rows[-1]
        if self._show_bar and time.monotonic() - self._drawn >= REDRAW_S:
            self._draw()

    def _draw(self) -> None:
        last, self._drawn = self._last, time.monotonic()
        if last is None or last.step == self._done:
            return
        self._bar.label = f"epoch {last.epoch} loss={last.loss:.4f} acc={last.accuracy:.3f}"
        self._bar.update(last.step - self._done)
        self._done = last.step

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None:
        """One line per epoch's end: `epoch E: val/loss=... (global step S)`. System metrics
        (`system/...`, other hosts' of a data-parallel run) are the UI's, not the terminal's."""
        metrics = {k: v for k, v in metrics.items() if not k.startswith("system/")}
        if not metrics:
            return
        epoch = metrics.get("epoch")
        text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch")
        line = (
            f"epoch {int(epoch)}: {text} (global step {step})"
            if epoch is not None
            else (f"global step {step}: {text}")
        )
        if self._show_bar:
            self._draw()  # the epoch's end, whenever the last redraw was
            self._bar.render_finish()
        click.echo(line, err=True)

    def close(self) -> None:
        if self._show_bar:
            self._draw()
            self._bar.__exit__(None, None, None)


class Fanout:
    """One tracker that forwards to several."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_steps(self, rows: list[StepLog]) -> None:
        for t in self.trackers:
            t.log_steps(rows)

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step, timestamp)
