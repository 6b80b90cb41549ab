"""The MLflow calls of a search (pipeline/search): trial outcomes on child runs, the runs a
search and its workers look up.

A trial's run says what became of it at a glance in the MLflow UI: its status (FINISHED:
completed or diverged, KILLED: pruned or interrupted, FAILED: an error) and its tags,
`pipeline.trial_state` (complete, pruned, diverged, failed) first among them.
"""

from __future__ import annotations

import contextlib

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import tracking

ROLE_TAG = "pipeline.search_role"  # "trial" (searching) or "final" (a best setting, seeded)
GROUP_TAG = "pipeline.search_group"  # the group_by values, e.g. adam-cross_entropy
STUDY_TAG = "pipeline.optuna_study"  # the Optuna study's name
TRIAL_TAG = "pipeline.optuna_trial"  # the Optuna trial's number in its study
STATE_TAG = "pipeline.trial_state"  # complete, pruned, diverged, failed, interrupted
PRUNED_EPOCH_TAG = "pipeline.pruned_at_epoch"
STORAGE_TAG = "pipeline.optuna_storage"  # the study storage's URL, credentials hidden
SEARCH_TAG = "pipeline.search"  # "true" on the parent run of a search


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def tag_run(run_id: str, tags: dict[str, str], status: str | None = None) -> None:
    """Tags on a run that need not be active (any status), and a new final status if given."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if status is not None:
        client.set_terminated(run_id, status)


def child_named(experiment_id: str, parent_run_id: str, name: str) -> str | None:
    """The newest child run of `parent_run_id` named `name`, or None."""
    with contextlib.suppress(Exception):
        runs = MlflowClient().search_runs(
            [experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.run_name = '{name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None
    return None


def search_runs_of(parent_run_id: str, role: str) -> list[mlflow.entities.Run]:
    """The train runs of a search parent with this role (trial or final), any status."""
    parent = tracking.get_run(parent_run_id)
    return MlflowClient().search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{ROLE_TAG}` = '{role}'",
        max_results=5000,
    )


def running_search(experiment_name: str, file_digest: str) -> mlflow.entities.Run | None:
    """The RUNNING parent run of a search of this file (same bytes), newest first."""
    experiment = MlflowClient().get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = MlflowClient().search_runs(
        [experiment.experiment_id],
        f"tags.`{tracking.STEP_TAG}` = 'sweep' and tags.`{tracking.SWEEP_FILE_TAG}` = "
        f"'{file_digest}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def trials_of(experiment_id: str, studies: set[str]) -> list[mlflow.entities.Run]:
    """The trial runs of these studies, under whichever parent run ran them (a search
    resumed after its code changed has a new parent; its studies carry on)."""
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{ROLE_TAG}` = 'trial'", max_results=50000
    )
    return [r for r in runs if r.data.tags.get(STUDY_TAG) in studies]
