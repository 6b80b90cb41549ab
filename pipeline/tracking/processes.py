"""Which process owns a run, whether it still lives, and what ends a run whose process is gone.

Also the one process that outlives `mlflow run`, to keep the KILLED of a run it would
overwrite.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.tracking.tags import PROCESS_TAG, STOPPED_BY_TAG

# The run `mlflow run` made for this process; read now, as mlflow.start_run unsets it.
MLFLOW_RUN_ID = os.environ.get("MLFLOW_RUN_ID")


REASSERT_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import pipeline.tracking.processes as p; "
    "p._reassert_killed_main(*sys.argv[2:])"
)


def pending_models(run_id: str, experiment_id: str) -> list[str]:
    """The ids of the run's logged models still PENDING (being logged, or cut off)."""
    models = MlflowClient().search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return [m.model_id for m in models if str(m.status) == "PENDING"]


def fail_pending_models(run_id: str, experiment_id: str) -> list[str]:
    """Finalize as FAILED every logged model of the run still PENDING; returns their ids."""
    pending = pending_models(run_id, experiment_id)
    for model_id in pending:
        MlflowClient().finalize_logged_model(model_id, "FAILED")
    return pending


def process_tag() -> dict[str, str]:
    """This process as `host:pid:start time`, to tell later whether a RUNNING run's process
    is still alive (`process_alive`)."""
    import psutil

    started = int(psutil.Process().create_time())
    return {PROCESS_TAG: f"{platform.node()}:{os.getpid()}:{started}"}


def process_alive(tag: str | None) -> bool | None:
    """Whether the process a `process_tag()` value names still runs; None when it cannot be
    told (another host, no tag)."""
    import psutil

    try:
        host, pid, started = tag.rsplit(":", 2)
        pid, started = int(pid), int(started)
    except (AttributeError, ValueError):
        return None
    if host != platform.node():
        return None
    try:
        return int(psutil.Process(pid).create_time()) == started
    except psutil.Error:
        return False


def end_orphaned_runs(runs: list[mlflow.entities.Run]) -> list[str]:
    """End KILLED the RUNNING runs among `runs` whose process is gone (SIGKILL, power cut):
    MLflow has no other way to learn they stopped. Returns the ids it ended."""
    client, ended = MlflowClient(), []
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        if process_alive(run.data.tags.get(PROCESS_TAG)) is not False:
            continue  # alive, or unknown: not ours to end
        fail_pending_models(run.info.run_id, run.info.experiment_id)
        client.set_tag(run.info.run_id, STOPPED_BY_TAG, "process gone (SIGKILL or crash)")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def mlflow_run_pid() -> int | None:
    """The pid of the `mlflow run` process that started this one for its run, if it did."""
    if not MLFLOW_RUN_ID:
        return None
    import psutil

    with contextlib.suppress(psutil.Error):
        args = psutil.Process().parent().cmdline()
        if "run" in args and any(Path(a).name == "mlflow" for a in args):
            return os.getppid()
    return None


def outlast_mlflow_run(run_id: str) -> None:
    """Under `mlflow run`, keep the KILLED of its run: once our command exits non-zero,
    `mlflow run` sets its run FAILED (MLflow 3.17 compares a status string with
    `RunStatus.is_terminated`, which takes an int, so it overwrites any final status). A
    small detached process waits for `mlflow run` to exit, then writes KILLED back."""
    pid = mlflow_run_pid()
    if pid is None or run_id != MLFLOW_RUN_ID:
        return
    root = str(Path(pipeline.__file__).resolve().parents[1])
    end_ms = str(int(time.time() * 1000))
    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-c", REASSERT_CODE, root, run_id, str(pid), end_ms],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
            start_new_session=True,  # out of reach of the Ctrl-C or hang-up that stopped us
        )


def _reassert_killed_main(run_id: str, pid: str, end_ms: str) -> None:
    """The detached process of `outlast_mlflow_run`."""
    import psutil

    with contextlib.suppress(psutil.Error):
        psutil.Process(int(pid)).wait(timeout=120)
    client = MlflowClient()
    if client.get_run(run_id).info.status == "FAILED":
        client.set_terminated(run_id, "KILLED", end_time=int(end_ms))
