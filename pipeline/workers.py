"""`--workers N`: N long-lived `pipeline serve` processes that run trial after trial.

Each imports torch and MLflow once, before its first task, keeps one metric writer process
for all its runs (`tracking.keep_writers`) and gets `cpus / N` torch threads; the sweep
hands it tasks as JSON lines on its stdin and reads one JSON result line per task from a
pipe of its own (the worker's stdout and stderr go to its log, attached to the parent run as
`trial_logs/worker-<i>.log`). A task is a grid trial or a final run ("train": one run) or a
search ("search": take WAITING trials from the studies until none is left).

If the sweep is interrupted, the workers get SIGTERM and end their runs KILLED; they also
get it, from the kernel, when the sweep process dies by SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pipeline
from pipeline import signals, tracking
from pipeline.errors import PipelineError

RESULT_FD_ENV = "PIPELINE_RESULT_FD"


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    results: int  # read end of the worker's result pipe
    log: Path
    task: dict | None = None
    buffer: bytes = field(default=b"")


class Pool:
    """N worker processes, started at once (their imports overlap), ended by `close`."""

    def __init__(self, n: int, logs: Path | None = None) -> None:
        self.logs = logs or Path(tempfile.mkdtemp(prefix="pipeline-workers-"))
        self.workers: list[Worker] = []
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = str(max(1, (cpus or 1) // n))
        try:
            for i in range(n):
                with signals.held():  # a process started is always recorded for clean-up
                    self.workers.append(self._start(i))
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> Worker:
        read, write = os.pipe()
        root = str(Path(pipeline.__file__).resolve().parent.parent)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        env |= {
            "PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])),
            "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
            "OMP_NUM_THREADS": self.threads,
            "MKL_NUM_THREADS": self.threads,
            RESULT_FD_ENV: str(write),
        }
        log = self.logs / f"worker-{index}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "serve", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                pass_fds=(write,),
            )  # fmt: skip
        os.close(write)
        os.set_blocking(read, False)
        return Worker(index, proc, read, log)

    def run(self, tasks: list[dict], on_result=None) -> list[dict]:
        """Every task on some worker; returns the results in task order. A worker that dies
        fails its task ({"status": "failed", "message": ...}) and takes no more."""
        queue = list(enumerate(tasks))
        results: dict[int, dict] = {}
        alive = [w for w in self.workers if w.proc.poll() is None]
        selector = selectors.DefaultSelector()
        for w in alive:
            selector.register(w.results, selectors.EVENT_READ, w)
        try:
            while len(results) < len(tasks):
                for w in alive:
                    if w.task is None and queue:
                        w.task = {"n": queue[0][0], **queue.pop(0)[1]}
                        self._send(w, w.task)
                if not any(w.task for w in alive):
                    for n, _ in queue:  # no worker left to run them
                        results[n] = {"status": "failed", "message": "no worker left"}
                    queue.clear()
                    break
                for key, _ in selector.select(timeout=1.0):
                    w = key.data
                    for result in self._read(w):
                        results[result["n"]] = result
                        w.task = None
                        if on_result:
                            on_result(result)
                for w in [w for w in alive if w.proc.poll() is not None]:
                    if w.task is not None:  # it died with a task: that task failed
                        results[w.task["n"]] = {
                            "n": w.task["n"], "status": "failed",
                            "message": f"worker {w.index} exited {w.proc.returncode}; see "
                                       f"trial_logs/{w.log.name}",
                        }  # fmt: skip
                        w.task = None
                    selector.unregister(w.results)
                    alive.remove(w)
        finally:
            selector.close()
        return [results[n] for n in range(len(tasks))]

    def _send(self, w: Worker, task: dict) -> None:
        try:
            w.proc.stdin.write((json.dumps(task) + "\n").encode())
            w.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: run() sees it exit

    def _read(self, w: Worker) -> list[dict]:
        try:
            chunk = os.read(w.results, 1 << 16)
        except BlockingIOError:
            return []
        w.buffer += chunk
        *lines, w.buffer = w.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def close(self) -> None:
        """End the workers: EOF on stdin (they exit after their task), SIGTERM if they are
        still busy (an interrupted sweep): their runs then end KILLED."""
        for w in self.workers:
            try:
                if w.task is not None:
                    w.proc.terminate()
                w.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 60
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            os.close(w.results)


def serve(sweep_pid: int) -> None:
    """The `pipeline serve` process: run the tasks read from stdin, one result line each."""
    out = os.fdopen(int(os.environ[RESULT_FD_ENV]), "w", buffering=1)
    signals.die_with_parent(sweep_pid)
    # One metric writer process for trial after trial, not one started per trial.
    with tracking.keep_writers(ahead=True):
        _warm_up()
        for line in sys.stdin:
            task = json.loads(line)
            t0 = time.perf_counter()
            if task["kind"] == "train":
                result = _train(task)
            elif task["kind"] == "search":
                result = _search(task)
            else:
                raise PipelineError(f"unknown task kind {task['kind']!r}")
            result |= {"n": task["n"], "seconds": time.perf_counter() - t0}
            out.write(json.dumps(result) + "\n")
            sys.stdout.flush()


def _warm_up() -> None:
    """What every trial needs once per process, done before the first task rather than in
    it: torch and MLflow imported (~3.5 s), torch._dynamo (~1.6 s, imported by the first
    optimizer built), what the end of a run imports and what torch.export's first call
    imports (~0.6 s), the tracking store opened. Best effort: a trial meets any error here
    again and reports it as its own."""
    import torch
    import torch._dynamo  # noqa: F401

    from pipeline import steps  # noqa: F401 - MLflow and the rest of a trial's code

    tracking.import_end_of_run()
    with contextlib.suppress(Exception):  # as log_model exports: a dynamic batch dimension
        auto = [{0: torch.export.Dim.AUTO}]
        torch.export.export(torch.nn.Linear(1, 1), (torch.zeros(2, 1),), dynamic_shapes=auto)
    with contextlib.suppress(Exception):
        tracking.open_store()


def _train(task: dict) -> dict:
    """One run: a grid trial or a final run; failures are a result, signals are raised."""
    import traceback

    from pipeline import store
    from pipeline.checkpointing import CheckpointConfig
    from pipeline.config import TrainConfig
    from pipeline.errors import first_line
    from pipeline.steps import run_train
    from pipeline.tracking import search as tracking_search

    try:
        result = run_train(
            TrainConfig(**task["config"]), experiment_id=task["experiment_id"],
            parent_run_id=task["parent_run_id"], run_name=task["name"],
            checkpoints=CheckpointConfig(**task["checkpoints"]) if "checkpoints" in task else None,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - one failed run; the worker goes on
        sys.stderr.write(store.redact(traceback.format_exc()))
        return {"status": "failed", "message": store.redact(first_line(exc, with_type=True))}
    if task.get("tags"):
        tracking_search.tag_run(result.run_id, task["tags"])
    if result.diverged_at is not None:
        return {"status": "diverged", "run_id": result.run_id, "at": result.diverged_at}
    return {"status": "ran", "run_id": result.run_id}


def _search(task: dict) -> dict:
    from pipeline.search.run import join

    return {"status": "ran", "trials": join(task, offset=task.get("offset", 0))}
