"""MLflow experiments: found or created, marked as model training; runs that hold artifacts."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.tracking.connection import _client
from pipeline.tracking.tags import CODE_VERSION_TAG, EXPERIMENT_KIND_TAG, MODEL_TRAINING, STEP_TAG
from pipeline.tracking.versions import code_version


def mark_model_training(experiment_id: str, tags: dict[str, str] | None = None) -> None:
    """Tag the experiment as model training, so the MLflow UI opens it on its runs.

    `tags`: the experiment's tags, when the caller has them (saves a request). A kind the
    UI only guessed (`*_inferred`, `no_inferred_type`) is replaced; one somebody chose is
    left as it is.
    """
    client = MlflowClient()
    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    kind = tags.get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created now if missing, marked as model training.

    Created up front by the one sweep process: several processes calling `set_experiment`
    for a new name race, and all but one end up logging to "Default".
    """
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise PipelineError(
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                "or choose another name"
            )
        mark_model_training(found.experiment_id, found.tags)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        mark_model_training(found.experiment_id, found.tags)
        return found.experiment_id


def experiment_name(experiment_id: str) -> str:
    return _client().get_experiment(experiment_id).name


def experiment_by_name(name: str) -> mlflow.entities.Experiment:
    """Experiment `name`; the error lists the experiments there are."""
    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise PipelineError(
            f"{name!r} is neither an experiment nor a run id; experiments: {', '.join(names)}"
        )
    return experiment


def create_finished_run(experiment_id: str, run_name: str, step: str) -> str:
    """A FINISHED run that only holds artifacts logged to it afterwards (`log_artifacts_to`)."""
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={STEP_TAG: step, CODE_VERSION_TAG: code_version()},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def compare_run(experiment_id: str, run_name: str) -> str:
    """The experiment's run that holds its comparisons: the newest FINISHED `compare` run,
    or a new one. Reused, so comparing again refreshes its artifacts instead of adding runs."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{STEP_TAG}` = 'compare' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    return create_finished_run(experiment_id, run_name, "compare")
