"""Checkpoints of the whole training state, and resuming a train run from them.

A checkpoint is one `torch.save` file, `step-<global step>.pt`, holding `loop.TrainState`
(weights, optimizer, scheduler, early stopping, counters and position inside the epoch,
every RNG), the run id, the run's params, the data digest, the code version, and the metric
points handed to MLflow since the checkpoint before the last one (see
`tracking_resume.PointLog`). It is read back with `torch.load(weights_only=True)`: tensors
and plain containers only, never arbitrary objects.

Written atomically: to a temporary file in the same folder, fsynced, renamed over, and the
folder fsynced; a crash while writing leaves the previous checkpoint whole. Only the newest
is kept, locally in `<root>/<run id>/` (root: `--checkpoint-dir`, `$PIPELINE_CHECKPOINT_DIR`,
else `~/.cache/pipeline/checkpoints`) and in the run's artifacts (`checkpoints/`), so
another machine that shares only the tracking server can resume the run.

Writing happens on a thread: the training thread only copies the state (a `state_dict`
clone), except on a stop signal, when the checkpoint is written before the run ends KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError, quote
from pipeline.lock import cache_dir
from pipeline.loop import TrainState

DIR_ENV = "PIPELINE_CHECKPOINT_DIR"
KILL_AT_ENV = "PIPELINE_KILL_AT"  # tests only: SIGKILL this process at a named point
FORMAT = 1
DEFAULT_EVERY = "epoch,60s"
UPLOAD_WAIT_S = 15.0  # what a run's end gives the last upload (a stop signal's checkpoint)
_NAME = re.compile(r"step-(\d+)\.pt")
_KILL_AT = os.environ.get(KILL_AT_ENV)  # read once: `kill_point` runs on every step


@dataclass(frozen=True)
class CheckpointConfig:
    """When to write checkpoints, whether to keep the final one, and what to resume.

    `every`: comma-separated `epoch` (at each epoch's end), `N` (every N global steps), `Ns`
    (at most every N seconds, checked between steps), or `none` (no checkpoints at all; a
    resume then starts the run over, skipping what it logged already). A stop signal always
    writes one, unless `none`. `resume`: None (a new run), `auto`, or a train run id.
    """

    every: str = DEFAULT_EVERY
    keep: bool = False  # keep the final checkpoint of a FINISHED run
    resume: str | None = None
    directory: str | None = None
    scope: str | None = None  # `auto` looks only among the children of this run


@dataclass(frozen=True)
class Every:
    epoch: bool = False
    steps: int = 0
    seconds: float = 0.0

    @property
    def never(self) -> bool:
        return not (self.epoch or self.steps or self.seconds)


def parse_every(text: str) -> Every:
    """`CheckpointConfig.every` parsed; PipelineError naming the bad part and the forms."""
    epoch, steps, seconds = False, 0, 0.0
    if text.strip().lower() == "none":
        return Every()
    for part in (p.strip().lower() for p in str(text).split(",")):
        try:
            if part == "epoch":
                epoch = True
            elif part.endswith("s") and float(part[:-1]) > 0:
                seconds = float(part[:-1])
            elif part.isdigit() and int(part) > 0:
                steps = int(part)
            else:
                raise ValueError
        except ValueError:
            raise PipelineError(
                f"checkpoint_every {quote(text)} is invalid: {quote(part)}; valid: a "
                "comma-separated list of 'epoch', N (steps > 0), Ns (seconds > 0), or 'none'"
            ) from None
    return Every(epoch, steps, seconds)


def root(directory: str | None = None) -> Path:
    return Path(directory) if directory else cache_dir(DIR_ENV, "checkpoints")


def name_of(step: int) -> str:
    return f"step-{step:09d}.pt"


def step_of(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match[1]) if match else None


def local(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if step_of(p.name) is not None]
    return sorted(found, key=lambda p: step_of(p.name), reverse=True)


def write_atomic(path: Path, payload: dict) -> None:
    """`torch.save(payload)` at `path`, whole or not at all (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def load(path: Path) -> dict:
    """A checkpoint's payload; tensors on the CPU. Raises PipelineError if it is unreadable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not ours
        raise PipelineError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"checkpoint {path} is not a format-{FORMAT} checkpoint")
    return payload


def _copy(value):
    """A deep copy of a state dict's tensors on the CPU: training goes on changing them."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def kill_point(name: str, value: int | None = None, before=None, until=None) -> None:
    """Tests: SIGKILL this process at `name[:value]` when PIPELINE_KILL_AT names it (of
    global rank R only: `name:value@R`), or, for a point that lasts (model logging), from a
    thread a moment after (`name+seconds`) or once `until()` holds (`name+until`: polled
    every 50 ms, so the kill lands inside the lasting work however slow the machine is).
    `before()` runs first (waiting for a checkpoint being written), so which checkpoints
    exist at the kill is certain, and a test knows where the resume starts."""
    spec = _KILL_AT
    if not spec:
        return
    where, _, delay = spec.partition("+")
    where, _, rank = where.partition("@")  # `step:13@0`: that global rank only (DDP)
    if rank and rank != os.environ.get("RANK", "0"):
        return
    if where != (name if value is None else f"{name}:{value}"):
        return
    if before is not None:
        before()
    if delay == "until" and until is not None:

        def kill_once_true() -> None:
            while not until():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_once_true, name="kill-point", daemon=True).start()
    elif delay:
        timer = threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


AGREE_EVERY = 50  # global steps between two checks of a seconds trigger shared by ranks


class Checkpointer:
    """Writes checkpoints of one run: the loop's `StepHook`, and `save` at epoch ends and
    on a stop signal. `stall_s` adds up what it cost the training thread.

    For a data-parallel training (pipeline.distributed) every rank has one, and every rank
    must decide the same: saving reports the steps first, a collective. `writes=False`
    (ranks other than 0) decides but writes nothing; `agree(due)` gives rank 0's decision
    on every rank (a broadcast), asked for the seconds trigger, which differs per rank's
    clock, at every `AGREE_EVERY`-th global step and at each epoch's end only.
    """

    def __init__(
        self,
        run_id: str,
        config: CheckpointConfig,
        meta: dict,
        points,
        upload=None,
        kept: list[str] | None = None,
        writes: bool = True,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self.run_id, self.every = run_id, parse_every(config.every)
        self.folder = root(config.directory) / run_id
        self.meta, self.points, self.upload = meta, points, upload
        self._thread: threading.Thread | None = None
        self._uploading: threading.Thread | None = None  # while uploads are on their way
        self._pending: Path | None = None  # the newest checkpoint not uploaded yet
        self._upload_lock = threading.Lock()
        self._error: BaseException | None = None
        self._last_time = time.monotonic()
        self._saved: list[int] = []  # global steps of the checkpoints written, in order
        self._position: tuple[int, int, int] | None = None  # (epoch, batch, step) saved last
        self._uploaded = list(kept or [])  # artifact names, to prune after the next upload
        self.stall_s, self.count = 0.0, 0
        self.warned = False
        self.writes, self.agree = writes, agree

    def due(self, state: TrainState) -> bool:
        kill_point("step", state.step, self.settle)
        if self.every.steps and state.step % self.every.steps == 0:
            return True
        if not self.every.seconds:
            return False
        if self.agree is not None:
            return state.step % AGREE_EVERY == 0 and self.agree(self._seconds_due())
        return self._seconds_due()

    def _seconds_due(self) -> bool:
        return bool(self.every.seconds) and (
            time.monotonic() - self._last_time >= self.every.seconds
        )

    def __call__(self, state: TrainState) -> None:
        self.save(state)

    def epoch_end(self, state: TrainState) -> None:
        due = self.every.epoch
        if not due and self.every.seconds:
            due = self.agree(self._seconds_due()) if self.agree else self._seconds_due()
        if due:
            self.save(state)

    def save(self, state: TrainState, wait: bool = False) -> None:
        """Copy the state now; write it on a thread (`wait`: before returning)."""
        position = (state.epoch, state.batch, state.step)
        if self.every.never or position == self._position:  # nothing new to save
            return
        self._position = position
        if not self.writes:  # rank 0 writes for every rank
            self._last_time = time.monotonic()
            return
        t0 = time.perf_counter()
        self.join()
        previous = self._saved[-2] if len(self._saved) >= 2 else 0
        payload = {
            "format": FORMAT,
            "run_id": self.run_id,
            "state": _copy(state.state_dict()),
            "points": [list(p) for p in self.points.since(previous)],
            "saved_at": time.time(),
            **self.meta,
        }
        self._saved.append(state.step)
        self.points.drop_until(previous)
        self._last_time = time.monotonic()
        self._thread = threading.Thread(
            target=self._write, args=(payload, state.step), name="checkpoint", daemon=True
        )
        self._thread.start()
        self.count += 1
        self.stall_s += time.perf_counter() - t0
        if wait:
            self.join()

    def _write(self, payload: dict, step: int) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / name_of(step)
            write_atomic(path, payload)
            for old in local(self.folder)[1:]:
                old.unlink(missing_ok=True)
            self._start_upload(path)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
            self._error = exc

    def _start_upload(self, path: Path) -> None:
        """Upload on a thread of its own, which training never waits for. While one is on
        its way (a slow or unreachable server), newer checkpoints wait; when it is done, the
        newest of them goes next, so the run's artifacts catch up with the last checkpoint
        written, not the one after it."""
        if self.upload is None:
            return
        with self._upload_lock:
            self._pending = path
            if self._uploading is not None:  # the thread on its way takes it next
                return
            self._uploading = threading.Thread(
                target=self._upload_pending, name="checkpoint-upload", daemon=True
            )
            self._uploading.start()

    def _upload_pending(self) -> None:
        while True:
            with self._upload_lock:
                path, self._pending = self._pending, None
                if path is None:
                    self._uploading = None
                    return
            self._upload(path)

    def _upload(self, path: Path) -> None:
        try:
            self.upload(path, [n for n in self._uploaded if n != path.name])
            self._uploaded = [path.name]
        except Exception as exc:  # noqa: BLE001 - the local copy still resumes here
            if not path.exists():  # a newer checkpoint replaced it meanwhile: that one goes
                return
            if not self.warned:
                self.warned = True
                print(f"Warning: checkpoint not uploaded to run {self.run_id}: "
                      f"{str(exc).splitlines()[0][:200]}; kept in {self.folder}",
                      file=sys.stderr)  # fmt: skip

    def settle(self) -> None:
        """Wait for the checkpoint being written and uploaded (tests' kill points)."""
        self.join()
        self.wait_upload(60.0)

    def wait_upload(self, timeout_s: float = UPLOAD_WAIT_S) -> None:
        """Give the upload on its way at most `timeout_s` s to finish (a run's end)."""
        thread = self._uploading
        if thread is not None:
            thread.join(timeout_s)

    def join(self) -> None:
        """Wait for the checkpoint being written; raise what writing it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError):
                raise PipelineError(
                    f"writing a checkpoint to {self.folder} failed: {error.strerror or error}"
                ) from None
            raise error

    def finish(self, keep: bool, delete_uploaded=None) -> None:
        """At a FINISHED run's end: keep the final checkpoint, or drop it here and in the
        run's artifacts (`delete_uploaded(names)`)."""
        self.join()
        self.wait_upload()
        if keep or not self.writes:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        if delete_uploaded is not None and self._uploaded:
            with contextlib.suppress(Exception):
                delete_uploaded(self._uploaded)


def write_owner(folder: Path, process: str, writer_pid: int | None) -> None:
    """Who writes this run now: its process and its metric writer (a resume on this host
    waits for a dead run's writer to finish writing what it had)."""
    import psutil

    folder.mkdir(parents=True, exist_ok=True)
    started = None
    if writer_pid is not None:
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(writer_pid).create_time()
    record = {"process": process, "writer_pid": writer_pid, "writer_started": started}
    (folder / "owner.json").write_text(json.dumps(record))


def wait_for_old_writer(folder: Path, timeout_s: float) -> None:
    """Wait until the metric writer of the run's dead process is gone (it writes what it
    had queued, then exits); PipelineError after `timeout_s`."""
    import psutil

    path = folder / "owner.json"
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    pid, started = record.get("writer_pid"), record.get("writer_started")
    if pid is None or started is None:
        return
    try:
        proc = psutil.Process(pid)
        if proc.create_time() != started:
            return
        proc.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        raise PipelineError(
            f"the metric writer (pid {pid}) of the run's earlier process is still writing "
            f"after {timeout_s:.0f} s; try again later"
        ) from None


def check_payload(payload: dict, run_id: str, params: dict, digest: str, code: str) -> None:
    """PipelineError naming what differs between a checkpoint and the run resuming it."""
    differ = []
    if payload.get("run_id") != run_id:
        differ.append(f"run {payload.get('run_id')!r} (checkpoint) vs {run_id!r}")
    if payload.get("data_digest") != digest:
        differ.append(f"data_digest {payload.get('data_digest')!r} (checkpoint) vs {digest!r}")
    if payload.get("code_version") != code:
        differ.append(f"code version {payload.get('code_version')!r} (checkpoint) vs {code!r}")
    saved = payload.get("params", {})
    for key, value in params.items():
        if str(saved.get(key)) != str(value):
            differ.append(f"{key} {saved.get(key)!r} (checkpoint) vs {value!r}")
    if differ:
        raise PipelineError(f"cannot resume from the checkpoint: {'; '.join(differ)}")


# --- resuming a run -----------------------------------------------------------------------


def resume_target(
    config: CheckpointConfig,
    params: dict[str, str],
    step: str = "train",
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
):
    """The run to resume (an mlflow Run), or None for a new one: `config.resume` is a run
    id, checked (`tracking_resume.check_resumable`), or `auto`, the newest unfinished run
    with these params (children of `parent_run_id` only, when given).

    Before it returns, what the run's dead process still had on its way to MLflow is
    written: its metric writer (this host) is waited for, and its kept writes (an outage,
    `pipeline sync`) are written first; a resume never runs ahead of its own log. Under
    `mlflow run`, the run `mlflow run` made is marked as the one that resumed this run.
    """
    from pipeline import tracking
    from pipeline.tracking import resume as tr
    from pipeline.tracking import spool

    if not config.resume:
        return None
    if config.resume.lower() == "auto":
        where = experiment_id or tr.active_experiment_id()
        run = tr.find_resumable(where, params, step, parent_run_id)
        if run is None:
            return None
    else:
        run = tr.check_resumable(config.resume, params, step)
    run_id = run.info.run_id
    _hold_resume_lock(root(config.directory), run_id)
    wait_for_old_writer(root(config.directory) / run_id, spool.wait_seconds() + 30)
    uri = tracking.tracking_uri()
    if spool.is_server(uri) and spool.RunSpool(uri, run_id).pending():
        spool.sync(uri, quiet=True)
        if spool.RunSpool(uri, run_id).pending():
            raise PipelineError(f"run {run_id} still has writes kept from an outage; run "
                                "`pipeline sync` first, then resume it")  # fmt: skip
    if (stub := os.environ.pop("MLFLOW_RUN_ID", None)) and stub != run_id:
        tr.mark_stub(stub, run_id, step)
    return tracking.get_run(run_id)


_resume_locks: dict[str, int] = {}  # run id -> descriptor of its held lock, for our lifetime


def _hold_resume_lock(folder: Path, run_id: str) -> None:
    """One resume of a run at a time on this host: an exclusive flock on
    `<root>/<run id>.lock`, held until this process ends (the kernel drops it however it
    ends). Two hosts resuming one run at once are not serialised."""
    import fcntl

    if run_id in _resume_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{run_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PipelineError(f"run {run_id} is being resumed by another process") from None
    _resume_locks[run_id] = fd


def latest_payload(run_id: str, config: CheckpointConfig, check) -> dict | None:
    """The newest readable checkpoint of the run, here or in its artifacts, or None.

    `check(payload)` raises if it belongs to another configuration. A checkpoint that cannot
    be read (an upload cut off) gives way to an older one.
    """
    from pipeline.tracking import resume as tr

    here = {step_of(p.name): p for p in local(root(config.directory) / run_id)}
    try:
        there = {step_of(n): n for n in tr.uploaded(run_id) if step_of(n) is not None}
    except Exception:  # noqa: BLE001 - a store without artifacts: only what is here
        there = {}
    with tr.temporary_folder() as tmp:
        for step in sorted(set(here) | set(there), reverse=True):
            path = here.get(step) or tr.download(run_id, there[step], Path(tmp))
            try:
                payload = load(path)
            except PipelineError as exc:
                print(f"Warning: {exc}; trying an older one", file=sys.stderr)
                continue
            check(payload)
            return payload
    return None


class Session:
    """Checkpoints and resume of one open train run, around its training.

    Entered right after the run opens: it loads the resumed run's newest checkpoint into
    `state`, wraps the run's tracker so no step is logged twice (`tracker`), writes again
    what the checkpoint carried that the run lacks, starts the heartbeat and records this
    process as the run's writer. On a stop signal its exit writes a checkpoint before the
    run ends KILLED; on a clean exit it drops the checkpoints (or keeps the final one).
    """

    def __init__(self, run, state: TrainState, config: CheckpointConfig, meta: dict,
                 resumed, writer_pid: int | None = None, agree=None,
                 signal_checkpoint: bool = True) -> None:  # fmt: skip
        from pipeline import tracking
        from pipeline.tracking import resume as tr

        self.run_id, self.state, self.config = run.run_id, state, config
        self.last: dict[str, int] = {}
        self.resumed = resumed is not None
        log = tr.PointLog()
        payload = None
        kept: list[str] = []
        if resumed is not None:
            payload = latest_payload(
                self.run_id,
                config,
                lambda p: check_payload(
                    p, self.run_id, meta["params"], meta["data_digest"], meta["code_version"]
                ),  # fmt: skip
            )
            if payload is not None:
                state.load_state_dict(payload["state"])
            self.last = tr.last_steps(self.run_id)
            with contextlib.suppress(Exception):
                kept = tr.uploaded(self.run_id)
            tr.record_resume(resumed, state.step)
            threads = resumed.data.tags.get("torch_num_threads")
            if threads and threads != str(torch.get_num_threads()):
                print(
                    f"Warning: run {self.run_id} trained with {threads} torch threads, this "
                    f"process has {torch.get_num_threads()}: on a CPU its numbers will "
                    "differ from an uninterrupted run's in the last bits",
                    file=sys.stderr,
                )
            # A model its killed process was logging stays PENDING otherwise (MLflow
            # finalizes one only on an exception).
            tracking.fail_pending_models(self.run_id, run.experiment_id)
            where = (f"global step {state.step} (epoch {state.epoch}, batch {state.batch})"
                     if payload is not None else "the start: no checkpoint")  # fmt: skip
            print(f"train: resuming run {self.run_id} from {where}")
        self.tracker = tr.dedupe(run.tracker, self.last, log)
        if payload is not None:
            tr.replay(self.tracker, payload.get("points", []))
        self.checkpointer = Checkpointer(
            self.run_id, config, meta, log,
            upload=lambda path, older: tr.upload(self.run_id, path, older), kept=kept,
            agree=agree,
        )  # fmt: skip
        # A data-parallel run's last steps before a stop are not logged (their numbers are
        # not reduced over the ranks): a checkpoint there would skip them for good. Its
        # resume goes on from the last checkpoint, which never runs ahead of the log.
        self.signal_checkpoint = signal_checkpoint
        process = tracking.process_tag()[tracking.PROCESS_TAG]
        if not self.checkpointer.every.never:
            write_owner(self.checkpointer.folder, process, writer_pid)
        self._heartbeat = tr.Heartbeat(self.run_id)

    def logged(self, key: str) -> bool:
        """Whether the resumed run has `key` already (a final metric: not logged again)."""
        return key in self.last

    def trained(self, epochs: int) -> bool:
        """Whether training is over: every epoch validated, or stopped early."""
        es = self.state.early_stopping
        if es is not None and es.stopped_epoch:
            return True
        return self.state.batch == 0 and self.state.epoch >= epochs

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        from pipeline import signals
        from pipeline.tracking import resume as tr

        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt) and self.signal_checkpoint:
                with signals.held():  # written whole, before the run ends KILLED
                    self.checkpointer.save(self.state, wait=True)
                self.checkpointer.wait_upload()  # a spot machine: resumed elsewhere from it
            elif kind is None:
                self.checkpointer.finish(
                    self.config.keep, lambda names: tr.delete(self.run_id, names)
                )
            else:
                self.checkpointer.join()
                self.checkpointer.wait_upload()
        finally:
            self._heartbeat.stop()


class Follower:
    """What `Session` is to a rank of a data-parallel training other than 0: the same
    checkpoint decisions (a `Checkpointer` that writes nothing), no MLflow. Its state is
    rank 0's, sent over the process group after a resume (`distributed.Group.share_state`).
    """

    resumed = False  # what rank 0 alone does for a resumed run (its logged model) is skipped

    def __init__(self, run, state: TrainState, config: CheckpointConfig, agree) -> None:
        self.state, self.tracker = state, run.tracker
        self.last: dict[str, int] = {}  # what the run has logged: rank 0 alone reads it
        self.checkpointer = Checkpointer(run.run_id or "", config, {}, None, writes=False,
                                         agree=agree)  # fmt: skip

    def logged(self, key: str) -> bool:
        return False

    trained = Session.trained

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        pass
