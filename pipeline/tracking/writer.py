"""Per-step metrics, written by a helper process so the training loop only appends.

The loop reports to `MlflowTracker`, which queues points for a helper process that writes
them (`spool.PointQueue`, through `points.point_writer`). A process that runs one run after
another (a sweep's worker) keeps that helper between runs (`keep_writers`). This module
must not import torch: the helper process imports it, and only needs MLflow. MLflow itself
is imported where it is used, so that a command can start the helper before its own
imports (`keep_writers(ahead=True)`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pipeline
from pipeline import signals
from pipeline.errors import PipelineError
from pipeline.tracking import spool
from pipeline.tracking.spool import Point

if TYPE_CHECKING:
    from pipeline.loop import StepLog


WRITER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from pipeline import startup; startup.postpone_full_collections(); "
    "import pipeline.tracking.writer as w; w.writer_main()"
)


READY = b"ready\n"
OPEN = "open-store"  # (OPEN, uri): create or open that store now, ahead of any run
OPENED = b"opened\n"  # its answer, once done (opened or not)


class WriterProcess:
    """The helper process a `MetricWriter` writes through, started ahead of the run.

    Starting it costs ~1.5 s of CPU (importing MLflow) on another core: a caller that knows
    a run is coming starts it early, so that time overlaps its own data loading and imports.
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
        self._finished: dict | None = None
        self.used = False  # given a run or a store to open: it must then end by itself

    def open_store(self, uri: str) -> None:
        """Have it create or open the tracking store at `uri`, on its own core, and wait
        until it has: a fresh sqlite store's migrations (~1.5 s of CPU) then stay off this
        process's GIL. Best effort: the caller opens the store itself afterwards
        (`connection.open_store`), and meets any error there."""
        self.used = True
        with contextlib.suppress(OSError, ValueError):
            pickle.dump((OPEN, uri), self.proc.stdin)
            self.proc.stdin.flush()
            self.proc.stdout.readline()  # OPENED, or b"" if it died

    def discard(self) -> None:
        """End it: killed if it was never used (it holds nothing yet, and may still be
        importing MLflow, seconds a failed command would otherwise wait), else `finish`."""
        if not self.used and self._finished is None:
            self.proc.kill()
        self.finish()

    def end_run(self) -> dict:
        """The report of the run it was writing, once its input for that run has ended with
        ("close", seconds): as `finish` describes it. The process then waits for another run
        (see `keep_writers`), unless a write failed or points were kept: then it exits."""
        line = self.proc.stdout.readline()
        if line.startswith(b"{"):
            return json.loads(line)
        return self.finish()  # it died: its status and stderr say why

    def finish(self) -> dict:
        """End of input; wait for the process to write the rest (or keep it, see
        `spool.PointQueue.close`). Returns its report: {"error": ...} if a write failed,
        {"kept": N, "folder": ...} if N points were kept for a server that did not answer.
        Finishing again returns the same report."""
        if self._finished is not None:
            return self._finished
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
        self._finished = report
        return report


_keeping = False  # whether `release` keeps a writer process for the next run (keep_writers)
_idle: WriterProcess | None = None  # kept by the last run, waiting for the next
_handed: WriterProcess | None = None  # given out by writer_process(), not yet released


@contextlib.contextmanager
def keep_writers(ahead: bool = False) -> Iterator[None]:
    """Within this block, a run that ends FINISHED leaves its writer process for the next
    run of this process (`writer_process`), instead of ending it: a process that runs trial
    after trial (a sweep's worker) pays the writer's start-up (~1.5 s of CPU) once.
    `ahead`: start one now, for the first run, before this process's own imports (torch,
    MLflow): its start-up, and the store's creation once `connection.open_store` asks for
    it, then run on another core. If no run comes, it is killed unused.

    Only after a FINISHED run whose every point was written: a run that did not finish may
    be resumed, and its resume waits for that run's writer process to end
    (`checkpointing.wait_for_old_writer`). The kept process ends with the block.
    """
    global _keeping, _idle, _handed
    _keeping = True
    try:
        if ahead and _idle is None:
            _idle = WriterProcess()
        yield
    finally:
        _keeping = False
        if _handed is not None:  # taken for a run that never began: an error or a signal first
            _handed.discard()
            _handed = None
        release(None, finished=False)


def open_store_ahead(uri: str) -> None:
    """Have the writer process started ahead (`keep_writers(ahead=True)`) create or open
    the store at `uri`, if there is one and it runs."""
    if _idle is not None and _idle.proc.poll() is None:
        _idle.open_store(uri)


def writer_process() -> WriterProcess:
    """A writer process for this process's next run: the one the last run left (see
    `keep_writers`), if it still runs, else a new one."""
    global _idle, _handed
    process, _idle = _idle, None
    if process is None or process.proc.poll() is not None:
        if process is not None:
            process.finish()  # it died between runs: reaped, and replaced
        process = WriterProcess()
    _handed = process
    return process


def release(process: WriterProcess | None, *, finished: bool) -> None:
    """After a run has ended: keep its writer `process` for the next run (within
    `keep_writers`, after a FINISHED run) or end it. Ends any writer kept before."""
    global _idle, _handed
    if _idle is not None and (process is not None or not _keeping):
        _idle.discard()
        _idle = None
    if process is None:
        return
    if process is _handed:
        _handed = None
    if _keeping and finished and process.proc.poll() is None:
        _idle = process
    else:
        process.finish()


class MetricWriter:
    """Writes queued metrics to one run, from a helper process.

    Writing a point costs CPU: ~90 us in `log_batch`'s ORM on a sqlite store, ~8-17 us in
    the helper's direct write (`points`). Done on a thread, that time would hold the GIL and
    stall the training loop; a separate process writes on another core instead. A feeder
    thread here merges what the loop queues into batches and pickles them down the
    process's stdin, so the loop itself never waits on the pipe.
    """

    def __init__(self, run_id: str, process: WriterProcess | None = None) -> None:
        self.run_id = run_id
        self.process = process or WriterProcess()
        self._queue: queue.SimpleQueue[list[Point] | None] = queue.SimpleQueue()
        self._closed = False
        self._broken = False  # the process is gone: its report says why
        self._wait_s = 0.0
        self.report: dict = {}
        proc = self.process.proc
        self.process.used = True
        try:
            import mlflow

            pickle.dump((mlflow.get_tracking_uri(), run_id), proc.stdin)
            proc.stdin.flush()
            ready = proc.stdout.readline()  # once it has opened the store
        except OSError:
            ready = b""
        if ready != READY:
            self._closed = True
            error = self.process.finish().get("error", "the writer process did not start")
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
        stdin = self.process.proc.stdin
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
        while len(batch) < spool.MAX_POINTS_PER_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
            if item is None:
                return batch, True
            batch.extend(item)
        return batch, False

    def close(self, wait_s: float = 0.0, end_process: bool = True) -> None:
        """Write everything queued so far, then stop; raises if any write failed. Points a
        tracking server did not take within `wait_s` s are kept (`self.report["kept"]`).
        `end_process=False` leaves `self.process` to the caller (see `release`).

        Closing again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._wait_s = wait_s
        self._queue.put(None)
        self._thread.join()
        self.report = self.process.end_run()
        if end_process:
            self.process.finish()
        if "error" in self.report:
            raise PipelineError(f"logging metrics to MLflow failed: {self.report['error']}")


def writer_main() -> None:
    """The helper process: open the run named on stdin, then log every pickled batch.

    The run's last message is ("close", seconds): how long to wait for an unreachable server
    before keeping what is left in the run's spool. The report goes to stdout as JSON; then
    the next run may follow on stdin (`keep_writers`). A run whose input ends without
    "close" (its process died), a failed write or points kept end this process.
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
    from mlflow.tracking import MlflowClient

    from pipeline import startup
    from pipeline.tracking.connection import open_store

    # MLflow's heap out of every later full collection: one walked it for ~120 ms of this
    # process's CPU every ~50 batches, beside the training process (see pipeline.startup).
    startup.settle()
    stdin = sys.stdin.buffer
    while True:
        try:
            message = pickle.load(stdin)
        except EOFError:
            os._exit(0)  # started ahead and never used, or kept after its last run
        if message[0] == OPEN:
            with contextlib.suppress(Exception):  # the parent opens it too, and says why
                open_store(message[1])
            sys.stdout.buffer.write(OPENED)
            sys.stdout.buffer.flush()
            continue
        tracking_uri, run_id = message
        points = spool.PointQueue(MlflowClient(tracking_uri), tracking_uri, run_id)
        sys.stdout.buffer.write(READY)
        sys.stdout.buffer.flush()
        wait_s, closed = spool.wait_seconds(), False  # no ("close", s): the parent died
        while points.fatal is None:
            try:
                message = pickle.load(stdin)
            except (EOFError, pickle.UnpicklingError):
                break
            if isinstance(message, tuple):
                wait_s, closed = message[1], True
                break
            points.put(message)
        report = points.close(wait_s)
        sys.stdout.buffer.write(json.dumps(report).encode() + b"\n")
        sys.stdout.buffer.flush()
        # A run's spool folder (points spilled or kept) holds this process's writer.lock.
        if not closed or report != {"kept": 0} or points.spool.exists():
            break
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

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None:
        ts = int((time.time() if timestamp is None else timestamp) * 1000)
        self.writer.put([(k, float(v), ts, step) for k, v in metrics.items()])
