"""The real `mlflow run` CLI, end to end, on the offline sample."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def mlflow_run(tmp_path: Path, *params: str, entry: str = "main") -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = [f"-P{p}" for p in params]
    return subprocess.run(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mlflow_run_main_end_to_end(tracking, tmp_path):
    data_dir = f"data_dir={tmp_path / 'data'}"
    proc = mlflow_run(tmp_path, "optimizer=adam", "epochs=1", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking)
    runs = client.search_runs(["0"])
    assert len(runs) == 3
    by_step = {r.data.tags["pipeline.step"]: r for r in runs}
    parent, prep, train = by_step["main"], by_step["data_prep"], by_step["train"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert prep.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["optimizer"] == "adam" and parent.data.params["lr"] == "auto"
    assert train.data.params["effective_lr"] == "0.001"
    assert prep.data.params["data_digest"] == train.data.params["data_digest"]
    steps = math.ceil(3600 / 128)
    for key in ("train/loss", "train/accuracy"):
        history = client.get_metric_history(train.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert train.data.metrics["test/accuracy"] > 0.8

    # A second main with the same data parameters reuses the finished data_prep run.
    proc = mlflow_run(tmp_path, "optimizer=sgd", "epochs=1", data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = client.search_runs(["0"], "tags.`pipeline.step` = 'data_prep'")
    assert len(runs) == 1
    latest = client.search_runs(["0"], "tags.`pipeline.step` = 'main'")[0]
    assert latest.data.tags["data_prep_reused"] == "True"


def test_mlflow_run_rejects_bad_input_and_marks_the_run_failed(tracking, tmp_path):
    proc = mlflow_run(tmp_path, "optimizer=lbfgs", "epochs=1")
    assert proc.returncode != 0
    assert "'lbfgs' is not one of 'sgd'" in proc.stderr
    statuses = {r.info.status for r in MlflowClient(tracking).search_runs(["0"])}
    assert statuses == {"FAILED"}


def test_logged_model_serves_with_mlflow_models_serve(tracking, tmp_path, sample_file):
    import json
    import time
    import urllib.request

    import mlflow
    import numpy as np

    from pipeline.config import TrainConfig
    from pipeline.data import load_prepared, to_model_input
    from pipeline.steps import run_train

    result = run_train(TrainConfig(data=str(sample_file), epochs=1))
    x = to_model_input(load_prepared(sample_file).splits["test"].images[:4]).numpy()
    expected = mlflow.pyfunc.load_model(result.model_uri).predict(x)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"runs:/{result.run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        body = json.dumps({"inputs": x.tolist()}).encode()
        deadline = time.time() + 120
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    predictions = json.loads(response.read())["predictions"]
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                assert time.time() < deadline, "server did not answer in 120 s"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    np.testing.assert_allclose(np.asarray(predictions), expected, rtol=1e-4, atol=1e-4)
