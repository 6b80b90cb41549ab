"""Every MLflow call of the project lives here.

The loop reports to `MlflowTracker`, which queues points for a background thread that
writes them with `log_batch`, so per-step logging costs the training thread a list append.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import queue
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.errors import PipelineError
from pipeline.loop import StepLog

STEP_TAG = "pipeline.step"
CODE_VERSION_TAG = "pipeline.code_version"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
FLUSH_SECONDS = 1.0  # longest a queued point waits for a fuller batch
WRITER_SWITCH_INTERVAL_S = 5e-5  # the GIL switch interval while the writer runs Python
DEFAULT_SWITCH_INTERVAL_S = sys.getswitchinterval()  # restored after; not the prior value,
# which another writer may have lowered itself
SYSTEM_METRICS_INTERVAL_S = 5  # MLflow's default of 10 s leaves short runs with no samples


def code_version() -> str:
    """A digest of the package's source: changes whenever the code that made a result does."""
    h = hashlib.sha256()
    for path in sorted(Path(pipeline.__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def version_tags() -> dict[str, str]:
    import importlib.metadata

    import torch

    return {
        "torch_version": torch.__version__,
        # From the installed metadata: importing torchvision only to read this costs ~1 s.
        "torchvision_version": importlib.metadata.version("torchvision"),
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        CODE_VERSION_TAG: code_version(),
    }


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run can be closed as KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated()


Point = tuple[str, float, int, int]  # (key, value, timestamp ms, step): a Metric, unbuilt


class MetricWriter:
    """A background thread that writes queued metrics to one run with `log_batch`.

    The training thread only queues plain tuples; building `Metric` objects and the
    SQLAlchemy work happen here. Points are gathered into batches of up to
    `MAX_METRICS_PER_BATCH` (or `FLUSH_SECONDS` old), since each `log_batch` has a fixed cost.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = MlflowClient()
        self._queue: queue.SimpleQueue[list[Point] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def put(self, points: list[Point]) -> None:
        self._queue.put(points)

    def _work(self) -> None:
        done = False
        while not done:
            batch, done = self._gather()
            if batch:
                self._write(batch)

    def _gather(self) -> tuple[list[Point], bool]:
        """Wait for points, then keep collecting for up to FLUSH_SECONDS; True once closed."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch, deadline = list(first), time.monotonic() + FLUSH_SECONDS
        while len(batch) < MAX_METRICS_PER_BATCH:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.extend(item)
        return batch, False

    def _write(self, points: list[Point]) -> None:
        metrics = [Metric(*p) for p in points]
        # While this thread runs Python, the training thread waits for the GIL after every
        # torch op, by default up to 5 ms each time; a short switch interval lets the two
        # interleave, so the writing overlaps the training thread's GIL-free kernels.
        sys.setswitchinterval(WRITER_SWITCH_INTERVAL_S)
        try:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
        except BaseException as exc:  # surfaced by close(): the run must not pass silently
            self._error = exc
        finally:
            sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL_S)

    def close(self) -> None:
        """Write everything queued so far, then stop; raises if any write failed."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise PipelineError(f"logging metrics to MLflow failed: {self._error}")


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
    """An open MLflow run, with its asynchronous metric writer."""

    run_id: str
    experiment_id: str
    writer: MetricWriter

    @property
    def tracker(self) -> MlflowTracker:
        return MlflowTracker(self.writer)


def open_store_in_background() -> threading.Thread:
    """Start creating (or opening) the tracking store on a thread; join it before a run.

    A fresh sqlite store runs MLflow's schema migrations, seconds of mostly disk waits:
    on a thread they overlap the data loading and imports the run does anyway. Errors are
    left for `start_run` to raise where they always did.
    """

    def open_store() -> None:
        with contextlib.suppress(Exception):
            MlflowClient()

    thread = threading.Thread(target=open_store, name="mlflow-store", daemon=True)
    thread.start()
    return thread


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
) -> Iterator[Run]:
    """Open a run and always close it: FINISHED, FAILED on an exception, KILLED on a signal.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is resumed instead.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    active = mlflow.start_run(
        run_name=run_name,
        nested=nested,
        experiment_id=experiment_id,
        log_system_metrics=system_metrics,
    )
    run_id = active.info.run_id
    writer = MetricWriter(run_id)
    status = "FAILED"
    try:
        mlflow.set_tags({"mlflow.runName": run_name, STEP_TAG: step, **version_tags()})
        yield Run(run_id, active.info.experiment_id, writer)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            writer.close()
        except PipelineError:
            status = "FAILED"
            raise
        finally:
            mlflow.end_run(status)
            signal.signal(signal.SIGTERM, previous)


def log_params(params: dict[str, object]) -> None:
    """Log params as strings, skipping keys already set: under `mlflow run` MLflow logs the
    entry point's parameters itself, as typed, and a param can never change once logged."""
    # The run as `start_run` fetched it, MLflow's own params included: no extra request.
    existing = mlflow.active_run().data.params
    new = {k: "none" if v is None else str(v) for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_prepared_data(path: Path, digest: str, splits: dict[str, int], source: str, counts) -> None:
    """The prepared file as an artifact, each split as a dataset input, class counts as JSON."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.log_artifact(str(path), artifact_path="data")
    mlflow.log_dict(counts, "class_counts.json")
    src = HTTPDatasetSource(source) if source.startswith("http") else _local_source(path)
    for split, size in splits.items():
        ds = MetaDataset(source=src, name=f"{path.stem}/{split}", digest=digest[:16])
        mlflow.log_input(ds, context=split, tags={"size": str(size)})


def _local_source(path: Path):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # two registered local sources match; either is right
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(path.resolve()))


def find_prep_run(experiment_id: str, params: dict[str, str]) -> mlflow.entities.Run | None:
    """The newest FINISHED data_prep run of this code version with exactly these params."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = 'data_prep' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            " and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        # MLflow stores params as strings, so compare them as strings.
        if all(run.data.params.get(k) == v for k, v in params.items()):
            return run
    return None


def prepared_file_of(run_id: str) -> tuple[Path, str]:
    """(local path, digest) of a data_prep run's prepared file, downloading it if needed."""
    from pipeline.data import file_digest

    try:
        run = MlflowClient().get_run(run_id)
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
    dst = Path(tempfile.mkdtemp(prefix="pipeline-data-"))
    path = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"data/{local.name}", dst_path=str(dst)
        )
    )
    return path, digest


def log_evaluation(prefix: str, ev, classes: list[str], step: int) -> None:
    """Final metrics, per-class accuracy and the confusion matrix as a figure and JSON."""
    metrics = {f"{prefix}/loss": ev.loss, f"{prefix}/accuracy": ev.accuracy}
    for name, acc in zip(classes, ev.per_class_accuracy(), strict=True):
        metrics[f"{prefix}/class_accuracy/{name}"] = acc
    mlflow.log_metrics(metrics, step=step)
    mlflow.log_dict({"classes": classes, "matrix": ev.confusion}, f"{prefix}_confusion.json")
    mlflow.log_figure(_confusion_figure(ev.confusion, classes), f"{prefix}_confusion_matrix.png")


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


def log_model(model, example, *, registered_model_name: str | None = None):
    """Log the model as a pt2 (torch.export) artifact, loadable by pyfunc and servable.

    pip requirements are given explicitly: inferring them imports the model in a
    subprocess and costs seconds on every run.
    """
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    base = lambda v: v.split("+")[0]  # noqa: E731 - drop local tags like +cpu / +cu130
    return mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[
            f"torch=={base(torch.__version__)}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}",
        ],
        registered_model_name=registered_model_name,
    )


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)
