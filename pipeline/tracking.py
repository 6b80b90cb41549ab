"""Every MLflow tracking call of the project lives here (registry calls: registry.py).

The loop reports to `MlflowTracker`, which queues points for a helper process that writes
them with `log_batch`, so per-step logging costs the training thread a list append. Every
write of a run goes through `pipeline.spool`, which keeps it while a tracking server is
unreachable and writes it once the server is back.

This module must not import torch at the top: the helper process imports it, and only
needs MLflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import pickle
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.tracking import MlflowClient

import pipeline
from pipeline import signals, spool, store
from pipeline.errors import PipelineError, first_line
from pipeline.lock import cache_dir

if TYPE_CHECKING:
    from pipeline.loop import StepLog

STEP_TAG = "pipeline.step"
DATA_CACHE_ENV = "PIPELINE_DATA_CACHE"  # where data_prep files of other machines are kept
CODE_VERSION_TAG = "pipeline.code_version"
SWEEP_FILE_TAG = "pipeline.sweep_file_sha256"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
SYSTEM_METRICS_INTERVAL_S = 5  # MLflow's default of 10 s leaves short runs with no samples
spool.configure()


def code_version() -> str:
    """A digest of the package's source: changes whenever the code that made a result does."""
    h = hashlib.sha256()
    for path in sorted(Path(pipeline.__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def version_tags() -> dict[str, str]:
    """Versions, code digest and environment (pipeline.environment.tags) of a new run."""
    import importlib.metadata

    import torch

    from pipeline import environment

    return {
        "torch_version": torch.__version__,
        # From the installed metadata: importing torchvision only to read this costs ~1 s.
        "torchvision_version": importlib.metadata.version("torchvision"),
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        CODE_VERSION_TAG: code_version(),
        **environment.tags(),
    }


Point = tuple[str, float, int, int]  # (key, value, timestamp ms, step): a Metric, unbuilt
WRITER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import pipeline.tracking as t; t._writer_main()"  # noqa: E501
)
READY = b"ready\n"


class WriterProcess:
    """The helper process a `MetricWriter` writes through, started ahead of the run.

    Starting it costs ~1.5 s (importing MLflow) on another core: a caller that knows a run
    is coming starts it early, so that time overlaps its own data loading and imports.
    """

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        root = str(Path(pipeline.__file__).resolve().parents[1])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_CODE, root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )

    def finish(self) -> dict:
        """End of input; wait for the process to write the rest (or keep it, see
        `spool.PointQueue.close`). Returns its report: {"error": ...} if a write failed,
        {"kept": N, "folder": ...} if N points were kept for a server that did not answer."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        code = self.proc.wait()
        out = self.proc.stdout.read().decode(errors="replace").strip().splitlines()
        self.proc.stdout.close()
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        self.stderr.close()
        report = json.loads(out[-1]) if out and out[-1].startswith("{") else {}
        if code != 0 and "error" not in report:
            report["error"] = lines[-1] if lines else f"writer process exited with status {code}"
        return report


class MetricWriter:
    """Writes queued metrics to one run with `log_batch`, from a helper process.

    MLflow's sqlite store spends ~60 us of Python per point (SQLAlchemy's ORM). Done on a
    thread, that time holds the GIL and stalls the training loop, ~8% at three points per
    step; a separate process writes on another core instead. A feeder thread here merges
    what the loop queues into batches and pickles them down the process's stdin, so the
    loop itself never waits on the pipe.
    """

    def __init__(self, run_id: str, process: WriterProcess | None = None) -> None:
        self.run_id = run_id
        self._process = process or WriterProcess()
        self._queue: queue.SimpleQueue[list[Point] | None] = queue.SimpleQueue()
        self._closed = False
        self._broken = False  # the process is gone: its report says why
        self._wait_s = 0.0
        self.report: dict = {}
        proc = self._process.proc
        try:
            pickle.dump((mlflow.get_tracking_uri(), run_id), proc.stdin)
            proc.stdin.flush()
            ready = proc.stdout.readline()  # once it has opened the store
        except OSError:
            ready = b""
        if ready != READY:
            self._closed = True
            error = self._process.finish().get("error", "the writer process did not start")
            raise PipelineError(f"logging metrics to MLflow failed: {error}")
        self._thread = threading.Thread(target=self._feed, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def put(self, points: list[Point]) -> None:
        """Queue points; raises PipelineError once the writer has stopped on an error (a full
        disk, a deleted run), so a run whose points cannot be written stops early."""
        if self._broken and not self._closed:
            self.close()
        self._queue.put(points)

    def _feed(self) -> None:
        stdin = self._process.proc.stdin
        try:
            while (item := self._queue.get()) is not None:
                batch, done = self._drain(list(item))
                pickle.dump(batch, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.flush()
                if done:
                    break
            # How long the process may wait for an unreachable server before keeping the rest.
            pickle.dump(("close", self._wait_s), stdin)
            stdin.flush()
        except OSError:  # the process stopped on an error: close() reports it
            self._broken = True

    def _drain(self, batch: list[Point]) -> tuple[list[Point], bool]:
        """Add whatever else is queued already; True once the end marker was taken."""
        while len(batch) < MAX_METRICS_PER_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
            if item is None:
                return batch, True
            batch.extend(item)
        return batch, False

    def close(self, wait_s: float = 0.0) -> None:
        """Write everything queued so far, then stop; raises if any write failed. Points a
        tracking server did not take within `wait_s` s are kept (`self.report["kept"]`).

        Closing again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._wait_s = wait_s
        self._queue.put(None)
        self._thread.join()
        self.report = self._process.finish()
        if "error" in self.report:
            raise PipelineError(f"logging metrics to MLflow failed: {self.report['error']}")


def _writer_main() -> None:
    """The helper process: open the run named on stdin, then log every pickled batch.

    The last message is ("close", seconds): how long to wait for an unreachable server
    before keeping what is left in the run's spool. The report goes to stdout as JSON.
    """
    # Signals are for the parent, which ends this process by closing stdin: a Ctrl-C, a
    # SIGTERM or a closed terminal must not drop the points still in the pipe.
    for sig in signals.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # The queue retries under its own time budget; MLflow's retries would last minutes.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    # What opening a store imports, done while the parent is still busy: then the parent's
    # wait for READY is only the connection itself.
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    stdin = sys.stdin.buffer
    try:
        tracking_uri, run_id = pickle.load(stdin)
    except EOFError:
        os._exit(0)  # started ahead, never used
    points = spool.PointQueue(MlflowClient(tracking_uri), tracking_uri, run_id)
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    wait_s = spool.wait_seconds()  # input ends without ("close", s): the parent died
    while points.fatal is None:
        try:
            message = pickle.load(stdin)
        except (EOFError, pickle.UnpicklingError):
            break
        if isinstance(message, tuple):
            wait_s = message[1]
            break
        points.put(message)
    report = points.close(wait_s)
    sys.stdout.buffer.write(json.dumps(report).encode() + b"\n")
    sys.stdout.buffer.flush()
    sys.stderr.flush()
    # Everything is committed or kept; the interpreter's teardown would only add ~1 s.
    os._exit(1 if "error" in report else 0)


class MlflowTracker:
    """The loop's `Tracker`, writing train/* points asynchronously and other metrics too."""

    def __init__(self, writer: MetricWriter) -> None:
        self.writer = writer

    def log_steps(self, rows: list[StepLog]) -> None:
        points = []
        for r in rows:
            ts = int(r.time * 1000)
            points += [
                ("train/loss", r.loss, ts, r.step),
                ("train/accuracy", r.accuracy, ts, r.step),
                ("train/lr", r.lr, ts, r.step),
            ]
        self.writer.put(points)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.writer.put([(k, float(v), ts, step) for k, v in metrics.items()])


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
        if self.process is not None:  # started ahead but never used
            self.process.finish()
            self.process = None
        if self._writer is not None:
            self._writer.close(wait_s)
            spool.note_report(self._writer.report)
            return self._writer.report
        return {}


def open_store_in_background() -> threading.Thread:
    """Start creating (or opening) the tracking store on a thread; join it before a run.

    A fresh sqlite store runs MLflow's schema migrations, seconds of mostly disk waits:
    on a thread they overlap the data loading and imports the run does anyway. Errors are
    left for `start_run`, which opens the store again and raises them.
    """

    def open_in_background() -> None:
        with contextlib.suppress(Exception):
            open_store()

    thread = threading.Thread(target=open_in_background, name="mlflow-store", daemon=True)
    thread.start()
    return thread


_opened: set[str] = set()  # tracking URIs this process has opened a store for
_opening = threading.Lock()


def open_store() -> None:
    """Open (and, where it is new, create) the tracking store, once per process and URI.

    MLflow creates a sqlite store by running its schema migrations on first open, and
    several processes doing that at once crash each other (`duplicate column name`, `table
    ... already exists`, `_alembic_tmp_*` tables left behind). So the first open of a sqlite
    store in each process holds an exclusive `flock` on the store's folder: the first
    process creates it, the others wait, then find it complete. MLflow caches the opened
    store per URI, so every later MLflow call of this process uses it without the lock.
    The metric writer process opens the store only after its parent has.

    Raises PipelineError naming the URI (credentials hidden) and the cause when the store
    cannot be opened: a truncated or foreign file, a missing or unwritable folder, a server
    that does not answer.
    """
    from mlflow.tracking._tracking_service.utils import _get_store

    uri = mlflow.get_tracking_uri()
    with _opening:
        if uri in _opened:
            return
        try:
            if uri.lower().startswith("sqlite"):
                # Its ~2 s of imports outside the lock: other processes wait only for the
                # opening itself (~0.1 s on an existing store).
                from mlflow.store.tracking import sqlalchemy_store  # noqa: F401
            with _creation_lock(uri):
                _get_store()
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"cannot open the tracking store {store.redact(uri)}: "
                f"{store.redact(first_line(exc))}"
            ) from None
        _opened.add(uri)


def _client() -> MlflowClient:
    """A client of the tracking store, opened first with `open_store` (safe to race)."""
    open_store()
    return MlflowClient()


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """An exclusive flock on the folder of a sqlite store, else nothing.

    The folder, not a file: nothing is left behind, and sqlite's own locks on the database
    file are POSIX locks that closing any other descriptor of that file would drop.
    """
    path = store.local_path(uri) if uri.lower().startswith("sqlite") else None
    if path is None:
        yield
        return
    folder = path.expanduser().resolve().parent
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise PipelineError(
            f"cannot open the tracking store {store.redact(uri)}: folder {str(folder)!r}: "
            f"{exc.strerror}"
        ) from None
    try:
        # No flock on this file system (some NFS): open unserialised, as MLflow does.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def import_end_of_run() -> None:
    """Import what the end of a run needs (torch.export and mlflow.pytorch for `log_model`,
    matplotlib for the figure): ~2 s, best spent while the store is still being created."""
    import matplotlib
    import mlflow.pytorch  # noqa: F401
    import torch.export  # noqa: F401
    from mlflow.models import infer_signature  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


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
        if system_metrics:
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


ENTRY_POINT_TAG = "mlflow.project.entryPoint"
ENTRY_POINTS = ("main", "data_prep", "train", "retrain", "sweep")  # each runs the step it names
ERROR_TAG = "pipeline.error"


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


# --- how a run ends (signals, `mlflow run`) ---------------------------------------------

STOPPED_BY_TAG = "pipeline.stopped_by"  # the signal that ended a KILLED run
PROCESS_TAG = "pipeline.process"  # host:pid:start time of the process that owns the run
# The run `mlflow run` made for this process; read now, as mlflow.start_run unsets it.
MLFLOW_RUN_ID = os.environ.get("MLFLOW_RUN_ID")
REASSERT_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import pipeline.tracking as t; "
    "t._reassert_killed_main(*sys.argv[2:])"
)


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
            if status != "FINISHED":
                _mark_unfinished(run.run_id, run.experiment_id, status)
            spool.end_run(status, report, deadline)
            if status == "KILLED":
                _outlast_mlflow_run(run.run_id)


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


def fail_pending_models(run_id: str, experiment_id: str) -> list[str]:
    """Finalize as FAILED every logged model of the run still PENDING; returns their ids."""
    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    pending = [m.model_id for m in models if str(m.status) == "PENDING"]
    for model_id in pending:
        client.finalize_logged_model(model_id, "FAILED")
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


def _outlast_mlflow_run(run_id: str) -> None:
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
    """The detached process of `_outlast_mlflow_run`."""
    import psutil

    with contextlib.suppress(psutil.Error):
        psutil.Process(int(pid)).wait(timeout=120)
    client = MlflowClient()
    if client.get_run(run_id).info.status == "FAILED":
        client.set_terminated(run_id, "KILLED", end_time=int(end_ms))


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


def canonical(value: object) -> str:
    """A param value in one spelling, to compare params as MLflow stores them (strings).

    `mlflow run` logs each entry point parameter shell-quoted when it has to be
    (`'/tmp/x/sp ace'`) and as typed (`0.10`, `1e-3`, `false`); this product logs
    `0.1`, `0.001`, `False`. Numbers compare as floats, true/false in any case, and the
    spellings of "unset" (`auto`, `none`, empty) as one.
    """
    text = "none" if value is None else str(value)
    if text.startswith("'"):
        with contextlib.suppress(ValueError):
            words = shlex.split(text)
            if len(words) == 1 and shlex.quote(words[0]) == text:
                text = words[0]
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered
    if lowered in ("auto", "none", ""):
        return "auto"
    if len(lowered) > 24:  # ids and digests: compared exactly, never as numbers
        return text
    try:
        number = float(lowered)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else lowered


def same_value(a: object, b: object) -> bool:
    return canonical(a) == canonical(b)


def params_match(params: dict[str, str], wanted: dict[str, object]) -> bool:
    """Whether a run's `params` hold every key of `wanted` with the same value (`canonical`)."""
    return all(k in params and same_value(params[k], v) for k, v in wanted.items())


def set_tags(tags: dict[str, str]) -> None:
    spool.submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})


def log_prepared_data(path: Path, digest: str, splits: dict[str, int], source: str, counts) -> None:
    """The prepared file as an artifact, each split as a dataset input, class counts as JSON."""
    log_artifact(path, artifact_path="data")
    log_dict(counts, "class_counts.json")
    for split, size in splits.items():
        dataset = split_dataset(path, digest, source, split)
        spool.submit(spool.dataset_op(dataset, split, {"size": str(size)}))


def split_dataset(path: Path, digest: str, source: str, split: str):
    """One split of a prepared file as an MLflow dataset: `<file stem>/<split>`, named and
    digested alike wherever it is logged (data_prep's inputs, a model's test metrics)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    src = HTTPDatasetSource(source) if source.startswith("http") else _local_source(path)
    return MetaDataset(source=src, name=f"{path.stem}/{split}", digest=digest[:16])


def _local_source(path: Path):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # two registered local sources match; either is right
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(path.resolve()))


def find_prep_run(experiment_id: str, params: dict[str, str]) -> mlflow.entities.Run | None:
    """The newest FINISHED data_prep run of this code version with exactly these params."""
    return find_finished_run(experiment_id, "data_prep", params)


def find_finished_run(
    experiment_id: str, step: str, params: dict[str, str], max_results: int = 50
) -> mlflow.entities.Run | None:
    """The newest FINISHED `step` run of this code version with exactly these params."""
    for run in finished_runs(experiment_id, step, max_results):
        # As stored: `mlflow run` quotes and spells values its own way (`canonical`).
        if params_match(run.data.params, params):
            return run
    return None


def finished_runs(
    experiment_id: str, step: str, max_results: int = 5000
) -> list[mlflow.entities.Run]:
    """FINISHED `step` runs of this code version, newest first."""
    return _client().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = '{step}' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            " and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The kind the MLflow UI (3.x) opens on the runs table for; it opens an experiment without
# a kind, or with a GenAI one, on its GenAI overview. Values from the UI's ExperimentKind.
MODEL_TRAINING = "custom_model_development"


def mark_model_training(experiment_id: str, tags: dict[str, str] | None = None) -> None:
    """Tag the experiment as model training, so the MLflow UI opens it on its runs.

    `tags`: the experiment's tags, when the caller has them (saves a request). A kind the
    UI only guessed (`*_inferred`, `no_inferred_type`) is replaced; one somebody chose is
    left as it is.
    """
    client = MlflowClient()
    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    kind = tags.get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created now if missing, marked as model training.

    Created up front by the one sweep process: several processes calling `set_experiment`
    for a new name race, and all but one end up logging to "Default".
    """
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise PipelineError(
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                "or choose another name"
            )
        mark_model_training(found.experiment_id, found.tags)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        mark_model_training(found.experiment_id, found.tags)
        return found.experiment_id


def experiment_name(experiment_id: str) -> str:
    return _client().get_experiment(experiment_id).name


def find_unfinished_sweep(experiment_id: str, file_digest: str) -> str | None:
    """The newest sweep run of this file and code version if it did not finish, to resume.

    A RUNNING one is resumed too: the caller holds the sweep's lock, so no live process
    is running it (it was SIGKILLed, or its machine died).
    """
    run = find_sweep(experiment_id, file_digest)
    return run.info.run_id if run is not None and run.info.status != "FINISHED" else None


def find_sweep(experiment_id: str, file_digest: str) -> mlflow.entities.Run | None:
    """The newest sweep run of this file and code version, any status."""
    runs = _client().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = 'sweep' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            f" and tags.`{SWEEP_FILE_TAG}` = '{file_digest}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


# --- reading runs back -------------------------------------------------------------------


def find_run(run_id: str) -> mlflow.entities.Run | None:
    """The run with this id, or None where there is none (or `run_id` is no run id).

    Other errors (a server that does not answer) are raised, not taken for "no such run".
    """
    try:
        return get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_run(run_id: str) -> mlflow.entities.Run:
    return _client().get_run(run_id)


def experiment_by_name(name: str) -> mlflow.entities.Experiment:
    """Experiment `name`; the error lists the experiments there are."""
    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise PipelineError(
            f"{name!r} is neither an experiment nor a run id; experiments: {', '.join(names)}"
        )
    return experiment


def train_runs(experiment_id: str, parent_run_id: str | None = None) -> list[mlflow.entities.Run]:
    """The train runs of an experiment, or only the children of `parent_run_id`; any status."""
    query = f"tags.`{STEP_TAG}` = 'train'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return _client().search_runs([experiment_id], query, max_results=5000)


def load_json_artifact(run_id: str, artifact_file: str) -> object | None:
    """A JSON file logged to a run, or None where the run has none (yet).

    Downloaded into a temporary folder that is gone when this returns.
    """
    client = MlflowClient()
    if artifact_file not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="pipeline-artifact-") as folder, _no_progress_bar():
        path = client.download_artifacts(run_id, artifact_file, folder)
        return json.loads(Path(path).read_text())


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a download progress bar even for one small file."""
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def running_retrains(experiment_id: str, model_name: str) -> list[mlflow.entities.Run]:
    """The RUNNING retrain runs of registered model `model_name`."""
    return MlflowClient().search_runs(
        [experiment_id],
        f"tags.`{STEP_TAG}` = 'retrain' and tags.`retrain.model_name` = '{model_name}'"
        " and attributes.status = 'RUNNING'",
        max_results=5000,
    )


def running_children(experiment_id: str, parent_run_id: str) -> list[mlflow.entities.Run]:
    """The RUNNING child runs of `parent_run_id`, any step."""
    return MlflowClient().search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged point of `key` as (step, value), in step order."""
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def create_finished_run(experiment_id: str, run_name: str, step: str) -> str:
    """A FINISHED run that only holds artifacts logged to it afterwards (`log_artifacts_to`)."""
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={STEP_TAG: step, CODE_VERSION_TAG: code_version()},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def compare_run(experiment_id: str, run_name: str) -> str:
    """The experiment's run that holds its comparisons: the newest FINISHED `compare` run,
    or a new one. Reused, so comparing again refreshes its artifacts instead of adding runs."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{STEP_TAG}` = 'compare' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    return create_finished_run(experiment_id, run_name, "compare")


def log_artifacts_to(run_id: str, folder: Path, artifact_path: str) -> None:
    """Every file of `folder` to a run that need not be the active one."""
    MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """A file to the active run (kept, as a copy, while the server is unreachable)."""
    op = {"op": "artifact", "file": str(Path(path).resolve()), "artifact_path": artifact_path}
    spool.submit(op)


def log_dict(obj: object, artifact_file: str) -> None:
    """`obj` as JSON at `artifact_file` of the active run, as `mlflow.log_dict` writes it."""
    _log_file(lambda path: path.write_text(json.dumps(obj, indent=2)), artifact_file)


def _log_file(write, artifact_file: str) -> None:
    """Log the file that `write(path)` writes as `artifact_file` of the active run."""
    with tempfile.TemporaryDirectory(prefix="pipeline-artifact-") as folder:
        path = Path(folder) / Path(artifact_file).name
        write(path)
        parent = str(Path(artifact_file).parent)
        log_artifact(path, None if parent == "." else parent)


def tracking_uri() -> str:
    """The store in use, so child processes log to the same one."""
    return mlflow.get_tracking_uri()


def prepared_file_of(run_id: str) -> tuple[Path, str]:
    """(local path, digest) of a data_prep run's prepared file, downloading it if needed."""
    from pipeline.data import file_digest

    try:
        run = get_run(run_id)
    except Exception:
        raise PipelineError(
            f"data {run_id!r} is neither an existing file nor a data_prep run id"
        ) from None
    if run.data.tags.get(STEP_TAG) != "data_prep" or run.info.status != "FINISHED":
        raise PipelineError(f"run {run_id!r} is not a FINISHED data_prep run")
    digest = run.data.params["data_digest"]
    local = Path(run.data.params["data_path"])
    if local.is_file() and file_digest(local) == digest:
        return local, digest
    # Another machine's file: downloaded once into the user's cache, by digest, so a second
    # train on the same data neither downloads again nor leaves a folder in /tmp each time.
    cached = cache_dir(DATA_CACHE_ENV, "data") / digest[:16] / local.name
    if cached.is_file() and file_digest(cached) == digest:
        return cached, digest
    cached.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=".download-", dir=cached.parent))
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"data/{local.name}", dst_path=str(part)
        )
        os.replace(path, cached)  # whole or not at all, also with two trains at once
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return cached, digest


# Class names end metric keys (`challenger/test/class_accuracy/<name>`, 31 characters before
# the name) that MLflow caps at 250 characters.
MAX_CLASS_KEY = 200
_NOT_KEY_CHARS = re.compile(r"[^\w.\- :]")  # MLflow's key characters, less "/"


def class_metric_names(classes: list[str]) -> list[str]:
    """Each class name as it ends a metric key (`test/class_accuracy/<name>`), one per class.

    Every character other than letters, digits, `_ - . :` and space becomes `_`: `/` too,
    which MLflow allows but its UI splits into sections (`T-shirt/top` -> `T-shirt_top`); a
    name of only dots (`.`, `..`, a path step MLflow refuses) becomes underscores; names are
    cut to 200 characters (MLflow's keys take 250). A name that would repeat an earlier
    one gets `_2`, `_3`, ... in class order. The real names stay everywhere else.
    """
    names: list[str] = []
    for name in classes:
        base = _NOT_KEY_CHARS.sub("_", name)[:MAX_CLASS_KEY]
        base = "_" * len(base) if not base.strip(".") else base
        key, n = base, 1
        while key in names:
            n += 1
            key = f"{base[: MAX_CLASS_KEY - len(str(n)) - 1]}_{n}"
        names.append(key)
    return names


def log_evaluation(
    prefix: str, ev, classes: list[str], step: int, model_id: str | None = None, dataset=None
) -> None:
    """Final metrics, per-class accuracy and the confusion matrix as a figure and JSON.

    Per-class keys are `<prefix>/class_accuracy/<class_metric_names(classes)[i]>`; the JSON
    pairs each real class name with its metric name. With `model_id` (a logged model's,
    `log_model(...).model_id`) the metrics are that model's too, and with `dataset`
    (`split_dataset`) they name the data they were measured on, which is logged as an input
    of the run: the UI's Models tab then shows both.
    """
    metrics = {f"{prefix}/loss": ev.loss, f"{prefix}/accuracy": ev.accuracy}
    keys = class_metric_names(classes)
    for key, acc in zip(keys, ev.per_class_accuracy(), strict=True):
        metrics[f"{prefix}/class_accuracy/{key}"] = acc
    if dataset is not None:
        spool.submit(spool.dataset_op(dataset, prefix, {}))
    log_metrics(metrics, step=step, model_id=model_id, dataset=dataset)
    log_dict(
        {"classes": classes, "metric_names": keys, "matrix": ev.confusion},
        f"{prefix}_confusion.json",
    )
    figure = _confusion_figure(ev.confusion, classes)
    _log_file(figure.savefig, f"{prefix}_confusion_matrix.png")


def _confusion_figure(matrix: list[list[int]], classes: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test)",
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    peak = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            color = "white" if n > peak / 2 else "black"
            ax.text(j, i, n, ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    plt.close(fig)
    return fig


def log_model(
    model,
    example,
    *,
    classes: list[str] | None = None,
    registered_model_name: str | None = None,
    step: int = 0,
    params: dict[str, object] | None = None,
):
    """Log the model as a pt2 (torch.export) artifact, loadable by pyfunc and servable.

    `example` is a float32 batch [N, C, H, W] as the model takes it; the signature records
    its shape. `classes` (the name of each logit, in order) goes into the model's metadata
    (`MLmodel`), with a description of the input: `get_model_info(uri).metadata["classes"]`.
    `step`: the global step the weights are from; MLflow attaches to the model any metric
    later logged at that step without a model id, so the run's step-0 metrics (`time/*`,
    the first system metrics sample) stay the run's. `params` (as strings, `None` as
    "none") are the model's own params in the UI's Models tab.

    pip requirements are given explicitly: inferring them imports the model in a
    subprocess and costs seconds on every run. They pin the versions the model ran with and,
    when this environment is the lock's, carry every pin of the lock as the model's
    `constraints.txt`, so an environment rebuilt to serve it is the one that trained it.
    """
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from pipeline import environment

    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    base = lambda v: v.split("+")[0]  # noqa: E731 - drop local tags like +cpu / +cu130
    requirements = [
        f"torch=={base(torch.__version__)}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if (pins := environment.model_constraints()) is not None:
            # MLflow copies a `-c` file into the model; it takes no constraint lines directly.
            constraints = Path(tmp, "constraints.txt")
            constraints.write_text("\n".join(pins) + "\n")
            requirements.append(f"-c {constraints}")
        kwargs = dict(
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=requirements,
            metadata=_model_metadata(example, classes),
        )
        logged = dict(step=step, params=None if params is None else _strings(params))
        if registered_model_name is not None:  # registering needs the server now: never kept
            return mlflow.pytorch.log_model(
                model, name="model", registered_model_name=registered_model_name, **kwargs, **logged
            )
        return spool.keep_model(
            lambda: mlflow.pytorch.log_model(model, name="model", **kwargs, **logged),
            lambda path: mlflow.pytorch.save_model(model, path, **kwargs),
            "model",
            **logged,
        )


def _model_metadata(example, classes: list[str] | None) -> dict[str, object]:
    """What the served model's numbers mean: the input it takes and the name of each logit."""
    shape = ", ".join(["N", *map(str, example.shape[1:])])
    images = ": pixels / 255, then (x - 0.5) / 0.5" if example.ndim == 4 else ""
    metadata: dict[str, object] = {
        "input": f"float32 [{shape}]{images}",
        "output": "float32 [N, classes] logits; classes[i] names logit i",
    }
    if classes is not None:
        metadata["classes"] = list(classes)
    return metadata


def _strings(params: dict[str, object]) -> dict[str, str]:
    return {k: str(v) for k, v in params.items()}


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
