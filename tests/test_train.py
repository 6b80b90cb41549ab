"""The train step against a real sqlite tracking store: what is logged, and how runs end."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import PrepConfig, TrainConfig
from pipeline.data import load_prepared, to_model_input
from pipeline.steps import run_main, run_prep, run_train

from .conftest import assert_one_line_error, run_cli, start_cli


def _one_epoch(data: str, **kwargs) -> TrainConfig:
    return TrainConfig(data=data, epochs=1, **kwargs)


def test_train_logs_params_curves_evaluation_and_model(tracking, sample_file):
    result = run_train(_one_epoch(str(sample_file)))
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "adam-cross_entropy-seed_cnn"
    params = run.data.params
    assert params["effective_lr"] == "0.001" and params["optimizer"] == "adam"
    assert params["n_params"] == "54170" and len(params["data_digest"]) == 64
    for key in ("model", "loss", "batch_size", "epochs", "seed", "device", "weight_decay"):
        assert key in params
    tags = run.data.tags
    for key in ("torch_version", "torchvision_version", "mlflow_version", "python_version"):
        assert tags[key]
    assert tags["device"] == "cpu"
    assert tags["pipeline.diverged"] == "false" and result.diverged_at is None

    steps = math.ceil(3600 / 128)
    for key in ("train/loss", "train/accuracy", "train/lr"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
    # val/* and epoch at the epoch's last global step, on train/*'s x axis
    for key in ("val/accuracy", "val/loss"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [steps]
    assert [(m.step, m.value) for m in client.get_metric_history(result.run_id, "epoch")] == [
        (steps, 1.0)
    ]
    metrics = run.data.metrics
    assert metrics["test/accuracy"] == pytest.approx(result.test_accuracy)
    assert metrics["test/accuracy"] > 0.8
    assert len([k for k in metrics if k.startswith("test/class_accuracy/")]) == 10
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"test_confusion_matrix.png", "test_confusion.json"} <= artifacts

    # The logged model, loaded through pyfunc, predicts what the trained model predicts.
    data = load_prepared(sample_file)
    x = to_model_input(data.splits["test"].images[:32])
    served = np.asarray(mlflow.pyfunc.load_model(result.model_uri).predict(x.numpy()))
    with torch.no_grad():
        expected = result.model.eval()(x).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)
    assert (served.argmax(1) == data.splits["test"].labels[:32].numpy()).mean() > 0.7


def test_same_seed_gives_identical_metrics(tracking, sample_file):
    a = run_train(_one_epoch(str(sample_file), seed=7, optimizer="momentum"))
    b = run_train(_one_epoch(str(sample_file), seed=7, optimizer="momentum"))
    c = run_train(_one_epoch(str(sample_file), seed=8, optimizer="momentum"))
    assert (a.test_loss, a.test_accuracy) == (b.test_loss, b.test_accuracy)
    assert a.test_loss != c.test_loss
    client = MlflowClient()
    hist = [
        [m.value for m in sorted(client.get_metric_history(r.run_id, "train/loss"),
                                 key=lambda m: m.step)]
        for r in (a, b)
    ]  # fmt: skip
    assert hist[0] == hist[1]


def test_main_chains_prep_and_train_and_reuses_prep(tracking, tmp_path):
    prep = PrepConfig(data_dir=str(tmp_path / "data"))
    first = run_main(prep, TrainConfig(epochs=1))
    second = run_main(prep, TrainConfig(epochs=1, optimizer="sgd"))
    client = MlflowClient()
    runs = client.search_runs(["0"])
    by_step = {}
    for r in runs:
        by_step.setdefault(r.data.tags["pipeline.step"], []).append(r)
    assert len(by_step["main"]) == 2 and len(by_step["train"]) == 2
    assert len(by_step["data_prep"]) == 1  # the second main reused it
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = {r.info.run_id: r for r in by_step["main"]}
    for child in by_step["train"]:
        assert child.data.tags["mlflow.parentRunId"] in parents
    reused = [p.data.tags["data_prep_reused"] for p in parents.values()]
    assert sorted(reused) == ["False", "True"]
    assert {first.run_id, second.run_id} == {r.info.run_id for r in by_step["train"]}


def test_train_accepts_a_data_prep_run_id(tracking, tmp_path):
    prepared = run_prep(PrepConfig(data_dir=str(tmp_path / "d")))
    result = run_train(_one_epoch(prepared.run_id, log_every=10))
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["data_digest"] == prepared.digest
    assert len(MlflowClient().get_metric_history(result.run_id, "train/loss")) == 2


def _runs_not_finished_cleanly(uri: str) -> list[str]:
    client = MlflowClient(uri)
    return [r.info.status for r in client.search_runs(["0"]) if r.info.status == "RUNNING"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--optimizer", "lbfgs"], "'lbfgs' is not one of 'sgd'"),
        (["--loss", "hinge"], "'hinge' is not one of 'cross_entropy'"),
        (["--model", "resnet"], "'resnet' is not one of 'seed_cnn'"),
        (["--lr", "0"], "'0' must be 'auto' or a number > 0"),
        (["--lr", "-0.1"], "'-0.1' must be 'auto' or a number > 0"),
        (["--batch-size", "0"], "0 is not in the range x>=1"),
        (["--device", "tpu"], "'tpu' is not one of 'auto'"),
    ],
)
def test_bad_train_options_fail_in_one_line(tracking, tmp_path, sample_file, args, needle):
    proc = run_cli("train", "--data", str(sample_file), *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert not _runs_not_finished_cleanly(tracking)


def test_bad_data_fails_in_one_line_and_leaves_no_run(tracking, tmp_path, sample_file):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(sample_file.read_bytes()[:1000])
    cases = {
        str(tmp_path / "missing.pt"): "does not exist",
        str(corrupt): "is not a valid prepared file",
        "0123456789abcdef0123456789abcdef": "neither an existing file nor a data_prep run id",
    }
    for data, needle in cases.items():
        proc = run_cli("train", "--data", data, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert_one_line_error(proc, needle)
        assert_one_line_error(proc, data)
        # The metric writer process the command started ahead ended with it.
        assert _processes_in(tmp_path) == [], data
    # Refused before the store is opened: that writer process, still importing MLflow, too.
    proc = run_cli("train", "--data", str(sample_file), "--optimizer", "nesterov",
                   "--momentum", "0", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(proc, "optimizer 'nesterov' needs momentum > 0")
    assert _processes_in(tmp_path) == []
    proc = run_cli("prep", "--dataset", "cifar", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "'cifar' is not one of 'mnist-sample'")
    assert MlflowClient(tracking).search_runs(["0"]) == []


def _processes_in(folder) -> list[int]:
    """Pids of the processes other than this one whose working folder is `folder`."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (
                entry.name.isdigit()
                and entry.name != str(os.getpid())
                and (Path(os.readlink(entry / "cwd")) == Path(folder))
            ):
                pids.append(int(entry.name))
    return pids


def test_a_fresh_store_is_created_by_the_writer_process_started_ahead(
    tmp_path, sample_file, monkeypatch
):
    """`pipeline train` on a store that does not exist yet: its metric writer process,
    started before torch is imported, runs MLflow's migrations (whose log lines it keeps to
    itself), not the training process; the run is then FINISHED in that store."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    uri = f"sqlite:///{folder}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PIPELINE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("PIPELINE_SPOOL_DIR", str(tmp_path / "spool"))
    proc = run_cli("train", "--data", str(sample_file), "--epochs", "1", cwd=folder, check=True)
    assert "Creating initial MLflow database tables" not in proc.stderr, proc.stderr
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert _processes_in(folder) == []


def test_offline_torchvision_dataset_names_the_sample(tracking, tmp_path):
    proc = run_cli("prep", "--dataset", "fashion-mnist", "--data-dir", "nothing", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_line_error(proc, "--dataset mnist-sample")
    assert MlflowClient(tracking).search_runs(["0"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_the_run_killed_and_keeps_what_was_logged(
    tracking, tmp_path, sample_file, sig, code
):
    proc = start_cli("train", "--data", sample_file, "--epochs", 500, cwd=tmp_path)
    client = MlflowClient(tracking)
    deadline = time.time() + 120
    run = None
    while time.time() < deadline:
        runs = client.search_runs(["0"])
        if runs and client.get_metric_history(runs[0].info.run_id, "val/loss"):
            run = runs[0]
            break
        time.sleep(0.5)
    assert run is not None, "training never logged an epoch"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps and sorted(steps) == list(range(1, len(steps) + 1))  # flushed, no gaps


def test_failure_inside_a_run_marks_it_failed(tracking, sample_file, monkeypatch):
    import pipeline.steps

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("injected failure during evaluation")

    monkeypatch.setattr(pipeline.steps, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError, match="injected"):
        run_train(_one_epoch(str(sample_file)))
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED"
    assert MlflowClient().get_metric_history(run.info.run_id, "train/loss")  # flushed anyway


def test_labels_out_of_range_are_rejected_before_a_run(tracking, tmp_path, sample_file):
    payload = torch.load(sample_file, weights_only=True)
    payload["test_labels"] = payload["test_labels"] + 100
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    proc = run_cli("train", "--data", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "malformed 'test' split")
    assert MlflowClient(tracking).search_runs(["0"]) == []
