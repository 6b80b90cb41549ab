"""One retrain at a time per registered model, and one sweep at a time per sweep file, on
this host: an exclusive `flock`, keyed on which tracking store is used.

The kernel drops a `flock` when its holder exits, however it exits (SIGKILL and OOM kills
included), so a lock left by a dead process never blocks the next run: the file stays, the
lock does not. The lock is per host; two hosts retraining the same model against one
tracking server are not serialised by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline import store
from pipeline.errors import PipelineError

LOCK_DIR_ENV = "PIPELINE_LOCK_DIR"
EX_TEMPFAIL = 75  # sysexits.h: "try again later", what a scheduler should see for "busy"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class LockHeld(PipelineError):
    """Another retrain of the same model holds the lock; the CLI exits with `exit_code`."""

    exit_code = EX_TEMPFAIL


def cache_dir(env: str, name: str) -> Path:
    """$`env`, else $XDG_CACHE_HOME/pipeline/`name`, else ~/.cache/pipeline/`name`: where this
    user's per-host state lives (locks, the spool)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pipeline" / name


def default_lock_dir() -> Path:
    """$PIPELINE_LOCK_DIR, else $XDG_CACHE_HOME/pipeline/locks, else ~/.cache/pipeline/locks."""
    return cache_dir(LOCK_DIR_ENV, "locks")


def lock_path(lock_dir: Path, model_name: str, tracking_uri: str) -> Path:
    """One file per (tracking store, model name): different stores never block each other,
    and one store is one lock however its URI is spelled (`store_key`)."""
    if not MODEL_NAME.match(model_name):
        raise PipelineError(
            f"invalid model name {model_name!r}; use letters, digits, '.', '_' and '-' "
            "(at most 100, starting with a letter or digit)"
        )
    return Path(lock_dir) / f"{model_name}-{store_key(tracking_uri)}.lock"


def sweep_lock_path(lock_dir: Path, experiment: str, file_digest: str, tracking_uri: str) -> Path:
    """One file per (tracking store, experiment, sweep file content): one sweep of a file
    runs at a time, and another file or store never waits for it."""
    sweep = hashlib.sha256(f"{experiment}\0{file_digest}".encode()).hexdigest()[:12]
    return Path(lock_dir) / "sweeps" / f"{sweep}-{store_key(tracking_uri)}.lock"


def store_key(tracking_uri: str) -> str:
    """A short digest of which store the URI names (`store.identity`: the resolved path of a
    sqlite file, the host, port and path of a server), not of how it is spelled:
    `sqlite:///mlflow.db` and `sqlite:////abs/path/mlflow.db` are one store, one lock."""
    return hashlib.sha256(store.identity(tracking_uri).encode()).hexdigest()[:10]


@contextlib.contextmanager
def exclusive(path: Path, holder: str = "another retrain") -> Iterator[Path]:
    """Hold an exclusive lock on `path` or raise LockHeld at once (never waits).

    `holder` says who the other holder is in LockHeld's message. Raises PipelineError
    naming the folder when the lock file cannot be created there.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PipelineError(
            f"cannot create the lock file {str(path)!r}: {exc.strerror or exc}; pass "
            f"--lock-dir or set {LOCK_DIR_ENV} to a folder this user can write"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"{holder} holds the lock {str(path)!r} ({_read_holder(fd)}); "
                f"exiting with {EX_TEMPFAIL}, try again later"
            ) from None
        # Who holds it, for the message above; written only after the lock is ours.
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid={os.getpid()} since={time.strftime('%FT%TZ', time.gmtime())}\n".encode(), 0
        )
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "holder unknown"
