"""Data-parallel training (pipeline/distributed.py, pipeline/launch.py): real ranks on gloo,
started by `pipeline train --nproc-per-node`, by torchrun and by two launchers, against a
real sqlite store. One thread per rank: the machine is small and shared."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import TrainConfig
from pipeline.data import Split, file_digest, load_prepared, save_prepared
from pipeline.distributed import BatchSplit, Group
from pipeline.launch import train_args
from pipeline.steps import run_train

from .conftest import ROOT, assert_one_line_error, free_port, run_cli, start_cli

TRAIN_SIZE = 3599  # odd: the last batch of 128 (15 samples) splits 8 / 7 between two ranks
RTOL = 1e-5  # every train/loss point and the test metrics, 2 ranks against 1 process


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory, sample_file) -> Path:
    """The offline sample with one training image less."""
    data = load_prepared(sample_file)
    train = data.splits["train"]
    data.splits["train"] = Split(train.images[:TRAIN_SIZE], train.labels[:TRAIN_SIZE])
    path = tmp_path_factory.mktemp("odd") / "odd.pt"
    save_prepared(data, path)
    return path


@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("PIPELINE_THREADS_PER_RANK", "1")


def _runs(client: MlflowClient, step: str = "train") -> list:
    return client.search_runs(["0"], f"tags.`pipeline.step` = '{step}'")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _ranks(launcher: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the ranks a launcher process started (its children)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(launcher.pid).children():
            env = child.environ()
            if "RANK" in env:
                found[int(env["RANK"])] = child.pid
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("no ranks started")


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line with {text!r}; exit {proc.poll()}")


@pytest.mark.parametrize("n_global, world", [(128, 2), (15, 2), (1, 2), (7, 3), (2, 4)])
def test_batch_split_covers_each_sample_once_weighted_by_its_share(n_global, world):
    idx = torch.randperm(1000)[:n_global]
    parts = [BatchSplit(rank, world)(idx) for rank in range(world)]
    taken = torch.cat([p for p, w in parts if w > 0])
    assert torch.equal(taken, idx)  # in order, each once
    # Weights n_local * world / n_global: DDP's mean of the weighted per-rank means is then
    # the mean over the global batch.
    assert sum(w for _, w in parts) == pytest.approx(world)
    for (part, weight), rank in zip(parts, range(world), strict=True):
        assert len(part) >= 1  # an empty rank still runs backward, on one sample at weight 0
        assert BatchSplit(rank, world).sizes(n_global) == (len(part) if weight else 0)


def test_train_args_give_back_the_config():
    cfg = TrainConfig(data="x.pt", lr=0.1 + 0.2, momentum=None, amp=True, seed=2**64 - 1)
    from pipeline.cli import cli

    ctx = cli.commands["train"].make_context("train", train_args(cfg))
    params = {k: v for k, v in ctx.params.items() if k in cfg.__dataclass_fields__}
    assert TrainConfig(**params | {"compile": ctx.params["compile_"]}) == cfg


def test_checkpoint_args_reach_the_ranks_unchanged():
    from pipeline.checkpointing import CheckpointConfig
    from pipeline.cli import _checkpoint_config, cli
    from pipeline.launch import checkpoint_args

    for ck in (CheckpointConfig("epoch,10,30s", True, "abc123", "/tmp/ck"), CheckpointConfig()):
        args = ["--data", "x.pt", *checkpoint_args(ck)]
        ctx = cli.commands["train"].make_context("train", args)
        assert _checkpoint_config(dict(ctx.params)) == ck


def test_a_seconds_trigger_is_rank_0s_decision_asked_every_50_steps():
    """Each rank's clock differs: with `agree` (Group.agree on a DDP run) the seconds
    trigger is asked at every AGREE_EVERY-th step only, and what it answers is the decision;
    a rank other than 0 (writes=False) decides but writes nothing."""
    from types import SimpleNamespace

    from pipeline.checkpointing import AGREE_EVERY, CheckpointConfig, Checkpointer

    asked = []
    follower = Checkpointer("r", CheckpointConfig("0.001s"), {}, None, writes=False,
                            agree=lambda due: asked.append(due) or False)  # fmt: skip
    time.sleep(0.01)
    due = [s for s in range(1, 2 * AGREE_EVERY + 1) if follower.due(SimpleNamespace(step=s))]
    assert due == [] and asked == [True, True]  # rank 0 said no, twice
    follower.agree = lambda due: True
    assert follower.due(SimpleNamespace(step=AGREE_EVERY))
    assert not follower.due(SimpleNamespace(step=AGREE_EVERY + 1))
    follower.save(SimpleNamespace(epoch=1, batch=AGREE_EVERY, step=AGREE_EVERY))
    assert follower.count == 0 and not follower.folder.exists()


def test_a_batch_that_does_not_divide_is_one_line_before_any_rank(tracking, tmp_path, odd_file):
    proc = run_cli("train", "--data", str(odd_file), "--batch-size", "127",
                   "--nproc-per-node", "2", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(proc, "batch_size 127 does not divide among 2 ranks")
    assert not _runs(MlflowClient(tracking))


class _Recorder:
    """Rank 0's inner tracker: what StepReducer hands it."""

    def __init__(self) -> None:
        self.rows: list = []
        self.metrics: list[tuple[dict, int, float | None]] = []

    def log_steps(self, rows) -> None:
        self.rows += rows

    def log_metrics(self, metrics, step, timestamp=None) -> None:
        self.metrics.append((metrics, step, timestamp))


def _two_hosts_rank(rank: int, port: int, sample: Path, tmp: Path) -> None:
    """Rank `rank` of two gloo ranks, one per "host" (node rank = rank), running the checks
    of the tests below in one start-up of two processes; results in `tmp`."""
    import json

    import torch.distributed as dist

    from pipeline.loop import StepLog

    os.environ["PIPELINE_DATA_CACHE"] = str(tmp / f"cache{rank}")
    # rank 0's interval is the run's; rank 1's own must not count
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5" if rank == 0 else "60"
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = Group(torch.device("cpu"), rank, 2, 0, 1, rank, "gloo", BatchSplit(rank, 2))

    # rank 1's path stands for the file missing on its host
    path = sample if rank == 0 else tmp / "not-on-this-host" / sample.name
    (tmp / f"rank{rank}").write_text(str(group.local_copy(path, file_digest(sample))))

    inner = _Recorder()
    # a resumed run that has node1's steps up to 4: its next one is 5
    tracker = group.tracker(inner, 256, 128, {"system/node1/cpu_utilization_percentage": 4})
    rows = [StepLog(1, i, i + 1, time.time(), 1.0, 0.5, 0.1) for i in range(2)]
    seen = []
    tracker.log_steps(rows[:1])  # not due yet: nothing gathered
    seen.append(len(inner.metrics))
    try:  # a report on the way out of an exception: no collective at all
        raise RuntimeError
    except RuntimeError:
        tracker.log_steps(rows[1:])
    time.sleep(1.2)
    tracker.log_steps(rows[1:])  # due: one gather with the report
    seen.append(len(inner.metrics))
    time.sleep(0.8)
    group.finish(tracker)  # the last ones; the sampler stops
    seen.append(len(inner.metrics))
    result = {"seen": seen, "metrics": inner.metrics, "steps": [r.step for r in inner.rows]}
    (tmp / f"hosts{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, sample_file) -> Path:
    """The folder of `_two_hosts_rank`'s results, its two ranks spawned once."""
    tmp = tmp_path_factory.mktemp("two-hosts")
    tmp.joinpath("t0").write_text(repr(time.time()))
    torch.multiprocessing.spawn(_two_hosts_rank, (free_port(), sample_file, tmp), 2)
    return tmp


@pytest.mark.slow
def test_a_prepared_file_missing_on_a_host_is_sent_by_rank_0(two_hosts, sample_file):
    tmp_path = two_hosts
    assert Path((tmp_path / "rank0").read_text()) == sample_file
    copy = Path((tmp_path / "rank1").read_text())
    assert copy.parent == tmp_path / "cache1" / file_digest(sample_file)[:16]
    assert copy.read_bytes() == sample_file.read_bytes()
    assert not (tmp_path / "cache0").exists() and len(list(copy.parent.iterdir())) == 1


@pytest.mark.slow
def test_other_hosts_system_metrics_reach_rank_0_with_the_reports(two_hosts):
    """Transport alone: a gather with a report once due and one at the end, none on the way
    out of an exception; node1's points numbered on from a resumed run's last step, with
    their own timestamps, under MLflow's names; rank 1 hands nothing to a tracker."""
    import json

    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    zero, one = (json.loads((two_hosts / f"hosts{r}.json").read_text()) for r in (0, 1))
    assert one == {"seen": [0, 0, 0], "metrics": [], "steps": []}
    assert zero["steps"] == [1, 2]  # the report on the way out of an exception was dropped
    before, with_report, at_end = zero["seen"]
    assert before == 0 and 1 <= with_report < at_end, zero["seen"]
    names = set()
    for monitor in (CPUMonitor(), DiskMonitor(), NetworkMonitor()):
        monitor.collect_metrics()
        names |= set(monitor.aggregate_metrics())
    steps, stamps = [], []
    for metrics, step, timestamp in zero["metrics"]:
        assert set(metrics) == {f"system/node1/{n}" for n in names}
        steps.append(step)
        stamps.append(timestamp)
    assert steps == list(range(5, 5 + len(steps)))
    t0 = float((two_hosts / "t0").read_text())
    assert stamps == sorted(stamps) and t0 < stamps[0] and stamps[-1] < time.time()


@pytest.mark.slow
def test_two_ranks_log_one_run_with_the_single_process_numbers(
    tracking, tmp_path, odd_file, monkeypatch
):
    """Same parameters and seed: every train/loss point within RTOL, train/lr exact, and
    one run, written by rank 0. System metrics: one process's as MLflow names them, one
    host's under its node id, no other."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    single = run_train(TrainConfig(data=str(odd_file), epochs=1, optimizer="momentum"))
    proc = run_cli("train", "--data", str(odd_file), "--epochs", "1", "--optimizer", "momentum",
                   "--nproc-per-node", "2", cwd=tmp_path, check=True)  # fmt: skip
    client = MlflowClient(tracking)
    (ddp,) = [r for r in _runs(client) if r.info.run_id != single.run_id]
    assert ddp.info.status == "FINISHED"
    assert f"run_id={ddp.info.run_id}" in proc.stdout and proc.stdout.count("train:") == 1
    params = ddp.data.params
    assert (params["world_size"], params["nnodes"], params["backend"]) == ("2", "1", "gloo")
    assert ddp.data.tags["torch_num_threads"] == "1"
    steps = -(-TRAIN_SIZE // 128)
    for key in ("train/loss", "train/accuracy", "train/lr"):
        one, two = (_history(client, r, key) for r in (single.run_id, ddp.info.run_id))
        assert [s for s, _ in two] == list(range(1, steps + 1)), key
        # accuracy: exact here; one sample of a batch may flip on a near-tie of two logits
        exact = {"rel": 0, "abs": 0}
        tol = {"train/loss": {"rel": RTOL}, "train/accuracy": {"abs": 1 / 128}}.get(key, exact)
        assert [v for _, v in two] == pytest.approx([v for _, v in one], **tol), key
    one = MlflowClient().get_run(single.run_id).data.metrics
    for key in ("test/loss", "test/accuracy", "val/loss", "val/accuracy"):
        assert ddp.data.metrics[key] == pytest.approx(one[key], rel=RTOL), key
    names = {k.removeprefix("system/") for k in one if k.startswith("system/")}
    assert "cpu_utilization_percentage" in names and not any("/" in n for n in names)
    assert {k for k in ddp.data.metrics if k.startswith("system/")} == {
        f"system/node0/{n}" for n in names
    }


@pytest.mark.slow
def test_torchrun_runs_the_cli_as_ranks(tracking, tmp_path, sample_file):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pipeline", "train", "--data", str(sample_file), "--epochs", "1",
         "--log-every", "1000"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(MlflowClient(tracking))
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert "test/accuracy" in run.data.metrics


@pytest.mark.slow
def test_main_keeps_its_parent_and_children(tracking, tmp_path):
    proc = run_cli("main", "--epochs", "1", "--log-every", "1000", "--nproc-per-node", "2",
                   cwd=tmp_path, check=True)  # fmt: skip
    client = MlflowClient(tracking)
    (parent,) = _runs(client, "main")
    (train,) = _runs(client, "train")
    (prep,) = _runs(client, "data_prep")
    assert parent.info.status == train.info.status == "FINISHED", proc.stderr[-2000:]
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert prep.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["train_run_id"] == train.info.run_id
    assert train.data.params["world_size"] == "2"


@pytest.mark.slow
def test_two_launchers_form_one_training_with_one_run(tracking, tmp_path, sample_file, monkeypatch):
    """Two hosts, simulated: two launchers, --nnodes 2, a c10d rendezvous on 127.0.0.1. The
    one run has each host's system metrics under its node id, by the same names (MLflow's
    sampler on rank 0's host, ours on the other), sampled every 0.1 s here."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        start_cli("train", "--data", sample_file, "--epochs", "10", "--log-every", "1000",
                  "--nnodes", "2", "--node-rank", rank, "--rdzv-endpoint", endpoint,
                  cwd=tmp_path)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    client = MlflowClient(tracking)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    assert (run.data.params["world_size"], run.data.params["nnodes"]) == ("2", "2")
    assert sum("train: test/loss" in out for out, _ in outputs) == 1
    assert not any("system/" in err for _, err in outputs)  # the UI's, not the terminal's
    system = [k.split("/") for k in run.data.metrics if k.startswith("system/")]
    names = {node: {n for _, nd, n in system if nd == node} for node in ("node0", "node1")}
    assert {len(k) for k in system} == {3} and {nd for _, nd, _ in system} == set(names)
    assert "cpu_utilization_percentage" in names["node0"] and names["node1"] == names["node0"]
    for name in names["node1"]:
        points = client.get_metric_history(run.info.run_id, f"system/node1/{name}")
        assert len(points) >= 2, name
        assert sorted(p.step for p in points) == list(range(len(points))), name  # each once
        by_step = [p.timestamp for p in sorted(points, key=lambda p: p.step)]
        assert by_step == sorted(by_step), name


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_takes_the_others_down_and_ends_the_run(
    tracking, tmp_path, sample_file, victim
):
    """SIGKILL to one rank: the other is stopped, the launcher fails with one line, and the
    run is not left RUNNING (rank 0 ends it; if rank 0 itself died, the launcher does)."""
    launcher = start_cli("train", "--data", sample_file, "--epochs", "500",
                         "--nproc-per-node", "2", cwd=tmp_path)  # fmt: skip
    _wait_for_line(launcher, "epoch 1:")
    os.kill(_ranks(launcher)[victim], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("Error: rank")]
    assert f"Error: rank {victim} (local rank {victim}, pid" in errors[-1]
    assert "was killed by SIGKILL" in errors[-1]
    (run,) = _runs(MlflowClient(tracking))
    assert run.info.status in ("FAILED", "KILLED")


@pytest.mark.slow
def test_sigterm_to_the_launcher_ends_the_run_killed(tracking, tmp_path, sample_file):
    launcher = start_cli("train", "--data", sample_file, "--epochs", "500",
                         "--nproc-per-node", "2", cwd=tmp_path)  # fmt: skip
    _wait_for_line(launcher, "epoch 1:")
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, err[-3000:]
    (run,) = _runs(MlflowClient(tracking))
    assert run.info.status == "KILLED"
    assert run.data.tags["pipeline.stopped_by"] == "SIGTERM"
    steps = [s for s, _ in _history(MlflowClient(tracking), run.info.run_id, "train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 29  # epoch 1, each once


@pytest.mark.slow
def test_mlflow_run_train_on_two_ranks_adopts_its_run_and_ctrl_c_ends_it_killed(
    tracking, tmp_path, sample_file
):
    """`-P nproc_per_node=2`: rank 0 trains into the run `mlflow run` made; Ctrl-C (SIGINT to
    the whole group) ends it KILLED, also after `mlflow run` has written FAILED over it."""
    MlflowClient(tracking).search_experiments()  # create the store before `mlflow run` does
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "train",
         "-P", f"data={sample_file}", "-P", "epochs=500", "-P", "nproc_per_node=2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a shell makes for a command
    )  # fmt: skip
    _wait_for_line(proc, "epoch 1:")
    client = MlflowClient(tracking)
    (run,) = client.search_runs(["0"])  # the one `mlflow run` made, adopted by rank 0
    assert run.data.params["nproc_per_node"] == "2" and run.data.params["world_size"] == "2"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    deadline = time.monotonic() + 60
    while client.get_run(run.info.run_id).info.status != "KILLED":
        assert time.monotonic() < deadline, client.get_run(run.info.run_id).info.status
        time.sleep(0.2)
    time.sleep(1)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pipeline.stopped_by"] == "SIGINT"
    assert len(client.search_runs(["0"])) == 1


def _uninterrupted(client, args, tmp_path) -> tuple[str, dict[str, list]]:
    """Train `args` once without interruption: its run id and every logged series but
    system/* and time/*, as (step, value) pairs, that an interrupted run must match."""
    run_cli(*map(str, args), cwd=tmp_path, check=True)
    (baseline,) = _runs(client)
    keys = [k for k in baseline.data.metrics if not k.startswith(("system", "time"))]
    return baseline.info.run_id, {k: _history(client, baseline.info.run_id, k) for k in keys}


def _kill_env(kill_at: str) -> dict[str, str]:
    from pipeline.checkpointing import KILL_AT_ENV

    return {**os.environ, "PYTHONPATH": str(ROOT), KILL_AT_ENV: kill_at}


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_into_the_same_run_bit_identically(
    tracking, tmp_path, sample_file
):
    """SIGKILL to rank 0 mid-epoch (step 13; checkpoint at 10), then to rank 1 of the resumed
    training (step 23; checkpoint at 20), then `--resume RUN_ID --nproc-per-node 2`: one
    run, FINISHED, every train/loss step once, every logged value equal to the uninterrupted
    2-rank run's bit for bit (tolerance 0: same ranks, same thread count, gloo on the CPU)."""
    from pipeline.tracking import resume as tracking_resume

    args = ["train", "--data", sample_file, "--model", "mlp", "--epochs", "1",
            "--checkpoint-every", "10", "--nproc-per-node", "2"]  # fmt: skip
    client = MlflowClient(tracking)
    baseline_id, expected = _uninterrupted(client, args, tmp_path)

    first = start_cli(*args, cwd=tmp_path, env=_kill_env("step:13@0"))
    _, err = first.communicate(timeout=300)
    assert first.returncode == 1 and "rank 0 (local rank 0" in err, err[-3000:]
    (run,) = [r for r in _runs(client) if r.info.run_id != baseline_id]
    run_id = run.info.run_id
    assert run.info.status == "KILLED"  # the launcher ended it: rank 0 died by SIGKILL

    second = start_cli(*args, "--resume", run_id, cwd=tmp_path, env=_kill_env("step:23@1"))
    out, err = second.communicate(timeout=300)
    # rank 1's SIGKILL comes first; rank 0 then loses its peer (which the launcher may see first)
    assert second.returncode == 1 and "Error: rank" in err, err[-3000:]
    assert f"train: resuming run {run_id} from global step 10" in out, out
    assert client.get_run(run_id).info.status in ("FAILED", "KILLED")

    done = run_cli(*map(str, args), "--resume", run_id, cwd=tmp_path, check=True)
    assert f"train: resuming run {run_id} from global step 20" in done.stdout, done.stdout
    assert len(_runs(client)) == 2  # the baseline and this one: no run opened by a resume
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking_resume.RESUMED_TAG] == "2"
    assert run.data.tags[tracking_resume.RESUMED_FROM_TAG] == "10,20"
    assert sorted(k for k in run.data.metrics if not k.startswith(("system", "time"))) == sorted(
        expected
    )
    for key, points in expected.items():
        assert _history(client, run_id, key) == points, key  # exact, and each step once
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 30))
    assert not (tmp_path / "checkpoints" / run_id).exists()  # dropped once FINISHED


@pytest.mark.slow
def test_sigkill_to_the_launcher_resumes_from_rank_0s_last_checkpoint(
    tracking, tmp_path, sample_file
):
    """SIGKILL to the launcher once rank 0 has written a checkpoint: its ranks stop (SIGTERM,
    they die with it), the run ends KILLED without a checkpoint of its own, and the resume
    goes on from the last periodic one, with the uninterrupted run's numbers exactly."""
    args = ["train", "--data", sample_file, "--model", "mlp", "--epochs", "3",
            "--checkpoint-every", "10", "--nproc-per-node", "2"]  # fmt: skip
    client = MlflowClient(tracking)
    baseline_id, expected = _uninterrupted(client, args, tmp_path)

    launcher = start_cli(*args, cwd=tmp_path)
    folder, deadline = tmp_path / "checkpoints", time.monotonic() + 180
    while not any(folder.glob("*/step-*.pt")):
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)
    ranks = _ranks(launcher)
    launcher.kill()
    launcher.wait(timeout=30)
    import psutil

    psutil.wait_procs([psutil.Process(p) for p in ranks.values() if psutil.pid_exists(p)], 120)
    (run,) = [r for r in _runs(client) if r.info.run_id != baseline_id]
    run_id = run.info.run_id
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["pipeline.stopped_by"] == "SIGTERM"
    done = run_cli(*map(str, args), "--resume", run_id, cwd=tmp_path, check=True)
    resumed_at = re.search(rf"resuming run {run_id} from global step (\d+)", done.stdout)
    assert resumed_at, done.stdout
    step = int(resumed_at[1])
    assert step > 0 and (step % 10 == 0 or step % 29 == 0)  # a periodic one, none at the stop
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, points in expected.items():
        assert _history(client, run_id, key) == points, key
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 3 * 29 + 1))
