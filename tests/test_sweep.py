"""Experiment files, `pipeline sweep` and `pipeline compare`, against real MLflow stores.

The end-to-end tests use a real `mlflow server` on 127.0.0.1 and a real sqlite store; the
trials are one epoch of seed_cnn on the offline sample.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import OPTIMIZERS
from pipeline.errors import PipelineError
from pipeline.experiments import load_experiment
from pipeline.sweep import run_sweep

from .conftest import ROOT, assert_one_line_error, run_cli, start_cli

STEPS_PER_EPOCH = math.ceil(3600 / 128)
COMPARE_FILES = {
    "compare/table.csv",
    "compare/table.md",
    "compare/loss_curves.png",
    "compare/val_accuracy.png",
    "compare/metric_by_optimizer_loss.png",
}
VALID = """
experiment: tiny
base: {epochs: 1}
grid: {optimizer: [adam, sgd]}
"""


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- experiment files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("experimnt: x\ngrid: {loss: [mse]}", "unknown key 'experimnt' in the top level"),
        ("grid: {loss: [mse]}", "key 'experiment' must be a non-empty string"),
        ("experiment: x\nbase: {optimiser: adam}\ngrid: {loss: [mse]}",
         "unknown key 'optimiser' in base; valid keys: model, optimizer"),
        ("experiment: x\ngrid: {los: [mse]}", "unknown key 'los' in grid"),
        ("experiment: x\nruns: [{optimizer: adam, epoch: 1}]", "unknown key 'epoch' in runs[0]"),
        ("experiment: x\ndata: {val_frac: 0.1}\ngrid: {loss: [mse]}",
         "unknown key 'val_frac' in data"),
        ("experiment: x\ngrid: {optimizer: [adam, lbfgs]}",
         "grid.optimizer 'lbfgs' is invalid; valid choices: sgd, momentum"),
        ("experiment: x\nbase: {loss: hinge}\ngrid: {optimizer: [adam]}",
         "base.loss 'hinge' is invalid; valid choices: cross_entropy"),
        ("experiment: x\ndata: {val_fraction: 1.5}\ngrid: {loss: [mse]}",
         "data.val_fraction must be between 0 and 1 (exclusive), got 1.5"),
        ("experiment: x\ndata: {dataset: cifar}\ngrid: {loss: [mse]}",
         "data.dataset 'cifar' is invalid; valid choices: mnist-sample"),
        ("experiment: x\nbase: {epochs: two}\ngrid: {loss: [mse]}",
         "base.epochs must be an integer, got 'two'"),
        ("experiment: x\nbase: {epochs: 1.5}\ngrid: {loss: [mse]}",
         "base.epochs must be an integer, got 1.5"),
        ("experiment: x\ngrid: {lr: [0.1, fast]}",
         "grid.lr must be a number or 'auto', got 'fast'"),
        ("experiment: x\nbase: {amp: 1}\ngrid: {loss: [mse]}", "base.amp must be true or false"),
        ("experiment: x\ngrid: {}", "key 'grid' is empty"),
        ("experiment: x\ngrid:", "key 'grid' is empty"),
        ("experiment: x\ngrid: {optimizer: []}", "grid.optimizer must be a non-empty list"),
        ("experiment: x\ngrid: {optimizer: adam}", "grid.optimizer must be a non-empty list"),
        ("experiment: x\nbase: {epochs: 1}", "needs a 'grid' and/or a list of 'runs'"),
        ("experiment: x\nruns: []", "key 'runs' must be a non-empty list"),
        ("experiment: x\nruns: {optimizer: adam}", "key 'runs' must be a non-empty list"),
        ("experiment: x\ngrid: {loss: [mse]}\nseeds: 3", "key 'seeds' must be a non-empty list"),
        ("experiment: x\ngrid: {loss: [mse]}\nseeds: [1, a]", "seeds must be integers, got 'a'"),
        ("experiment: x\nbase: {seed: 1}\ngrid: {loss: [mse]}\nseeds: [1, 2]",
         "key 'seed' is set in base, grid or runs and also by 'seeds'"),
        ("experiment: x\ngrid: {loss: [mse]}\nmetric: accuracy",
         "metric 'accuracy' is not rankable; valid choices: test/accuracy"),
        ("experiment: x\ngrid: {loss: [mse]}\ndirection: up",
         "direction 'up' is invalid; valid choices: max, min"),
        ("experiment: x\nbase: {data: f.pt}\ngrid: {loss: [mse]}", "key 'data' in base is set"),
        ("experiment: x\ngrid: {optimizer: [adam]}\nruns: [{optimizer: adam}]",
         "trial 'adam-cross_entropy-seed_cnn' is listed twice"),
        ("experiment: x\nbase: {momentum: 0.9}\ngrid: {optimizer: [momentum, adam]}",
         "trial 'adam-cross_entropy-seed_cnn': momentum=0.9 does not apply to optimizer 'adam'"),
        ("experiment: x\ngrid: {loss: [mse], label_smoothing: [0.1]}",
         "trial 'adam-mse-seed_cnn': label_smoothing=0.1 applies to loss 'cross_entropy' only"),
        ("experiment: x\ngrid: {epochs: [0]}", "epochs must be >= 1, got 0"),
        ("experiment: x\ngrid: [adam, sgd]", "key 'grid' must be a mapping"),
        ("- experiment: x", "the file must be a mapping"),
        ("experiment: x\ngrid: {loss: [mse}", "not valid YAML at line 2"),
        ("experiment: !!python/object:os.system x\ngrid: {loss: [mse]}", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_experiment_files_fail_naming_file_and_key(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(PipelineError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert needle in message, message
    assert "\n" not in message


def test_missing_experiment_file_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="experiment file '.*nope.yaml' does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_shipped_experiment_files_are_valid():
    optimizers = load_experiment(ROOT / "experiments" / "optimizers.yaml")
    combos = {(t.config.optimizer, t.config.loss) for t in optimizers.trials}
    assert combos == {(o, loss) for o in OPTIMIZERS for loss in ("cross_entropy", "mse")}
    assert {t.config.model for t in optimizers.trials} == {"seed_cnn"}
    assert (optimizers.name, optimizers.metric, optimizers.direction) == (
        "optimizers",
        "test/accuracy",
        "max",
    )
    assert len(load_experiment(ROOT / "experiments" / "losses.yaml").trials) == 15
    assert len(load_experiment(ROOT / "experiments" / "smoke.yaml").trials) == 4


def test_grid_runs_and_seeds_expand_into_named_trials(tmp_path):
    path = _write(
        tmp_path,
        """
experiment: x
base: {epochs: 1, lr: 1e-3}
grid: {optimizer: [adam], loss: [cross_entropy, mse]}
runs: [{optimizer: sgd, lr: auto}]
seeds: [1, 2]
direction: min
metric: test/loss
""",
    )
    exp = load_experiment(path)
    names = [t.name for t in exp.trials]
    assert names == [
        "adam-cross_entropy-seed_cnn-lr0.001-seed1",
        "adam-cross_entropy-seed_cnn-lr0.001-seed2",
        "adam-mse-seed_cnn-lr0.001-seed1",
        "adam-mse-seed_cnn-lr0.001-seed2",
        "sgd-cross_entropy-seed_cnn-lrauto-seed1",
        "sgd-cross_entropy-seed_cnn-lrauto-seed2",
    ]
    assert exp.trials[0].config.lr == 0.001  # YAML reads 1e-3 as text; taken as the number
    assert exp.trials[-1].config.lr is None and exp.trials[-1].config.seed == 2
    assert (exp.metric, exp.direction) == ("test/loss", "min")


def test_dry_run_lists_trials_and_touches_no_store(tracking, tmp_path, capsys):
    assert run_sweep(_write(tmp_path, VALID), dry_run=True) == []
    out = capsys.readouterr().out
    assert "2 trials" in out and "adam-cross_entropy-seed_cnn" in out and "sgd-" in out
    assert [e.name for e in MlflowClient().search_experiments()] == ["Default"]
    assert MlflowClient().search_runs(["0"]) == []


def test_bad_file_on_the_cli_is_one_line_and_creates_nothing(tracking, tmp_path):
    path = _write(tmp_path, "experiment: x\ngrid: {optimizer: [adam, lbfgs]}")
    proc = run_cli("sweep", str(path), cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_line_error(proc, f"{path}: grid.optimizer 'lbfgs' is invalid")
    assert [e.name for e in MlflowClient(tracking).search_experiments()] == ["Default"]
    proc = run_cli("sweep", str(path), "--parallel", "0", cwd=tmp_path)
    assert_one_line_error(proc, "0 is not in the range x>=1")


# --- sweeps against real stores ---------------------------------------------------------


def _by_step(client: MlflowClient, experiment_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id]):
        out.setdefault(run.data.tags["pipeline.step"], []).append(run)
    return out


@pytest.mark.slow
def test_parallel_sweep_against_a_tracking_server(mlflow_server, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"  # the sweep's own temporary folder, to see what it leaves there
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    path = _write(
        tmp_path,
        """
experiment: served
base: {epochs: 1, log_every: 5}
grid: {optimizer: [adam, sgd, adagrad], loss: [mse]}
""",
    )
    proc = run_cli("sweep", str(path), "--parallel", "2", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("served")
    assert client.search_runs(["0"]) == []  # nothing strayed into Default
    runs = _by_step(client, experiment.experiment_id)
    (parent,) = runs["sweep"]
    (prep,) = runs["data_prep"]
    trials = runs["train"]
    assert parent.info.status == "FINISHED" and prep.info.status == "FINISHED"
    assert prep.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(r.info.run_name for r in trials) == [
        "adagrad-mse-seed_cnn",
        "adam-mse-seed_cnn",
        "sgd-mse-seed_cnn",
    ]
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["data_digest"] == prep.data.params["data_digest"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(5, STEPS_PER_EPOCH + 1, 5))
        val = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in val] == [STEPS_PER_EPOCH]  # the epoch's last global step
        assert "test/accuracy" in run.data.metrics
    # Two trials ran at the same time.
    spans = sorted((r.info.start_time, r.info.end_time) for r in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "experiment")}
    assert COMPARE_FILES | {"trials.json", "experiment/exp.yaml"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "compare/table.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    accuracy = [float(r["test/accuracy"]) for r in rows]
    assert accuracy == sorted(accuracy, reverse=True) and rows[0]["rank"] == "best"
    assert {r["run_id"] for r in rows} == {r.info.run_id for r in trials}
    assert "optimizer" in rows[0] and "epochs" not in rows[0]  # only the params that vary
    assert "ranked by test/accuracy (max)" in proc.stdout
    # Each trial's output went to the parent run, and no folder was left behind.
    logs = {a.path for a in client.list_artifacts(parent.info.run_id, "trial_logs")}
    assert logs == {f"trial_logs/{r.info.run_name}.log" for r in trials}
    assert not list(tmp.glob("pipeline-*"))


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_only_the_missing_trials(tracking, tmp_path):
    path = _write(
        tmp_path,
        """
experiment: resumable
base: {epochs: 1, log_every: 10}
grid: {optimizer: [adam, sgd, rmsprop]}
""",
    )
    # Interrupted while running trials in 2 processes; resumed in this one.
    sweep = start_cli("sweep", path, "--parallel", 2, cwd=tmp_path)
    client = MlflowClient(tracking)
    deadline = time.time() + 120
    while time.time() < deadline and not _finished_trials(client):
        assert sweep.poll() is None, sweep.communicate()[1][-3000:]
        time.sleep(0.3)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 143, err[-3000:]
    before = {r.info.run_name: r.info.run_id for r in _finished_trials(client)}
    assert 1 <= len(before) < 3
    experiment_id = client.get_experiment_by_name("resumable").experiment_id
    (parent,) = _by_step(client, experiment_id)["sweep"]
    assert parent.info.status == "KILLED"
    statuses = {r.info.status for r in client.search_runs([experiment_id])}
    assert "RUNNING" not in statuses  # the trial processes were stopped too, their runs KILLED

    proc = run_cli("sweep", str(path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming run {parent.info.run_id}" in proc.stdout
    assert f"{len(before)} already finished, {3 - len(before)} to run" in proc.stdout
    after = _finished_trials(client)
    assert sorted(r.info.run_name for r in after) == [
        "adam-cross_entropy-seed_cnn",
        "rmsprop-cross_entropy-seed_cnn",
        "sgd-cross_entropy-seed_cnn",
    ]  # each trial finished exactly once: nothing ran twice
    assert {n: i for n, i in ((r.info.run_name, r.info.run_id) for r in after) if n in before} == (
        before
    )
    runs = _by_step(client, experiment_id)
    assert len(runs["sweep"]) == 1 and runs["sweep"][0].info.status == "FINISHED"
    assert len(runs["data_prep"]) == 1  # prepared once, reused on resume
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in after)


def _finished_trials(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("resumable")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        "tags.`pipeline.step` = 'train' and attributes.status = 'FINISHED'",
    )


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tracking, tmp_path, monkeypatch):
    import torch

    import pipeline.steps

    real_epoch = pipeline.steps.train_epoch

    def sgd_breaks(state, *args, **kwargs):
        if type(state.optimizer) is torch.optim.SGD:
            raise RuntimeError("injected failure in the sgd trial")
        return real_epoch(state, *args, **kwargs)

    monkeypatch.setattr(pipeline.steps, "train_epoch", sgd_breaks)
    path = _write(tmp_path, VALID.replace("epochs: 1", "epochs: 1, log_every: 10"))
    with pytest.raises(PipelineError) as info:
        run_sweep(path)
    message = str(info.value)
    assert message.startswith("1 of 2 trials failed: sgd-cross_entropy-seed_cnn (RuntimeError")
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    runs = _by_step(client, experiment_id)
    status = {r.info.run_name: r.info.status for r in runs["train"]}
    assert status == {
        "adam-cross_entropy-seed_cnn": "FINISHED",
        "sgd-cross_entropy-seed_cnn": "FAILED",
    }
    (parent,) = runs["sweep"]
    assert parent.info.status == "FAILED"
    compared = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert compared == COMPARE_FILES
    trials_file = client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))
    trials = json.loads(Path(trials_file).read_text())
    assert [t["status"] for t in trials] == ["ran", "failed"]

    # compare on the experiment: bad metric and bad target are one-line errors.
    from pipeline.compare import compare

    with pytest.raises(PipelineError, match="no run has metric 'test/acc'; metrics: "):
        compare("tiny", metric="test/acc")
    with pytest.raises(PipelineError, match="'nope' is neither an experiment nor a run id"):
        compare("nope")
    result = compare("tiny", metric="test/loss")
    assert result.direction == "min" and len(result.runs) == 1
    assert client.get_run(result.log_run_id).data.tags["pipeline.step"] == "compare"


@pytest.mark.slow
def test_mlflow_run_sweep_entry_point(tracking, tmp_path):
    # `mlflow run` works in the project folder: keep the prepared data out of it.
    text = VALID.replace("[adam, sgd]", "[adam]").replace("tiny", "entry")
    path = _write(tmp_path, f"{text}\ndata: {{data_dir: {tmp_path / 'data'}}}\n")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def mlflow_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "sweep",
             f"-Pconfig={path}", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    proc = mlflow_run()  # the run lands in Default, not the file's experiment
    assert proc.returncode != 0
    assert "names experiment 'entry' but `mlflow run` logs to 'Default'" in proc.stderr
    client = MlflowClient(tracking)
    assert [r.info.status for r in client.search_runs(["0"])] == ["FAILED"]

    proc = mlflow_run("--experiment-name", "entry")
    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment_id = client.get_experiment_by_name("entry").experiment_id
    runs = _by_step(client, experiment_id)
    (parent,) = runs["sweep"]
    (trial,) = runs["train"]
    assert parent.info.status == trial.info.status == "FINISHED"
    assert parent.data.tags["mlflow.project.entryPoint"] == "sweep"
    assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
    compared = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert compared == COMPARE_FILES
