"""Files of a run: prepared data, evaluations, JSON, and the logged model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.lock import cache_dir
from pipeline.tracking import spool
from pipeline.tracking.queries import get_run
from pipeline.tracking.runs import log_metrics
from pipeline.tracking.tags import STEP_TAG

DATA_CACHE_ENV = "PIPELINE_DATA_CACHE"  # where data_prep files of other machines are kept


def import_end_of_run() -> None:
    """Import what the end of a run needs (torch.export and mlflow.pytorch for `log_model`,
    matplotlib for the figure): ~2 s, best spent while the store is still being created."""
    import matplotlib
    import mlflow.pytorch  # noqa: F401
    import torch.export  # noqa: F401
    from mlflow.models import infer_signature  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


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
    from pipeline.plots import confusion_figure

    figure = confusion_figure(ev.confusion, classes)
    _log_file(figure.savefig, f"{prefix}_confusion_matrix.png")


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
        # MLflow checks that the input example serves by loading the saved model back and
        # predicting (~0.5 s, mostly comparing each pinned requirement with the installed
        # one). The answer depends on the architecture and the example's shape, not on the
        # weights: checked once per process, not for each trial of a sweep's worker.
        served = f"{model}{example.shape}"
        check = dict(validate_serving_input=served not in _served)
        if registered_model_name is not None:  # registering needs the server now: never kept
            info = mlflow.pytorch.log_model(
                model, name="model", registered_model_name=registered_model_name, **kwargs,
                **logged, **check,
            )  # fmt: skip
        else:
            info = spool.keep_model(
                lambda: mlflow.pytorch.log_model(model, name="model", **kwargs, **logged, **check),
                lambda path: mlflow.pytorch.save_model(model, path, **kwargs),
                "model",
                **logged,
            )
        if not isinstance(info, spool.KeptModel):  # kept for later: nothing was checked
            _served.add(served)
        return info


_served: set[str] = set()  # models (module tree, example shape) whose example was served here


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
