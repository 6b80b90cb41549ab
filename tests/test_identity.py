"""Run identity: which run a command writes into, which store it opens, what it names the
run, how params compare, and what it prints about the store (never its credentials)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Param, ViewType
from mlflow.tracking import MlflowClient

from pipeline import store
from pipeline import tracking as pt
from pipeline.config import PrepConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.steps import prep_or_reuse, run_prep, run_train

from .conftest import ROOT, assert_one_line_error, run_cli


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's bin first on PATH (`mlflow` and `python`), our worktree importable."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return env | extra


def mlflow_run(cwd: Path, entry: str, *args: str, env: dict[str, str] | None = None):
    """The real `mlflow run <project> -e ENTRY ARGS...`, started in `cwd`."""
    return subprocess.run(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry, *args],
        cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def _mlflow_run_style_run(entry_point: str, name: str | None = None) -> str:
    """A run as `mlflow run -e ENTRY_POINT` leaves it for the command: RUNNING, untouched."""
    client = MlflowClient()
    run = client.create_run("0", run_name=name, tags={pt.ENTRY_POINT_TAG: entry_point})
    return run.info.run_id


# --- a stale MLFLOW_RUN_ID ---------------------------------------------------------------


@pytest.mark.slow
def test_a_stale_mlflow_run_id_never_reopens_a_finished_run(
    tracking, tmp_path, sample_file, monkeypatch
):
    """The example: train adam, then `MLFLOW_RUN_ID=<that run> pipeline train ... sgd`."""
    first = run_train(TrainConfig(data=str(sample_file), epochs=1, log_every=1000))
    client = MlflowClient()
    before = client.get_run(first.run_id)
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss"))

    monkeypatch.setenv("MLFLOW_RUN_ID", first.run_id)  # run_cli passes os.environ on
    proc = run_cli("train", "--data", str(sample_file), "--epochs", "1", "--optimizer", "sgd",
                   cwd=tmp_path)  # fmt: skip
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert_one_line_error(proc, f"MLFLOW_RUN_ID={first.run_id} names a FINISHED train run")
    assert "unset MLFLOW_RUN_ID" in proc.stderr
    after = client.get_run(first.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.params == before.data.params and after.data.params["optimizer"] == "adam"
    assert after.data.tags == before.data.tags  # not renamed, no error tag
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss")) == steps
    assert len(client.search_runs(["0"])) == 1  # and no other run was made


@pytest.mark.parametrize(
    "make, needle",
    [
        # a live train run of another process: RUNNING, but a step has started in it
        (lambda: pt.create_finished_run("0", "x", "train"), "a FINISHED train run"),
        (lambda: _started("train"), "a train run ('live') that has started already"),
        (lambda: _mlflow_run_style_run("data_prep"), "the run of entry point 'data_prep'"),
        (lambda: _deleted(), "a deleted run"),
        (lambda: "0123456789abcdef0123456789abcdef", "is not a run in the tracking store"),
    ],
    ids=["finished", "running-started", "other-entry-point", "deleted", "missing"],
)
def test_mlflow_run_id_of_any_other_run_is_refused_untouched(tracking, make, needle, monkeypatch):
    run_id = make()
    client = MlflowClient()
    before = pt.find_run(run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with pytest.raises(PipelineError, match=re.escape(needle)), pt.start_run("train", "mine"):
        pass
    assert mlflow.active_run() is None
    if before is not None:  # untouched: status, name, tags
        after = client.get_run(run_id)
        assert (after.info.status, after.data.tags) == (before.info.status, before.data.tags)
    every = client.search_runs(["0"], run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in every] == ([run_id] if before else [])


def _started(step: str) -> str:
    run = MlflowClient().create_run("0", run_name="live", tags={pt.STEP_TAG: step})
    return run.info.run_id


def _deleted() -> str:
    run_id = _mlflow_run_style_run("train")
    MlflowClient().delete_run(run_id)
    return run_id


def test_the_run_mlflow_run_made_for_this_step_is_adopted(tracking, monkeypatch):
    """The legitimate case: RUNNING, untouched, this entry point. MLflow's made-up name is
    replaced by ours; a name the user chose is kept."""
    for name, expected in [(None, "mine"), ("my-baseline", "my-baseline")]:
        run_id = _mlflow_run_style_run("train", name)
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
        with pt.start_run("train", "mine") as run:
            assert run.run_id == run_id
            assert "MLFLOW_RUN_ID" not in os.environ  # consumed: nested runs are new runs
            with pt.start_run("data_prep", "child", nested=True) as child:
                assert child.run_id != run_id
        got = MlflowClient().get_run(run_id)
        assert (got.info.run_name, got.info.status) == (expected, "FINISHED")
        assert got.data.tags["mlflow.runName"] == expected


@pytest.mark.parametrize(
    "name, generated",
    [("bemused-fox-123", True), ("righteous-lark-7", True), ("", True),
     ("my-baseline-prep", False), ("adam-mse-seed_cnn", False), ("nice-run-1", False)],
)  # fmt: skip
def test_generated_names_are_told_from_users_names(name, generated):
    assert pt.generated_name(name) is generated


# --- params that cannot change, compared as MLflow stores them ---------------------------


def test_log_params_refuses_a_changed_value_and_logs_nothing_of_that_call(tracking, monkeypatch):
    run_id = _mlflow_run_style_run("train")
    # As `mlflow run` logs them: quoted where the shell needs it, as the user typed.
    logged = {"data_dir": "'/tmp/x/sp ace'", "amp": "false", "lr": "1e-3", "momentum": "none",
              "optimizer": "adam"}  # fmt: skip
    MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with pt.start_run("train", "params"):
        pt.log_params({"data_dir": "/tmp/x/sp ace", "amp": False, "lr": 0.001,
                       "momentum": "auto", "epochs": 1})  # fmt: skip
        with pytest.raises(PipelineError, match=r"param optimizer='adam'.*cannot change to 'sgd'"):
            pt.log_params({"seed": 1, "optimizer": "sgd"})
    params = MlflowClient().get_run(run_id).data.params
    assert params == logged | {"epochs": "1"}  # seed: checked before anything was logged


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("'/tmp/x/sp ace'", "/tmp/x/sp ace", True),
        ("'it'\"'\"'s'", "it's", True),
        ("0.10", 0.1, True),
        ("1e-3", "0.001", True),
        ("false", False, True),
        ("TRUE", "True", True),
        ("auto", None, True),
        ("''", "auto", True),
        ("adam", "sgd", False),
        ("0.1", "0.01", False),
        ("'a b'", "a  b", False),
        ("nan", "nan", True),
        ("1" * 64, "1" * 63 + "2", False),  # digests compare exactly, not as numbers
    ],
)
def test_canonical_values(a, b, same):
    assert pt.same_value(a, b) is same


@pytest.mark.slow
def test_mlflow_run_keeps_the_users_run_name_and_its_quoted_params_are_reused(tracking, tmp_path):
    """`mlflow run -e data_prep --run-name my-baseline-prep -P "data_dir=.../sp ace"`: the
    name stays; the data_dir MLflow stored quoted matches, so that run is reused."""
    data_dir = tmp_path / "sp ace"
    proc = mlflow_run(tmp_path, "data_prep", "--run-name", "my-baseline-prep",
                      "-P", f"data_dir={data_dir}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.run_name == "my-baseline-prep" and run.info.status == "FINISHED"
    assert run.data.params["data_dir"] == f"'{data_dir}'"  # as `mlflow run` stores it
    assert run.data.tags[pt.STEP_TAG] == "data_prep"

    reused = prep_or_reuse(PrepConfig(data_dir=str(data_dir)), "0")
    assert reused.reused and reused.run_id == run.info.run_id
    assert len(MlflowClient().search_runs(["0"])) == 1


def test_a_finished_prep_with_other_params_is_not_reused(tracking, tmp_path):
    first = run_prep(PrepConfig(data_dir=str(tmp_path / "d")))
    assert prep_or_reuse(PrepConfig(data_dir=str(tmp_path / "d")), "0").run_id == first.run_id
    with pt.start_run("main", "parent"):
        other = prep_or_reuse(PrepConfig(data_dir=str(tmp_path / "d"), split_seed=1), "0")
    assert not other.reused and other.run_id != first.run_id


# --- which store: a relative URI under `mlflow run` --------------------------------------


@pytest.mark.slow
def test_mlflow_run_from_another_folder_with_a_relative_sqlite_uri(tmp_path):
    """The example: `MLFLOW_TRACKING_URI=sqlite:///rel.db mlflow run <project>` from another
    folder. The entry point finds the run's store instead of opening <project>/rel.db."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(MLFLOW_TRACKING_URI="sqlite:///rel.db")
    proc = mlflow_run(elsewhere, "data_prep", "-P", f"data_dir={tmp_path / 'data'}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (ROOT / "rel.db").exists()
    (run,) = MlflowClient(f"sqlite:///{elsewhere / 'rel.db'}").search_runs(["0"])
    assert run.info.status == "FINISHED" and run.data.tags[pt.STEP_TAG] == "data_prep"
    assert run.info.run_name == "data_prep-mnist-sample"  # MLflow's random name replaced


def test_a_relative_store_without_the_run_is_refused_and_not_created(tmp_path):
    """Where no folder of ours or our parents holds the run: one line, no stray file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(MLFLOW_TRACKING_URI="sqlite:///rel.db", MLFLOW_RUN_ID="ab" * 16)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "prep", "--data-dir", str(tmp_path / "data")],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert_one_line_error(proc, f"run {'ab' * 16} (MLFLOW_RUN_ID) is not in the tracking store")
    assert "absolute path" in proc.stderr
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "data").exists()


def test_the_default_store_is_found_in_the_folder_mlflow_run_was_started_in(tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: `mlflow run` uses mlflow.db of its own folder, the entry point
    (started by it in the project folder) would use the project's. A parent process in
    `user` starts the command in `project`, as `mlflow run` does."""
    monkeypatch.chdir(tmp_path)  # where the store keeps artifacts (./mlruns)
    user, project = tmp_path / "user", tmp_path / "project"
    user.mkdir()
    project.mkdir()
    client = MlflowClient(f"sqlite:///{user / 'mlflow.db'}")
    run = client.create_run("0", tags={pt.ENTRY_POINT_TAG: "data_prep"})
    env = {k: v for k, v in _env(MLFLOW_RUN_ID=run.info.run_id).items()
           if k != "MLFLOW_TRACKING_URI"}  # fmt: skip
    command = [sys.executable, "-m", "pipeline", "prep", "--data-dir", str(tmp_path / "data")]
    proc = subprocess.run(
        [sys.executable, "-c", f"import subprocess, sys; sys.exit(subprocess.run({command!r}, "
         f"cwd={str(project)!r}).returncode)"],
        cwd=user, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (project / "mlflow.db").exists()
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.tags[pt.STEP_TAG] == "data_prep"


# --- bad input under `mlflow run` --------------------------------------------------------


@pytest.mark.slow
def test_bad_input_under_mlflow_run_leaves_a_recognisable_failed_run(tracking, tmp_path):
    proc = mlflow_run(tmp_path, "train", "-P", "data=x.pt", "-P", "optimizer=nosuch")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "'nosuch' is not one of 'sgd'" in errors[0], proc.stderr
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and run.info.run_name == "invalid-train"
    assert run.data.tags[pt.ERROR_TAG] == errors[0].removeprefix("Error: ")
    assert pt.STEP_TAG not in run.data.tags  # no step ever ran in it


def test_bad_input_in_a_run_mlflow_run_made_keeps_the_users_name(tracking, tmp_path):
    """What the CLI does with the run `mlflow run --run-name mine` made, for an error found
    after the arguments parsed (a data file that is not there)."""
    run_id = _mlflow_run_style_run("train", "mine")
    env = _env(MLFLOW_RUN_ID=run_id)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", "missing.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert_one_line_error(proc, "data file 'missing.pt' does not exist")
    run = MlflowClient().get_run(run_id)
    assert (run.info.run_name, run.info.status) == ("mine", "FAILED")
    assert "missing.pt" in run.data.tags[pt.ERROR_TAG]


# --- stores that are not what they claim -------------------------------------------------


def test_a_truncated_store_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = f"sqlite:///{tmp_path / 'good.db'}"
    MlflowClient(good).create_run("0")
    data = (tmp_path / "good.db").read_bytes()
    (tmp_path / "mlflow.db").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.db").write_bytes(os.urandom(4096))
    for name in ("mlflow.db", "junk.db"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "prep", "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{name}"),
            capture_output=True, text=True,
        )  # fmt: skip
        assert_one_line_error(proc, f"cannot open the tracking store sqlite:///{name}: ")
        assert "DatabaseError" in proc.stderr  # sqlite's own word for what is wrong


def test_a_store_in_a_missing_folder_is_one_line_and_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/nowhere/mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "prep", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
    )  # fmt: skip
    assert_one_line_error(proc, f"folder '{tmp_path}/nowhere': No such file or directory")
    assert not (tmp_path / "nowhere").exists()


def test_a_data_dir_that_is_a_file_is_one_line_naming_it(tracking, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    proc = run_cli("prep", "--data-dir", "afile", cwd=tmp_path)
    assert_one_line_error(proc, "afile")
    assert "Not a directory" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or MlflowClient().search_runs(["0"]) == []


def test_a_lock_dir_that_cannot_be_created_is_one_line_naming_it(tracking, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    config = tmp_path / "retrain.yaml"
    config.write_text(f"prep: {{data_dir: {tmp_path / 'data'}}}\ntrain: {{epochs: 1}}\n")
    proc = run_cli("retrain", "--config", str(config), "--lock-dir", "afile/locks", cwd=tmp_path)
    assert_one_line_error(proc, "cannot create the lock file 'afile/locks/")
    assert "Not a directory" in proc.stderr and "--lock-dir" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing started


# --- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("http://user:secret@host:5000/api", "http://***@host:5000/api"),
        ("https://token@h.example/x y", "https://***@h.example/x y"),
        ("to 'postgresql://u:p@ss@db/m' failed", "to 'postgresql://***@db/m' failed"),
        ("mail me@x.org, see http://host/a@b", "mail me@x.org, see http://host/a@b"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)  # fmt: skip
def test_redact_hides_user_and_password_of_every_uri(text, shown):
    assert store.redact(text) == shown


def test_a_password_in_the_tracking_uri_is_never_printed(tmp_path):
    uri = f"http://user:secret@127.0.0.1:{_closed_port()}"
    env = _env(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="5")  # fmt: skip
    prep = subprocess.run(
        [sys.executable, "-m", "pipeline", "prep", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert_one_line_error(prep, "tracking store http://***@127.0.0.1:")
    # compare has no one-line path for a dead server: its traceback is redacted too.
    compare = subprocess.run(
        [sys.executable, "-m", "pipeline", "compare", "0123456789abcdef0123456789abcdef"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert compare.returncode != 0
    for proc in (prep, compare):
        assert "secret" not in proc.stdout + proc.stderr, proc.stderr
    assert "***@127.0.0.1" in compare.stderr


@pytest.mark.slow
def test_a_password_in_the_uri_of_a_live_server_is_never_printed(mlflow_server, tmp_path):
    """MLflow prints `View run ... at: <URI>` when a run on a server ends; the URI's user and
    password are hidden in that line too. (This server ignores the credentials.)"""
    uri = mlflow_server.replace("http://", "http://user:secret@")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "prep", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "secret" not in proc.stdout + proc.stderr
    assert "View run data_prep-mnist-sample at: http://***@127.0.0.1:" in proc.stdout + proc.stderr


# --- store identity ---------------------------------------------------------------------


def test_store_identity_is_what_the_store_is_not_how_it_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    same = [
        ["sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db", "sqlite:///./mlflow.db",
         f"sqlite:///{tmp_path}/sub/../mlflow.db"],
        ["sqlite:///sub/m.db", "sqlite:///link/m.db"],
        ["http://127.0.0.1:5000", "http://user:secret@127.0.0.1:5000/", "HTTP://127.0.0.1:5000"],
        ["https://mlflow.example", "https://MLflow.example:443/", "https://t@mlflow.example"],
        ["postgresql://u:p@db/mlflow", "postgresql+psycopg2://db:5432/mlflow"],
        ["mlruns", f"file://{tmp_path}/mlruns", "./mlruns"],
    ]  # fmt: skip
    identities = []
    for group in same:
        ids = {store.identity(uri) for uri in group}
        assert len(ids) == 1, ids
        identities.append(ids.pop())
    assert len(set(identities)) == len(identities)  # different stores stay apart
    assert all("secret" not in i and "u:p" not in i for i in identities)
    assert store.identity("http://127.0.0.1:5001") != store.identity("http://127.0.0.1:5000")

    assert not (tmp_path / "mlflow.db").exists()  # nothing opened to tell what a URI names


def test_retrain_wrapper_logs_no_password_and_only_for_its_user(tmp_path):
    """deploy/retrain.sh as cron runs it, against a server that is down: its log names the
    store without the password and is readable by its owner only, an old 0644 log too."""
    config = tmp_path / "retrain.yaml"
    config.write_text(f"prep: {{data_dir: {tmp_path / 'data'}}}\ntrain: {{epochs: 1}}\n")
    logs = tmp_path / "logs"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": f"http://user:secret@127.0.0.1:{_closed_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "PIPELINE_PYTHON": sys.executable,
        "PIPELINE_LOG_DIR": str(logs),
        "PIPELINE_LOCK_DIR": str(tmp_path / "locks"),
        "PIPELINE_RETRAIN_CONFIG": str(config),
    }
    for _ in range(2):
        proc = subprocess.run([str(ROOT / "deploy/retrain.sh")], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 1, proc.stderr[-3000:]
        log = (logs / "retrain.log").read_text()
        assert "secret" not in log + proc.stdout + proc.stderr
        assert "tracking http://***@127.0.0.1:" in log
        assert (logs / "retrain.log").stat().st_mode & 0o777 == 0o600
        assert logs.stat().st_mode & 0o077 == 0  # created by the script: owner only
        (logs / "retrain.log").chmod(0o644)  # as an older version of the script left it
