"""`pipeline retrain` and `pipeline champion`: champion/challenger through a real Model
Registry (sqlite, and a real `mlflow server` over HTTP), the lock, and crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import registry
from pipeline.data import load_prepared, prepared_path, to_model_input
from pipeline.errors import PipelineError
from pipeline.lock import EX_TEMPFAIL, LockHeld, exclusive
from pipeline.retrain import (
    RetrainConfig,
    decide,
    load_config,
    retrain,
    settle_crashed,
)

from .conftest import ROOT, assert_one_line_error, run_cli, start_cli

NAME = "digits-test"
FIRST = {"optimizer": "adam", "epochs": 1}
WORSE = {"optimizer": "sgd", "lr": 0.0001, "epochs": 1}
BETTER = {"optimizer": "adam", "epochs": 3}


def _config(tmp_path: Path, train: dict, name: str = NAME, file: str = "retrain.yaml") -> Path:
    """A retrain YAML with tiny training and the data under tmp_path."""
    path = tmp_path / file
    body = {
        "model_name": name,
        "metric": "accuracy",
        "min_delta": 0.002,
        "prep": {"data_dir": str(tmp_path / "data")},
        "train": train,
    }
    path.write_text(yaml.safe_dump(body))
    return path


def _retrain(tmp_path: Path, train: dict, **kwargs):
    cfg = load_config(_config(tmp_path, train))
    return retrain(cfg, lock_dir=tmp_path / "locks", **kwargs)


def _champion_version(name: str = NAME) -> str | None:
    current = registry.champion(name)
    return None if current is None else current.version


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's bin first on PATH, and our worktree importable."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


# --- the rule and the config file (no MLflow) -------------------------------------------


def test_decide_promotes_first_and_only_when_better_by_min_delta():
    acc = RetrainConfig(min_delta=0.01)
    assert decide(acc, 0.5, None, "none").promote
    assert decide(acc, 0.91, 0.90, "1").promote
    assert not decide(acc, 0.905, 0.90, "1").promote
    assert not decide(acc, float("nan"), 0.90, "1").promote
    loss = RetrainConfig(metric="loss", direction="minimize", min_delta=0.01)
    assert decide(loss, 0.30, 0.35, "1").promote
    kept = decide(loss, 0.345, 0.35, "1")
    assert not kept.promote and "champion v1" in kept.reason and "min_delta 0.01" in kept.reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decide_never_promotes_a_score_that_is_not_finite_nor_lets_one_block(bad):
    for cfg in (RetrainConfig(), RetrainConfig(metric="loss", direction="minimize")):
        # A challenger without a finite score: never promoted, not even as the first version.
        for champion in (None, 0.5, bad):
            kept = decide(cfg, bad, champion, "3")
            assert not kept.promote and "is not a finite number: not promoted" in kept.reason
        # A champion without one never keeps out a finite challenger, however bad it is.
        for challenger in (0.0, 0.5, 1e9):
            promoted = decide(cfg, challenger, bad, "3")
            assert promoted.promote, promoted.reason
            assert f"champion v3 {cfg.metric}={bad} is not a finite number" in promoted.reason


def test_the_shipped_config_loads():
    cfg = load_config(ROOT / "experiments" / "retrain.yaml")
    assert cfg.metric == "accuracy" and cfg.direction == "maximize" and cfg.min_delta > 0
    assert cfg.train.lr is None and cfg.train.epochs >= 1 and cfg.prep.dataset == "mnist-sample"


@pytest.mark.parametrize(
    "body, needle",
    [
        (
            {"modle_name": "x"},
            "unknown key 'modle_name' in the top level; valid keys: model_name, metric",
        ),
        ({"train": {"epoch": 2}}, "unknown key 'epoch' in train; valid keys: model, optimizer"),
        ({"metric": "f1"}, "unknown metric 'f1'; valid choices: accuracy, loss"),
        ({"metric": "loss", "direction": "maximize"}, "valid choice: minimize"),
        ({"min_delta": -1}, "min_delta must be a number >= 0"),
        ({"min_delta": "big"}, "min_delta must be a number, got 'big'"),
        ({"train": {"epochs": "three"}}, "train.epochs must be an integer, got 'three'"),
        (
            {"train": {"optimizer": "lbfgs"}},
            "train.optimizer 'lbfgs' is invalid; valid choices: sgd",
        ),
        (
            {"prep": {"dataset": "cifar"}},
            "prep.dataset 'cifar' is invalid; valid choices: mnist-sample",
        ),
        ({"model_name": "a b"}, "invalid model_name 'a b'"),
        ({"prep": {"val_fraction": 1}}, "prep.val_fraction must be between 0 and 1"),
        ({"train": {"data": "f.pt"}}, "unknown key 'data' in train"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number or 'auto', got 'fast'"),
        (["a", "list"], "expected a mapping"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path, body, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(PipelineError, match="bad.yaml") as err:
        load_config(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "locks" / "m.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pipeline.lock import exclusive; from pathlib import Path\n"
         f"with exclusive(Path({str(path)!r})):\n    print('held', flush=True); time.sleep(600)"],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid={holder.pid}") as err, exclusive(path):
            pass
        assert err.value.exit_code == EX_TEMPFAIL == 75
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
    with exclusive(path):  # the file is still there, the lock is not
        assert path.exists()


# --- retrain against a real store -------------------------------------------------------


@pytest.mark.slow
def test_promote_keep_promote_over_http_registry(mlflow_server, tmp_path, no_temp_left):
    first = _retrain(tmp_path, FIRST)
    assert (first.decision, first.version, first.champion) == ("promote", "1", None)
    worse = _retrain(tmp_path, WORSE)
    assert (worse.decision, worse.version, _champion_version()) == ("keep", "2", "1")
    assert worse.challenger < worse.champion == pytest.approx(first.challenger)
    better = _retrain(tmp_path, BETTER)
    assert (better.decision, better.version, _champion_version()) == ("promote", "3", "3")
    assert better.challenger >= better.champion + 0.002
    # Loading the champion and the challenger left nothing (torch's compile cache is reused).
    left = [p.name for p in no_temp_left.iterdir() if not p.name.startswith("torchinductor_")]
    assert not left, "a retrain left temporary folders behind"

    # Both models were scored in the retrain run itself, on the data version it logged.
    client = MlflowClient()
    run = client.get_run(better.run_id)
    assert run.data.metrics["challenger/test/accuracy"] == pytest.approx(better.challenger)
    assert run.data.metrics["champion/test/accuracy"] == pytest.approx(better.champion)
    tags = run.data.tags
    assert (tags["retrain.decision"], tags["retrain.champion_before"]) == ("promote", "1")
    assert tags["retrain.champion_after"] == "3" and "better, promoted" in tags["retrain.reason"]
    assert tags["data_digest"] == better.data_digest
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(c.data.tags["pipeline.step"] for c in children) == ["data_prep", "train"]
    v3 = client.get_model_version(NAME, "3").tags
    assert v3["data_digest"] == better.data_digest and v3["previous_champion"] == "1"
    assert v3["source_run_id"] == tags["train_run_id"] and v3["retrain_run_id"] == better.run_id

    # The history, as `pipeline champion` prints it over HTTP, shows all three decisions.
    proc = run_cli("champion", NAME, cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{NAME}: champion v3 since ")
    rows = [line.split(None, 7) for line in lines[2:]]  # aligned columns, then the reason
    starts = {(line.index(r[0]), line.index(r[1])) for line, r in zip(lines[2:], rows, strict=True)}
    assert starts == {(0, lines[1].index("decision"))}  # the columns line up under the header
    assert [(r[0], r[1], r[6]) for r in rows] == [
        ("v1", "promote", "none"), ("v2", "keep", "1"), ("v3", "promote", "1")
    ]  # fmt: skip
    assert all(r[5] == better.data_digest[:12] for r in rows)
    assert_one_line_error(run_cli("champion", "nope", cwd=tmp_path), NAME)

    # models:/NAME@champion loads through pyfunc from the server and predicts the digits.
    data = load_prepared(prepared_path(load_config(tmp_path / "retrain.yaml").prep))
    x = to_model_input(data.splits["test"].images[:64]).numpy()
    predicted = np.asarray(mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(x))
    assert (predicted.argmax(1) == data.splits["test"].labels[:64].numpy()).mean() > 0.8


@pytest.mark.slow
def test_crash_never_moves_champion_and_the_next_run_recovers(tracking, tmp_path, monkeypatch):
    first = _retrain(tmp_path, FIRST)
    client = MlflowClient()

    # Bad input: one line, exit 1, no run, champion unchanged.
    bad = _config(tmp_path, {"optimizer": "lbfgs"}, file="bad.yaml")
    proc = run_cli("retrain", "--config", str(bad), "--lock-dir", "locks", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_line_error(proc, "train.optimizer 'lbfgs' is invalid; valid choices: sgd")
    assert len(client.search_runs(["0"], "tags.`pipeline.step` = 'retrain'")) == 1

    # A failure after registration, before promotion: the better version stays pending.
    monkeypatch.setenv("PIPELINE_FAIL_AFTER", "register")
    with pytest.raises(RuntimeError, match="injected failure after register"):
        _retrain(tmp_path, BETTER)
    assert _champion_version() == "1"
    assert client.get_model_version(NAME, "2").tags["retrain.decision"] == "pending"
    statuses = [r.info.status for r in client.search_runs(["0"])]
    assert "RUNNING" not in statuses and "FAILED" in statuses

    # The next run settles it as abandoned and trains with the champion's own parameters.
    monkeypatch.delenv("PIPELINE_FAIL_AFTER")
    again = _retrain(tmp_path, WORSE, params_from="champion")
    assert client.get_model_version(NAME, "2").tags["retrain.decision"] == "abandoned"
    assert (again.version, again.decision, _champion_version()) == ("3", "keep", "1")
    assert again.challenger == pytest.approx(first.challenger)  # same params, data and seed
    train_runs = {
        v: client.get_run(client.get_model_version(NAME, v).tags["source_run_id"]).data.params
        for v in ("1", "3")
    }
    for key in ("optimizer", "lr", "epochs", "seed", "model"):
        assert train_runs["1"][key] == train_runs["3"][key], key

    # A crash right after the alias moved: the version was complete and evaluated, so it
    # stays champion, and the decision it did not record is filled in afterwards.
    monkeypatch.setenv("PIPELINE_FAIL_AFTER", "promote")
    with pytest.raises(RuntimeError, match="after promote"):
        _retrain(tmp_path, BETTER)
    assert _champion_version() == "4"
    settle_crashed(NAME)
    v4 = client.get_model_version(NAME, "4").tags
    assert (v4["retrain.decision"], v4["previous_champion"]) == ("promote", "1")


@pytest.mark.slow
def test_two_concurrent_retrains_one_exits_with_the_lock_code(tracking, tmp_path, monkeypatch):
    """The first runs as the MLproject entry point (`mlflow run -e retrain`), the second as
    the CLI; both find the lock folder in $PIPELINE_LOCK_DIR."""
    monkeypatch.setenv("PIPELINE_LOCK_DIR", str(tmp_path / "locks"))
    slow = _config(tmp_path, {"epochs": 8}, file="slow.yaml")
    first = subprocess.Popen(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "retrain",
         "-P", f"config={slow}"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 90
    while not any(p.read_text().startswith("pid=") for p in (tmp_path / "locks").glob("*.lock")):
        assert first.poll() is None and time.time() < deadline, "first retrain never locked"
        time.sleep(0.2)
    t0 = time.time()
    second = run_cli("retrain", "--config", str(slow), cwd=tmp_path)
    refused_s = time.time() - t0
    assert second.returncode == 75, second.stderr
    assert_one_line_error(second, "another retrain holds the lock")
    assert first.poll() is None, "the first retrain finished before the second was refused"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert f"retrain: promote {NAME} v1" in out
    print(f"second retrain refused after {refused_s:.1f} s")
    runs = MlflowClient().search_runs(["0"], "tags.`pipeline.step` = 'retrain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["config"] == str(slow)  # logged by `mlflow run` itself
    assert registry.champion(NAME).version == "1"


@pytest.mark.slow
def test_sigterm_mid_retrain_ends_runs_killed_and_frees_the_lock(tracking, tmp_path):
    long = _config(tmp_path, {"epochs": 200}, file="long.yaml")
    locks = tmp_path / "locks"
    proc = start_cli("retrain", "--config", long, "--lock-dir", locks, cwd=tmp_path, env=_env())
    client = MlflowClient()
    deadline = time.time() + 90
    while True:  # until the nested train run has logged an epoch
        runs = client.search_runs(["0"], "tags.`pipeline.step` = 'train'")
        if runs and client.get_metric_history(runs[0].info.run_id, "val/loss"):
            break
        assert proc.poll() is None and time.time() < deadline, "training never logged an epoch"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    statuses = {r.data.tags["pipeline.step"]: r.info.status for r in client.search_runs(["0"])}
    assert statuses == {"retrain": "KILLED", "data_prep": "FINISHED", "train": "KILLED"}
    assert registry.champion(NAME) is None and client.search_registered_models() == []
    (lock,) = locks.glob("*.lock")
    with exclusive(lock):  # released: the next scheduled run is not blocked
        pass
