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


def _write_run(name: str, process, value: float, steps: int = 1200):
    """A train run whose writer (`process`) logs train/loss = value at steps 1..steps."""
    with pt.start_run("train", name, writer_process=process) as run:
        writer = run.tracker.writer
        for step in range(1, steps + 1):  # more than one log_batch's worth
            writer.put([("train/loss", value, 0, step)])
    return run.run_id


def test_a_kept_writer_writes_run_after_run_each_point_in_its_own_run(tracking):
    # What a sweep's worker does: one writer process for trial after trial.
    with pt.keep_writers():
        processes, runs = [], []
        for i in range(3):
            processes.append(pt.writer_process())
            runs.append(_write_run(f"r{i}", processes[-1], float(i)))
        assert {p.proc.pid for p in processes} == {processes[0].proc.pid}
        assert processes[0].proc.poll() is None  # kept for the next run
    assert processes[0].proc.wait(timeout=30) == 0  # ends with the block
    client = MlflowClient()
    for i, run_id in enumerate(runs):
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 1201))
        assert {m.value for m in history} == {float(i)}
        assert client.get_run(run_id).info.status == "FINISHED"


def test_a_kept_writer_that_dies_between_runs_is_replaced(tracking):
    with pt.keep_writers():
        first = pt.writer_process()
        _write_run("before", first, 1.0, steps=10)
        first.proc.kill()
        first.proc.wait(timeout=30)
        second = pt.writer_process()
        assert second.proc.pid != first.proc.pid
        run_id = _write_run("after", second, 2.0, steps=10)
    history = MlflowClient().get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))


def test_a_run_that_does_not_finish_ends_its_writer_even_when_writers_are_kept(tracking):
    # Its resume waits for that run's writer to end (checkpointing.wait_for_old_writer).
    with pt.keep_writers():
        process = pt.writer_process()
        with (
            pytest.raises(RuntimeError),
            pt.start_run("train", "fails", writer_process=process) as run,
        ):
            run.tracker.writer.put([("train/loss", 1.0, 0, 1)])
            raise RuntimeError("a failed trial")
        assert process.proc.poll() is not None
        fresh = pt.writer_process()
        assert fresh.proc.pid != process.proc.pid
        fresh.finish()
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"
    assert [m.step for m in MlflowClient().get_metric_history(run.run_id, "train/loss")] == [1]


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
