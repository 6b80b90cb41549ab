"""Concurrent use of one store, with real processes: creating a new sqlite store from many
commands at once, one sweep of a file at a time, and locks keyed on what the store is."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.lock import EX_TEMPFAIL, lock_path, sweep_lock_path

from .conftest import ROOT, assert_one_line_error, run_cli, start_cli


def _start(*args: object, cwd: Path, uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    return start_cli(*args, cwd=cwd, env=env)


def _wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, err))
    return results


def _schema_is_clean(db: Path) -> None:
    """One schema version, and no table a migration cut short left behind."""
    with sqlite3.connect(db) as con:
        tmp = con.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp%'")
        assert tmp.fetchall() == []
        assert len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1


# --- creating a new store ---------------------------------------------------------------


@pytest.mark.slow
def test_prep_in_two_folders_at_once_on_a_new_store(tmp_path):
    """The example: `(cd a && pipeline prep) & (cd b && pipeline prep) & wait`, one URI."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    folders = [tmp_path / name for name in "ab"]
    for folder in folders:
        folder.mkdir()
    procs = [_start("prep", cwd=folder, uri=uri) for folder in folders]
    for code, err in _wait_all(procs):
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    runs = MlflowClient(uri).search_runs(["0"])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    _schema_is_clean(db)


@pytest.mark.slow
def test_eight_trains_at_once_on_a_new_store(tmp_path, sample_file):
    """The example: 8 `pipeline train` started together on a fresh store. Each also starts
    a metric writer process that opens the store."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    procs = [
        _start("train", "--data", sample_file, "--epochs", 1, "--log-every", 7, "--seed", seed,
               cwd=tmp_path, uri=uri)
        for seed in range(8)
    ]  # fmt: skip
    for code, err in _wait_all(procs):
        assert code == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs(["0"])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in runs) == [str(s) for s in range(8)]
    for run in runs:  # every logged point arrived: steps 7, 14, 21, 28 of 29
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == [7, 14, 21, 28]
    _schema_is_clean(db)


@pytest.mark.slow
def test_first_registry_reads_at_once_on_a_new_store(tmp_path):
    """`pipeline champion` reads the Model Registry before any run: its first open of a new
    store is serialised too. Each says, in one line, that there is no such model."""
    db = tmp_path / "mlflow.db"
    procs = [_start("champion", "nosuch", cwd=tmp_path, uri=f"sqlite:///{db}") for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_one_line_error(result, "registered model 'nosuch' does not exist")
    _schema_is_clean(db)


# --- one sweep of a file at a time --------------------------------------------------------

SWEEP = """
experiment: together
base: {epochs: 1, log_every: 10}
grid: {optimizer: [adam, sgd]}
"""


def _sweep_lock_held(locks: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not any(p.read_text().startswith("pid=") for p in locks.glob("sweeps/*.lock")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the sweep never took its lock"
        time.sleep(0.2)


def _runs(client: MlflowClient, step: str) -> list:
    experiment = client.get_experiment_by_name("together")
    return client.search_runs([experiment.experiment_id], f"tags.`pipeline.step` = '{step}'")


@pytest.mark.slow
def test_a_running_sweep_is_never_taken_over_and_a_finished_one_never_repeated(tracking, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(SWEEP)
    first = start_cli("sweep", path, cwd=tmp_path)
    _sweep_lock_held(tmp_path / "locks", first)

    second = run_cli("sweep", str(path), cwd=tmp_path)
    assert second.returncode == EX_TEMPFAIL
    assert_one_line_error(second, "another sweep of exp.yaml (experiment 'together') holds the")
    assert "try again later" in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    client = MlflowClient(tracking)
    (parent,) = _runs(client, "sweep")
    trials = _runs(client, "train")
    assert parent.info.status == "FINISHED" and len(trials) == 2  # each trial ran once
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}

    # Run again once it finished: nothing to do, and no new run of any kind.
    before = len(client.search_runs([parent.info.experiment_id]))
    again = run_cli("sweep", str(path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"all 2 trials already finished (parent run {parent.info.run_id}); nothing to do" in (
        again.stdout
    )
    assert len(client.search_runs([parent.info.experiment_id])) == before

    # A changed file is another sweep: it runs (its trials are already finished: skipped).
    path.write_text(SWEEP + "description: changed\n")
    changed = run_cli("sweep", str(path), cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "2 already finished, 0 to run" in changed.stdout
    assert len(_runs(client, "sweep")) == 2


@pytest.mark.slow
def test_a_sweep_left_running_by_a_killed_process_is_resumed(tracking, tmp_path):
    """SIGKILL leaves the parent RUNNING; the lock died with the process, so the next sweep
    knows nobody runs it and resumes it."""
    path = tmp_path / "exp.yaml"
    path.write_text(SWEEP)
    first = start_cli("sweep", path, cwd=tmp_path)
    client = MlflowClient(tracking)
    deadline = time.time() + 120
    while not (client.get_experiment_by_name("together") and _runs(client, "train")):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.2)
    first.kill()
    first.communicate(timeout=60)
    (parent,) = _runs(client, "sweep")
    assert parent.info.status == "RUNNING"

    proc = run_cli("sweep", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming run {parent.info.run_id}" in proc.stdout
    (after,) = _runs(client, "sweep")
    assert after.info.run_id == parent.info.run_id and after.info.status == "FINISHED"


# --- locks keyed on the store, not its spelling ---------------------------------------------


def test_locks_of_one_store_spelled_two_ways_are_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locks = tmp_path / "locks"
    spellings = ["sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db", "sqlite:///./mlflow.db"]
    assert len({lock_path(locks, "m", uri) for uri in spellings}) == 1
    assert len({sweep_lock_path(locks, "e", "d1", uri) for uri in spellings}) == 1
    servers = ["http://127.0.0.1:5000", "http://user:pw@127.0.0.1:5000/"]
    assert len({lock_path(locks, "m", uri) for uri in servers}) == 1
    others = [*spellings[:1], servers[0], "sqlite:///other.db", "http://127.0.0.1:5001"]
    assert len({lock_path(locks, "m", uri) for uri in others}) == 4
    assert sweep_lock_path(locks, "e", "d1", spellings[0]) != sweep_lock_path(
        locks, "e", "d2", spellings[0]
    )


@pytest.mark.slow
def test_two_retrains_with_differently_spelled_uris_do_not_both_run(tmp_path):
    """The example: `sqlite:///$PWD/mlflow.db` and `sqlite:///mlflow.db` from one folder."""
    config = tmp_path / "retrain.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model_name": "spelled", "prep": {"data_dir": str(tmp_path / "data")},
             "train": {"epochs": 50, "log_every": 100}}
        )
    )  # fmt: skip
    locks = tmp_path / "locks"
    first = _start("retrain", "--config", config, "--lock-dir", locks, cwd=tmp_path,
                   uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    deadline = time.time() + 120
    while not any(p.read_text().startswith("pid=") for p in locks.glob("*.lock")):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    second = subprocess.run(
        [sys.executable, "-m", "pipeline", "retrain", "--config", str(config),
         "--lock-dir", str(locks)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == EX_TEMPFAIL, second.stderr[-3000:]
    assert_one_line_error(second, "another retrain holds the lock")
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)  # its own promotion is tested elsewhere
    first.communicate(timeout=120)
    assert len(list(locks.glob("*.lock"))) == 1


def _log_test_metrics_together(barrier, results) -> None:
    """One process of the test below: a run that logs test metrics measured on a dataset
    (`tracking.log_metrics`, as `log_evaluation` does), once all 8 are ready."""
    import mlflow

    from pipeline import tracking

    with mlflow.start_run(experiment_id="0"):
        dataset = tracking.split_dataset(Path("/data/sample.pt"), "ab" * 32, "http://x/s", "test")
        barrier.wait(timeout=300)
        try:
            tracking.log_metrics({"test/accuracy": 0.5}, step=1, dataset=dataset)
            results.put("ok")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results.put(str(exc)[:200])


@pytest.mark.slow
def test_runs_logging_the_same_dataset_at_once_all_succeed(tracking):
    """MLflow looks a dataset up, then inserts it: 8 runs doing so at one moment raced on
    the table's unique key (2 of 8 failed here) until the loser tried again."""
    import multiprocessing

    MlflowClient().search_runs(["0"])  # the store exists before the race
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_log_test_metrics_together, args=(barrier, results))
             for _ in range(8)]  # fmt: skip
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["ok"] * 8
    runs = MlflowClient().search_runs(["0"])
    assert len(runs) == 8 and all(len(r.inputs.dataset_inputs) == 1 for r in runs)
