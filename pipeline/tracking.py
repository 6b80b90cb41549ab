"""Every MLflow tracking call of the project lives here (registry calls: registry.py).

The loop reports to `MlflowTracker`, which queues points for a background thread that
writes them with `log_batch`, so per-step logging costs the training thread a list append.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import queue
import signal
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
SWEEP_FILE_TAG = "pipeline.sweep_file_sha256"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
SYSTEM_METRICS_INTERVAL_S = 5  # MLflow's default of 10 s leaves short runs with no samples


def code_version() -> str:
    """A digest of the package's source: changes whenever the code that made a result does."""
    h = hashlib.sha256()
    for path in sorted(Path(pipeline.__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def version_tags() -> dict[str, str]:
    import torch
    import torchvision

    return {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        CODE_VERSION_TAG: code_version(),
    }


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run can be closed as KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated()


class MetricWriter:
    """A background thread that writes queued metrics to one run with `log_batch`."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = MlflowClient()
        self._queue: queue.SimpleQueue[list[Metric] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def put(self, metrics: list[Metric]) -> None:
        self._queue.put(metrics)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = item
            # Drain whatever else is queued so one request carries as many points as allowed.
            while len(batch) < MAX_METRICS_PER_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch = batch + nxt
            for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
                try:
                    self._client.log_batch(
                        self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH]
                    )
                except BaseException as exc:  # surfaced by close(): the run must not pass silently
                    self._error = exc

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
        metrics = []
        for r in rows:
            ts = int(r.time * 1000)
            metrics.append(Metric("train/loss", r.loss, ts, r.step))
            metrics.append(Metric("train/accuracy", r.accuracy, ts, r.step))
            metrics.append(Metric("train/lr", r.lr, ts, r.step))
        self.writer.put(metrics)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.writer.put([Metric(k, float(v), ts, step) for k, v in metrics.items()])


@dataclass
class Run:
    """An open MLflow run, with its asynchronous metric writer."""

    run_id: str
    experiment_id: str
    writer: MetricWriter

    @property
    def tracker(self) -> MlflowTracker:
        return MlflowTracker(self.writer)


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
) -> Iterator[Run]:
    """Open a run and always close it: FINISHED, FAILED on an exception, KILLED on a signal.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is resumed instead, as is
    `run_id` when given. `parent_run_id` nests the run under a run of another process.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    active = mlflow.start_run(
        run_id=run_id,
        run_name=run_name,
        nested=nested,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
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
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
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
    return find_finished_run(experiment_id, "data_prep", params)


def find_finished_run(
    experiment_id: str, step: str, params: dict[str, str], max_results: int = 50
) -> mlflow.entities.Run | None:
    """The newest FINISHED `step` run of this code version with exactly these params."""
    for run in finished_runs(experiment_id, step, max_results):
        # MLflow stores params as strings, so compare them as strings.
        if all(run.data.params.get(k) == v for k, v in params.items()):
            return run
    return None


def finished_runs(
    experiment_id: str, step: str, max_results: int = 5000
) -> list[mlflow.entities.Run]:
    """FINISHED `step` runs of this code version, newest first."""
    return MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = '{step}' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            " and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created now if missing.

    Created up front by the one sweep process: several processes calling `set_experiment`
    for a new name race, and all but one end up logging to "Default".
    """
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise PipelineError(
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                "or choose another name"
            )
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def experiment_name(experiment_id: str) -> str:
    return MlflowClient().get_experiment(experiment_id).name


def experiment_of_run(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.experiment_id


def find_unfinished_sweep(experiment_id: str, file_digest: str) -> str | None:
    """The newest sweep run of this file and code version that did not finish, to resume."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = 'sweep' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            f" and tags.`{SWEEP_FILE_TAG}` = '{file_digest}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs and runs[0].info.status != "FINISHED":
        return runs[0].info.run_id
    return None


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: object, artifact_file: str) -> None:
    mlflow.log_dict(obj, artifact_file)


def tracking_uri() -> str:
    """The store in use, so child processes log to the same one."""
    return mlflow.get_tracking_uri()


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
