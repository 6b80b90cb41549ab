"""The metric writer process (every point arrives, a failed write fails the run) and how
signals end a run."""

from __future__ import annotations

import os
import signal

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import signals
from pipeline import tracking as pt
from pipeline.errors import PipelineError
from pipeline.signals import Terminated


def test_metric_writer_writes_every_point(tracking):
    run = MlflowClient().create_run("0")
    writer = pt.MetricWriter(run.info.run_id)
    for step in range(1, 1201):  # more than one log_batch's worth
        writer.put([("train/loss", 1.0 / step, 0, step)])
    writer.close()
    writer.close()  # a second close does nothing
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 1201))


def test_a_failed_write_is_an_error_on_close(tracking):
    writer = pt.MetricWriter("f" * 32)  # no such run
    writer.put([("train/loss", 1.0, 0, 1)])
    with pytest.raises(PipelineError, match="logging metrics to MLflow failed"):
        writer.close()


def test_a_writer_started_ahead_but_unused_ends_with_the_run(tracking):
    process = pt.WriterProcess()
    with pt.start_run("train", "unused", writer_process=process):
        pass
    assert process.proc.poll() == 0
    assert mlflow.active_run() is None


def test_a_signal_inside_held_waits_for_the_block_then_acts_as_usual():
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored); the autouse fixture puts the session's back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    with pytest.raises(Terminated), signals.stop_signals_raise(), signals.held():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("rest of the block")  # a handler would have raised before this line
    assert done == ["rest of the block"]
    with pytest.raises(KeyboardInterrupt), signals.held():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("again")
    assert done == ["rest of the block", "again"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_sigterm_in_a_run_ends_it_killed(tracking):
    with pytest.raises(Terminated), pt.start_run("train", "stopped") as run:
        os.kill(os.getpid(), signal.SIGTERM)
    assert MlflowClient().get_run(run.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
