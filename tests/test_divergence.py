"""A run that diverges (sgd at lr 500 on the sample: its loss is NaN by step 6): the loop stops
it, the run ends FINISHED and tagged, and sweeps and retrain treat it as an outcome."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline import registry
from pipeline.config import TrainConfig
from pipeline.data import load_prepared, to_model_input
from pipeline.experiments import Trial
from pipeline.loop import Diverged, StepLog, TrainState, evaluate, train_epoch
from pipeline.losses import build_loss
from pipeline.models import build_model, training_forward
from pipeline.optimizers import build_optimizer
from pipeline.retrain import load_config, retrain
from pipeline.steps import run_train
from pipeline.sweep import _collect, run_sweep

from .conftest import run_cli

STEPS_PER_EPOCH = math.ceil(3600 / 128)


def _diverging(data: Path, **kwargs) -> TrainConfig:
    return TrainConfig(data=str(data), optimizer="sgd", lr=500, epochs=2, **kwargs)


class Rows:
    """A Tracker that keeps what it is given."""

    def __init__(self) -> None:
        self.rows: list[StepLog] = []

    def log_steps(self, rows: list[StepLog]) -> None:
        self.rows += rows

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


def _sgd_state(lr: float) -> TrainState:
    torch.manual_seed(0)
    model = build_model("seed_cnn", 10)
    optimizer = build_optimizer("sgd", list(model.parameters()), lr, 0.0, 0.0, torch.device("cpu"))
    state = TrainState(model, optimizer, torch.Generator().manual_seed(0))
    state.forward = training_forward(model)  # as `run_train` trains it
    return state


@pytest.mark.parametrize("log_every", [1, 4])
def test_loop_stops_at_the_first_logged_loss_that_is_not_finite(sample_file, log_every):
    data = load_prepared(sample_file)
    n = 16 * 128  # 16 steps: it diverges within 8
    x, y = to_model_input(data.splits["train"].images[:n]), data.splits["train"].labels[:n]
    state, tracker = _sgd_state(500.0), Rows()
    with pytest.raises(Diverged) as info:
        train_epoch(state, x, y, build_loss("cross_entropy"), tracker, log_every=log_every)
    rows = tracker.rows
    assert [r.step for r in rows] == list(range(log_every, info.value.step + 1, log_every))
    assert all(math.isfinite(r.loss) and 0 <= r.accuracy <= 1 for r in rows[:-1])
    last = rows[-1]
    assert not math.isfinite(last.loss) and math.isnan(last.accuracy)
    assert info.value.step == last.step and info.value.step % log_every == 0
    assert 1 < info.value.step <= 8 and state.step == 16  # read at the epoch's end

    # A healthy lr on the same data never raises.
    healthy = Rows()
    train_epoch(_sgd_state(0.01), x, y, build_loss("cross_entropy"), healthy, log_every=log_every)
    assert all(math.isfinite(r.loss) for r in healthy.rows)


def test_evaluate_of_outputs_that_are_not_numbers_has_no_accuracy(sample_file):
    data = load_prepared(sample_file)
    model = build_model("seed_cnn", 10)
    x, y = to_model_input(data.splits["test"].images), data.splits["test"].labels
    healthy = evaluate(model, x, y, build_loss("cross_entropy"), 10)
    assert math.isfinite(healthy.loss) and 0 <= healthy.accuracy <= 1
    with torch.no_grad():
        model[-1].bias.fill_(math.nan)
    broken = evaluate(model, x, y, build_loss("cross_entropy"), 10)
    # argmax of NaN logits picks class 0 for every image: ~10% "accuracy" that means nothing.
    assert math.isnan(broken.loss) and math.isnan(broken.accuracy)
    assert all(math.isnan(a) for a in broken.per_class_accuracy())


def test_diverged_run_stops_early_finished_tagged_and_without_a_model(
    tracking, sample_file, capsys
):
    result = run_train(_diverging(sample_file))
    out = capsys.readouterr().out
    step = result.diverged_at
    assert step is not None and 1 < step < STEPS_PER_EPOCH
    assert f"train: diverged at step {step} (train/loss=nan) in epoch 1 of 2: stopped" in out
    assert math.isnan(result.test_loss) and math.isnan(result.test_accuracy)
    assert result.model_uri is None

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.diverged"] == "true"
    assert run.data.tags["pipeline.diverged_at_step"] == str(step)
    # Every point once, up to and including the first that is not finite; nothing after.
    points = client.get_metric_history(run.info.run_id, "train/loss")
    history = sorted((m.step, m.value) for m in points)
    assert [s for s, _ in history] == list(range(1, step + 1))
    assert all(math.isfinite(v) for _, v in history[:-1]) and math.isnan(history[-1][1])
    accuracy = client.get_metric_history(run.info.run_id, "train/accuracy")
    assert len(accuracy) == step and math.isnan(max(accuracy, key=lambda m: m.step).value)
    # Stopped in epoch 1: no validation point, no second epoch, NaN test metrics, no model.
    assert client.get_metric_history(run.info.run_id, "val/accuracy") == []
    for key in ("test/loss", "test/accuracy"):
        (point,) = client.get_metric_history(run.info.run_id, key)
        assert point.step == step and math.isnan(point.value)
    assert not [k for k in run.data.metrics if "class_accuracy" in k]
    assert client.search_logged_models([run.info.experiment_id]) == []
    assert "time/loop_seconds" in run.data.metrics


def test_divergence_between_logged_steps_is_found_by_the_validation_loss(
    tracking, sample_file, capsys
):
    result = run_train(_diverging(sample_file, log_every=1000))  # no train step is logged
    assert result.diverged_at == STEPS_PER_EPOCH  # the end of epoch 1
    assert "(val/loss=nan) in epoch 1 of 2: stopped" in capsys.readouterr().out
    client = MlflowClient()
    assert client.get_metric_history(result.run_id, "train/loss") == []
    (val,) = client.get_metric_history(result.run_id, "val/loss")
    assert val.step == STEPS_PER_EPOCH and math.isnan(val.value)
    tags = client.get_run(result.run_id).data.tags
    assert tags["pipeline.diverged_at_step"] == str(STEPS_PER_EPOCH)


def test_cli_train_that_diverges_exits_0_and_a_sweep_reads_it_as_diverged(
    tracking, tmp_path, sample_file
):
    proc = run_cli(
        "train", "--data", str(sample_file), "--optimizer", "sgd", "--lr", "500", "--epochs", "2",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # What a `sweep --parallel` trial process prints is what the sweep reads back.
    log = tmp_path / "trial.log"
    log.write_text(proc.stdout + proc.stderr)
    outcome = _collect(Trial("t", TrainConfig(), {}), 0, log)
    (run,) = MlflowClient().search_runs(["0"])
    assert outcome.status == "diverged" and outcome.run_id == run.info.run_id
    assert outcome.message == f"at step {run.data.tags['pipeline.diverged_at_step']}"


def test_sweep_records_a_diverged_trial_as_diverged_and_goes_on(tracking, tmp_path, capsys):
    path = tmp_path / "lr.yaml"
    path.write_text(
        "experiment: lr\nbase: {optimizer: sgd, epochs: 1, log_every: 10}\n"
        "grid: {lr: [0.01, 500]}\n"
    )
    outcomes = run_sweep(path)  # no error: a diverged trial is not a failed one
    assert [(o.trial.name, o.status) for o in outcomes] == [
        ("sgd-cross_entropy-seed_cnn-lr0.01", "ran"),
        ("sgd-cross_entropy-seed_cnn-lr500", "diverged"),
    ]
    out = capsys.readouterr().out
    assert "1 ran, 1 diverged, 0 skipped (already finished), 0 failed" in out
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("lr").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`pipeline.step` = 'sweep'")
    assert parent.info.status == "FINISHED"
    trials = client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))
    assert [t["status"] for t in yaml.safe_load(Path(trials).read_text())] == ["ran", "diverged"]
    table = client.download_artifacts(parent.info.run_id, "compare/table.md", str(tmp_path))
    lines = Path(table).read_text().splitlines()
    assert lines[2].startswith("| **best** | **sgd-cross_entropy-seed_cnn-lr0.01**")
    assert lines[3].startswith("| 2 | sgd-cross_entropy-seed_cnn-lr500 |")
    assert "nan (diverged)" in lines[3]

    # Running it again skips both: a diverged trial is a result, not something to retry.
    again = run_sweep(path)
    assert [o.status for o in again] == ["skipped", "skipped"]


def test_retrain_with_a_diverging_challenger_keeps_the_champion_and_registers_nothing(
    tracking, tmp_path, capsys
):
    config = tmp_path / "retrain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name": "diverging",
                "prep": {"data_dir": str(tmp_path / "data")},
                "train": {"optimizer": "sgd", "lr": 500, "epochs": 1, "log_every": 10},
            }
        )
    )
    result = retrain(load_config(config), lock_dir=tmp_path / "locks")
    assert result.decision == "keep" and result.version == "none"
    assert "challenger diverged at step" in result.reason and "no champion yet" in result.reason
    assert "retrain: keep diverging (no new version): challenger diverged" in (
        capsys.readouterr().out
    )
    assert registry.champion("diverging") is None
    assert MlflowClient().search_model_versions("name = 'diverging'") == []
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["retrain.decision"] == "keep"
    assert run.data.tags["retrain.champion_after"] == "none"
