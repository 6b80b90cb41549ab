"""`pipeline compare` against a real sqlite store: values that are not finite rank last, the
direction follows the metric, runs are keyed by id, and a comparison leaves behind only the
artifacts it reports."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import plots
from pipeline.compare import _rank, compare, format_markdown, run_labels, write_csv
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.steps import run_train
from pipeline.sweep import run_sweep
from pipeline.tracking import get_run, load_json_artifact

from .conftest import run_cli

COMPARE_FILES = ("table.csv", "table.md", "loss_curves.png", "val_accuracy.png",
                 "metric_by_optimizer_loss.png")  # fmt: skip


def _left(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith("pipeline-")]


def _train(data: Path, **kwargs) -> str:
    return run_train(TrainConfig(data=str(data), log_every=10, **kwargs)).run_id


def _runs(experiment: str = "Default") -> list:
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id])


def _artifacts(run_id: str, path: str) -> set[str]:
    return {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, path) if not a.is_dir}


def test_a_diverged_run_never_ranks_best_in_either_direction_or_order(
    tracking, tmp_path, sample_file, no_temp_left
):
    healthy = _train(sample_file, epochs=1)
    diverged = _train(sample_file, optimizer="sgd", lr=500, epochs=2)

    # The example, on the command line.
    proc = run_cli("compare", "Default", "--metric", "test/loss", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "ranked by test/loss (min); 1 without a finite test/loss, ranked last" in lines[0]
    assert lines[3].startswith("best  adam-cross_entropy-seed_cnn")
    assert lines[4].startswith("2     sgd-cross_entropy-seed_cnn")
    assert "nan (diverged)" in lines[4]
    assert _left(no_temp_left) == []

    # Whatever order MLflow returns them in, by any metric, either way round.
    runs = [r for r in _runs() if r.data.tags.get("pipeline.step") == "train"]
    for metric in ("test/loss", "test/accuracy", "train/loss"):
        for direction in ("min", "max"):
            for order in (runs, runs[::-1]):
                ranked = _rank("t", order, metric, direction)
                assert [r.info.run_id for r in ranked.runs] == [healthy, diverged]
                assert ranked.rows()[0]["rank"] == "best"
                assert ranked.rows()[1][metric] == "nan (diverged)"

    # Only diverged runs: nobody is best, and the CSV keeps numbers as numbers.
    only = _rank("t", [r for r in runs if r.info.run_id == diverged], "test/accuracy", "max")
    assert only.rows()[0]["rank"] == "1"
    csv_path = tmp_path / "only.csv"
    write_csv(only, csv_path)
    (row,) = csv.DictReader(csv_path.read_text().splitlines())
    assert math.isnan(float(row["test/accuracy"])) and int(row["diverged_at_step"]) > 1
    assert "**" not in format_markdown(only)


def test_same_named_runs_are_keyed_by_id_and_labelled_by_what_differs(
    tracking, tmp_path, sample_file, no_temp_left
):
    one = _train(sample_file, epochs=1)
    two = _train(sample_file, epochs=2)
    client = MlflowClient()
    assert client.get_run(one).info.run_name == client.get_run(two).info.run_name

    # Errors before anything is drawn leave no run behind.
    with pytest.raises(PipelineError, match="no run has metric 'test/acc'"):
        compare("Default", metric="test/acc")
    assert len(_runs()) == 2

    result = compare("Default", out=tmp_path / "out")  # crashed in plots.loss_curves before
    assert {result.label(r) for r in result.runs} == {
        "adam-cross_entropy-seed_cnn epochs=1",
        "adam-cross_entropy-seed_cnn epochs=2",
    }
    assert _artifacts(result.log_run_id, "compare") == set(COMPARE_FILES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(COMPARE_FILES)
    compare_runs = [r for r in _runs() if r.data.tags["pipeline.step"] == "compare"]
    assert [r.info.run_id for r in compare_runs] == [result.log_run_id]

    # Comparing again, or by another metric, reuses that one run; each metric has its folder.
    again = compare("Default")
    by_loss = compare("Default", metric="test/loss")
    assert again.log_run_id == by_loss.log_run_id == result.log_run_id
    assert by_loss.direction == "min" and by_loss.artifact_dir == "compare/test-loss"
    assert _artifacts(result.log_run_id, "compare/test-loss") == set(COMPARE_FILES)
    assert len(_runs()) == 3
    assert _left(no_temp_left) == []


def test_run_labels_add_the_run_id_where_params_are_the_same_too(tracking):
    ids = []
    for seed, epochs in ((1, 1), (1, 1), (2, 1), (1, 1)):
        name = "adam-cross_entropy-seed_cnn" if len(ids) < 3 else "other"
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params({"seed": seed, "epochs": epochs})
        ids.append(run.info.run_id)
    labels = run_labels([get_run(i) for i in ids])
    assert labels == {
        ids[0]: f"adam-cross_entropy-seed_cnn seed=1 #{ids[0][:8]}",
        ids[1]: f"adam-cross_entropy-seed_cnn seed=1 #{ids[1][:8]}",
        ids[2]: "adam-cross_entropy-seed_cnn seed=2",
        ids[3]: "other",
    }


def test_compare_of_a_sweep_by_another_metric_goes_beside_its_own(tracking, tmp_path, no_temp_left):
    path = tmp_path / "two.yaml"
    path.write_text(
        "experiment: two\ndata: {data_dir: data}\n"
        "base: {epochs: 1, log_every: 10}\ngrid: {optimizer: [adam, adagrad]}\n"
    )
    run_sweep(path)
    client = MlflowClient()
    (parent,) = [r for r in _runs("two") if r.data.tags["pipeline.step"] == "sweep"]
    parent_id = parent.info.run_id
    own = Path(client.download_artifacts(parent_id, "compare/table.csv", str(tmp_path)))
    own_text = own.read_text()

    # The README's example: by test/loss the lowest loss is best, and the sweep's own stays.
    proc = run_cli("compare", parent_id, "--metric", "test/loss", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranked by test/loss (min)" in proc.stdout
    assert f"logged to run {parent_id} under compare/test-loss/" in proc.stdout
    by_loss = client.download_artifacts(parent_id, "compare/test-loss/table.csv", str(tmp_path))
    rows = list(csv.DictReader(Path(by_loss).read_text().splitlines()))
    losses = [float(r["test/loss"]) for r in rows]
    assert losses == sorted(losses) and rows[0]["rank"] == "best"
    again = client.download_artifacts(parent_id, "compare/table.csv", str(tmp_path / "again"))
    assert Path(again).read_text() == own_text
    own_rows = list(csv.DictReader(own_text.splitlines()))
    accuracy = [float(r["test/accuracy"]) for r in own_rows]
    assert accuracy == sorted(accuracy, reverse=True)

    # Its own metric keeps its own direction and folder; a given direction gets its own.
    assert compare(parent_id).artifact_dir == "compare"
    flipped = compare(parent_id, metric="test/accuracy", direction="min")
    assert flipped.artifact_dir == "compare/test-accuracy-min"
    assert [r["rank"] for r in flipped.rows()] == ["best", "2"]
    assert len([r for r in _runs("two") if r.data.tags["pipeline.step"] == "compare"]) == 0
    assert _left(no_temp_left) == []


def test_load_json_artifact_leaves_no_temp_folder(tracking, no_temp_left):
    with mlflow.start_run() as run:
        mlflow.log_dict([{"a": 1}], "trials.json")
    assert load_json_artifact(run.info.run_id, "trials.json") == [{"a": 1}]
    assert load_json_artifact(run.info.run_id, "missing.json") is None
    assert _left(no_temp_left) == []


# --- the charts, without MLflow ---------------------------------------------------------


def _series(key, label, points, optimizer="adam", diverged=False):
    return plots.Series(key, label, optimizer, "cross_entropy", points, diverged)


def test_charts_key_runs_by_id_and_never_draw_a_value_that_is_not_finite(tmp_path):
    same = "adam-cross_entropy-seed_cnn"
    curves = [
        _series("a", f"{same} epochs=1", [(1, 2.3), (2, 1.0)]),
        _series("b", f"{same} epochs=2", [(1, 2.3), (2, 1.0), (3, 0.8), (4, 0.5)]),
        _series("c", "sgd", [(1, 2.3), (2, 1e30), (3, math.nan)], "sgd", diverged=True),
        _series("d", "sgd all nan", [(1, math.nan)], "sgd", diverged=True),
    ]
    plots.loss_curves(curves, tmp_path / "loss.png")
    plots.val_accuracy(curves, tmp_path / "val.png")
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "val.png").stat().st_size

    finals = [
        _series("a", "a", [(0, 0.8)]),
        _series("b", "b", [(0, math.nan)], diverged=True),  # same bar as a: never averaged in
        _series("c", "c", [(0, math.inf)], "sgd", diverged=True),  # a bar of nothing finite
    ]
    heights = plots.metric_bars(finals, "test/accuracy", tmp_path / "bars.png")
    assert heights == {("adam", "cross_entropy"): 0.8}
