"""Reading runs back: by id, by step and params, the unfinished ones, metric histories."""

from __future__ import annotations

import contextlib
import math
import shlex

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.tracking.connection import _client
from pipeline.tracking.tags import CODE_VERSION_TAG, STEP_TAG, SWEEP_FILE_TAG
from pipeline.tracking.versions import code_version


def canonical(value: object) -> str:
    """A param value in one spelling, to compare params as MLflow stores them (strings).

    `mlflow run` logs each entry point parameter shell-quoted when it has to be
    (`'/tmp/x/sp ace'`) and as typed (`0.10`, `1e-3`, `false`); this product logs
    `0.1`, `0.001`, `False`. Numbers compare as floats, true/false in any case, and the
    spellings of "unset" (`auto`, `none`, empty) as one.
    """
    text = "none" if value is None else str(value)
    if text.startswith("'"):
        with contextlib.suppress(ValueError):
            words = shlex.split(text)
            if len(words) == 1 and shlex.quote(words[0]) == text:
                text = words[0]
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered
    if lowered in ("auto", "none", ""):
        return "auto"
    if len(lowered) > 24:  # ids and digests: compared exactly, never as numbers
        return text
    try:
        number = float(lowered)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else lowered


def same_value(a: object, b: object) -> bool:
    return canonical(a) == canonical(b)


def params_match(params: dict[str, str], wanted: dict[str, object]) -> bool:
    """Whether a run's `params` hold every key of `wanted` with the same value (`canonical`)."""
    return all(k in params and same_value(params[k], v) for k, v in wanted.items())


def find_prep_run(experiment_id: str, params: dict[str, str]) -> mlflow.entities.Run | None:
    """The newest FINISHED data_prep run of this code version with exactly these params."""
    return find_finished_run(experiment_id, "data_prep", params)


def find_finished_run(
    experiment_id: str, step: str, params: dict[str, str], max_results: int = 50
) -> mlflow.entities.Run | None:
    """The newest FINISHED `step` run of this code version with exactly these params."""
    for run in finished_runs(experiment_id, step, max_results):
        # As stored: `mlflow run` quotes and spells values its own way (`canonical`).
        if params_match(run.data.params, params):
            return run
    return None


def finished_runs(
    experiment_id: str, step: str, max_results: int = 5000
) -> list[mlflow.entities.Run]:
    """FINISHED `step` runs of this code version, newest first."""
    return _client().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = '{step}' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            " and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def find_unfinished_sweep(experiment_id: str, file_digest: str) -> str | None:
    """The newest sweep run of this file and code version if it did not finish, to resume.

    A RUNNING one is resumed too: the caller holds the sweep's lock, so no live process
    is running it (it was SIGKILLed, or its machine died).
    """
    run = find_sweep(experiment_id, file_digest)
    return run.info.run_id if run is not None and run.info.status != "FINISHED" else None


def find_sweep(experiment_id: str, file_digest: str) -> mlflow.entities.Run | None:
    """The newest sweep run of this file and code version, any status."""
    runs = _client().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{STEP_TAG}` = 'sweep' and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            f" and tags.`{SWEEP_FILE_TAG}` = '{file_digest}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_run(run_id: str) -> mlflow.entities.Run | None:
    """The run with this id, or None where there is none (or `run_id` is no run id).

    Other errors (a server that does not answer) are raised, not taken for "no such run".
    """
    try:
        return get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_run(run_id: str) -> mlflow.entities.Run:
    return _client().get_run(run_id)


def train_runs(experiment_id: str, parent_run_id: str | None = None) -> list[mlflow.entities.Run]:
    """The train runs of an experiment, or only the children of `parent_run_id`; any status."""
    query = f"tags.`{STEP_TAG}` = 'train'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return _client().search_runs([experiment_id], query, max_results=5000)


def running_retrains(experiment_id: str, model_name: str) -> list[mlflow.entities.Run]:
    """The RUNNING retrain runs of registered model `model_name`."""
    return MlflowClient().search_runs(
        [experiment_id],
        f"tags.`{STEP_TAG}` = 'retrain' and tags.`retrain.model_name` = '{model_name}'"
        " and attributes.status = 'RUNNING'",
        max_results=5000,
    )


def running_children(experiment_id: str, parent_run_id: str) -> list[mlflow.entities.Run]:
    """The RUNNING child runs of `parent_run_id`, any step."""
    return MlflowClient().search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged point of `key` as (step, value), in step order."""
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))
