"""A tracking server that goes away, and disks that fill up (pipeline/tracking/spool.py).

Real parts only: a real `mlflow server` on 127.0.0.1 that is killed, frozen (SIGSTOP) and
restarted on the same port; a port nothing listens on; a socket that accepts and never
answers; real sqlite stores; a small tmpfs for the full disk.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline.tracking import spool

from .conftest import assert_one_line_error, free_port, start_cli, wait_http
from .test_retrain import _env

STEPS_PER_EPOCH = math.ceil(3600 / 128)  # the offline sample's train split, batch 128


# --- servers that do not answer -----------------------------------------------------------


@pytest.fixture
def refused() -> str:
    """The URI of a port on 127.0.0.1 where nothing listens: connection refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def silent():
    """A server that accepts connections and never answers (a frozen or overloaded one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def spool_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "spool"
    monkeypatch.setenv(spool.SPOOL_DIR_ENV, str(folder))
    return folder


def test_unreachable_tells_an_outage_from_an_error(tracking, refused, silent, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with pytest.raises(mlflow.exceptions.MlflowException) as down:
        MlflowClient(refused).get_run("0" * 32)
    assert spool.unreachable(down.value) == "Connection refused"
    with pytest.raises(mlflow.exceptions.MlflowException) as hung:
        MlflowClient(silent).get_run("0" * 32)
    assert spool.unreachable(hung.value) == "no answer in 1 s"
    with pytest.raises(mlflow.exceptions.MlflowException) as missing:
        MlflowClient(tracking).get_run("0" * 32)  # an answer, and an error: not an outage
    assert spool.unreachable(missing.value) is None


def _points(first: int, last: int) -> list[tuple[str, float, int, int]]:
    return [("train/loss", 1.0 / s, 1_700_000_000_000 + s, s) for s in range(first, last + 1)]


def test_points_kept_for_an_unreachable_server_are_written_once(
    tracking, refused, spool_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(spool, "SPILL_POINTS", 500)  # spill to disk during the outage too
    run_id = MlflowClient(tracking).create_run("0").info.run_id
    queue = spool.PointQueue(MlflowClient(refused), refused, run_id)
    for first in range(1, 2501, 250):
        queue.put(_points(first, first + 249))
    report = queue.close(0.5)
    assert report["kept"] == 2500 and report["down"] == "Connection refused"

    kept = spool.RunSpool(refused, run_id)
    assert Path(report["folder"]) == kept.folder and kept.folder.parent.parent == spool_dir
    assert stat.S_IMODE(kept.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((kept.folder / spool.METRICS).stat().st_mode) == 0o600
    assert sum(len(b) for b in kept.point_batches()) == 2500

    # Written later (here to the sqlite store the run lives in), in full, then again from
    # the start, as after a replay cut off before its progress was saved: still once each.
    spool.replay(MlflowClient(tracking), kept)
    (kept.folder / "done.json").unlink()
    spool.replay(MlflowClient(tracking), kept)
    history = MlflowClient(tracking).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 2501))


def test_every_kind_of_kept_write_is_written_in_order(tracking, tmp_path, spool_dir):
    import numpy as np
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    from pipeline.models import build_model

    client = MlflowClient(tracking)
    run_id = client.create_run("0").info.run_id
    kept = spool.RunSpool("http://127.0.0.1:9", run_id)  # the server it was meant for
    kept.append({"op": "params", "params": {"optimizer": "adam", "lr": "auto"}})
    kept.append({"op": "tags", "tags": {"device": "cpu"}})
    kept.append({"op": "tags", "tags": {"device": "cuda"}})  # a later write wins
    kept.append({"op": "metrics", "metrics": [["test/accuracy", 0.9, 1_700_000_000_000, 58]]})
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    spool._keep(kept, {"op": "artifact", "file": str(table), "artifact_path": "compare"})
    table.unlink()  # the spool has its own copy
    source = HTTPDatasetSource("https://example.com/digits.npz")
    dataset = MetaDataset(source=source, name="s/train", digest="d1")
    kept.append(spool.dataset_op(dataset, "train", {"size": "3600"}))
    model_dir = kept.slot() / "model"
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    mlflow.pytorch.save_model(build_model("seed_cnn"), str(model_dir), input_example=example)
    kept.append(
        {"op": "model", "dir": str(model_dir.relative_to(kept.folder)), "name": "model",
         "step": 58, "params": {"model": "seed_cnn"}}
    )  # fmt: skip
    stand_in = spool.KEPT_MODEL + "model"  # what tracking.log_evaluation got as model_id
    kept.append({"op": "metrics", "metrics": [["test/loss", 0.3, 1_700_000_000_001, 58, stand_in]]})
    kept.append({"op": "end", "status": "KILLED", "end_time": 1_700_000_100_000})
    assert kept.summary() == (
        "2 metric points, 2 params, 2 tags, 1 artifact, 1 dataset input, 1 model, "
        "the end status KILLED"
    )

    spool.replay(client, kept)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time == 1_700_000_100_000
    assert run.data.params == {"optimizer": "adam", "lr": "auto"}
    assert run.data.tags["device"] == "cuda"
    (point,) = client.get_metric_history(run_id, "test/accuracy")
    assert (point.value, point.step, point.timestamp) == (0.9, 58, 1_700_000_000_000)
    assert [a.path for a in client.list_artifacts(run_id, "compare")] == ["compare/table.csv"]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "s/train" and {t.key: t.value for t in inp.tags} == {
        "size": "3600",
        "mlflow.data.context": "train",
    }
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.status == LoggedModelStatus.READY and model.source_run_id == run_id
    # The metric at the model's step logged before it, and the one kept with its stand-in
    # id after it, are the model's, as when it is logged live.
    assert {m.key for m in model.metrics} == {"test/accuracy", "test/loss"}
    served = mlflow.pyfunc.load_model(f"models:/{output.model_id}").predict(example)
    assert np.asarray(served).shape == (2, 10)


def test_the_end_of_a_run_waits_at_most_its_budget_for_a_silent_server(
    tracking, silent, spool_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # each request would hang 60 s
    queue = spool.PointQueue(MlflowClient(silent), silent, "a" * 32)
    queue.put(_points(1, 10))
    time.sleep(spool.LINGER_S + 0.5)  # the sender is inside a request never answered
    t0 = time.monotonic()
    report = queue.close(3.0)
    waited = time.monotonic() - t0
    assert report["kept"] == 10 and report["down"] == "no answer in 3 s"
    assert 2.9 < waited < 5, waited


def test_a_server_down_before_the_run_starts_is_one_line_and_nothing_runs(
    refused, sample_file, tmp_path, spool_dir
):
    env = {**_env(), "MLFLOW_TRACKING_URI": refused, "PIPELINE_SPOOL_DIR": str(spool_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", str(sample_file)],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(proc, f"tracking store {refused}: unreachable (Connection refused)")
    assert "epoch" not in proc.stderr and not spool_dir.exists()


# --- a real tracking server, stopped and restarted ------------------------------------------


class Server:
    """A real `mlflow server` on a fixed port, to be killed, frozen and started again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir()

    def start(self) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        wait_http(f"{self.uri}/health", self.proc)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.signal(signal.SIGCONT)
            srv.kill()


def _train(server: Server, sample_file: Path, cwd: Path, epochs: int, **env: str):
    """`pipeline train` against `server`, returned once its run exists (training then)."""
    started = time.time() * 1000
    env = {**_env(), "MLFLOW_TRACKING_URI": server.uri, **env}
    proc = start_cli("train", "--data", sample_file, "--epochs", epochs, cwd=cwd, env=env)
    client = MlflowClient(server.uri)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        runs = client.search_runs(["0"], f"attributes.start_time > {started - 1000}")
        if runs:
            return proc, runs[0].info.run_id
        time.sleep(0.05)
    raise AssertionError(f"no run appeared: {proc.communicate()}")


def _assert_complete(uri: str, run_id: str, epochs: int) -> None:
    """FINISHED, every train/* step exactly once, every epoch, the evaluation and the model."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = list(range(1, epochs * STEPS_PER_EPOCH + 1))
    for key in ("train/loss", "train/accuracy", "train/lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
    val = client.get_metric_history(run_id, "val/accuracy")
    epoch_ends = [e * STEPS_PER_EPOCH for e in range(1, epochs + 1)]  # at the global step
    assert sorted(m.step for m in val) == epoch_ends
    assert "test/accuracy" in run.data.metrics and "time/loop_seconds" in run.data.metrics
    assert run.data.params["optimizer"] == "adam" and run.data.tags["device"] == "cpu"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"test_confusion.json", "test_confusion_matrix.png"} <= artifacts
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.status == LoggedModelStatus.READY and model.source_run_id == run_id
    # The test metrics are the model's, as when it is logged live (tracking.log_evaluation).
    assert "test/accuracy" in {m.key for m in model.metrics}


@pytest.mark.slow
def test_a_server_killed_mid_run_and_restarted_loses_nothing(server, sample_file, tmp_path):
    proc, run_id = _train(
        server, sample_file, tmp_path, 2,
        PIPELINE_SPOOL_DIR=str(tmp_path / "spool"), PIPELINE_SERVER_WAIT="180",
        PIPELINE_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
    )  # fmt: skip
    server.kill()  # the run is training: its points, evaluation and model meet a dead server
    time.sleep(10)
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # A checkpoint upload that met the dead server says so (the file stays local, for a
    # resume); nothing of the run's record may be kept or lost.
    checkpoint = "Warning: checkpoint not uploaded"
    warnings = [w for w in err.splitlines() if "Warning" in w and not w.startswith(checkpoint)]
    assert "Traceback" not in err and not warnings, err
    _assert_complete(server.uri, run_id, 2)
    assert f"run_id={run_id} model=models:/" in out
    assert not list((tmp_path / "spool").rglob("*.jsonl"))  # nothing left kept


@pytest.mark.slow
def test_a_server_that_stays_down_keeps_the_run_until_pipeline_sync(
    server, sample_file, tmp_path, monkeypatch
):
    kept_in = tmp_path / "spool"
    monkeypatch.setenv(spool.SPOOL_DIR_ENV, str(kept_in))
    proc, run_id = _train(
        server, sample_file, tmp_path, 2,
        PIPELINE_SPOOL_DIR=str(kept_in), PIPELINE_SERVER_WAIT="2",
    )  # fmt: skip
    server.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err  # the training itself succeeded
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "unreachable" in x]
    folder = spool.RunSpool(server.uri, run_id).folder
    assert line.startswith(f"Warning: tracking server {server.uri} unreachable (")
    assert f"run {run_id} not fully written" in line and str(folder) in line
    assert "the end status FINISHED" in line and "pipeline sync" in line
    assert "model=(kept for pipeline sync)" in out
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"  # this user's only

    env = {**_env(), "MLFLOW_TRACKING_URI": server.uri, "PIPELINE_SPOOL_DIR": str(kept_in)}
    early = subprocess.run(
        [sys.executable, "-m", "pipeline", "sync"], env=env, capture_output=True, text=True
    )
    assert_one_line_error(early, f"tracking server {server.uri} unreachable (Connection refused)")
    assert folder.exists()

    server.start()
    sync = subprocess.run(
        [sys.executable, "-m", "pipeline", "sync"], env=env, capture_output=True, text=True
    )
    assert sync.returncode == 0, sync.stderr
    assert f"sync: run {run_id}: wrote " in sync.stdout and "the end status FINISHED" in sync.stdout
    _assert_complete(server.uri, run_id, 2)
    assert not folder.exists()
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "sync"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "nothing kept" in again.stdout


@pytest.mark.slow
def test_a_frozen_server_costs_a_bounded_wait_and_the_next_command_writes_the_run(
    server, sample_file, tmp_path, monkeypatch
):
    kept_in = tmp_path / "spool"
    monkeypatch.setenv(spool.SPOOL_DIR_ENV, str(kept_in))
    env = {"PIPELINE_SPOOL_DIR": str(kept_in), "PIPELINE_SERVER_WAIT": "3",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}  # fmt: skip
    proc, run_id = _train(server, sample_file, tmp_path, 1, **env)
    server.signal(signal.SIGSTOP)  # accepts connections, answers nothing
    frozen_at = time.monotonic()
    try:
        out, err = proc.communicate(timeout=300)
        ended_after = time.monotonic() - frozen_at
    finally:
        server.signal(signal.SIGCONT)
    assert proc.returncode == 0, err
    assert "unreachable (no answer in 3 s)" in err, err
    # Training, evaluation and saving the model take ~5 s here; the waits on the frozen
    # server add at most one timeout (the first write) plus PIPELINE_SERVER_WAIT.
    assert ended_after < 60, ended_after

    # Any later command against the store writes what was kept before it does its own work.
    cli_env = {**_env(), "MLFLOW_TRACKING_URI": server.uri, **env}
    later = subprocess.run(
        [sys.executable, "-m", "pipeline", "champion", "no-such-model"],
        env=cli_env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert f"sync: run {run_id}: wrote " in later.stderr, later.stderr
    assert "registered model 'no-such-model' does not exist" in later.stderr  # and its own work
    _assert_complete(server.uri, run_id, 1)


# --- full disks ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 MiB (`mount -t tmpfs`, root only); skipped where mounting is refused."""
    folder = tmp_path / "small"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, leave_bytes: int) -> None:
    """Take all of `folder`'s file system but `leave_bytes`."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def _train_cli(*args: object, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**_env(), "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "train", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_a_store_whose_disk_fills_up_stops_the_run_in_one_line(small_disk, sample_file):
    db = small_disk / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()  # the store's tables, before the disk fills
    _fill(small_disk, 150_000)  # room for a few hundred points, not for 20 epochs
    proc = _train_cli("--data", sample_file, "--epochs", 20, cwd=small_disk, uri=uri)
    assert_one_line_error(proc, f"{db}: No space left on device")
    assert len(proc.stderr.splitlines()) < 40, proc.stderr  # no SQLAlchemy tracebacks
    epochs_done = proc.stderr.count("\nepoch ")
    assert epochs_done < 20, "the run should stop once its points cannot be written"
    (run,) = MlflowClient(uri).search_runs(["0"])
    error = next(x for x in proc.stderr.splitlines() if x.startswith("Error:"))
    # As true as the full disk lets it be: FAILED, or RUNNING and the error line says so.
    assert run.info.status in ("FAILED", "RUNNING")
    assert (run.info.status == "RUNNING") == ("left RUNNING" in error), (run.info.status, error)


@pytest.mark.slow
def test_a_full_artifact_folder_fails_the_run_in_one_line(small_disk, sample_file, tmp_path):
    # The store has room; its artifacts do not: they go to ./mlruns of the process that
    # creates the store, here the train command itself, in the small folder.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fill(small_disk, 100_000)  # less than the model's files
    proc = _train_cli("--data", sample_file, "--epochs", 1, cwd=small_disk, uri=uri)
    assert_one_line_error(proc, "No space left on device")
    error = next(x for x in proc.stderr.splitlines() if x.startswith("Error:"))
    assert f"Error: {small_disk}/mlruns/" in error, error
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FAILED"


def test_a_full_data_folder_keeps_the_previous_prepared_file(tracking, small_disk, tmp_path):
    from pipeline.config import PrepConfig
    from pipeline.data import file_digest, prepared_path

    from .conftest import run_cli

    data_dir = small_disk / "data"
    run_cli("prep", "--data-dir", str(data_dir), cwd=tmp_path, check=True)
    path = prepared_path(PrepConfig(data_dir=str(data_dir)))
    before = file_digest(path)
    _fill(small_disk, 100_000)
    proc = run_cli("prep", "--data-dir", str(data_dir), cwd=tmp_path)
    assert_one_line_error(proc, f"{path}: No space left on device")
    assert file_digest(path) == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    runs = MlflowClient(tracking).search_runs(["0"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # no second, broken run


def test_a_bad_server_wait_is_a_one_line_error(tracking, tmp_path, sample_file, monkeypatch):
    from .conftest import run_cli

    monkeypatch.setenv(spool.WAIT_ENV, "soon")
    proc = run_cli("train", "--data", str(sample_file), cwd=tmp_path)
    assert_one_line_error(proc, "PIPELINE_SERVER_WAIT='soon' is invalid")
    assert MlflowClient(tracking).search_runs(["0"]) == []


def test_spool_lines_survive_a_torn_last_line(tmp_path):
    path = tmp_path / "ops.jsonl"
    path.write_bytes(b'{"op": "tags", "tags": {"a": "1"}}\n{"op": "params", "par')
    assert spool._read_lines(path) == [{"op": "tags", "tags": {"a": "1"}}]
    assert math.isnan(json.loads(spool._line({"v": float("nan")}))["v"])  # NaN round-trips
