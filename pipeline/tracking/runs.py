"""A run's life: opened or adopted, written to (params, tags, metrics), always ended.

Every write of a run goes through `pipeline.tracking.spool`, which keeps it while a
tracking server is unreachable and writes it once the server is back.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlflow
from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
from mlflow.tracking import MlflowClient

from pipeline import signals, startup, store
from pipeline.errors import PipelineError, first_line
from pipeline.tracking import spool
from pipeline.tracking.connection import open_store, tracking_uri
from pipeline.tracking.experiments import mark_model_training
from pipeline.tracking.processes import fail_pending_models, outlast_mlflow_run, process_tag
from pipeline.tracking.queries import find_run, get_run, same_value
from pipeline.tracking.tags import (
    ENTRY_POINT_TAG,
    ENTRY_POINTS,
    ERROR_TAG,
    STEP_TAG,
    STOPPED_BY_TAG,
)
from pipeline.tracking.versions import version_tags
from pipeline.tracking.writer import MetricWriter, MlflowTracker, WriterProcess, release

SYSTEM_METRICS_INTERVAL_S = 5  # MLflow's default of 10 s leaves short runs with no samples


@dataclass
class Run:
    """An open MLflow run; its metric writer starts on first use of `tracker`."""

    run_id: str
    experiment_id: str
    process: WriterProcess | None = None  # started ahead by the caller, if it did
    _writer: MetricWriter | None = None

    @property
    def tracker(self) -> MlflowTracker:
        if self._writer is None:
            process, self.process = self.process, None
            self._writer = MetricWriter(self.run_id, process)
        return MlflowTracker(self._writer)

    def flush(self, wait_s: float = 0.0) -> dict:
        """Wait until every queued point is written, or kept after `wait_s` s of an
        unreachable server; raises if any write failed. Returns the writer's report."""
        if self._writer is not None:
            self._writer.close(wait_s, end_process=False)  # ended by `end_writer`
            spool.note_report(self._writer.report)
            return self._writer.report
        return {}

    def end_writer(self, finished: bool) -> None:
        """End the writer process, or keep it for the next run (`writer.release`)."""
        process = self._writer.process if self._writer is not None else self.process
        self.process = None
        release(process, finished=finished)


@contextlib.contextmanager
def start_run(
    step: str,
    run_name: str,
    *,
    nested: bool = False,
    experiment_id: str | None = None,
    system_metrics: bool = False,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    writer_process: WriterProcess | None = None,
) -> Iterator[Run]:
    """Open a run and always close it: FINISHED, FAILED on an exception, KILLED on a signal.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is adopted instead, if it
    is what `mlflow run` creates for this step (see `adoption_problem`), keeping the name
    the user gave it (`--run-name`); `run_id` reopens a run of the same step (a sweep
    resuming). `parent_run_id` nests the run under a run of another process.

    Raises PipelineError, before any run is touched, when MLFLOW_RUN_ID or `run_id` names
    a run that is not there, is of another step, or (MLFLOW_RUN_ID) is not a new one.
    """
    with signals.stop_signals_raise():
        open_store()
        with _store_errors():
            existing, users_name = _run_to_reopen(step, run_id)
        if existing is not None and run_id is None:  # adopted: nested runs are new runs
            os.environ.pop("MLFLOW_RUN_ID", None)
        if system_metrics and not MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.defined:
            # The user's interval stands (MLflow's variable); else ours, not MLflow's 10 s.
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        run, status = None, "FAILED"
        try:
            # Held until `run` is set: a run created but not yet known here stays RUNNING.
            with signals.held(), _store_errors():
                active = mlflow.start_run(
                    run_id=existing,
                    run_name=None if users_name else run_name,
                    nested=nested,
                    experiment_id=experiment_id,
                    parent_run_id=parent_run_id,
                    log_system_metrics=system_metrics,
                )
                run = Run(active.info.run_id, active.info.experiment_id, writer_process)
            startup.settle()  # the command's imports are done by its first run
            name = {} if users_name else {"mlflow.runName": run_name}
            # process_tag: lets a later command tell that a RUNNING run's process is gone.
            set_tags(name | {STEP_TAG: step, **version_tags(), **process_tag()})
            # The experiment's tag, not the run's: nothing to keep if the server is down.
            spool.try_write(lambda: mark_model_training(run.experiment_id))
            yield run
            # A stop signal whose exception was swallowed (raised inside a gc callback or a
            # __del__) let the body carry on; the run still ends KILLED, never FINISHED.
            signals.raise_if_received()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if run is not None:
                _end_run(run, status)


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """MLflow's errors from the store (a server that does not answer, a refused request) as
    one line naming the store, credentials hidden, instead of a page of traceback."""
    try:
        yield
    except mlflow.exceptions.MlflowException as exc:
        reason = spool.unreachable(exc)
        what = f"unreachable ({reason})" if reason else store.redact(first_line(exc))
        raise PipelineError(f"tracking store {store.redact(tracking_uri())}: {what}") from None


def _run_to_reopen(step: str, run_id: str | None) -> tuple[str | None, bool]:
    """(id of the existing run `start_run` reopens or None, whether its name is the user's).

    MLFLOW_RUN_ID is checked here, not left to `mlflow.start_run`: that would reopen any
    run, a FINISHED run of another command included (a value left over in the shell), and
    train into it.
    """
    if run_id is not None:  # a resume the caller chose: only ever a run of the same step
        found = find_run(run_id)
        if found is None or found.data.tags.get(STEP_TAG) != step:
            what = "no run" if found is None else f"a {_describe(found)}"
            raise PipelineError(f"cannot resume run {run_id} as a {step} run: it is {what}")
        return run_id, False
    env_id = os.environ.get("MLFLOW_RUN_ID")
    if not env_id:
        return None, False
    found = find_run(env_id)
    if found is None:
        raise PipelineError(
            f"MLFLOW_RUN_ID={env_id} is not a run in the tracking store "
            f"{store.redact(tracking_uri())}; unset MLFLOW_RUN_ID if it is left over in this "
            "shell, or give `mlflow run` and this command the same MLFLOW_TRACKING_URI"
        )
    if (problem := adoption_problem(found, step)) is not None:
        raise PipelineError(
            f"MLFLOW_RUN_ID={env_id} names {problem}, not a new run that `mlflow run` started "
            f"for this {step}; unset MLFLOW_RUN_ID (left over in this shell?)"
        )
    return env_id, not generated_name(found.info.run_name)


def adoption_problem(run: mlflow.entities.Run, step: str) -> str | None:
    """Why `run` is not one this `step` may write into as its own, or None if it may.

    The legitimate case is the run `mlflow run` created for the entry point that runs this
    step: RUNNING, not deleted, no step of ours started in it yet, and (when MLflow recorded
    it) that entry point.
    """
    entry_point = run.data.tags.get(ENTRY_POINT_TAG)
    if run.info.lifecycle_stage != "active":
        return f"a deleted {_describe(run)}"
    if run.info.status != "RUNNING":
        return f"a {run.info.status} {_describe(run)}"
    if STEP_TAG in run.data.tags:
        return f"a {_describe(run)} that has started already"
    if entry_point in ENTRY_POINTS and entry_point != step:
        return f"the run of entry point {entry_point!r}"
    return None


def _describe(run: mlflow.entities.Run) -> str:
    step = run.data.tags.get(STEP_TAG)
    return f"{step + ' ' if step else ''}run ({run.info.run_name!r})"


def generated_name(name: str | None) -> bool:
    """Whether `name` is one MLflow made up for an unnamed run (`adjective-noun-123`), as
    opposed to one a user chose (`mlflow run --run-name`)."""
    match = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d{1,4})", name or "")
    if not name:
        return True
    if match is None:
        return False
    try:  # MLflow's own word lists; private, so only a refinement of the pattern
        from mlflow.utils import name_utils

        return (
            match[1] in name_utils._GENERATOR_PREDICATES and match[2] in name_utils._GENERATOR_NOUNS
        )
    except (ImportError, AttributeError):
        return True


def mark_not_started(message: str, prefix: str) -> None:
    """Under `mlflow run`, mark the run it created for a command that stopped before
    starting it (bad input, a busy lock): MLflow creates that run before our command
    starts, and ends it FAILED with a random name when the command exits non-zero.

    It is named `<prefix>-<entry point>` (unless the user named it) and tagged
    `pipeline.error` with the one-line error. Only such a run is touched: a stale
    MLFLOW_RUN_ID naming any other run is left alone. Best effort; never raises.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    path = store.local_path(tracking_uri())
    if not run_id or (path is not None and not path.expanduser().exists()):
        return  # opening a local store that is not there would create it
    with contextlib.suppress(Exception):
        found = get_run(run_id)
        entry_point = found.data.tags.get(ENTRY_POINT_TAG)
        if entry_point not in ENTRY_POINTS or adoption_problem(found, entry_point):
            return
        client = MlflowClient()
        client.set_tag(run_id, ERROR_TAG, store.redact(message)[:5000])
        if generated_name(found.info.run_name):
            client.set_tag(run_id, "mlflow.runName", f"{prefix}-{entry_point}")
        client.set_terminated(run_id, "FAILED")


def _end_run(run: Run, status: str) -> None:
    """Write the queued points, then the final status, with signals held until both are in.

    A stop signal, even one whose exception something swallowed, makes the status KILLED.
    An unreachable tracking server is waited for at most `spool.wait_seconds()` in all;
    what it did not take is kept in the run's spool, announced in one line.
    """
    with signals.held():
        if status != "FINISHED" and signals.received() is not None:
            status = "KILLED"
        deadline = time.monotonic() + spool.wait_seconds()
        report: dict = {}
        try:
            report = run.flush(spool.wait_seconds())
        except PipelineError:
            if status != "KILLED":
                status = "FAILED"
            raise
        finally:
            run.end_writer(status == "FINISHED")
            if status != "FINISHED":
                _mark_unfinished(run.run_id, run.experiment_id, status)
            spool.end_run(status, report, deadline)
            if status == "KILLED":
                outlast_mlflow_run(run.run_id)


def _mark_unfinished(run_id: str, experiment_id: str, status: str) -> None:
    """What a run that did not finish records besides its status; never raises.

    The signal that stopped it, as a tag, and any model it was logging finalized FAILED:
    MLflow finalizes a logged model only on an Exception, so one cut short by a signal
    would stay PENDING forever.
    """
    with contextlib.suppress(Exception):
        if status == "KILLED" and (signum := signals.received()) is not None:
            MlflowClient().set_tag(run_id, STOPPED_BY_TAG, signals.name(signum))
    with contextlib.suppress(Exception):
        fail_pending_models(run_id, experiment_id)


def log_params(params: dict[str, object]) -> None:
    """Log params as strings. A key already on the run with the same value (`same_value`)
    is skipped: under `mlflow run` MLflow logs the entry point's parameters itself, as it
    spells them. A different value is an error, before anything else is logged: a param
    can never change once logged.

    Raises PipelineError naming the key and both values.
    """
    # The run as `start_run` fetched it, MLflow's own params included: no extra request.
    active = mlflow.active_run()
    existing = active.data.params
    new = {}
    for key, value in params.items():
        text = "none" if value is None else str(value)
        if key not in existing:
            new[key] = text
        elif not same_value(existing[key], text):
            raise PipelineError(
                f"run {active.info.run_id} already has param {key}={existing[key]!r}, which "
                f"cannot change to {text!r}"
            )
    if new:
        spool.submit({"op": "params", "params": new})


def set_tags(tags: dict[str, str]) -> None:
    spool.submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})


def log_metrics(
    metrics: dict[str, float], step: int | None = None, model_id: str | None = None, dataset=None
) -> None:
    """Metrics of the active run at `step` (0 if None), stamped now; with `model_id` those of
    that logged model too, with `dataset` (an MLflow dataset) measured on it."""
    run_id = mlflow.active_run().info.run_id
    ts = int(time.time() * 1000)
    named = (dataset.name, dataset.digest) if dataset is not None else (None, None)
    points = [[k, float(v), ts, step or 0, model_id, *named] for k, v in metrics.items()]
    spool.submit(
        {"op": "metrics", "metrics": points},
        # run_id given, so MLflow reads the run as it is now (with its model and input)
        # instead of the active run's stale copy, and links neither a second time.
        lambda: mlflow.log_metrics(
            metrics, step=step, run_id=run_id, model_id=model_id, dataset=dataset
        ),
    )
