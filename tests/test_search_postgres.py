"""Workers on two "hosts" (two processes in separate folders) joining one search: a real
PostgreSQL server holding both the Optuna studies and, behind a real `mlflow server`, the
tracking store: every trial runs exactly once, each study keeps its budget, every run nests
under the one parent run, nothing lands in "Default".

PostgreSQL's initdb refuses root, so the server runs as the `postgres` system user (runuser)
in a temporary folder, on 127.0.0.1 and a free port. Skipped only where the binaries are not
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from .conftest import PG_BIN, ROOT, run_cli, running_mlflow_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL binaries (initdb, pg_ctl) not installed"),
]


@pytest.fixture
def pg_mlflow_server(postgres, tmp_path, monkeypatch):
    """A real `mlflow server` whose backend store is the PostgreSQL database `mlflow`."""
    with running_mlflow_server(tmp_path / "server", f"{postgres}/mlflow", workers=2) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("PIPELINE_LOCK_DIR", str(tmp_path / "locks"))
        monkeypatch.setenv("PIPELINE_SPOOL_DIR", str(tmp_path / "spool"))
        yield uri, f"{postgres}/optuna"


SEARCH = """
experiment: shared
base: {epochs: 1, log_every: 10}
search:
  sampler: random
  n_trials: 3
  group_by: [optimizer]
  space: {optimizer: [adam, sgd], lr: {log_uniform: [1.0e-3, 1.0e-2]}}
"""


def test_two_hosts_share_one_search_through_postgresql(pg_mlflow_server, tmp_path):
    uri, storage = pg_mlflow_server
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    for host in hosts:
        host.mkdir()
        (host / "search.yaml").write_text(SEARCH)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    log = hosts[0] / "sweep.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads it while the worker runs
        sweep = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "sweep", "search.yaml", "--storage", storage],
            cwd=hosts[0], env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    deadline = time.time() + 240
    while "search 'shared': 2 studies x 3 trials" not in log.read_text():  # studies planned
        assert sweep.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    worker = run_cli("worker", "search.yaml", "--storage", storage, cwd=hosts[1], timeout=400)
    sweep.wait(timeout=400)
    assert sweep.returncode == 0, log.read_text()[-3000:]
    assert worker.returncode == 0, worker.stderr[-3000:]
    joined = worker.stdout.splitlines()
    assert any(line.startswith("worker: joining search run") for line in joined), joined
    ran_by_worker = int(next(ln for ln in joined if ln.startswith("worker: ran")).split()[2])
    assert ran_by_worker >= 1  # it did take part

    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "shared"]
    assert client.search_runs([client.get_experiment_by_name("Default").experiment_id]) == []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags["pipeline.step"] == "sweep"]
    trials = [r for r in runs if r.data.tags.get("pipeline.search_role") == "trial"]
    names = sorted(r.info.run_name for r in trials)
    assert names == [f"{o}-t{i}" for o in ("adam", "sgd") for i in range(3)]  # each exactly once
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.info.status for r in trials} == {"FINISHED"}
    pids = {r.data.tags["pipeline.process"].split(":")[1] for r in trials}
    assert len(pids) == 2  # the sweep and the worker both ran trials

    import optuna

    for group in ("adam", "sgd"):
        (study_name,) = {r.data.tags["pipeline.optuna_study"] for r in trials
                         if r.info.run_name.startswith(group)}  # fmt: skip
        study = optuna.load_study(study_name=study_name, storage=storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # the budget, held
