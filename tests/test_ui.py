"""What the MLflow UI and the terminal show: experiments marked as model training, validation
on train's x axis, the logged model's own metrics and data set, help and tables that read."""

from __future__ import annotations

import re

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline import tracking as tr
from pipeline.cli import aligned, cli
from pipeline.compare import _by_epoch
from pipeline.config import TrainConfig
from pipeline.plots import Series
from pipeline.steps import run_train

from .conftest import ROOT

KIND = "mlflow.experimentKind"


def test_every_experiment_the_pipeline_uses_is_marked_model_training(tracking):
    client = MlflowClient()
    # A run in Default (no experiment named), as `pipeline train` makes
    with tr.start_run("train", "a-run"):
        pass
    assert client.get_experiment("0").tags[KIND] == "custom_model_development"
    # A new one from ensure_experiment (a sweep), one `mlflow run` created without the tag,
    # one whose kind the UI only guessed, and one somebody chose as GenAI.
    assert client.get_experiment(tr.ensure_experiment("new")).tags[KIND] == tr.MODEL_TRAINING
    plain = client.create_experiment("made-by-mlflow-run")
    guessed = client.create_experiment("guessed", tags={KIND: "genai_development_inferred"})
    chosen = client.create_experiment("chosen", tags={KIND: "genai_development"})
    for name in ("made-by-mlflow-run", "guessed", "chosen"):
        tr.ensure_experiment(name)
    assert client.get_experiment(plain).tags[KIND] == tr.MODEL_TRAINING
    assert client.get_experiment(guessed).tags[KIND] == tr.MODEL_TRAINING
    assert client.get_experiment(chosen).tags[KIND] == "genai_development"
    with tr.start_run("train", "another", experiment_id=plain):
        pass
    assert client.get_experiment(plain).tags[KIND] == tr.MODEL_TRAINING


def test_the_logged_model_has_its_test_metrics_data_set_and_params(tracking, sample_file):
    result = run_train(TrainConfig(data=str(sample_file), epochs=1, log_every=1000))
    client = MlflowClient()
    run = client.get_run(result.run_id)
    (model,) = client.search_logged_models([run.info.experiment_id])
    last = -(-3600 // 128)
    metrics = {m.key: m for m in model.metrics}
    test = metrics["test/accuracy"]
    assert test.value == pytest.approx(result.test_accuracy) and test.step == last
    assert test.dataset_name == f"{sample_file.stem}/test" and len(test.dataset_digest) == 16
    assert {"test/loss", "test/class_accuracy/7", "val/accuracy", "val/loss", "epoch"} <= set(
        metrics
    )
    # the run's own bookkeeping stays the run's
    assert not [k for k in metrics if k.startswith(("time/", "system/"))]
    assert model.params["optimizer"] == "adam" and model.params["effective_lr"] == "0.001"
    # the test split is an input of the run once, and the model is its output, not an input
    inputs = [(d.dataset.name, [t.value for t in d.tags]) for d in run.inputs.dataset_inputs]
    assert inputs == [(f"{sample_file.stem}/test", ["test"])]
    assert run.inputs.model_inputs == []
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, last)]
    # each point once on the run: attaching to the model did not log a step twice
    assert len(client.get_metric_history(result.run_id, "test/accuracy")) == 1
    assert len(client.get_metric_history(result.run_id, "val/accuracy")) == 1


def test_compare_charts_validation_by_epoch_from_the_epoch_metric(tracking):
    with mlflow.start_run() as now:  # val/* at each epoch's last global step, with `epoch`
        for epoch, step, acc in [(1, 29, 0.8), (2, 58, 0.9)]:
            mlflow.log_metrics({"val/accuracy": acc, "epoch": epoch}, step=step)
    with mlflow.start_run() as before:  # a run from before: val/* at step = epoch
        for epoch, acc in [(1, 0.7), (2, 0.75)]:
            mlflow.log_metrics({"val/accuracy": acc}, step=epoch)
    series = [
        Series(r.info.run_id, "x", "adam", "mse", tr.metric_history(r.info.run_id, "val/accuracy"))
        for r in (now, before)
    ]
    assert [s.points for s in _by_epoch(series)] == [[(1, 0.8), (2, 0.9)], [(1, 0.7), (2, 0.75)]]


def test_help_shows_each_command_description_in_full():
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.output.split("Commands:\n")[1]
    assert "..." not in commands
    for name, command in cli.commands.items():
        if command.hidden:
            continue
        line = next(x for x in commands.splitlines() if x.split()[0] == name)
        assert line.split(None, 1)[1] == command.short_help, line
        assert len(line) <= 80


def test_tables_line_up_in_columns():
    rows = [["version", "decision", "reason"], ["v10", "promote", "a b"], ["v2", "keep", "-"]]
    lines = aligned(rows)
    assert lines == ["version  decision  reason", "v10      promote   a b", "v2       keep      -"]


def test_readme_screenshots_exist_and_are_small():
    readme = (ROOT / "README.md").read_text()
    shots = re.findall(r"!\[[^\]]*\]\((docs/ui/[^)]+\.png)\)", readme)
    assert len(shots) >= 3, shots
    sizes = [(ROOT / s).stat().st_size for s in shots]
    assert all(0 < n < 200_000 for n in sizes) and sum(sizes) < 600_000, sizes
