"""Rank 0's run as the launcher of a data-parallel training (pipeline/launch.py) sees it.

The launcher is no rank and writes nothing into the run while it trains; it only finishes
what rank 0 could not: a run that rank 0 left RUNNING by dying (SIGKILL), and, under
`mlflow run -e train`, the KILLED that `mlflow run` would overwrite (it watches the
launcher, its own child, not rank 0).
"""

from __future__ import annotations

import contextlib

from pipeline.tracking.processes import end_orphaned_runs, outlast_mlflow_run
from pipeline.tracking.queries import find_run


def end_if_orphaned(run_id: str | None) -> None:
    """End KILLED the run `run_id` if it is RUNNING and its process (rank 0, on this host) is
    gone; best effort, never raises."""
    if run_id is None:
        return
    with contextlib.suppress(Exception):
        if (run := find_run(run_id)) is not None:
            end_orphaned_runs([run])


def keep_killed_under_mlflow_run(run_id: str | None) -> None:
    """Under `mlflow run`, write KILLED back over the FAILED it writes once this process
    exits (processes.outlast_mlflow_run); nothing under any other parent. Never raises."""
    if run_id is not None:
        with contextlib.suppress(Exception):
            outlast_mlflow_run(run_id)
