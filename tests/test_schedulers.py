"""Learning-rate schedules: the lr of every step, the schedule as training state, what a run
logs as train/lr, and bad values refused in one line on every entry."""

from __future__ import annotations

import math
from dataclasses import replace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import TrainConfig
from pipeline.data import load_prepared, to_model_input
from pipeline.errors import PipelineError
from pipeline.experiments import load_experiment
from pipeline.loop import TrainState, train_epoch
from pipeline.losses import build_loss
from pipeline.models import build_model
from pipeline.optimizers import build_optimizer
from pipeline.registry import Version
from pipeline.retrain import champion_train_config
from pipeline.schedulers import build_scheduler
from pipeline.steps import requested_params, run_train, validate_train

from .conftest import assert_one_line_error, run_cli
from .test_components import Recorder
from .test_values import assert_no_runs

LR = 0.1


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The lr each step of the run trains at, stepping the schedule as the loop does."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=LR)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


def test_none_is_the_notebooks_constant_lr():
    cfg = TrainConfig(epochs=2)
    weight = torch.nn.Parameter(torch.zeros(1))
    assert build_scheduler(cfg, torch.optim.SGD([weight], lr=LR), 5) is None
    assert _lrs(cfg, 5) == [LR] * 10


def test_step_decays_by_gamma_every_step_size_epochs():
    lrs = _lrs(TrainConfig(scheduler="step", step_size=2, gamma=0.5, epochs=5), 3)
    expected = [LR] * 6 + [LR / 2] * 6 + [LR / 4] * 3
    assert lrs == pytest.approx(expected)


def test_cosine_falls_from_lr_to_eta_min_on_the_last_step():
    lrs = _lrs(TrainConfig(scheduler="cosine", eta_min_fraction=0.1, epochs=2), 6)
    assert lrs[0] == pytest.approx(LR) and lrs[-1] == pytest.approx(0.1 * LR)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # CosineAnnealingLR's half cosine, t_max = the run's steps - 1
    t_max = len(lrs) - 1
    for t, lr in enumerate(lrs):
        assert lr == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * t / t_max)) / 2)


def test_onecycle_rises_to_lr_then_anneals_to_a_tiny_lr():
    lrs = _lrs(TrainConfig(scheduler="onecycle", pct_start=0.25, epochs=4), 10)
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(LR / 25) and max(lrs) == pytest.approx(LR)
    assert peak == round(0.25 * 40) - 1
    assert lrs[-1] == pytest.approx(LR / 25 / 1e4)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))


@pytest.mark.parametrize("scheduler", ["none", "step", "cosine", "onecycle"])
def test_warmup_ramps_linearly_to_where_the_schedule_starts(scheduler):
    cfg = TrainConfig(scheduler=scheduler, epochs=3)
    plain = _lrs(cfg, 4)
    warm = _lrs(replace(cfg, warmup_steps=3), 4)
    start = _lrs(replace(cfg, epochs=3), 4)[0]  # the schedule's first lr, without warm-up
    assert warm[:3] == pytest.approx([start / 4, start * 2 / 4, start * 3 / 4])
    assert warm[3] == pytest.approx(start)
    if scheduler in ("none", "step"):  # not stretched over the run: shifted by the warm-up
        assert warm[3:] == pytest.approx(plain[: len(plain) - 3])
    assert len(warm) == len(plain) == 12


def _tiny_state(cfg: TrainConfig, steps_per_epoch: int) -> TrainState:
    torch.manual_seed(0)
    model = build_model("mlp")
    optimizer = build_optimizer("sgd", list(model.parameters()), LR, 0.0, 0.0, torch.device("cpu"))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    return TrainState(model, optimizer, torch.Generator().manual_seed(0), scheduler)


def test_the_schedule_is_training_state_and_logged_lr_is_the_steps_own(sample_file):
    """Resumed from its state_dict after epoch 1, a run trains epoch 2 at the same lrs as
    one that never stopped; each logged lr is the one its step trained at."""
    data = load_prepared(sample_file)
    x, y = to_model_input(data.splits["train"].images[:256]), data.splits["train"].labels[:256]
    cfg = TrainConfig(scheduler="cosine", warmup_steps=2, epochs=2, eta_min_fraction=0.2)
    loss_fn = build_loss("cross_entropy")
    whole, rec = _tiny_state(cfg, 4), Recorder()
    for _ in range(2):
        train_epoch(whole, x, y, loss_fn, rec, batch_size=64)
    assert [r.lr for r in rec.rows] == pytest.approx(_lrs(cfg, 4))

    first = _tiny_state(cfg, 4)
    train_epoch(first, x, y, loss_fn, Recorder(), batch_size=64)
    saved = first.state_dict()
    assert saved["scheduler"]["last_epoch"] == 4
    resumed, rec2 = _tiny_state(cfg, 4), Recorder()
    resumed.load_state_dict(saved)
    train_epoch(resumed, x, y, loss_fn, rec2, batch_size=64)
    assert [r.lr for r in rec2.rows] == [r.lr for r in rec.rows[4:]]
    assert [r.loss for r in rec2.rows] == [r.loss for r in rec.rows[4:]]
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lr scheduler"):
        _tiny_state(TrainConfig(), 4).load_state_dict(saved)


def test_train_run_logs_the_schedule_as_train_lr(tracking, sample_file):
    cfg = TrainConfig(data=str(sample_file), epochs=1, batch_size=256, scheduler="onecycle",
                      warmup_steps=3, optimizer="sgd", lr=0.05)  # fmt: skip
    result = run_train(cfg)
    client = MlflowClient()
    points = client.get_metric_history(result.run_id, "train/lr")
    history = sorted((m.step, m.value) for m in points)
    steps = math.ceil(3600 / 256)
    assert [s for s, _ in history] == list(range(1, steps + 1))
    expected = []
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.05)
    scheduler = build_scheduler(cfg, optimizer, steps)
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [v for _, v in history] == pytest.approx(expected)
    assert history[0][1] == pytest.approx(0.05 / 25 / 4) and 0.045 < max(expected) <= 0.05
    params = client.get_run(result.run_id).data.params
    assert params["scheduler"] == "onecycle" and params["warmup_steps"] == "3"
    assert params["pct_start"] == "0.3"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--scheduler", "linear"], "Invalid value for '--scheduler': 'linear' is not one of"),
        (["--gamma", "0"], "Invalid value for '--gamma': '0' must be a number in (0, 1]"),
        (["--scheduler", "cosine", "--gamma", "0.5"],
         "gamma=0.5 applies to scheduler 'step' only; scheduler is 'cosine'"),
        (["--pct-start", "0.5"], "pct_start=0.5 applies to scheduler 'onecycle' only"),
        (["--warmup-steps", "29"], "warmup_steps=29 must be less than the run's 29 steps "
         "(1 epochs x 29 steps)"),
    ],
)  # fmt: skip
def test_bad_schedules_fail_in_one_line_before_a_run(tracking, tmp_path, sample_file, args, needle):
    proc = run_cli("train", "--data", str(sample_file), "--epochs", "1", *args, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert_no_runs(tracking)


def test_schedules_in_experiment_files(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment: x\nbase: {epochs: 1, warmup_steps: 10}\n"
        "runs: [{scheduler: none}, {scheduler: cosine, eta_min_fraction: 0.1},"
        " {scheduler: step, gamma: 0.5, step_size: 2}, {scheduler: onecycle}]\n"
    )
    trials = load_experiment(path).trials
    assert [t.config.scheduler for t in trials] == ["none", "cosine", "step", "onecycle"]
    assert trials[1].config.eta_min_fraction == 0.1 and trials[2].config.step_size == 2
    assert trials[0].config.warmup_steps == 10
    path.write_text("experiment: x\ngrid: {scheduler: [cosine, exponential]}\n")
    with pytest.raises(PipelineError, match=r"grid.scheduler 'exponential' is invalid; valid "
                       r"choices: none, step, cosine, onecycle$"):  # fmt: skip
        load_experiment(path)
    path.write_text("experiment: x\nbase: {gamma: 0.5}\ngrid: {scheduler: [step, cosine]}\n")
    with pytest.raises(PipelineError, match="gamma=0.5 applies to scheduler 'step' only"):
        load_experiment(path)


def test_python_api_checks_the_schedule():
    with pytest.raises(PipelineError, match=r"^unknown scheduler 'cyclic'; valid choices: none"):
        validate_train(TrainConfig(data="x.pt", scheduler="cyclic"))
    validate_train(TrainConfig(data="x.pt", scheduler="step", step_size=3, gamma=1.0))


@pytest.mark.parametrize("scheduler", ["none", "cosine"])
def test_retrain_reads_a_champions_schedule_back_from_its_params(tracking, scheduler):
    """`--params-from champion` reads the train run's params back: scheduler `none` is the
    choice, not an unset value (as `none` is for lr and momentum)."""
    cfg = TrainConfig(scheduler=scheduler, warmup_steps=5, optimizer="momentum")
    with mlflow.start_run() as run:
        mlflow.log_params(requested_params(cfg))
    assert champion_train_config(Version("1", run.info.run_id, 0, {})) == cfg
