"""Searches (pipeline/search): experiment files' `search` sections, Optuna studies in real
sqlite storages, pruned/diverged/final child runs in real MLflow stores, resuming after
SIGTERM, `--workers`, and the statistics `compare` reports over seeds."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import stats
from pipeline.compare import compare, group_rows
from pipeline.errors import PipelineError
from pipeline.experiments import load_experiment
from pipeline.sweep import run_sweep

from .conftest import assert_one_line_error, run_cli, start_cli

STEPS_PER_EPOCH = math.ceil(3600 / 128)  # the offline sample's train split, batch 128

SEARCH = """
experiment: {name}
base: {{epochs: 2, log_every: 10}}
search:
  sampler: grid
  group_by: [optimizer]
  space:
    optimizer: [adam, sgd]
    lr: [0.003, 1.0e-6, 500.0]
  pruner: median
  final: {{seeds: 2}}
"""


def _write(tmp_path: Path, text: str, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- search sections --------------------------------------------------------------------

HEAD = "experiment: x\nsearch:\n"


@pytest.mark.parametrize(
    "body, needle",
    [
        ("  sampler: anneal\n  n_trials: 2\n  space: {lr: [0.1]}",
         "search.sampler 'anneal' is invalid; valid choices: grid, random, tpe, qmc, gp"),
        ("  n_trials: 2\n  space: {lr: [0.1]}\n  pruner: asha",
         "search.pruner 'asha' is invalid; valid choices: median, hyperband, none"),
        ("  space: {lr: [0.1]}", "search.n_trials is missing"),
        ("  n_trials: 0\n  space: {lr: [0.1]}", "search.n_trials must be an integer between 1"),
        ("  n_trials: 2", "search.space must be a mapping"),
        ("  n_trials: 2\n  space: {lrate: [0.1]}", "unknown key 'lrate' in search.space"),
        ("  n_trials: 2\n  space: {lr: {log_uniform: [0, 1]}}",
         "search.space.lr.log_uniform must be > 0"),
        ("  n_trials: 2\n  space: {lr: {log_uniform: [1, 0.1]}}", "with low < high"),
        ("  n_trials: 2\n  space: {lr: {normal: [0, 1]}}",
         "search.space.lr must be a list of choices or one of"),
        ("  n_trials: 2\n  space: {epochs: {uniform: [1, 3]}}", "epochs is an integer; use int"),
        ("  n_trials: 2\n  space: {optimizer: [adam, lbfgs]}",
         "search.space.optimizer 'lbfgs' is invalid; valid choices: sgd"),
        ("  n_trials: 2\n  space: {seed: [1, 2]}", "seed cannot be searched"),
        ("  n_trials: 2\n  space: {lr: [0.1]}\n  group_by: [optimizer]",
         "search.group_by key 'optimizer' is not a list of choices in search.space"),
        ("  n_trials: 2\n  space: {optimizer: [adam], lr: [0.1]}\n  group_by: [optimizer]\n"
         "  final: {seeds: 0}", "search.final.seeds must be an integer between 1 and 1000"),
        ("  n_trials: 2\n  space: {lr: [0.1]}\n  final: {sedes: 2}",
         "unknown key 'sedes' in search.final"),
        ("  sampler: grid\n  n_trials: 5\n  space: {lr: [0.1, 0.01]}",
         "search.n_trials 5 does not match the grid"),
        ("  sampler: grid\n  space: {lr: {log_uniform: [0.001, 0.1]}}",
         "sampler grid needs lists of choices; search.space.lr is a range"),
        ("  n_trials: 2\n  space: {optimizer: [adam, nesterov], lr: [0.1],\n"
         "    momentum: {uniform: [0, 0.9]}}\n  group_by: [optimizer]",
         "group 'nesterov': optimizer 'nesterov' needs momentum > 0"),
        ("  n_trials: 2\n  space: {lr: [0.1]}\n  storage: optuna.db",
         "search.storage must be a database URL"),
        ("  n_trials: 2\n  space: {lr: [0.1]}\ngrid: {loss: [mse]}",
         "key 'grid' cannot be used with 'search'"),
        ("  n_trials: 2\n  space: {lr: [0.1]}\nmetric: train/loss",
         "metric 'train/loss' cannot guide a search"),
        ("  n_trials: 2\n  space: {lr: {uniform: [0.1, 1], when: {optimiser: [sgd]}}}",
         "unknown key 'optimiser' in search.space.lr.when"),
    ],
)  # fmt: skip
def test_bad_search_sections_fail_in_one_line_naming_file_and_key(tmp_path, body, needle):
    path = _write(tmp_path, HEAD + body)
    with pytest.raises(PipelineError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and needle in message, message
    assert "\n" not in message


def test_bad_search_on_the_cli_is_one_line_and_creates_nothing(tracking, tmp_path):
    path = _write(tmp_path, HEAD + "  sampler: anneal\n  n_trials: 2\n  space: {lr: [0.1]}")
    proc = run_cli("sweep", str(path), cwd=tmp_path)
    assert_one_line_error(proc, "search.sampler 'anneal' is invalid")
    good = _write(tmp_path, SEARCH.format(name="s"), "good.yaml")
    proc = run_cli("sweep", str(good), "--storage", "nosuchdb://x/y", cwd=tmp_path)
    assert_one_line_error(proc, "cannot open the study storage nosuchdb://x/y")
    assert [e.name for e in MlflowClient(tracking).search_experiments()] == ["Default"]
    assert MlflowClient(tracking).search_runs(["0"]) == []
    assert not (tmp_path / "optuna.db").exists()


def test_worker_without_a_running_search_is_one_line(tracking, tmp_path):
    path = _write(tmp_path, SEARCH.format(name="nothing-yet"))
    proc = run_cli("worker", str(path), cwd=tmp_path)
    assert_one_line_error(proc, "no running search of search.yaml in experiment 'nothing-yet'")
    proc = run_cli("sweep", str(path), "--workers", "2", "--parallel", "2", cwd=tmp_path)
    assert_one_line_error(proc, "--parallel starts a process per trial, --workers keeps N")


def test_groups_search_only_what_applies_to_them(tmp_path):
    exp = load_experiment(_write(tmp_path, """
experiment: x
search:
  n_trials: 3
  group_by: [optimizer, loss]
  space:
    optimizer: [sgd, momentum, adam]
    loss: [cross_entropy, mse]
    lr: {log_uniform: [1.0e-4, 1.0]}
    momentum: {uniform: [0.5, 0.99], when: {optimizer: [momentum]}}
    label_smoothing: [0.0, 0.1]
"""))  # fmt: skip
    dims = {g.name: [d.key for d in g.dims] for g in exp.search.groups}
    assert dims == {
        "sgd-cross_entropy": ["lr", "label_smoothing"],
        "sgd-mse": ["lr"],
        "momentum-cross_entropy": ["lr", "momentum", "label_smoothing"],
        "momentum-mse": ["lr", "momentum"],
        "adam-cross_entropy": ["lr", "label_smoothing"],
        "adam-mse": ["lr"],
    }
    assert exp.search.objective == "val/accuracy" and exp.search.n_trials == 3


# --- statistics, by hand --------------------------------------------------------------------


def test_group_statistics_match_values_computed_by_hand():
    # mean 0.82, s = 0.02, t(0.975, 2) = 4.302653 (tables), half-width 4.302653 * 0.02 / sqrt(3)
    a = stats.GroupStats("a", "a", [0.80, 0.82, 0.84])
    assert a.mean == pytest.approx(0.82) and a.std == pytest.approx(0.02)
    assert a.interval == pytest.approx((0.82 - 0.0496828, 0.82 + 0.0496828), abs=1e-6)
    # mean 0.70, s = 0.01: [0.6751585, 0.7248415]; no overlap with a: ranked below it
    b = stats.GroupStats("b", "b", [0.69, 0.70, 0.71])
    # mean 0.78, s = 0.03: [0.7054758, 0.8545242]; overlaps a: not distinguishable
    c = stats.GroupStats("c", "c", [0.75, 0.78, 0.81])
    d = stats.GroupStats("d", "d", [0.99, math.nan, 0.98])  # one seed diverged
    e = stats.GroupStats("e", "e", [0.5])  # one seed: no interval
    ranked = stats.rank_groups([d, b, e, c, a], "max")
    assert [(g.key, g.rank) for g in ranked] == [
        ("a", "best"), ("c", "~best"), ("b", "3"), ("e", "~best"), ("d", "nan")
    ]  # fmt: skip
    assert b.interval == pytest.approx((0.6751585, 0.7248415), abs=1e-6)
    assert math.isnan(d.mean) and d.not_finite == 1
    assert e.interval == (-math.inf, math.inf)
    # minimising: the lowest mean is best
    assert stats.rank_groups([a, b], "min")[0].key == "b"


def test_compare_reports_group_statistics_of_seeded_runs(tracking, tmp_path):
    client = MlflowClient()
    values = {"adam": [0.80, 0.82, 0.84], "sgd": [0.69, 0.70, 0.71], "nadam": [0.9, math.nan]}
    for optimizer, accs in values.items():
        for seed, acc in enumerate(accs, 1):
            run = client.create_run("0", run_name=f"{optimizer}-cross_entropy-seed_cnn-seed{seed}",
                                    tags={"pipeline.step": "train"})  # fmt: skip
            for k, v in {"optimizer": optimizer, "loss": "cross_entropy", "seed": seed}.items():
                client.log_param(run.info.run_id, k, v)
            client.log_metric(run.info.run_id, "test/accuracy", acc, step=10)
            for step in (1, 5, 10):
                client.log_metric(run.info.run_id, "train/loss", 2.0 / step + seed / 10, step=step)
            client.set_terminated(run.info.run_id, "FINISHED")
    result = compare("Default", out=tmp_path / "out")
    rows = {r["group"]: r for r in group_rows(result)}
    assert rows["adam-cross_entropy-seed_cnn"] | {} == rows["adam-cross_entropy-seed_cnn"]
    adam, sgd = rows["adam-cross_entropy-seed_cnn"], rows["sgd-cross_entropy-seed_cnn"]
    assert (adam["rank"], adam["n"], adam["mean"], adam["std"]) == ("best", "3", "0.8200", "0.0200")
    assert (adam["ci95_low"], adam["ci95_high"]) == ("0.7703", "0.8697")
    assert (sgd["rank"], sgd["ci95_low"], sgd["ci95_high"]) == ("2", "0.6752", "0.7248")
    nadam = rows["nadam-cross_entropy-seed_cnn"]
    assert nadam["rank"] == "nan" and nadam["mean"] == "nan (1 of 2 not finite)"
    assert list(rows) == ["adam-cross_entropy-seed_cnn", "sgd-cross_entropy-seed_cnn",
                          "nadam-cross_entropy-seed_cnn"]  # fmt: skip
    out = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"groups.csv", "groups.md", "metric_by_group.png", "loss_band_over_seeds.png"} <= out


# --- searches against real stores ------------------------------------------------------------


def _runs(client: MlflowClient, experiment: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], max_results=1000)


@pytest.mark.slow
def test_search_prunes_records_diverged_and_reruns_the_best_with_seeds(tracking, tmp_path):
    path = _write(tmp_path, SEARCH.format(name="searched"))
    outcomes = run_sweep(path)
    client = MlflowClient()
    runs = _runs(client, "searched")
    assert _runs(client, "Default") == []
    (parent,) = [r for r in runs if r.data.tags["pipeline.step"] == "sweep"]
    assert parent.info.status == "FINISHED"
    trials = {
        r.info.run_name: r for r in runs if r.data.tags.get("pipeline.search_role") == "trial"
    }
    assert sorted(trials) == [f"{o}-t{i}" for o in ("adam", "sgd") for i in range(3)]
    state = {n: (r.info.status, r.data.tags["pipeline.trial_state"]) for n, r in trials.items()}
    # grid order: lr 0.003 completes, 1e-6 is worse than the median after epoch 1, 500 diverges
    assert state["adam-t0"] == state["sgd-t0"] == ("FINISHED", "complete")
    assert state["adam-t1"] == state["sgd-t1"] == ("KILLED", "pruned")
    assert trials["adam-t1"].data.tags["pipeline.pruned_at_epoch"] == "1"
    assert state["sgd-t2"] == ("FINISHED", "diverged")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs
               if r.data.tags["pipeline.step"] != "sweep")  # fmt: skip

    # Optuna holds the same outcomes, in a storage beside the tracking store
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.load_study(study_name=trials["sgd-t0"].data.tags["pipeline.optuna_study"],
                              storage=storage)  # fmt: skip
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert study.best_trial.params == {"lr": 0.003}

    finals = [r for r in runs if r.data.tags.get("pipeline.search_role") == "final"]
    assert sorted(r.info.run_name for r in finals) == [
        "adam-seed1", "adam-seed2", "sgd-seed1", "sgd-seed2"]  # fmt: skip
    assert {r.data.params["lr"] for r in finals} == {"0.003"}
    assert [o.status for o in outcomes] == ["ran"] * 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/groups.csv", "compare/lr_sensitivity.png", "compare/history"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare/history")} == {
        "compare/history/adam.png", "compare/history/sgd.png"}  # fmt: skip

    # Again: nothing left to search, the final runs reused; no run trained twice
    assert [o.status for o in run_sweep(path)] == ["skipped"] * 4
    assert len([r for r in _runs(client, "searched")
                if r.data.tags["pipeline.step"] == "train"]) == len(trials) + 4  # fmt: skip


@pytest.mark.slow
def test_search_resumes_after_sigterm_without_rerunning_finished_trials(tracking, tmp_path):
    path = _write(tmp_path, """
experiment: resumed
base: {epochs: 30, log_every: 10}
search:
  sampler: random
  n_trials: 3
  space: {lr: {log_uniform: [1.0e-3, 1.0e-2]}}
""")  # fmt: skip
    sweep = start_cli("sweep", path, cwd=tmp_path)
    client = MlflowClient()
    deadline = time.time() + 300
    # SIGTERM once the second trial has logged a training point: mid-loop, with ~860 of its
    # 870 steps to go (a fixed sleep after its start raced a trial that had got faster).
    while not client.get_experiment_by_name("resumed") or not any(
        client.get_metric_history(r.info.run_id, "train/loss")
        for r in _runs(client, "resumed") if r.info.run_name == "all-t1"
    ):  # fmt: skip
        assert sweep.poll() is None and time.time() < deadline, sweep.stderr.read()[-3000:]
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 143, err[-3000:]
    before = {r.info.run_name: r for r in _runs(client, "resumed")}
    assert before["all-t0"].data.tags["pipeline.trial_state"] == "complete"
    assert before["all-t1"].info.status == "KILLED"
    assert before["all-t1"].data.tags["pipeline.trial_state"] == "interrupted"
    assert "RUNNING" not in {r.info.status for r in before.values()}

    proc = run_cli("sweep", str(path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = [r for r in _runs(client, "resumed") if r.data.tags["pipeline.step"] == "train"]
    names = sorted(r.info.run_name for r in after)
    assert names == ["all-t0", "all-t1", "all-t2", "all-t3"], names  # t0 never ran again
    (study_name,) = {r.data.tags["pipeline.optuna_study"] for r in after}
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [(t.number, t.state.name, t.user_attrs.get("retry_of")) for t in study.trials]
    assert states == [(0, "COMPLETE", None), (1, "FAIL", None), (2, "COMPLETE", None),
                      (3, "COMPLETE", 1)]  # fmt: skip
    assert study.trials[3].params == study.trials[1].params  # the cut trial, retried as it was
    assert mlflow.get_run(before["all-t0"].info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_workers_run_every_trial_once_for_searches_and_grids(tracking, tmp_path):
    path = _write(tmp_path, """
experiment: workers
base: {epochs: 1, log_every: 10}
search:
  sampler: random
  n_trials: 2
  group_by: [optimizer]
  space: {optimizer: [adam, sgd], lr: {log_uniform: [1.0e-3, 1.0e-2]}}
  final: {seeds: 1}
""")  # fmt: skip
    proc = run_cli("sweep", str(path), "--workers", "2", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = _runs(client, "workers")
    (parent,) = [r for r in runs if r.data.tags["pipeline.step"] == "sweep"]
    train = [r for r in runs if r.data.tags["pipeline.step"] == "train"]
    assert sorted(r.info.run_name for r in train) == [
        "adam-seed1", "adam-t0", "adam-t1", "sgd-seed1", "sgd-t0", "sgd-t1"]  # fmt: skip
    assert {r.data.tags["mlflow.parentRunId"] for r in train} == {parent.info.run_id}
    assert {r.info.status for r in train} == {"FINISHED"}
    # two worker processes, each with one of the two cores
    assert {r.data.tags["torch_num_threads"] for r in train} == {"1"}
    assert len({r.data.tags["pipeline.process"].split(":")[1] for r in train}) == 2
    logs = {a.path for a in client.list_artifacts(parent.info.run_id, "trial_logs")}
    assert logs == {"trial_logs/worker-0.log", "trial_logs/worker-1.log"}

    grid = _write(tmp_path, "experiment: grid\nbase: {epochs: 1, log_every: 1}\n"
                  "grid: {optimizer: [adam, sgd, nadam]}\n", "grid.yaml")  # fmt: skip
    proc = run_cli("sweep", str(grid), "--workers", "2", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 to run in 2 workers" in proc.stdout
    train = [r for r in _runs(client, "grid") if r.data.tags["pipeline.step"] == "train"]
    assert sorted(r.info.run_name.split("-")[0] for r in train) == ["adam", "nadam", "sgd"]
    assert {r.info.status for r in train} == {"FINISHED"}
    # A worker writes trial after trial through one metric writer process: every point of
    # every trial lands in that trial's run, once.
    for run in train:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, STEPS_PER_EPOCH + 1))
        val = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in val] == [STEPS_PER_EPOCH]
        assert "test/accuracy" in run.data.metrics
