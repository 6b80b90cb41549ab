"""The terminal's progress bar and print lines (pipeline.console), on a real pseudo-terminal."""

from __future__ import annotations

import os
import select
import sys

import pytest

from pipeline.console import ConsoleReporter
from pipeline.loop import StepLog


def rows(first: int, last: int, epoch: int = 1) -> list[StepLog]:
    return [StepLog(epoch, s - 1, s, 0.0, 1.0 / s, 0.5, 1e-3) for s in range(first, last + 1)]


@pytest.fixture
def terminal():
    """The slave side of a pty (a real terminal) as a text stream, and a reader of what it got.

    The test itself puts the stream on sys.stderr: pytest's capture sets sys.stderr again
    between a fixture's setup and the test's call.
    """
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", buffering=1)

    def read() -> str:
        stream.flush()
        chunks, wait = [], 5.0  # a pty hands its output over in pieces: read until it is quiet
        while select.select([master], [], [], wait)[0]:
            chunks.append(os.read(master, 1 << 16))
            wait = 0.5
        return b"".join(chunks).decode(errors="replace")

    yield stream, read
    stream.close()
    os.close(master)


def test_bar_redraws_are_throttled_and_the_epoch_ends_on_its_last_step(terminal, monkeypatch):
    stream, read = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    console = ConsoleReporter(total_steps=200)
    for step in range(1, 201):  # one call per step: far more calls than redraws
        console.log_steps(rows(step, step))
    console.log_metrics({"val/loss": 0.25, "epoch": 1.0}, 200)
    console.close()
    out = read()
    assert 1 <= out.count("epoch 1 loss=") < 20  # every 0.2 s, not on each of 200 calls
    assert "200/200" in out  # drawn at the last step at the epoch's end, whenever the last draw
    assert "epoch 1 loss=0.0050" in out  # the last step's loss, 1/200
    assert "epoch 1: val/loss=0.2500 (global step 200)" in out


def test_print_every_prints_every_divisible_step_off_a_terminal(capsys):
    console = ConsoleReporter(total_steps=30, print_every=10)
    for first in range(1, 31, 7):  # batches of rows that do not line up with print_every
        console.log_steps(rows(first, min(first + 6, 30)))
    console.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "Epoch 1, step 0: loss=1.0000, acc=0.5000",
        "Epoch 1, step 10: loss=0.0909, acc=0.5000",
        "Epoch 1, step 20: loss=0.0476, acc=0.5000",
    ]


def test_system_metrics_are_not_printed(capsys):
    """Other hosts' system metrics reach rank 0's trackers (pipeline.hostmetrics): the UI's,
    not the terminal's."""
    console = ConsoleReporter(total_steps=30)
    console.log_metrics({"system/node1/cpu_utilization_percentage": 12.5}, 3, 1.7e9)
    console.log_metrics({"val/loss": 0.25, "system/node1/disk_usage_percentage": 40.0}, 30)
    console.close()
    assert capsys.readouterr().err.splitlines() == ["global step 30: val/loss=0.2500"]
