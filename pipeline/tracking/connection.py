"""Opening the tracking store: once per process and URI, creation serialised between processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import store
from pipeline.errors import PipelineError, first_line


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


def open_store(uri: str | None = None) -> None:
    """Open (and, where it is new, create) the tracking store at `uri` (default: this
    process's tracking URI), once per process and URI.

    MLflow creates a sqlite store by running its schema migrations on first open, and
    several processes doing that at once crash each other (`duplicate column name`, `table
    ... already exists`, `_alembic_tmp_*` tables left behind). So the first open of a sqlite
    store in each process holds an exclusive `flock` on the store's folder: the first
    process creates it, the others wait, then find it complete. MLflow caches the opened
    store per URI, so every later MLflow call of this process uses it without the lock.
    A metric writer process started ahead of the run (`writer.keep_writers(ahead=True)`)
    is asked to create it first, on its own core; this process then waits on the same lock.

    Raises PipelineError naming the URI (credentials hidden) and the cause when the store
    cannot be opened: a truncated or foreign file, a missing or unwritable folder, a server
    that does not answer.
    """
    from mlflow.tracking._tracking_service.utils import _get_store

    from pipeline.tracking import writer

    uri = uri or mlflow.get_tracking_uri()
    with _opening:
        if uri in _opened:
            return
        writer.open_store_ahead(uri)
        try:
            if uri.lower().startswith("sqlite"):
                # Its ~2 s of imports outside the lock: other processes wait only for the
                # opening itself (~0.1 s on an existing store).
                from mlflow.store.tracking import sqlalchemy_store  # noqa: F401
            with _creation_lock(uri):
                _get_store(uri)
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


def tracking_uri() -> str:
    """The store in use, so child processes log to the same one."""
    return mlflow.get_tracking_uri()
