"""Interruptions end honestly: real signals, real processes, real MLflow stores.

Every stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) ends the open runs KILLED with every
completed step logged, and the process exits 128 + the signal; a signal whose exception
Python swallowed still counts; children die with their parent; a resumed sweep or the next
retrain ends the runs of a process that is gone; a retrain decision lands whole or not at all.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import pipeline.registry
import pipeline.steps
from pipeline import registry, signals
from pipeline import tracking as pt
from pipeline.config import TrainConfig
from pipeline.retrain import load_config, retrain, settle_crashed
from pipeline.signals import Terminated
from pipeline.steps import run_train

from .conftest import ROOT, start_cli

STEPS_PER_EPOCH = math.ceil(3600 / 128)
STOP = [
    (signal.SIGINT, 130),
    (signal.SIGTERM, 143),
    (signal.SIGHUP, 129),
    (signal.SIGQUIT, 131),
]


def _env() -> dict[str, str]:
    """This interpreter's bin first on PATH (for `mlflow run`), and our worktree importable."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def _wait(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 180):
    """Poll `condition` until it returns something true; fail naming `what` if it never does."""
    deadline = time.time() + timeout
    while not (found := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}: {proc.stderr.read()}")
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)
    return found


def _dead_process_tag() -> dict[str, str]:
    """The process tag of a process that has exited."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, _, started = pt.process_tag()[pt.PROCESS_TAG].split(":")
    return {pt.PROCESS_TAG: f"{host}:{dead.pid}:{started}"}


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


def _describe(pid: int) -> str:
    """A live process's pid, state and command line, for a failure message."""
    try:
        proc = psutil.Process(pid)
        return f"{pid} {proc.status()} {' '.join(proc.cmdline())[:200]}"
    except psutil.Error as exc:
        return f"{pid} ({exc})"


def _steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --- the signal machinery ---------------------------------------------------------------


@pytest.mark.parametrize("sig, code", STOP)
def test_each_stop_signal_raises_and_is_recorded(sig, code):
    with pytest.raises(Terminated) as info, signals.stop_signals_raise():
        signal.raise_signal(sig)
    assert (info.value.signum, info.value.exit_code, signals.received()) == (sig, code, sig)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_a_signal_the_process_started_ignoring_stays_ignored():
    """`nohup` starts a command ignoring SIGHUP so that it outlives its terminal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with signals.stop_signals_raise():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)  # nothing happens
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
    assert signals.received() == signal.SIGTERM
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_a_second_signal_at_once_does_not_cut_the_clean_up_short():
    """Ctrl-C reaches the whole process group, and `mlflow run` then sends SIGTERM too."""
    cleaned_up = []
    with pytest.raises(Terminated) as info, signals.stop_signals_raise():
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            signal.raise_signal(signal.SIGTERM)  # part of the same request: no second raise
            cleaned_up.append(True)
    assert info.value.signum == signal.SIGINT and cleaned_up == [True]
    assert signals.received() == signal.SIGINT


def test_held_without_delivery_leaves_the_signal_to_the_caller():
    with signals.stop_signals_raise():
        with signals.held(deliver=False) as caught:
            signal.raise_signal(signal.SIGHUP)
        assert caught == [signal.SIGHUP]
        assert signals.received() is None  # nothing left to act on it


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_in_a_destructor_still_ends_the_run_killed(tracking):
    class SignalsWhenCollected:
        def __del__(self):
            # Python runs the handler here and swallows its exception: "Exception ignored".
            signal.raise_signal(signal.SIGTERM)

    carried_on = []
    with pytest.raises(Terminated), pt.start_run("train", "swallowed") as run:
        SignalsWhenCollected()
        carried_on.append(True)
    assert carried_on == [True]  # the exception was indeed swallowed
    got = MlflowClient().get_run(run.run_id)
    assert got.info.status == "KILLED"
    assert got.data.tags[pt.STOPPED_BY_TAG] == "SIGTERM"


def test_a_model_cut_short_by_a_signal_is_finalized_failed(tracking):
    class StoppedWhileExported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:  # the first call is ours; the second is torch.export's trace
                signal.raise_signal(signal.SIGINT)
            return self.linear(x)

    with pytest.raises(Terminated), pt.start_run("train", "model") as run:
        pt.log_model(StoppedWhileExported(), np.zeros((2, 4), dtype=np.float32))
    client = MlflowClient()
    assert client.get_run(run.run_id).info.status == "KILLED"
    (model,) = client.search_logged_models([run.experiment_id])
    assert str(model.status) == "FAILED"  # MLflow alone leaves it PENDING forever


def test_a_child_dies_with_its_parent_even_by_sigkill(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]); from pipeline import signals; "
        "signals.die_with_parent(os.getppid()); open(sys.argv[2], 'w').write(str(os.getpid())); "
        "time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c",
         f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}, "
         f"{str(ROOT)!r}, {str(pid_file)!r}])"]
    )  # fmt: skip
    try:
        pid = int(_wait(lambda: pid_file.exists() and pid_file.read_text(), "child pid", parent))
    finally:
        parent.kill()
        parent.wait()
    assert _gone(pid), "the child outlived its SIGKILLed parent"


def test_runs_of_a_dead_process_are_ended_killed_and_live_ones_are_not(tracking):
    client = MlflowClient()
    runs = {}
    dead = _dead_process_tag()[pt.PROCESS_TAG]
    for name, tag in [("dead", dead), ("alive", pt.process_tag()[pt.PROCESS_TAG]),
                      ("elsewhere", "other-host:1:1"), ("untagged", None)]:  # fmt: skip
        run = client.create_run("0", run_name=name, tags={pt.PROCESS_TAG: tag} if tag else {})
        runs[name] = run.info.run_id
    model = client.create_logged_model("0", source_run_id=runs["dead"])
    ended = pt.end_orphaned_runs([client.get_run(r) for r in runs.values()])
    assert ended == [runs["dead"]]
    status = {name: client.get_run(r).info.status for name, r in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING",
                      "untagged": "RUNNING"}  # fmt: skip
    assert str(client.get_logged_model(model.model_id).status) == "FAILED"
    assert pt.process_alive(pt.process_tag()[pt.PROCESS_TAG]) is True


# --- the training loop ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_epoch_reports_every_completed_step(tracking, sample_file, monkeypatch, sig):
    """Stopped mid-epoch, between two of the loop's 50-step hand-overs: the steps since the
    last one used to be dropped."""
    real_epoch, seen = pipeline.steps.train_epoch, {}

    def stop_after_60_steps(state, *args, **kwargs):
        def send() -> None:
            while state.step < 60:
                time.sleep(0.001)
            os.kill(os.getpid(), sig)

        threading.Thread(target=send, daemon=True).start()
        try:
            return real_epoch(state, *args, **kwargs)
        finally:
            seen["steps"] = state.step

    monkeypatch.setattr(pipeline.steps, "train_epoch", stop_after_60_steps)
    with pytest.raises(Terminated):
        run_train(TrainConfig(data=str(sample_file), epochs=1, batch_size=8))
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "KILLED"
    assert seen["steps"] >= 60
    assert _steps(MlflowClient(), run.info.run_id) == list(range(1, seen["steps"] + 1))


# --- whole commands ---------------------------------------------------------------------


def _train_cli(tmp_path: Path, sample_file: Path, *args: object) -> subprocess.Popen:
    return start_cli("train", "--data", sample_file, *args, cwd=tmp_path)


def _only_run(client: MlflowClient, step: str = "train"):
    return _wait(
        lambda: next(iter(client.search_runs(["0"], f"tags.`pipeline.step` = '{step}'")), None),
        f"{step} run",
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", STOP[2:])
def test_hangup_and_quit_end_the_run_killed(tracking, tmp_path, sample_file, sig, code):
    """A closed terminal or SSH session (SIGHUP) and Ctrl-\\ (SIGQUIT), mid-loop."""
    proc = _train_cli(tmp_path, sample_file, "--epochs", 500, "--batch-size", 64)
    client = MlflowClient(tracking)
    run = _only_run(client)
    _wait(lambda: client.get_metric_history(run.info.run_id, "val/loss"), "epoch", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"Interrupted by {signals.name(sig)}" in err
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags[pt.STOPPED_BY_TAG] == signals.name(sig)
    steps = _steps(client, run.info.run_id)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3600 // 64  # epoch 1


@pytest.mark.slow
def test_nohup_train_outlives_its_terminal(tracking, tmp_path, sample_file):
    """`nohup pipeline train ...`, then the terminal closes (SIGHUP): training goes on."""
    args = ["nohup", sys.executable, "-m", "pipeline", "train", "--data", str(sample_file),
            "--epochs", "4", "--batch-size", "64"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    client = MlflowClient(tracking)
    run = _only_run(client)
    _wait(lambda: client.get_metric_history(run.info.run_id, "val/loss"), "epoch", proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and pt.STOPPED_BY_TAG not in run.data.tags
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 4


@pytest.mark.slow
@pytest.mark.parametrize("phase, sig, code", [("evaluation", signal.SIGTERM, 143),
                                              ("model logging", signal.SIGINT, 130)])  # fmt: skip
def test_a_signal_after_training_never_ends_finished(
    tracking, tmp_path, sample_file, phase, sig, code
):
    """Signals in evaluation and model logging were swallowed in a gc callback 4 times in 16."""
    proc = _train_cli(tmp_path, sample_file, "--epochs", 1, "--log-every", 10)
    client = MlflowClient(tracking)
    if phase == "evaluation":  # the last epoch's line; test evaluation and logging follow
        _wait(lambda: "epoch 1:" in proc.stderr.readline(), "epoch line", proc)
    else:
        run = _only_run(client)
        _wait(lambda: client.search_logged_models([run.info.experiment_id]), "logged model", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    run = _only_run(client)
    assert run.info.status == "KILLED"
    assert _steps(client, run.info.run_id) == list(range(10, STEPS_PER_EPOCH + 1, 10))
    for model in client.search_logged_models([run.info.experiment_id]):
        assert str(model.status) in ("READY", "FAILED")  # never PENDING


@pytest.mark.slow
def test_output_to_a_closed_pipe_does_not_fail_the_training(tracking, tmp_path, sample_file):
    """`pipeline train ... | head -1`."""
    proc = _train_cli(tmp_path, sample_file, "--epochs", 1, "--print-every", 1)
    assert proc.stdout.readline().startswith("Epoch 1, step 0:")
    proc.stdout.close()  # the reader is gone: every later print hits a broken pipe
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    run = _only_run(MlflowClient(tracking))
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics


# --- under `mlflow run` -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "kill mlflow run"])
def test_mlflow_run_interrupted_ends_its_run_killed(tracking, tmp_path, sample_file, how):
    """Ctrl-C signals the whole foreground process group; `kill PID` only `mlflow run`."""
    MlflowClient(tracking).search_experiments()  # create the store before `mlflow run` does
    proc = subprocess.Popen(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "train",
         "-P", f"data={sample_file}", "-P", "epochs=500", "-P", "batch_size=16"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a shell makes for a command
    )  # fmt: skip
    client = MlflowClient(tracking)
    run = _only_run(client)
    _wait(lambda: client.get_metric_history(run.info.run_id, "val/loss"), "epoch", proc)
    training = [p.pid for p in psutil.Process(proc.pid).children()]
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.terminate()
    proc.communicate(timeout=120)
    assert training and all(_gone(pid) for pid in training), "the training outlived mlflow run"
    # `mlflow run` writes FAILED over KILLED on Ctrl-C; a detached process writes KILLED back.
    _wait(lambda: client.get_run(run.info.run_id).info.status == "KILLED", "KILLED", timeout=60)
    time.sleep(1)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[pt.STOPPED_BY_TAG] == ("SIGINT" if how == "ctrl-c" else "SIGTERM")
    steps = _steps(client, run.info.run_id)
    assert steps == list(range(1, len(steps) + 1))


# --- sweeps -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_a_sweep_stops_its_trials_and_the_resume_ends_orphans(tracking, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"experiment: killed\ndata: {{data_dir: {tmp_path / 'data'}}}\n"
        "base: {epochs: 1, batch_size: 16, log_every: 10}\ngrid: {optimizer: [adam, sgd]}\n"
        # Trials start over: what ends orphans and reruns them is tested here; resuming an
        # interrupted trial from its checkpoint (the default) is tests/test_resume.py's.
        "resume: never\n"
    )
    client = MlflowClient(tracking)

    def trial_runs(status: str | None = None) -> list:
        experiment = client.get_experiment_by_name("killed")
        query = "tags.`pipeline.step` = 'train'"
        query += f" and attributes.status = '{status}'" if status else ""
        return client.search_runs([experiment.experiment_id], query) if experiment else []

    def training(n: int):
        return lambda: (
            len(runs := trial_runs()) >= n
            and all(client.get_metric_history(r.info.run_id, "train/loss") for r in runs)
        )

    # --parallel: SIGKILL the sweep; its trial processes get SIGTERM and end their runs KILLED.
    sweep = start_cli("sweep", path, "--parallel", 2, cwd=tmp_path)
    _wait(training(2), "two training trials", sweep)
    trials = [p.pid for p in psutil.Process(sweep.pid).children()]
    sweep.kill()
    sweep.communicate()
    left = [pid for pid in trials if not _gone(pid)]
    assert not left, f"outlived the SIGKILLed sweep: {[_describe(pid) for pid in left]}"
    _wait(lambda: len(trial_runs("KILLED")) == 2, "trial runs KILLED", timeout=60)

    # In one process: SIGKILL leaves the trial's run RUNNING; the resumed sweep ends it KILLED.
    sweep = start_cli("sweep", path, cwd=tmp_path)
    _wait(training(3), "a resumed trial", sweep)
    sweep.kill()
    sweep.communicate()
    (orphan,) = trial_runs("RUNNING")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", str(path)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {orphan.info.run_id} was left RUNNING by a process that is gone" in proc.stdout
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    experiment_id = client.get_experiment_by_name("killed").experiment_id
    statuses = [r.info.status for r in client.search_runs([experiment_id])]
    assert "RUNNING" not in statuses
    assert len(trial_runs("FINISHED")) == 2


# --- retrain ----------------------------------------------------------------------------

NAME = "digits-signals"


def _retrain(tmp_path: Path, **kwargs):
    path = tmp_path / "retrain.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name": NAME,
                "min_delta": 0.0,
                "prep": {"data_dir": str(tmp_path / "data")},
                "train": {"epochs": 1, "log_every": 10},
            }
        )  # fmt: skip
    )
    return retrain(load_config(path), lock_dir=tmp_path / "locks", **kwargs)


def _signal_before(monkeypatch, module, name: str, sig: int = signal.SIGTERM) -> None:
    """A real signal to this process just as `module.name` is called."""
    real = getattr(module, name)

    def signalled(*args, **kwargs):
        monkeypatch.setattr(module, name, real)
        signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)


@pytest.mark.slow
def test_a_signal_during_the_retrain_decision_lands_it_whole_or_not_at_all(
    tracking, tmp_path, monkeypatch, capsys
):
    client = MlflowClient()
    # A SIGKILLed retrain left its run and a nested one RUNNING; the next one ends them KILLED.
    gone = _dead_process_tag()
    orphan = client.create_run(
        "0", tags=gone | {"pipeline.step": "retrain", "retrain.model_name": NAME}
    ).info.run_id
    nested = client.create_run("0", tags=gone | {"mlflow.parentRunId": orphan}).info.run_id

    # During registration: the version is registered `pending`, and nothing else happens.
    _signal_before(monkeypatch, pipeline.registry, "register")
    with pytest.raises(Terminated):
        _retrain(tmp_path)
    assert registry.champion(NAME) is None
    assert client.get_model_version(NAME, "1").tags["retrain.decision"] == "pending"
    run_id = client.get_model_version(NAME, "1").tags["retrain_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(orphan).info.status == client.get_run(nested).info.status == "KILLED"

    # While the alias moves: the decision is written in full; the retrain succeeded.
    _signal_before(monkeypatch, pipeline.registry, "move_champion")
    result = _retrain(tmp_path)
    assert "SIGTERM arrived while the decision was being recorded" in capsys.readouterr().err
    assert (result.version, result.decision) == ("2", "promote")
    assert registry.champion(NAME).version == "2"
    v2 = client.get_model_version(NAME, "2").tags
    assert v2["retrain.decision"] == "promote" and v2["promoted_at"] and v2["retrain.reason"]
    assert client.get_model_version(NAME, "1").tags["retrain.decision"] == "abandoned"
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["retrain.decision"] == "promote"
    assert "RUNNING" not in {r.info.status for r in client.search_runs(["0"])}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # every handler put back


def test_the_next_retrain_completes_half_written_decisions(tracking):
    client = MlflowClient()
    client.create_registered_model(NAME)
    half = {
        # A keep cut short (decision word written last: still pending).
        "1": {"retrain.decision": "pending", "retrain.reason": "champion kept"},
        # A promote cut short after the alias moved.
        "2": {"retrain.decision": "pending", "retrain.champion_version": "none"},
        # Written by earlier code, the word first: a keep without its reason and time.
        "3": {"retrain.decision": "keep"},
        # Complete: left alone.
        "4": {"retrain.decision": "keep", "retrain.reason": "r", "retrain.decided_at": "t"},
    }
    for version, tags in half.items():
        client.create_model_version(NAME, f"file:///nowhere/{version}", tags=tags)
    client.set_registered_model_alias(NAME, "champion", "2")
    settle_crashed(NAME)
    tags = {v: client.get_model_version(NAME, v).tags for v in half}
    assert tags["1"]["retrain.decision"] == "abandoned"
    assert "never champion" in tags["1"]["retrain.reason"]
    assert tags["2"]["retrain.decision"] == "promote"
    assert tags["2"]["previous_champion"] == "none" and tags["2"]["promoted_at"]
    assert tags["3"]["retrain.decision"] == "keep" and tags["3"]["retrain.decided_at"]
    assert tags["4"] == half["4"]
    for v in ("1", "2", "3"):
        assert all(k in tags[v] for k in ("retrain.reason", "retrain.decided_at")), v
