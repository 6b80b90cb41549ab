"""The MLflow side of checkpoints and resume: which run to resume, whether its process is
alive, what it logged already, and its checkpoints as artifacts.

A resumed run never logs a step twice: `dedupe` drops every point at or below the last
step each metric has in the run (MLflow cannot delete points, and the run's old writer
process may have written points after its last checkpoint). The points it drops are the
ones the replay computes again, bit for bit the same.

Whether a RUNNING run is dead: its `pipeline.process` tag names host, pid and start time.
On this host the process table answers (`tracking.process_alive`). For a process on another
host the run's `pipeline.heartbeat` tag answers: the live process rewrites it every
`HEARTBEAT_S` seconds, and a run whose heartbeat is older than `STALE_S` is dead. A run of
another host without a heartbeat (older code) is never taken for dead.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.errors import PipelineError
from pipeline.tracking.artifacts import _no_progress_bar
from pipeline.tracking.connection import _client
from pipeline.tracking.spool import Point

HEARTBEAT_TAG = "pipeline.heartbeat"  # unix seconds, rewritten by the live process
RESUMED_TAG = "pipeline.resumed"  # how many times the run was resumed
RESUMED_FROM_TAG = "pipeline.resumed_from_steps"  # the global step of each resume, in order
HEARTBEAT_S = 30.0
STALE_S = 150.0  # five missed heartbeats: the process is gone (or cut off for minutes)
ARTIFACT_DIR = "checkpoints"


def active_experiment_id() -> str:
    """The experiment a new run of this process goes to (MLFLOW_EXPERIMENT_ID/NAME, else
    Default), as `mlflow.start_run` picks it."""
    from mlflow.tracking.fluent import _get_experiment_id

    tracking.open_store()
    return _get_experiment_id() or "0"


def last_steps(run_id: str) -> dict[str, int]:
    """The last global step each metric of the run has, by key (points are written in step
    order, so every step up to it that was logged is there)."""
    client = MlflowClient()
    keys = tracking.get_run(run_id).data.metrics
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


class PointLog:
    """The points handed to MLflow lately, so a checkpoint can carry those its run's writer
    may not have written before the process died (they are logged again on resume, with
    their own timestamps, where the run lacks them)."""

    def __init__(self) -> None:
        self.points: list[Point] = []

    def add(self, points: list[Point]) -> None:
        # Not system/* points (other hosts' of a data-parallel run): their steps count
        # samples, not global steps, so "since a checkpoint's step" means nothing for them;
        # as with MLflow's own sampler, a killed process loses its last samples.
        self.points.extend(p for p in points if not p[0].startswith("system/"))

    def since(self, step: int) -> list[Point]:
        return [p for p in self.points if p[3] > step]

    def drop_until(self, step: int) -> None:
        self.points = self.since(step)


class _Dedupe:
    """A metric writer that drops points at or below each key's last logged step."""

    def __init__(self, writer, last: dict[str, int], log: PointLog) -> None:
        self.writer, self.last, self.log = writer, last, log

    def put(self, points: list[Point]) -> None:
        if self.last:
            points = [p for p in points if p[3] > self.last.get(p[0], -1)]
        self.log.add(points)
        if points:
            self.writer.put(points)

    def close(self, *args, **kwargs) -> None:
        self.writer.close(*args, **kwargs)


def dedupe(tracker: tracking.MlflowTracker, last: dict[str, int], log: PointLog):
    """`tracker`, dropping what the run has already (`last`) and recording into `log`."""
    tracker.writer = _Dedupe(tracker.writer, last, log)
    return tracker


def replay(tracker: tracking.MlflowTracker, points: list[Point]) -> None:
    """Points a checkpoint carried, written where the run lacks them (`dedupe`)."""
    tracker.writer.put([tuple(p) for p in points])


# --- which run, and whether it is alive ---------------------------------------------------


def liveness(run: mlflow.entities.Run, now: float | None = None) -> tuple[str, str]:
    """('alive' | 'dead' | 'unknown' | 'ended', in words why) for a run."""
    if run.info.status != "RUNNING":
        return "ended", run.info.status
    tag = run.data.tags.get(tracking.PROCESS_TAG)
    host = tag.rsplit(":", 2)[0] if tag else "?"
    alive = tracking.process_alive(tag)
    if alive is not None:
        return ("alive" if alive else "dead"), f"process {tag} on this host"
    beat = run.data.tags.get(HEARTBEAT_TAG)
    try:
        age = (now or time.time()) - float(beat)
    except (TypeError, ValueError):
        return "unknown", f"process on host {host!r} without a heartbeat"
    state = "dead" if age > STALE_S else "alive"
    return state, f"process on host {host!r}, last heartbeat {age:.0f} s ago"


def find_resumable(
    experiment_id: str,
    params: dict[str, str],
    step: str = "train",
    parent_run_id: str | None = None,
) -> mlflow.entities.Run | None:
    """The newest unfinished `step` run of this code version with these params (children of
    `parent_run_id` only, when given) whose process is gone."""
    query = (
        f"tags.`{tracking.STEP_TAG}` = '{step}' and "
        f"tags.`{tracking.CODE_VERSION_TAG}` = '{tracking.code_version()}' and "
        "attributes.status != 'FINISHED'"
    )
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = _client().search_runs(
        [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=200
    )
    for run in runs:
        if not tracking.params_match(run.data.params, params):
            continue
        state, why = liveness(run)
        if state in ("ended", "dead"):
            return run
        print(f"{step}: run {run.info.run_id} with these parameters is still running ({why}); "
              "not resuming it")  # fmt: skip
    return None


def check_resumable(run_id: str, params: dict[str, str], step: str = "train"):
    """The `step` run `run_id`, if it can be resumed with these params by this code; else
    PipelineError naming what differs, or why not."""
    run = tracking.find_run(run_id)
    if run is None or run.data.tags.get(tracking.STEP_TAG) != step:
        what = "no run" if run is None else f"a {run.data.tags.get(tracking.STEP_TAG)} run"
        raise PipelineError(f"cannot resume {run_id!r}: it is {what}, not a {step} run")
    if run.info.lifecycle_stage != "active":
        raise PipelineError(f"cannot resume run {run_id}: it is deleted")
    if run.info.status == "FINISHED":
        raise PipelineError(f"cannot resume run {run_id}: it is FINISHED; nothing to resume")
    state, why = liveness(run)
    if state in ("alive", "unknown"):
        raise PipelineError(
            f"cannot resume run {run_id}: it is RUNNING and its {why} "
            f"{'is alive' if state == 'alive' else 'cannot be told dead'}"
        )
    differ = []
    for key, value in params.items():
        have = run.data.params.get(key)
        if have is None or not tracking.same_value(have, value):
            differ.append(f"{key} {have!r} (run) vs {value!r} (now)")
    code, ran = tracking.code_version(), run.data.tags.get(tracking.CODE_VERSION_TAG)
    if ran != code:
        differ.append(f"code version {ran!r} (run) vs {code!r} (now)")
    if differ:
        raise PipelineError(f"cannot resume run {run_id}: {'; '.join(differ)}")
    return run


def record_resume(run: mlflow.entities.Run, step: int) -> None:
    """Count the resume and the step it continued from, on the run (active now)."""
    tags = run.data.tags
    count = int(tags.get(RESUMED_TAG, "0")) + 1
    steps = ",".join(filter(None, [tags.get(RESUMED_FROM_TAG, ""), str(step)]))
    tracking.set_tags({RESUMED_TAG: str(count), RESUMED_FROM_TAG: steps})


def mark_stub(stub_id: str, resumed_id: str, step: str) -> None:
    """The run `mlflow run` created for a command that resumes another run instead: named
    `resume-<step>` and pointing at the run it resumed. `mlflow run` ends it."""
    client = MlflowClient()
    client.set_tag(stub_id, "mlflow.runName", f"resume-{step}")
    client.set_tag(stub_id, "pipeline.resumed_run", resumed_id)
    client.set_tag(stub_id, "mlflow.note.content", f"This command resumed run {resumed_id}.")


class Heartbeat:
    """Rewrites the run's heartbeat tag every HEARTBEAT_S s on a thread, until `stop`."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self._stop = run_id, threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with contextlib.suppress(Exception):  # a missed beat is only late: five make it dead
            MlflowClient().set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def experiment_ids(names: tuple[str, ...] | list[str]) -> list[str]:
    """The ids of experiments `names` (PipelineError listing the experiments for a missing
    one), or of every active experiment when none is named."""
    if names:
        return [tracking.experiment_by_name(n).experiment_id for n in names]
    return [e.experiment_id for e in _client().search_experiments()]


def end_dead_runs(experiment_ids: list[str]) -> list[tuple[str, str]]:
    """End KILLED every RUNNING run of these experiments whose process is dead (see
    `liveness`); returns (run id, why) of each."""
    client, ended = MlflowClient(), []
    runs = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000)
    for run in runs:
        state, why = liveness(run)
        if state != "dead":
            continue
        tracking.fail_pending_models(run.info.run_id, run.info.experiment_id)
        client.set_tag(run.info.run_id, tracking.STOPPED_BY_TAG, f"process gone ({why})")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append((run.info.run_id, why))
    return ended


def ready_model(run_id: str, experiment_id: str, step: int):
    """The READY model `model` the run logged at `step`, as (model_id, model_uri), if any:
    a run killed after logging its model reuses it rather than logging a second one."""
    models = MlflowClient().search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    for m in models:
        if str(m.status) == "READY" and m.name == "model" and m.model_id:
            return m.model_id, f"models:/{m.model_id}"
    return None


# --- checkpoints as artifacts -------------------------------------------------------------


def _repo(run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(tracking.get_run(run_id).info.artifact_uri)


def upload(run_id: str, path: Path, older: list[str]) -> None:
    """`path` into the run's `checkpoints/`, then the `older` ones (names) out of it."""
    MlflowClient().log_artifact(run_id, str(path), ARTIFACT_DIR)
    delete(run_id, older)


def delete(run_id: str, names: list[str]) -> None:
    if not names:
        return
    repo = _repo(run_id)
    for name in names:
        with contextlib.suppress(Exception):  # a store that cannot delete keeps them
            repo.delete_artifacts(f"{ARTIFACT_DIR}/{name}")


def uploaded(run_id: str) -> list[str]:
    """Names of the run's checkpoint artifacts."""
    return [Path(a.path).name for a in MlflowClient().list_artifacts(run_id, ARTIFACT_DIR)]


def download(run_id: str, name: str, folder: Path) -> Path:
    """Checkpoint artifact `name` of the run, into `folder`."""
    with _no_progress_bar():
        return Path(
            MlflowClient().download_artifacts(run_id, f"{ARTIFACT_DIR}/{name}", str(folder))
        )


def temporary_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="pipeline-checkpoint-")
