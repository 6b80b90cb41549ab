"""What a run could not write to an unreachable tracking server: kept, then written in order.

While the tracking server cannot be reached (connection refused or reset, no answer in
MLFLOW_HTTP_REQUEST_TIMEOUT, HTTP 408/429/5xx), training goes on and every write of the run
is kept instead of lost:

- metric points from the loop, in the metric writer process (`PointQueue`): in memory, spilled
  to `metrics.jsonl` past `SPILL_POINTS`, retried with a back-off and written, oldest first,
  once the server answers again;
- params, tags, other metrics, artifacts (a copy of each file), dataset inputs, the model
  (saved as an MLflow model folder) and the run's end status, in the main process (`submit`,
  `keep_model`, `end_run`): appended to `ops.jsonl` as they happen.

At its end a run waits up to `PIPELINE_SERVER_WAIT` seconds (default 60) for the server,
writes what it can, and leaves the rest in `<spool dir>/<store>/<run id>/`; one line on
stderr says what and where. `pipeline sync` (or the next `pipeline` command against that
store) writes it later: metric points first, then the other writes in the order they
happened, the end status last.

Nothing is written twice, in this sense: a write whose answer was lost may be sent again,
and what makes that harmless is the server, not us. MLflow's SQL store keys a metric point
by (run, key, timestamp, step, value) and drops a point it already has (the IntegrityError
path of `SqlAlchemyStore._log_metrics`), and every point here keeps the timestamp it was
created with; a param may be logged again with the same value; tags, artifacts and the
status are overwritten with the same content. A FileStore-backed server has no such key:
there a point whose write was cut off after the server applied it can appear twice. The
model is the one write that is not naturally idempotent (each `create_logged_model` makes a
new one): its id is recorded before the rest of it is written, and a replay resumes it.

This module must stay cheap to import (no MLflow at the top): the writer process and every
CLI start import it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline import store
from pipeline.errors import PipelineError
from pipeline.lock import cache_dir

SPOOL_DIR_ENV = "PIPELINE_SPOOL_DIR"
WAIT_ENV = "PIPELINE_SERVER_WAIT"
DEFAULT_WAIT_S = 60.0
SPILL_POINTS = 50_000  # points the writer keeps in memory before spilling to disk (~5 MB)
MAX_POINTS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
LINGER_S = 1.0  # the longest a point waits in the writer for others to share its write
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # then every 4 s: a server that is back is seen within 4 s
# MLflow's own HTTP retries (7, back-off factor 2) make one failed request last minutes.
# Pipeline processes retry reads a little and writes not at all: a write that fails is
# kept, and retried by the spool under its own time budget.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
OPS, METRICS, FILES = "ops.jsonl", "metrics.jsonl", "files"
NOUNS = {"metrics": "metric point", "params": "param", "tags": "tag", "inputs": "dataset input"}
STALL_S = 2.0  # a server silent this long (or the run's wait, if longer) is unreachable
PROBE_S = 30.0  # after a failed write, the next live try comes this much later at the soonest

Point = tuple[str, float, int, int]  # (key, value, timestamp ms, step)
T = TypeVar("T")


def configure() -> None:
    """Bound MLflow's HTTP retries in this process (and its children) unless the user chose.

    And keep MLflow from logging, as tracebacks, the failures that a run reports in one line
    of its own: each request its system metrics sampler makes during an outage (a long
    urllib3 chain each time), and each write to a sqlite store whose disk is full (a
    100-line SQLAlchemy traceback each time).
    """
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").addFilter(_quiet_outage)
    logging.getLogger("mlflow.store.db.utils").addFilter(_quiet_disk_full)


def _quiet_outage(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING or "API request to" not in record.getMessage()


def _quiet_disk_full(record: logging.LogRecord) -> bool:
    return "database or disk is full" not in record.getMessage()


@contextlib.contextmanager
def _no_http_retries(timeout_s: float | None = None) -> Iterator[None]:
    """One attempt per request (a write that fails is kept, not retried for minutes), and at
    most `timeout_s` s without an answer when given. Main thread only: it sets os.environ."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        current = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
        names["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(min(current, timeout_s))))
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def wait_seconds() -> float:
    """How long a run's end waits for an unreachable server ($PIPELINE_SERVER_WAIT, s; the
    default where it is not a number >= 0, which `check_settings` reports up front)."""
    try:
        return check_settings()
    except PipelineError:
        return DEFAULT_WAIT_S


def check_settings() -> float:
    """$PIPELINE_SERVER_WAIT as seconds; PipelineError if it is not a number >= 0."""
    raw = os.environ.get(WAIT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise PipelineError(f"{WAIT_ENV}={raw!r} is invalid; give seconds, a number >= 0")
    return value


# --- where runs are kept -----------------------------------------------------------------


def spool_root() -> Path:
    """$PIPELINE_SPOOL_DIR, else $XDG_CACHE_HOME/pipeline/spool, else ~/.cache/pipeline/spool."""
    return cache_dir(SPOOL_DIR_ENV, "spool")


def is_server(uri: str) -> bool:
    """Only a tracking server can be unreachable; a local store fails as a disk does."""
    return uri.startswith(("http://", "https://"))


def store_folder(uri: str) -> Path:
    """The spool folder of one tracking store: the digest of what the store is, however the
    URI spells it and without its credentials (`store.identity`)."""
    return spool_root() / hashlib.sha256(store.identity(uri).encode()).hexdigest()[:12]


def _private_dir(path: Path) -> Path:
    """Create `path` and its parents for this user only (runs' data, maybe not public)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)
    return path


def _owner_only(path: Path) -> None:
    """chmod what a library wrote (a copy, a saved model) to this user only."""
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod(0o700 if p.is_dir() else 0o600)


def _write_private(path: Path, data: bytes, mode: str = "wb") -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o600), mode) as f:
        f.write(data)


def _line(record: object) -> bytes:
    # NaN and infinities round-trip through Python's json (as NaN, Infinity): metrics have them.
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _read_lines(path: Path) -> list[Any]:
    """Every complete JSON line of `path`; a torn last line (a process killed mid-write) and
    nothing else is skipped."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        out.append(json.loads(raw))
    return out


class RunSpool:
    """The kept writes of one run: `ops.jsonl`, `metrics.jsonl`, `files/`, `run.json`.

    The folder, its files and `files/` are readable by their owner only. `run.json` names
    the process that ran the run (`owner`, with its start time against pid reuse); while it
    lives, or while its metric writer holds `writer.lock`, `pipeline sync` leaves the run
    alone: the run's own end writes it. A sync holds `sync.lock` while it writes.
    """

    def __init__(self, uri: str, run_id: str, owner: int | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.folder = store_folder(uri) / run_id
        self.owner = owner or os.getpid()
        self._lock_fd: int | None = None

    def exists(self) -> bool:
        return self.folder.exists()

    def create(self) -> Path:
        if not self.folder.exists():
            _private_dir(self.folder)
            meta = {
                "run_id": self.run_id,
                "store": store.redact(self.uri),
                "since": _now_iso(),
                "owner": self.owner,
                "owner_started": _started(self.owner),
            }
            _write_private(self.folder / "run.json", json.dumps(meta).encode())
        return self.folder

    def hold(self, name: str) -> bool:
        """Take the folder's lock `name` for as long as this process lives (or `release`).
        False if another process holds it."""
        import fcntl

        if self._lock_fd is not None:
            return True
        self.create()
        fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def in_use(self) -> bool:
        """Whether the run's process, or its metric writer, is still alive."""
        import fcntl

        meta = json.loads((self.folder / "run.json").read_text())
        if meta["owner"] != os.getpid() and _started(meta["owner"]) == meta["owner_started"]:
            return True
        path = self.folder / "writer.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def append(self, op: dict) -> None:
        self.create()
        _write_private(self.folder / OPS, _line(op), "ab")

    def keep_file(self, path: Path) -> str:
        """Copy file `path` into `files/`; returns its name relative to the run's folder."""
        target = self.slot() / path.name
        shutil.copyfile(path, target)
        _owner_only(target)
        return str(target.relative_to(self.folder))

    def slot(self) -> Path:
        """A new, empty folder in `files/` for one kept file or model."""
        files = _private_dir(self.create() / FILES)
        slot = files / f"{len(list(files.iterdir())):04d}"
        slot.mkdir(mode=0o700)
        return slot

    def ops(self) -> list[dict]:
        return _read_lines(self.folder / OPS)

    def point_batches(self) -> list[list[list]]:
        return _read_lines(self.folder / METRICS)

    def has_ops(self) -> bool:
        return (self.folder / OPS).exists()

    def pending(self) -> bool:
        return (self.folder / OPS).exists() or (self.folder / METRICS).exists()

    def summary(self) -> str:
        """What is kept, in words: '226 metric points, 3 params, 1 model, the end status
        FINISHED'."""
        done = _progress(self.folder)
        batches = self.point_batches()[done.get(METRICS, 0) :]
        ops = self.ops()[done.get(OPS, 0) :]
        counts = {"metric point": sum(len(b) for b in batches)}
        end = None
        for op in ops:
            kind = op["op"]
            n = len(op[kind]) if kind in ("metrics", "params", "tags") else 1
            noun = NOUNS.get(kind, kind)
            if kind == "end":
                end = op["status"]
            else:
                counts[noun] = counts.get(noun, 0) + n
        words = [f"{n} {noun}{'s' if n > 1 else ''}" for noun, n in counts.items() if n]
        if end:
            words.append(f"the end status {end}")
        return ", ".join(words) or "nothing"

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)


def _started(pid: int) -> float | None:
    """When process `pid` started, or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _progress(folder: Path) -> dict[str, int]:
    """Lines of each spool file already written to the server (by an earlier sync)."""
    path = folder / "done.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _set_progress(folder: Path, done: dict[str, int]) -> None:
    tmp = folder / "done.json.tmp"
    _write_private(tmp, json.dumps(done).encode())
    os.replace(tmp, folder / "done.json")


# --- telling an outage from an error ----------------------------------------------------

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def unreachable(exc: BaseException) -> str | None:
    """Why the tracking server could not be reached, if that is what `exc` says, else None.

    MLflow wraps the cause in an MlflowException whose message is the whole urllib3 chain;
    the cause itself sits in `__cause__` / `__context__`.
    """
    import requests
    import urllib3

    chain = _chain(exc)
    for e in chain:  # the root cause says it best: "Connection refused"
        if isinstance(e, ConnectionError) and e.strerror:
            return e.strerror
    # urllib3's NewConnectionError is a ConnectTimeoutError too, though not a timeout.
    timeouts = (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    if any(isinstance(e, timeouts) for e in chain) and not any(
        isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain
    ):
        return f"no answer in {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(e, requests.exceptions.HTTPError) and response is not None:
            status = response.status_code
            if status in _RETRY_STATUS:
                return f"HTTP {status}"
        if isinstance(e, urllib3.exceptions.MaxRetryError) and isinstance(
            e.reason, urllib3.exceptions.ResponseError
        ):
            return str(e.reason)  # "too many 503 error responses"
    for e in chain:
        if isinstance(e, urllib3.exceptions.NewConnectionError):
            return "cannot connect"
        if isinstance(
            e,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.RetryError,
                requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.ProtocolError,
            ),
        ):
            return type(e).__name__
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it was raised from or during, once each."""
    out: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        reason = getattr(e, "reason", None)  # urllib3's MaxRetryError holds its cause here
        stack += [e.__cause__, e.__context__, reason if isinstance(reason, BaseException) else None]
    return out


# --- the writer process's side: metric points ---------------------------------------------


class PointQueue:
    """Metric points on their way to one run, kept while the server is unreachable.

    `put` never blocks. A sender thread writes the oldest batch (`points.point_writer`, as
    `log_batch` would) until it succeeds: back-off while the server is unreachable, any
    other error is fatal (reported by `close`). Past `SPILL_POINTS` waiting points, the
    waiting batches move to `metrics.jsonl` and are read back from there, so memory stays
    bounded in a long outage. Order: the batch being sent, then the spill file, then the
    batches in memory.
    """

    def __init__(self, client, uri: str, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.spool = RunSpool(uri, run_id, owner=os.getppid())  # the run's process
        self._cond = threading.Condition()
        self._head: list[Point] | None = None
        self._tail: deque[list[Point]] = deque()
        self._tail_points = 0
        self._tail_since = 0.0  # when the oldest batch of `_tail` was queued (monotonic)
        self._spill: _SpillFile | None = None
        self._closing = False
        self._poke = threading.Event()  # cuts a back-off short: the run is ending
        self.fatal: BaseException | None = None
        self.down: str | None = None  # why the server is unreachable, while it is
        self._server = is_server(uri)
        self._last_answer = time.monotonic()
        self._thread = threading.Thread(target=self._send, name="points", daemon=True)
        self._thread.start()

    def put(self, points: list[Point]) -> None:
        with self._cond:
            if not self._tail:
                self._tail_since = time.monotonic()
            for i in range(0, len(points), MAX_POINTS_PER_BATCH):
                chunk = points[i : i + MAX_POINTS_PER_BATCH]
                self._tail.append(chunk)
                self._tail_points += len(chunk)
            if self._tail_points > SPILL_POINTS:
                if self._spill is None:
                    self._spill = _SpillFile(self.spool)
                self._spill.extend(self._tail)
                self._tail.clear()
                self._tail_points = 0
            self._cond.notify_all()

    def _next(self) -> list[Point] | None:
        """The batch to send, or None once closing with nothing left (lock held).

        Queued batches are merged, up to `MAX_POINTS_PER_BATCH` points, once that many are
        waiting, their oldest has waited `LINGER_S`, or the run is closing: a write's fixed
        cost (a transaction, a commit; a request) is then paid per ~1000 points, not per
        hand-over of the loop (~150).
        """
        while self._head is None:
            if self._spill is not None and (batch := self._spill.next()) is not None:
                self._head = batch
            elif self._tail and (
                self._closing
                or self._tail_points >= MAX_POINTS_PER_BATCH
                or time.monotonic() - self._tail_since >= LINGER_S
            ):
                self._head = self._tail.popleft()
                while self._tail and len(self._head) + len(self._tail[0]) <= MAX_POINTS_PER_BATCH:
                    self._head = self._head + self._tail.popleft()
                self._tail_points -= len(self._head)  # what is left is no younger: not reset
            elif self._tail:
                self._cond.wait(max(0.0, self._tail_since + LINGER_S - time.monotonic()))
            elif self._closing:
                return None
            else:
                self._cond.wait()
        return self._head

    def _send(self) -> None:
        from pipeline.tracking.points import point_writer

        write = point_writer(self.client, self.spool.uri, self.run_id)
        attempt = 0
        while True:
            with self._cond:
                batch = self._next()
            if batch is None:
                return
            try:
                write(batch)
            except Exception as exc:
                reason = unreachable(exc)
                with self._cond:
                    if reason is None:
                        self.fatal = exc
                        self._cond.notify_all()
                        return
                    self.down = reason
                self._poke.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                self._poke.clear()
                attempt += 1
                continue
            attempt = 0
            with self._cond:
                if self._head is batch:  # `close` may have kept it meanwhile
                    self._head = None
                self._last_answer = time.monotonic()
                self.down = None
                self._cond.notify_all()

    def _empty(self) -> bool:
        spilled = self._spill is not None and self._spill.unread()
        return self._head is None and not self._tail and not spilled

    def close(self, wait_s: float) -> dict:
        """Write what is queued, waiting at most `wait_s` s for an unreachable server; keep
        the rest in the spool. Returns the report the parent prints from."""
        deadline = time.monotonic() + wait_s
        stall = max(wait_s, STALL_S)
        self._poke.set()
        with self._cond:
            self._closing = True
            self._last_answer = time.monotonic()
            self._cond.notify_all()
            # A server that takes points is waited for however long they take; one that
            # refuses them, or has not answered for `stall` s, only until the deadline.
            while not self._empty() and self.fatal is None:
                now = time.monotonic()
                silent = self._server and now - self._last_answer >= stall
                if now >= deadline and (self.down is not None or silent):
                    self.down = self.down or f"no answer in {stall:g} s"
                    break
                self._cond.wait(0.2)
            if self.fatal is not None:
                return {"error": _describe(self.fatal, self.spool.uri)}
            if self._empty():
                if self._spill is not None:
                    self._spill.remove()
                    self._spill = None  # the sender, woken, must not read the closed file
                return {"kept": 0}
            batches = [self._head] if self._head is not None else []
            if self._spill is not None:
                batches += self._spill.rest()
            batches += list(self._tail)
            self._head, self._tail, self._spill = None, deque(), None
        kept = sum(len(b) for b in batches)
        try:
            _keep_points(self.spool, batches)
        except OSError as exc:
            return {"error": f"{kept} metric points could not be kept: {describe_os_error(exc)}"}
        return {"kept": kept, "down": self.down or "unreachable", "folder": str(self.spool.folder)}


class _SpillFile:
    """Batches waiting in `metrics.jsonl` while the writer runs, read back oldest first."""

    def __init__(self, spool: RunSpool) -> None:
        self.spool = spool
        spool.create()
        spool.hold("writer.lock")
        self.path = spool.folder / METRICS
        _write_private(self.path, b"", "ab")
        self._reader = open(self.path, "rb")  # noqa: SIM115 - closed by remove()/rest()

    def extend(self, batches) -> None:
        _write_private(self.path, b"".join(_line(b) for b in batches), "ab")

    def next(self) -> list[Point] | None:
        raw = self._reader.readline()
        if not raw:
            return None
        return [tuple(p) for p in json.loads(raw)]

    def unread(self) -> bool:
        return self._reader.tell() < self.path.stat().st_size

    def rest(self) -> list[list[Point]]:
        rest = [json.loads(raw) for raw in self._reader.readlines()]
        self.remove()
        return rest

    def remove(self) -> None:
        self._reader.close()
        self.path.unlink(missing_ok=True)


def _keep_points(spool: RunSpool, batches: list) -> None:
    """Write `batches` as the run's `metrics.jsonl` (all points not yet written), atomically."""
    spool.create()
    tmp = spool.folder / (METRICS + ".tmp")
    _write_private(tmp, b"".join(_line(b) for b in batches))
    os.replace(tmp, spool.folder / METRICS)


# --- the main process's side: every other write -----------------------------------------

_down: str | None = None  # why the server was unreachable at this process's last try
_down_at = 0.0  # when (time.monotonic())


def _mark_down(reason: str | None) -> None:
    global _down, _down_at
    _down, _down_at = reason, time.monotonic()


def _active_run_id() -> str:
    import mlflow

    return mlflow.active_run().info.run_id


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def submit(op: dict, write: Callable[[], object] | None = None) -> None:
    """Write `op` to the active run now (with `write`, if given: the same write through
    MLflow's own call), or keep it while the server is unreachable."""
    uri, run_id = _uri(), _active_run_id()
    if _write_live(uri, run_id, write or (lambda: _apply_live(op, run_id))) is _KEPT:
        _keep(RunSpool(uri, run_id), op)


def try_write(write: Callable[[], object]) -> bool:
    """`write()` if the tracking server answers, in one attempt; False, and nothing kept,
    if it does not. For writes outside a run (an experiment's tag) that are not worth
    keeping."""
    uri = _uri()
    if not is_server(uri):
        write()
        return True
    if _down is not None and time.monotonic() - _down_at <= PROBE_S:
        return False
    try:
        with _no_http_retries():
            write()
    except Exception as exc:
        if (reason := unreachable(exc)) is None:
            raise
        _mark_down(reason)
        return False
    return True


def note_report(report: dict) -> None:
    """Learn from the metric writer's report that the server is down: the run's next
    writes are then kept without waiting on it first."""
    if report.get("down"):
        _mark_down(report["down"])


_KEPT = object()  # what `_write_live` returns for a write it did not make


def _write_live(uri: str, run_id: str, write: Callable[[], T]) -> T | object:
    """`write()` now, in one attempt; `_KEPT` instead when the server is unreachable.

    Once a write of this process found it unreachable, or the run has kept writes already,
    the next ones are kept without trying: writes stay in order, and the training does not
    wait on a dead server again (a live try is made again after `PROBE_S`).
    """
    if not is_server(uri):
        return _retry_lost_race(write)
    if not _try_live(RunSpool(uri, run_id)):
        return _KEPT
    try:
        with _no_http_retries():
            result = _retry_lost_race(write)
    except Exception as exc:
        reason = unreachable(exc)
        if reason is None:
            raise
        _mark_down(reason)
        return _KEPT
    _mark_down(None)
    return result


def _retry_lost_race(write: Callable[[], T]) -> T:
    """`write()`, once more if it lost a race to create the same dataset row.

    MLflow logs a dataset input by looking the dataset up and inserting it when missing;
    several runs of one experiment logging the same data at the same moment (a sweep's
    trials, trains started together) can all miss it, and all but one then fail on the
    table's unique key. The failed transaction wrote nothing, and a second attempt finds
    the row the winner made.
    """
    try:
        return write()
    except Exception as exc:
        text = str(exc)
        unique = "UNIQUE constraint failed" in text or "duplicate key value" in text
        if not (unique and "datasets" in text):
            raise
    return write()


def _try_live(spool: RunSpool) -> bool:
    """Whether to write to the server now: never behind kept writes of the same run, and
    only now and then while it has been found unreachable."""
    if spool.has_ops():
        return False
    return _down is None or time.monotonic() - _down_at > PROBE_S


def _apply_live(op: dict, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    apply(MlflowClient(), run_id, op, Path("/"))


def _keep(spool: RunSpool, op: dict) -> None:
    if op["op"] == "artifact":
        op = {**op, "file": spool.keep_file(Path(op["file"]))}
    spool.append(op)


KEPT_MODEL = "pipeline-kept-model:"  # + name: a kept model's id, until it is logged


class KeptModel:
    """A model saved in a run's spool; `model_uri` is "" until a replay in this process has
    logged it (the run's end, once the server is back), then `models:/<id>`. Its `model_id`
    until then is a stand-in that metrics kept with it carry, replaced by the real id when
    they are written."""

    def __init__(self, run_id: str, name: str) -> None:
        self.run_id, self.name = run_id, name

    @property
    def model_id(self) -> str:
        return _replayed_models.get((self.run_id, self.name), KEPT_MODEL + self.name)

    @property
    def model_uri(self) -> str:
        model_id = _replayed_models.get((self.run_id, self.name))
        return f"models:/{model_id}" if model_id else ""


_replayed_models: dict[tuple[str, str], str] = {}  # (run id, name) -> logged model id


def keep_model(
    write: Callable[[], T],
    save: Callable[[str], None],
    name: str,
    step: int = 0,
    params: dict[str, str] | None = None,
) -> T | KeptModel:
    """Log the model with `write`, or, while the server is unreachable, `save` it as an
    MLflow model folder in the run's spool, to be logged later as the run's model `name`,
    at global step `step`, with `params` (what `write` gives `log_model` too)."""
    uri, run_id = _uri(), _active_run_id()
    result = _write_live(uri, run_id, write)
    if result is not _KEPT:
        return result
    spool = RunSpool(uri, run_id)
    path = spool.slot() / name
    save(str(path))
    _owner_only(path)
    spool.append(
        {
            "op": "model",
            "dir": str(path.relative_to(spool.folder)),
            "name": name,
            "step": step,
            "params": params or {},
        }
    )
    return KeptModel(run_id, name)


def forget_active_run() -> None:
    """End the active run in this process without writing to the server: its status is
    kept. MLflow has no public call for this; `end_run` would write the status first."""
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    run_id = _active_run_id()
    MLFLOW_RUN_ID.unset()  # as end_run does: a run started later must not resume this one
    fluent._active_run_stack.get().pop()
    _stop_system_metrics(run_id)


def _stop_system_metrics(run_id: str) -> None:
    """Stop MLflow's system metrics sampler of `run_id`, which `end_run` stops only after
    its status write succeeded. Its last samples are lost: the server does not answer."""
    from mlflow.tracking import fluent

    monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
    if monitor is not None:
        # finish() joins a thread that may sit in a request to a server that does not
        # answer: let it end on its own.
        threading.Thread(target=monitor.finish, name="stop-system-metrics", daemon=True).start()


def end_run(status: str, writer_report: dict | None, deadline: float) -> None:
    """End the active run with `status`: written now if nothing of the run is kept and the
    server answers; else kept after everything else, and every kept write retried until
    `deadline` (time.monotonic()). What is left is announced in one line on stderr."""
    import mlflow

    uri, run_id = _uri(), _active_run_id()
    spool = RunSpool(uri, run_id)
    if not is_server(uri):
        _end_locally(status, run_id, uri)
        return
    report = writer_report or {}
    if not report.get("kept") and _try_live(spool):
        try:
            with _no_http_retries():
                mlflow.end_run(status)
            _mark_down(None)
            _cleanup(spool)
            return
        except Exception as exc:
            reason = unreachable(exc)
            if reason is None:
                raise
            _mark_down(reason)
            # end_run took the run off MLflow's stack before its write failed.
            _stop_system_metrics(run_id)
            spool.append({"op": "end", "status": status, "end_time": _ms()})
    else:
        spool.append({"op": "end", "status": status, "end_time": _ms()})
        forget_active_run()
    if report.get("down"):
        _mark_down(report["down"])
    drain(spool, deadline)


def _end_locally(status: str, run_id: str, uri: str) -> None:
    """`end_run` on a local store; a full disk there is one line naming the path."""
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as exc:
        full = disk_full(exc, uri)
        if full is None:
            raise
        _stop_system_metrics(run_id)
        raise PipelineError(
            f"{full}; run {run_id} is left RUNNING: its status {status} could not be written"
        ) from None


def _cleanup(spool: RunSpool) -> None:
    if spool.exists() and not spool.pending():
        spool.remove()
    else:
        spool.release()


def drain(spool: RunSpool, deadline: float) -> bool:
    """Write what `spool` keeps, retrying an unreachable server until `deadline`; announce
    what is left. True when everything was written."""
    from mlflow.tracking import MlflowClient

    client, attempt = MlflowClient(spool.uri), 0
    while (left := deadline - time.monotonic()) > 0:
        try:
            with _no_http_retries(timeout_s=left):
                replay(client, spool)
            _mark_down(None)
            spool.remove()
            return True
        except Exception as exc:
            reason = unreachable(exc)
            if reason is None:
                raise
            _mark_down(reason)
        pause = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        attempt += 1
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
    # One write: MLflow's threads log to stderr too, and must not land inside the line.
    sys.stderr.write(kept_line(spool, _down or "unreachable") + "\n")
    sys.stderr.flush()
    spool.release()
    return False


def kept_line(spool: RunSpool, reason: str) -> str:
    return (
        f"Warning: tracking server {store.redact(spool.uri)} unreachable ({reason}): run "
        f"{spool.run_id} not fully written; kept {spool.summary()} in {spool.folder}; "
        "`pipeline sync` writes them once the server is back"
    )


def _ms() -> int:
    return int(time.time() * 1000)


# --- replaying kept writes ----------------------------------------------------------------


def replay(client, spool: RunSpool) -> None:
    """Write every kept write of `spool` in order, metric points first, the end status last;
    progress is recorded after each line, so an interrupted replay resumes where it was."""
    folder = spool.folder
    done = _progress(folder)
    for name in (METRICS, OPS):
        lines = _read_lines(folder / name)
        for i in range(done.get(name, 0), len(lines)):
            if name == METRICS:
                apply(client, spool.run_id, {"op": "metrics", "metrics": lines[i]}, folder)
            else:
                apply(client, spool.run_id, lines[i], folder)
            done[name] = i + 1
            _set_progress(folder, done)


def apply(client, run_id: str, op: dict, folder: Path) -> None:
    """Write one op to the run through `client`; files are relative to `folder`."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "metrics":
        metrics = [Metric(*_resolved(p, folder)) for p in op["metrics"]]
        for i in range(0, len(metrics), MAX_POINTS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_POINTS_PER_BATCH])
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, str(folder / op["file"]), op.get("artifact_path"))
    elif kind == "inputs":
        _apply_inputs(client, run_id, op)
    elif kind == "model":
        _apply_model(client, run_id, op, folder)
    elif kind == "end":
        client.set_terminated(run_id, op["status"], end_time=op["end_time"])
    else:
        raise PipelineError(f"unknown kept write {kind!r} in {folder}")


def _resolved(point: list, folder: Path) -> list:
    """`point` with a kept model's stand-in id (`KEPT_MODEL`) replaced by the id its replay
    gave it; the model's op comes before any metric kept with it."""
    if len(point) > 4 and isinstance(point[4], str) and point[4].startswith(KEPT_MODEL):
        name = point[4][len(KEPT_MODEL) :]
        for op in _read_lines(folder / OPS):
            if op["op"] == "model" and op["name"] == name:
                state = json.loads((folder / op["dir"]).parent.joinpath("state.json").read_text())
                return [*point[:4], state["model_id"], *point[5:]]
    return point


def dataset_op(dataset, context: str, tags: dict[str, str]) -> dict:
    """An `inputs` op for an MLflow dataset logged with `context` and input `tags`."""
    entity = dataset._to_mlflow_entity()
    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    return {
        "op": "inputs",
        "dataset": {f: getattr(entity, f) for f in fields},
        "tags": {**tags, "mlflow.data.context": context},
    }


def _apply_inputs(client, run_id: str, op: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    tags = [InputTag(k, v) for k, v in op["tags"].items()]
    client.log_inputs(run_id, [DatasetInput(Dataset(**op["dataset"]), tags)])


def _apply_model(client, run_id: str, op: dict, folder: Path) -> None:
    """Log a saved MLflow model folder as the run's model, as `Model.log` would have: a
    logged model linked to the run, its artifacts, READY. Each step is recorded in
    `state.json` next to the folder, so a replay cut off half-way resumes the same model."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    path = folder / op["dir"]
    state_path = path.parent / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def record(**kw) -> None:
        state.update(kw)
        _write_private(state_path, json.dumps(state).encode())

    step = op.get("step", 0)
    if "model_id" not in state:
        run = client.get_run(run_id)
        logged = client.create_logged_model(
            run.info.experiment_id,
            name=op["name"],
            source_run_id=run_id,
            params={**op.get("params", {}), **run.data.params},  # as Model.log merges them
        )
        record(model_id=logged.model_id, artifact_location=logged.artifact_location)
    model_id = state["model_id"]
    if not state.get("linked"):
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=step)])
        _link_metrics_at_step(client, run_id, model_id, step)
        record(linked=True)
    if not state.get("uploaded"):
        mlmodel = Model.load(str(path))
        mlmodel.artifact_path = state["artifact_location"]
        mlmodel.model_uuid = mlmodel.model_id = model_id
        mlmodel.run_id = run_id
        mlmodel.save(str(path / "MLmodel"))
        client.log_model_artifacts(model_id, str(path))
        record(uploaded=True)
    client.finalize_logged_model(model_id, "READY")
    _replayed_models[(run_id, op["name"])] = model_id


def _link_metrics_at_step(client, run_id: str, model_id: str, step: int) -> None:
    """The run's metrics at `step` that belong to no model become `model_id`'s too, as
    `Model.log` does for a model logged at that step (its `log_model_metrics_for_step`)."""
    from mlflow.entities import Metric

    points = []
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            if m.step == step and m.model_id is None:
                points.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id))
    for i in range(0, len(points), MAX_POINTS_PER_BATCH):
        client.log_batch(run_id, metrics=points[i : i + MAX_POINTS_PER_BATCH])


# --- pipeline sync ------------------------------------------------------------------------


def kept_runs(uri: str) -> list[RunSpool]:
    """The runs of store `uri` with kept writes, oldest first."""
    folder = store_folder(uri)
    if not folder.is_dir():
        return []
    runs = [RunSpool(uri, p.name) for p in folder.iterdir() if p.is_dir()]
    runs = [r for r in runs if r.pending()]
    return sorted(runs, key=lambda r: (r.folder / "run.json").stat().st_mtime)


def sync(uri: str, *, quiet: bool = False) -> tuple[list[str], int]:
    """Write every kept run of store `uri` that no live process holds; one line per run.

    Returns (lines, number of runs still kept). Raises PipelineError if the server is
    unreachable (nothing more is written then; what is kept stays).
    """
    from mlflow.tracking import MlflowClient

    lines: list[str] = []
    left = 0
    runs = kept_runs(uri)
    client = MlflowClient(uri) if runs else None
    for spool in runs:
        if spool.in_use() or not spool.hold("sync.lock"):
            left += 1
            if not quiet:
                lines.append(f"sync: run {spool.run_id}: still being written by its process")
            continue
        what = spool.summary()
        try:
            with _no_http_retries():
                replay(client, spool)
        except Exception as exc:
            spool.release()
            reason = unreachable(exc)
            if reason is None:
                raise PipelineError(
                    f"sync: run {spool.run_id} ({spool.folder}): {_describe(exc)}"
                ) from exc
            raise PipelineError(
                f"tracking server {store.redact(uri)} unreachable ({reason}); "
                f"{len(kept_runs(uri))} run(s) still kept in {store_folder(uri)}"
            ) from None
        spool.remove()
        lines.append(f"sync: run {spool.run_id}: wrote {what}")
    return lines, left


def sync_quietly(uri: str) -> None:
    """At the start of a command: write runs kept from earlier ones, if the server answers.
    Costs one directory check when nothing is kept."""
    if not is_server(uri) or not kept_runs(uri):
        return
    with contextlib.suppress(PipelineError):
        lines, _ = sync(uri, quiet=True)
        for line in lines:
            print(line, file=sys.stderr)


# --- describing errors --------------------------------------------------------------------


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(exc: OSError) -> str:
    """'<path>: No space left on device': the path the system refused, and why."""
    text = exc.strerror or str(exc)
    # shutil's copies name the source first and the destination, the full one, second.
    path = exc.filename2 if exc.errno in _FULL and exc.filename2 else exc.filename
    return f"{path}: {text}" if path else text


def disk_full(exc: BaseException, uri: str | None = None) -> str | None:
    """'<path>: No space left on device' if `exc` (or its cause) is a full disk or quota or
    a file-size limit, else None. SQLite says only 'database or disk is full': the path is
    then the database of the sqlite tracking store `uri`."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL:
            return describe_os_error(e)
        if "database or disk is full" in str(e):
            db = uri[len("sqlite:///") :] if uri and uri.startswith("sqlite:///") else "database"
            why = "No space left on device (sqlite: database or disk is full)"
            return f"{os.path.abspath(db)}: {why}"
    return None


def explain(exc: BaseException) -> str | None:
    """A one-line message for a full disk or an unreachable tracking server, else None."""
    uri = _uri() if "mlflow" in sys.modules else store.uri()
    if (full := disk_full(exc, uri)) is not None:
        return full
    if "requests" in sys.modules and (reason := unreachable(exc)) is not None:
        return f"tracking server {store.redact(uri)} unreachable ({reason})"
    return None


def _describe(exc: BaseException, uri: str | None = None) -> str:
    from pipeline.errors import first_line

    if (full := disk_full(exc, uri)) is not None:
        return full
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return first_line(exc, with_type=True)
