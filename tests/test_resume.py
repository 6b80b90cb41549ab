"""Checkpoints and resume: real processes, real SIGKILL and SIGTERM, a real sqlite store.

A run killed at any point (mid-epoch, at an epoch boundary, during evaluation, during model
logging), several times over, and resumed, is the same MLflow run and logs bit for bit what
the uninterrupted run logs: every train/* and val/* step once, the same final metrics.
The processes kill themselves with a real SIGKILL at named points (PIPELINE_KILL_AT), so the
points are exact; CPU, one torch thread, the mlp on the offline sample.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline import checkpointing
from pipeline import tracking as pt
from pipeline.checkpointing import CheckpointConfig, Checkpointer, load, write_atomic
from pipeline.configfile import FileErrors, checkpoint_config
from pipeline.errors import PipelineError
from pipeline.tracking import resume as tracking_resume

from .conftest import ROOT, assert_one_line_error

STEPS_PER_EPOCH = 29  # 3600 training digits, batch 128
TRAIN = ["--model", "mlp", "--epochs", "2", "--checkpoint-every", "epoch,10"]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(checkpointing.KILL_AT_ENV, None)
    if kill_at:
        env[checkpointing.KILL_AT_ENV] = kill_at
    return env


def _train(data: Path, *args: str, kill_at: str | None = None, cwd: Path):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", str(data), *TRAIN, *args],
        cwd=cwd,
        env=_env(kill_at),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _series(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run but system/* and time/*, as (step, value) in step order."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(("system", "time"))]
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def _only_run(client: MlflowClient, exclude: set[str]) -> str:
    runs = pt.train_runs("0")
    ids = {r.info.run_id for r in runs} - exclude
    assert len(ids) == 1, ids
    return ids.pop()


@pytest.mark.slow
def test_killed_four_ways_and_resumed_is_bit_identical(tracking, tmp_path, sample_file):
    """SIGKILL mid-epoch, at an epoch boundary, during validation (resumed from the artifacts
    alone: another machine) and during model logging: four kills, one run, the
    uninterrupted run's numbers exactly. ~6 processes: ~60 s idle, minutes under load."""
    client = MlflowClient()
    whole = _train(sample_file, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    baseline = _only_run(client, set())
    expected = _series(client, baseline)

    kills = ["step:13", "epoch:1", "val:2", "model+until"]
    run_id = None
    for i, kill_at in enumerate(kills):
        proc = _train(sample_file, "--resume", "auto", kill_at=kill_at, cwd=tmp_path)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stdout, proc.stderr)
        found = _only_run(client, {baseline})
        assert run_id in (None, found), "a resume opened a new run"
        run_id = found
        if i == 0:
            assert "resuming" not in proc.stdout  # the first process starts the run
        else:
            assert f"train: resuming run {run_id}" in proc.stdout, proc.stdout
        if kill_at == "epoch:1":  # the next one resumes on a machine without local files
            local = tmp_path / "checkpoints" / run_id
            assert [p.name for p in checkpointing.local(local)] == ["step-000000029.pt"]
            shutil.rmtree(local)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL: nothing could end it

    done = _train(sample_file, "--resume", "auto", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming run {run_id} from global step 58 (epoch 2, batch 0)" in done.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking_resume.RESUMED_TAG] == "4"
    # the process killed at epoch:1 resumed from 10; val:2 from 29 (the artifact); model
    # from 50; the last from 58 (the epoch-end checkpoint)
    assert run.data.tags[tracking_resume.RESUMED_FROM_TAG] == "10,29,50,58"
    got = _series(client, run_id)
    assert got.keys() == expected.keys()
    for key, points in expected.items():
        assert got[key] == points, key  # bit for bit, and every step exactly once
    assert [s for s, _ in got["train/loss"]] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [s for s, _ in got["val/loss"]] == [29, 58]
    models = client.search_logged_models(
        experiment_ids=["0"], filter_string=f"source_run_id = '{run_id}'"
    )
    assert sorted(str(m.status) for m in models) == ["FAILED", "READY"]  # the one cut off
    assert not (tmp_path / "checkpoints" / run_id).exists()  # dropped once FINISHED
    assert tracking_resume.uploaded(run_id) == []


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_completes(tracking, tmp_path, sample_file):
    """SIGTERM writes a checkpoint of the step it stopped at before the run ends KILLED;
    `--resume RUN_ID` goes on from exactly there, and each step is logged once."""
    client = MlflowClient()
    args = ["--data", str(sample_file), "--model", "mlp", "--epochs", "40",
            "--checkpoint-every", "100000"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    run_id = None
    while time.time() < deadline and proc.poll() is None:
        runs = pt.train_runs("0")
        if runs and client.get_metric_history(runs[0].info.run_id, "val/loss"):
            run_id = runs[0].info.run_id
            break
        time.sleep(0.1)
    assert run_id is not None, proc.stderr.read() if proc.poll() is not None else "no epoch"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert client.get_run(run_id).info.status == "KILLED"
    [path] = checkpointing.local(tmp_path / "checkpoints" / run_id)
    stopped = load(path)["state"]["step"]
    logged = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert stopped == max(logged)  # the checkpoint is the last step the run logged

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", *args, "--resume", run_id],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"from global step {stopped} " in done.stdout
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 40 * STEPS_PER_EPOCH + 1))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_resume_refusals_are_one_line(tracking, tmp_path, sample_file):
    """Resuming with other params, a FINISHED run, a run of a live process, or a bad
    --checkpoint-every: one line naming what is wrong, and no run touched."""
    client = MlflowClient()
    first = _train(sample_file, "--epochs", "1", kill_at="step:5", cwd=tmp_path)
    assert first.returncode == -signal.SIGKILL
    run_id = _only_run(client, set())
    other = _train(sample_file, "--epochs", "1", "--lr", "0.01", "--resume", run_id, cwd=tmp_path)
    assert_one_line_error(other, f"cannot resume run {run_id}: lr 'auto' (run) vs '0.01' (now)")
    assert client.get_run(run_id).info.status == "RUNNING"
    bad = _train(sample_file, "--checkpoint-every", "sometimes", cwd=tmp_path)
    assert_one_line_error(bad, "checkpoint_every 'sometimes' is invalid")

    # A RUNNING run whose process is alive (this test's) is never taken over.
    pt_tag = pt.process_tag()
    client.set_tag(run_id, pt.PROCESS_TAG, pt_tag[pt.PROCESS_TAG])
    live = _train(sample_file, "--epochs", "1", "--resume", run_id, cwd=tmp_path)
    assert_one_line_error(live, "is alive")
    auto = _train(sample_file, "--epochs", "1", "--resume", "auto", cwd=tmp_path)
    assert auto.returncode == 0, auto.stderr
    assert "still running" in auto.stdout  # and a new run instead
    finished = _only_run(client, {run_id})
    again = _train(sample_file, "--epochs", "1", "--resume", finished, cwd=tmp_path)
    assert_one_line_error(again, "is FINISHED; nothing to resume")


def test_dead_or_alive_across_hosts(tracking):
    """On this host the process table decides; on another, the heartbeat: fresh is alive,
    stale is dead, none is unknown and never ended. `pipeline cleanup` ends the dead."""
    client = MlflowClient()
    now = time.time()
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    host, _, started = pt.process_tag()[pt.PROCESS_TAG].split(":")
    cases = {
        "here-dead": {pt.PROCESS_TAG: f"{host}:{dead_pid.pid}:{started}"},
        "here-alive": pt.process_tag(),
        "there-fresh": {pt.PROCESS_TAG: "other:1:1", tracking_resume.HEARTBEAT_TAG: f"{now - 20}"},
        "there-stale": {pt.PROCESS_TAG: "other:1:1", tracking_resume.HEARTBEAT_TAG: f"{now - 999}"},
        "there-silent": {pt.PROCESS_TAG: "other:1:1"},
    }
    ids = {}
    for name, tags in cases.items():
        ids[name] = client.create_run("0", run_name=name, tags=tags).info.run_id
    states = {n: tracking_resume.liveness(client.get_run(i))[0] for n, i in ids.items()}
    assert states == {"here-dead": "dead", "here-alive": "alive", "there-fresh": "alive",
                      "there-stale": "dead", "there-silent": "unknown"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "cleanup"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ended = {n for n, i in ids.items() if client.get_run(i).info.status == "KILLED"}
    assert ended == {"here-dead", "there-stale"}
    assert proc.stdout.count("ended KILLED") == 2


def test_checkpoint_file_is_atomic_and_safe_to_load(tmp_path):
    """A write cut off leaves the previous file whole; the loader takes no pickled code."""
    path = tmp_path / checkpointing.name_of(3)
    write_atomic(path, {"format": checkpointing.FORMAT, "x": torch.arange(3)})
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, {"format": checkpointing.FORMAT, "x": Boom()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    evil = tmp_path / checkpointing.name_of(4)
    torch.save({"format": checkpointing.FORMAT, "f": os.getcwd}, evil)  # a pickled callable
    with pytest.raises(PipelineError, match="cannot be read"):
        load(evil)


def test_checkpoint_every_and_config_keys():
    assert checkpointing.parse_every("epoch,60s") == checkpointing.Every(True, 0, 60.0)
    assert checkpointing.parse_every("500") == checkpointing.Every(False, 500, 0.0)
    assert checkpointing.parse_every("none").never
    for bad in ("0", "-5", "soon", "epoch,0s"):
        with pytest.raises(PipelineError, match="valid: a comma-separated list"):
            checkpointing.parse_every(bad)
    err = FileErrors("x.yaml")
    assert checkpoint_config(err, {}) == CheckpointConfig(resume="auto")
    assert checkpoint_config(err, {"resume": "never", "checkpoint_every": 100}).resume is None
    with pytest.raises(PipelineError, match="x.yaml: resume 'sometimes' is invalid"):
        checkpoint_config(err, {"resume": "sometimes"})


def test_checkpointer_writes_on_its_thread_and_keeps_only_the_newest(tmp_path):
    """The training thread only copies the state; the write is on a thread. (What that costs
    is measured by `make bench`, not asserted here: timings belong in benchmarks.)"""
    from pipeline.loop import TrainState
    from pipeline.models import build_model

    model = build_model("lenet5")
    state = TrainState(model, torch.optim.Adam(model.parameters()), torch.Generator())
    log = tracking_resume.PointLog()
    ck = Checkpointer("r", CheckpointConfig(directory=str(tmp_path)), {}, log)
    for step in range(1, 6):
        state.step = step
        ck.save(state)
    ck.join()
    assert ck.count == 5
    assert [p.name for p in checkpointing.local(tmp_path / "r")] == ["step-000000005.pt"]


def test_a_slow_upload_is_followed_by_the_newest_checkpoint_not_the_next_one(tmp_path):
    """Checkpoints written while an upload is on its way wait; the newest of them is
    uploaded when it is done, so the artifacts end at the last checkpoint written (a resume
    on another machine starts there). Found by CI: under load, the epoch-end checkpoint was
    written during the previous one's upload and never uploaded."""
    import threading

    from pipeline.loop import TrainState
    from pipeline.models import build_model

    model = build_model("mlp")
    state = TrainState(model, torch.optim.Adam(model.parameters()), torch.Generator())
    first_started, release = threading.Event(), threading.Event()
    uploads: list[tuple[str, list[str]]] = []

    def upload(path: Path, older: list[str]) -> None:
        load(path)  # the file is whole when its upload starts
        first_started.set()
        release.wait(30)  # a slow server
        uploads.append((path.name, older))

    ck = Checkpointer("r", CheckpointConfig(directory=str(tmp_path)), {},
                      tracking_resume.PointLog(), upload=upload)  # fmt: skip
    state.step = 10
    ck.save(state, wait=True)
    assert first_started.wait(30)
    for step in (20, 29):  # written while step 10 is on its way
        state.step = step
        ck.save(state, wait=True)
    release.set()
    ck.settle()
    assert uploads == [
        ("step-000000010.pt", []),
        ("step-000000029.pt", ["step-000000010.pt"]),  # 20 never went: 29 replaced it
    ]
    assert not ck.warned


@pytest.mark.slow
def test_early_stopping_stops_at_the_same_epoch_after_a_kill(tracking, tmp_path, sample_file):
    """Patience 1 on val/accuracy stops after epoch 6 (best: 5) and logs the best model;
    killed in epoch 6 and resumed from the epoch-5 checkpoint, it stops there too, with the
    same numbers."""
    client = MlflowClient()
    es = ["--epochs", "8", "--lr", "0.01", "--early-stopping-patience", "1",
          "--monitor", "val/accuracy", "--checkpoint-every", "epoch"]  # fmt: skip
    whole = _train(sample_file, *es, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    baseline = _only_run(client, set())
    expected = _series(client, baseline)
    assert expected["best_epoch"] == [(6 * STEPS_PER_EPOCH, 5.0)]
    assert expected["stopped_epoch"] == [(6 * STEPS_PER_EPOCH, 6.0)]
    assert client.get_run(baseline).data.tags["pipeline.early_stopped"] == "true"

    killed = _train(sample_file, *es, "--resume", "auto", kill_at="step:160", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_id = _only_run(client, {baseline})
    done = _train(sample_file, *es, "--resume", "auto", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming run {run_id} from global step {5 * STEPS_PER_EPOCH} " in done.stdout
    assert _series(client, run_id) == expected


@pytest.mark.slow
def test_sweep_resumes_an_interrupted_trial_from_its_checkpoint(tracking, tmp_path):
    """A sweep killed (SIGKILL) in the middle of its first trial, run again, resumes that
    trial in its own run from its checkpoint, and runs the second one afresh."""
    client = MlflowClient()
    data_dir = tmp_path / "data"
    spec = {
        "experiment": "resumed",
        "data": {"dataset": "mnist-sample", "data_dir": str(data_dir)},
        "base": {"model": "mlp", "epochs": 2},
        "grid": {"optimizer": ["adam", "sgd"]},
        "checkpoint_every": "epoch",
    }
    path = tmp_path / "resumed.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = [sys.executable, "-m", "pipeline", "sweep", str(path)]
    first = subprocess.run(sweep, cwd=tmp_path, env=_env("step:40"), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert first.returncode == -signal.SIGKILL, first.stderr
    experiment = client.get_experiment_by_name("resumed").experiment_id
    [trial] = pt.train_runs(experiment)
    assert trial.info.status == "RUNNING"

    again = subprocess.run(sweep, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"train: resuming run {trial.info.run_id} from global step 29" in again.stdout
    runs = {r.info.run_id: r for r in pt.train_runs(experiment)}
    assert len(runs) == 2 and trial.info.run_id in runs
    resumed = runs[trial.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[tracking_resume.RESUMED_FROM_TAG] == "29"
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 2 * STEPS_PER_EPOCH + 1))


@pytest.mark.slow
def test_main_resumes_its_parent_and_train_child(tracking, tmp_path):
    """`pipeline main --resume auto` reopens the killed main run, reuses its data_prep and
    resumes its train child from the checkpoint: three runs in all, each FINISHED."""
    client = MlflowClient()
    args = [sys.executable, "-m", "pipeline", "main", "--data-dir", str(tmp_path / "data"),
            *TRAIN]  # fmt: skip
    killed = subprocess.run(args, cwd=tmp_path, env=_env("step:13"), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = subprocess.run([*args, "--resume", "auto"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = client.search_runs(["0"])
    steps = sorted(r.data.tags[pt.STEP_TAG] for r in runs)
    assert steps == ["data_prep", "main", "train"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    [train] = [r for r in runs if r.data.tags[pt.STEP_TAG] == "train"]
    assert train.data.tags[tracking_resume.RESUMED_FROM_TAG] == "10"
    logged = [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")]
    assert sorted(logged) == list(range(1, 2 * STEPS_PER_EPOCH + 1))


@pytest.mark.slow
def test_retrain_resumes_a_killed_challenger(tracking, tmp_path):
    """A retrain killed (SIGKILL) while its challenger trains: the next retrain ends the old
    runs KILLED, prepares the same data again and resumes that challenger's run from its
    checkpoint instead of training it from the start."""
    client = MlflowClient()
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "model_name": "resumed-model",
        "prep": {"data_dir": str(tmp_path / "data")},
        "train": {"model": "mlp", "epochs": 2},
        "checkpoint_every": "epoch",
    }))  # fmt: skip
    args = [sys.executable, "-m", "pipeline", "retrain", "--config", str(config),
            "--lock-dir", str(tmp_path / "locks")]  # fmt: skip
    killed = subprocess.run(args, cwd=tmp_path, env=_env("step:40"), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [challenger] = pt.train_runs("0")
    done = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"train: resuming run {challenger.info.run_id} from global step 29" in done.stdout
    [train] = pt.train_runs("0")
    assert train.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 2 * STEPS_PER_EPOCH + 1))


class _StopAt:
    """A step hook that saves the state at `step` (as a checkpoint would) and then stops the
    loop with a stop signal's exception, as SIGTERM would."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, None

    def due(self, state) -> bool:
        return state.step == self.step

    def __call__(self, state) -> None:
        from pipeline.signals import Terminated

        self.saved = checkpointing._copy(state.state_dict())
        raise Terminated(signal.SIGTERM)


def _mlp_state():
    from pipeline.early_stopping import EarlyStopping
    from pipeline.loop import TrainState
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10, 0.5)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(0), scheduler)
    state.early_stopping = EarlyStopping(2, "val/loss")
    return state


def test_a_state_saved_mid_epoch_trains_on_bit_identically(sample_file):
    """In-process, for the loop alone: stopped at step 37 (epoch 2, batch 8), saved, loaded
    into a freshly built state and trained on, the rows and weights are the uninterrupted
    ones exactly: the epoch's order is drawn again, the schedule and Adam go on."""
    from pipeline.data import load_prepared, to_model_input
    from pipeline.loop import train_epoch
    from pipeline.losses import build_loss

    from .test_components import Recorder

    torch.set_num_threads(1)
    split = load_prepared(sample_file).splits["train"]
    x, y = to_model_input(split.images), split.labels
    loss_fn = build_loss("cross_entropy")
    whole, rec = _mlp_state(), Recorder()
    for _ in range(3):
        train_epoch(whole, x, y, loss_fn, rec)

    first, before = _mlp_state(), Recorder()
    stop = _StopAt(37)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(3):
            train_epoch(first, x, y, loss_fn, before, on_step=stop)
    resumed, after = _mlp_state(), Recorder()
    resumed.load_state_dict(stop.saved)
    assert (resumed.epoch, resumed.batch, resumed.step) == (2, 8, 37)
    while not (resumed.epoch == 3 and resumed.batch == STEPS_PER_EPOCH):
        train_epoch(resumed, x, y, loss_fn, after)
    assert [r.step for r in before.rows] == list(range(1, 38))

    def numbers(rows):  # all but the wall-clock time
        return [(r.epoch, r.epoch_step, r.step, r.loss, r.accuracy, r.lr) for r in rows]

    assert numbers(before.rows + after.rows) == numbers(rec.rows)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_rule_and_its_state():
    """Stops after `patience` epochs without strict improvement; NaN never improves; the
    best epoch's weights are a copy; its state round-trips through a checkpoint file."""
    from pipeline.early_stopping import EarlyStopping

    model = torch.nn.Linear(2, 1)
    es = EarlyStopping(2, "val/accuracy")
    outcomes = []
    for epoch, value in enumerate([0.5, 0.7, 0.7, float("nan")], 1):
        if epoch == 2:
            torch.nn.init.constant_(model.weight, 3.0)
        outcomes.append(es.update(epoch, value, model))
        torch.nn.init.constant_(model.weight, -1.0)  # training goes on changing it
    assert outcomes == [False, False, False, True]
    assert (es.best, es.best_epoch, es.stopped_epoch) == (0.7, 2, 4)
    assert torch.equal(es.best_weights["weight"], torch.full((1, 2), 3.0))
    loss = EarlyStopping(1, "val/loss")
    assert [loss.update(e, v, model) for e, v in [(1, 1.0), (2, 0.9), (3, 0.95)]] == [
        False, False, True,
    ]  # fmt: skip
