"""Which tracking store a URI names: its identity, a form of it safe to print, and a relative
one under `mlflow run`.

Plain text and the standard library only (no MLflow import): the CLI checks the URI before
anything opens the store, and `--help` should not pay for importing MLflow.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import PipelineError

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's store when MLFLOW_TRACKING_URI is unset
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
# user:password@ (or token@) of any URI in a text, up to its last '@' (a password may hold
# an unescaped one): what `redact` hides.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s'\"<>]+@")


def uri() -> str:
    """The tracking URI this process uses, as set: MLFLOW_TRACKING_URI, else MLflow's default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def redact(text: str) -> str:
    """`text` with the user and password of every URI in it replaced by `***`.

    For anything printed or logged that may hold a tracking URI (`http://user:secret@host`),
    an exception message of MLflow or requests included.
    """
    return _USERINFO.sub(r"\1***@", text)


class RedactingStream:
    """A text stream (stdout, stderr) that writes everything through `redact`, so that no
    one printing in this process shows a URI's credentials: MLflow itself prints
    `View run ... at: <tracking URI>/#/...` on stdout, and a URI in its warnings."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def local_path(store_uri: str) -> Path | None:
    """The file (sqlite) or folder (file store) a local store lives in, as the URI spells it
    (relative paths stay relative); None for servers, databases and in-memory sqlite."""
    parts = urlsplit(store_uri)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///rel.db is relative, sqlite:////abs.db absolute; SQLAlchemy drops '?...'.
        rest = store_uri.split(":", 1)[1].split("?", 1)[0]
        if not rest.startswith("///"):
            return None
        path = unquote(rest[3:])
        return None if path in ("", ":memory:") else Path(path)
    if scheme == "file":
        return Path(unquote(parts.path))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a plain path: a file store
        return Path(store_uri)
    return None


def identity(store_uri: str) -> str:
    """What the store is, however the URI spells it, without credentials: the absolute,
    resolved path of a sqlite file or file store (relative to the current folder, as MLflow
    reads it), else scheme://host:port/path with the host lower-cased and the default port
    filled in. Two URIs with the same identity are the same store."""
    path = local_path(store_uri)
    parts = urlsplit(store_uri)
    scheme = parts.scheme.lower()
    if path is not None:
        return f"{'sqlite' if scheme == 'sqlite' else 'file'}:{path.expanduser().resolve()}"
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2 is postgresql
    try:
        port = parts.port or DEFAULT_PORTS.get(base)
    except ValueError:  # not a number: keep what was written
        return redact(f"{base}://{parts.netloc}{parts.path}")
    host = (parts.hostname or "").lower()
    return f"{base}://{host}{f':{port}' if port else ''}{parts.path.rstrip('/')}"


def resolve_under_mlflow_run() -> None:
    """Make a relative local store URI name the store `mlflow run` created its run in.

    `mlflow run` creates the run (MLFLOW_RUN_ID) in the store the URI names from the folder
    it was started in, then starts the entry point in the project folder, where a relative
    `sqlite:///rel.db` (or the default `mlflow.db`) is another, new file. The run's store is
    found among the folders of this process's ancestors (`mlflow run` is one) by looking the
    run up read-only, so nothing is created; MLFLOW_TRACKING_URI then names it absolutely,
    for this process and its children. Where no folder holds the run, raises PipelineError
    saying what to do; a stale MLFLOW_RUN_ID in the shell ends the same way.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    store_uri = uri()
    path = local_path(store_uri)
    if not run_id or path is None or path.expanduser().is_absolute():
        return
    if _holds_run(path, run_id, store_uri):
        return
    for folder in _ancestor_folders():
        candidate = folder / path
        if _holds_run(candidate, run_id, store_uri):
            absolute = str(candidate.resolve())
            os.environ["MLFLOW_TRACKING_URI"] = (
                f"sqlite:///{absolute}" if store_uri.lower().startswith("sqlite") else absolute
            )
            return
    where = path.resolve()
    raise PipelineError(
        f"run {run_id} (MLFLOW_RUN_ID) is not in the tracking store {redact(store_uri)}, "
        f"which from this folder is {where}{'' if where.exists() else ' (no such file)'}: "
        "`mlflow run` starts entry points in the project folder, so give "
        "MLFLOW_TRACKING_URI as an absolute path (e.g. sqlite:////abs/path/mlflow.db), "
        "or unset MLFLOW_RUN_ID if it is left over in this shell"
    )


def _holds_run(path: Path, run_id: str, store_uri: str) -> bool:
    """Whether the local store at `path` has run `run_id`, read without creating anything."""
    path = path.expanduser()
    if not store_uri.lower().startswith("sqlite"):  # a file store: <root>/<exp id>/<run id>
        return path.is_dir() and any(path.glob(f"*/{run_id}/meta.yaml"))
    if not path.is_file():
        return False
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            row = con.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # not a store (yet); opening it reports what is wrong with it
        return False
    return row is not None


def _ancestor_folders(depth: int = 6) -> list[Path]:
    """The working folders of this process's parent, grandparent, ... (Linux /proc, psutil
    elsewhere), nearest first, without repeats and without our own."""
    import psutil

    here = Path.cwd()
    folders: list[Path] = []
    for proc in psutil.Process().parents()[:depth]:
        try:
            folder = Path(proc.cwd())
        except (psutil.Error, OSError):
            continue
        if folder != here and folder not in folders:
            folders.append(folder)
    return folders
