"""Names of the tags this project writes on MLflow runs and experiments."""

from __future__ import annotations

STEP_TAG = "pipeline.step"
CODE_VERSION_TAG = "pipeline.code_version"
SWEEP_FILE_TAG = "pipeline.sweep_file_sha256"
ENTRY_POINT_TAG = "mlflow.project.entryPoint"
ENTRY_POINTS = ("main", "data_prep", "train", "retrain", "sweep")  # each runs the step it names
ERROR_TAG = "pipeline.error"
STOPPED_BY_TAG = "pipeline.stopped_by"  # the signal that ended a KILLED run
PROCESS_TAG = "pipeline.process"  # host:pid:start time of the process that owns the run
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The kind the MLflow UI (3.x) opens on the runs table for; it opens an experiment without
# a kind, or with a GenAI one, on its GenAI overview. Values from the UI's ExperimentKind.
MODEL_TRAINING = "custom_model_development"
