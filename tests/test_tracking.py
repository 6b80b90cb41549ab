"""The metric writer process: every point arrives, and a failed write fails the run."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking as pt
from pipeline.errors import PipelineError


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
