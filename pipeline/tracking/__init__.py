"""Every MLflow tracking call of the project lives in this package (registry calls: registry.py).

One module per job:

- `tags`: the names of the tags the project writes;
- `versions`: library versions, environment and code digest of a run;
- `connection`: opening the tracking store (creation serialised between processes);
- `writer`: per-step metrics written by a helper process, so the loop only appends;
- `points`: that process's write of metric points into a SQL store (as `log_batch` would);
- `runs`: a run's life: opened or adopted, written to, always ended;
- `processes`: which process owns a run, and ending runs whose process is gone;
- `experiments`: experiments found, created, marked as model training;
- `queries`: reading runs back;
- `artifacts`: files, evaluations and the logged model;
- `resume`: resuming a run: dead or alive, its last logged steps, its checkpoint artifacts;
- `search`: a search's trial and final runs: their tags and states, and finding them;
- `ranks`: rank 0's run as the launcher of a data-parallel training sees it;
- `spool`: what a run could not write to an unreachable server, kept and written later.

Every public name is also reachable as `pipeline.tracking.<name>`, imported on first use:
`import pipeline.tracking.spool` (every CLI start) and the writer process stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.tracking import spool

_MODULES = ("tags", "versions", "connection", "writer", "runs", "processes", "experiments",
            "queries", "artifacts", "resume", "search", "ranks")  # fmt: skip
_EXPORTS = {
    "tags": (
        "CODE_VERSION_TAG", "ENTRY_POINTS", "ENTRY_POINT_TAG", "ERROR_TAG", "EXPERIMENT_KIND_TAG",
        "MODEL_TRAINING", "PROCESS_TAG", "STEP_TAG", "STOPPED_BY_TAG", "SWEEP_FILE_TAG",
    ),
    "versions": ("code_version", "version_tags"),
    "connection": ("open_store", "open_store_in_background", "tracking_uri"),
    "writer": ("MetricWriter", "MlflowTracker", "WriterProcess", "keep_writers", "writer_process"),
    "runs": (
        "Run", "adoption_problem", "generated_name", "log_metrics", "log_params",
        "mark_not_started", "set_tags", "start_run",
    ),
    "processes": (
        "MLFLOW_RUN_ID", "end_orphaned_runs", "fail_pending_models", "pending_models",
        "mlflow_run_pid", "process_alive", "process_tag",
    ),
    "experiments": (
        "compare_run", "create_finished_run", "ensure_experiment", "experiment_by_name",
        "experiment_name", "mark_model_training",
    ),
    "queries": (
        "canonical", "find_finished_run", "find_prep_run", "find_run", "find_sweep",
        "find_unfinished_sweep", "finished_runs", "get_run", "metric_history", "params_match",
        "running_children", "running_retrains", "same_value", "train_runs",
    ),
    "artifacts": (
        "DATA_CACHE_ENV", "class_metric_names", "import_end_of_run", "load_json_artifact",
        "log_artifact", "log_artifacts_to", "log_dict", "log_evaluation", "log_model",
        "log_prepared_data", "prepared_file_of", "split_dataset",
    ),
    "ranks": ("end_if_orphaned", "keep_killed_under_mlflow_run"),
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["spool", *_MODULES, *_WHERE]

# Bounded HTTP retries and quiet MLflow loggers, before any MLflow call of this process.
spool.configure()


def __getattr__(name: str) -> Any:
    """`tracking.<name>` from the module that defines it, imported on first use (PEP 562)."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # next time a plain attribute
    return value
