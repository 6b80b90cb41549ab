"""Models, losses and optimizers picked by name, and the loop itself (no MLflow)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline import loop, signals
from pipeline.config import LOSSES, OPTIMIZERS
from pipeline.data import load_prepared, to_model_input
from pipeline.errors import PipelineError
from pipeline.loop import StepLog, TrainState, evaluate, train_epoch
from pipeline.losses import build_loss
from pipeline.models import build_model, count_parameters, training_forward
from pipeline.optimizers import build_optimizer, resolve_hparams


class Recorder:
    def __init__(self) -> None:
        self.rows: list[StepLog] = []
        self.metrics: list[tuple[dict, int]] = []

    def log_steps(self, rows):
        self.rows.extend(rows)

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))


def test_seed_cnn_is_exactly_the_notebook_model():
    model = build_model("seed_cnn")
    kinds = [type(m) for m in model]
    assert kinds == [nn.Conv2d, nn.Flatten, nn.Linear]
    conv, _, linear = model
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 8, (3, 3))
    assert (linear.in_features, linear.out_features) == (8 * 26 * 26, 10)
    assert count_parameters(model) == 8 * 9 + 8 + 8 * 26 * 26 * 10 + 10


def test_training_forward_matches_the_model_up_to_float_rounding():
    torch.manual_seed(0)
    model = build_model("seed_cnn")
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    fast = training_forward(model)
    assert fast is not None
    expected, got = model(x), fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(expected, y), params)
    fast_grads = torch.autograd.grad(nn.functional.cross_entropy(got, y), params)
    for g, f in zip(grads, fast_grads, strict=True):
        torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_training_forward_leaves_other_models_alone(name):
    assert training_forward(build_model(name)) is None


@pytest.mark.parametrize("name", ["seed_cnn", "lenet5", "mlp"])
def test_models_map_images_to_logits(name):
    assert build_model(name)(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def _state(optimizer: str, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = build_model("seed_cnn")
    lr, momentum = resolve_hparams(optimizer, None, None)
    opt = build_optimizer(
        optimizer, list(model.parameters()), lr, momentum, 0.0, torch.device("cpu")
    )
    return TrainState(model, opt, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_optimizer_with_every_loss_takes_finite_steps(sample_file, optimizer, loss):
    data = load_prepared(sample_file)
    x = to_model_input(data.splits["train"].images[:512])
    y = data.splits["train"].labels[:512]
    state, rec = _state(optimizer), Recorder()
    before = [p.detach().clone() for p in state.model.parameters()]
    train_epoch(state, x, y, build_loss(loss), rec, batch_size=128)
    assert [r.step for r in rec.rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r.loss) for r in rec.rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters(), strict=True))


def test_loss_falls_over_an_epoch_on_the_sample(sample_file):
    data = load_prepared(sample_file)
    x, y = to_model_input(data.splits["train"].images), data.splits["train"].labels
    state, rec = _state("adam"), Recorder()
    loss_fn = build_loss("cross_entropy")
    before = evaluate(state.model, x, y, loss_fn, 10)
    train_epoch(state, x, y, loss_fn, rec, batch_size=128)
    after = evaluate(state.model, x, y, loss_fn, 10)
    assert len(rec.rows) == math.ceil(3600 / 128)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.8
    first, last = rec.rows[:5], rec.rows[-5:]
    assert sum(r.loss for r in last) < 0.5 * sum(r.loss for r in first)


def test_log_every_logs_every_nth_step(sample_file):
    data = load_prepared(sample_file)
    x, y = to_model_input(data.splits["train"].images), data.splits["train"].labels
    state, rec = _state("sgd"), Recorder()
    train_epoch(state, x, y, build_loss("nll"), rec, batch_size=100, log_every=5)
    assert [r.step for r in rec.rows] == list(range(5, 37, 5))


def test_logged_loss_and_accuracy_are_each_steps_own(sample_file):
    # Batches of 34 over 3600 samples: 106 steps, handed over 50, 50 and 6 at a time; the
    # last step has 30 samples (its accuracy is over 30), in a buffer row used before.
    data = load_prepared(sample_file)
    x, y = to_model_input(data.splits["train"].images), data.splits["train"].labels
    seen: list[tuple[float, float]] = []  # what each step's loss and accuracy really were

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, labels)
        hits = (logits.argmax(1) == labels).sum().item()
        seen.append((loss.item(), hits / len(labels)))
        return loss

    state, rec = _state("adam"), Recorder()
    train_epoch(state, x, y, loss_fn, rec, batch_size=34)
    assert [r.step for r in rec.rows] == list(range(1, 107))
    assert [(r.loss, r.accuracy) for r in rec.rows] == seen
    assert len({r.accuracy for r in rec.rows}) > 10  # accuracies that moved, not one value


def test_a_stop_inside_a_hand_over_leaves_its_rows_for_the_next_one():
    # A stop signal between reading the pending steps and handing them over (here: while
    # their rows are built) must leave every pending step and its loss in place: the
    # train_epoch's final hand-over then reports them, once, with their own values.
    pending = loop._Pending(batch_size=2)
    labels = torch.tensor([0, 1])
    for step, logits in ((1, [[1.0, 0.0], [1.0, 0.0]]), (2, [[1.0, 0.0], [0.0, 1.0]])):
        pending.add(step - 1, step, 0.0, torch.tensor(step / 10), torch.tensor(logits),
                    labels, 0.1)  # fmt: skip

    class StoppedOnce:
        stopped = False

        @property
        def epoch(self) -> int:
            if not StoppedOnce.stopped:
                StoppedOnce.stopped = True
                raise signals.Terminated()
            return 1

    rec = Recorder()
    with pytest.raises(signals.Terminated):
        loop._report(StoppedOnce(), pending, rec)
    loop._report(StoppedOnce(), pending, rec)
    assert [(r.step, r.loss, r.accuracy) for r in rec.rows] == [
        (1, pytest.approx(0.1), 0.5), (2, pytest.approx(0.2), 1.0)
    ]  # fmt: skip
    assert not pending


def test_a_stop_before_an_epochs_first_step_leaves_the_last_epoch_done(sample_file):
    # A stop signal in the new epoch's first forward: the state must still read "epoch 1
    # done" (epoch 1, batch 0, generator as epoch 1 left it), or a resume skips epoch 2.
    data = load_prepared(sample_file)
    x, y = to_model_input(data.splits["train"].images), data.splits["train"].labels
    state = _state("adam")
    train_epoch(state, x, y, build_loss("cross_entropy"), Recorder(), batch_size=128)
    state.batch = 0  # validated: what run_train does at the epoch's end
    epoch_rng, generator = state.epoch_rng.clone(), state.generator.get_state()

    def stopped(logits, labels):
        raise signals.Terminated()

    with pytest.raises(signals.Terminated):
        train_epoch(state, x, y, stopped, Recorder(), batch_size=128)
    assert (state.epoch, state.batch, state.step) == (1, 0, 29)
    assert torch.equal(state.epoch_rng, epoch_rng)
    assert torch.equal(state.generator.get_state(), generator)
    # Trained on, it is the epoch 2 that training without the stop would have been.
    rec = Recorder()
    train_epoch(state, x, y, build_loss("cross_entropy"), rec, batch_size=128)
    assert (state.epoch, state.step) == (2, 58) and rec.rows[0].epoch == 2


def test_evaluation_confusion_matrix_counts_every_sample(sample_file):
    data = load_prepared(sample_file)
    x, y = to_model_input(data.splits["test"].images), data.splits["test"].labels
    ev = evaluate(build_model("mlp"), x, y, build_loss("cross_entropy"), 10, batch_size=300)
    assert sum(map(sum, ev.confusion)) == 1000
    assert [sum(row) for row in ev.confusion] == [100] * 10
    assert ev.accuracy == pytest.approx(sum(ev.confusion[i][i] for i in range(10)) / 1000)


def test_mse_is_on_probabilities():
    logits = torch.tensor([[10.0, -10.0]])
    assert build_loss("mse")(logits, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: build_model("resnet"), "unknown model 'resnet'; valid choices: seed_cnn"),
        (lambda: build_loss("hinge"), "unknown loss 'hinge'; valid choices: cross_entropy"),
        (lambda: resolve_hparams("lbfgs", None, None), "unknown optimizer 'lbfgs'; valid"),
        (lambda: resolve_hparams("adam", -1.0, None), "lr must be > 0, got -1.0"),
        (lambda: resolve_hparams("adam", None, 0.9), "momentum=0.9 does not apply"),
        (lambda: build_loss("mse", 0.1), "applies to loss 'cross_entropy' only"),
    ],
)
def test_bad_component_names_raise_clear_errors(call, needle):
    with pytest.raises(PipelineError, match=needle.replace("(", r"\(")):
        call()
