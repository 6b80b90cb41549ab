"""Every knob of a run, with its default and its valid values, in one visible place.

The CLI, the MLproject and the experiment files all fill these dataclasses; nothing else
invents defaults, and RANGES is the one statement of which numbers each field takes: the
CLI's option types, the YAML files' values and the steps' own checks all ask it.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import asdict, dataclass

from pipeline.errors import PipelineError, quote

DATASETS = ("mnist-sample", "mnist", "fashion-mnist", "kmnist", "folder")
MODELS = ("seed_cnn", "lenet5", "mlp")
LOSSES = ("cross_entropy", "mse", "nll", "multi_margin")
OPTIMIZERS = (
    "sgd",
    "momentum",
    "nesterov",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    "adadelta",
    "radam",
    "nadam",
)
DEVICES = ("auto", "cpu", "cuda", "mps")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
MONITORS = ("val/loss", "val/accuracy")  # early stopping; the direction follows the name
ES_MODELS = ("best", "last")  # which epoch's weights an early-stopped run logs
CHOICES = {
    "dataset": DATASETS,
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "loss": LOSSES,
    "device": DEVICES,
    "channels": (1, 3),  # grayscale or RGB
    "scheduler": SCHEDULERS,
    "monitor": MONITORS,
    "early_stopping_model": ES_MODELS,
}


@dataclass(frozen=True)
class PrepConfig:
    """How to build the prepared train/val/test file."""

    dataset: str = "mnist-sample"
    data_dir: str = "data"
    val_fraction: float = 0.1  # carved from train, stratified
    test_fraction: float = 0.2  # mnist-sample and folder: the IDX sets ship an official test split
    split_seed: int = 0
    image_size: int = 28  # folder only: images are resized to image_size x image_size
    channels: int = 1  # folder only: 1 = grayscale, 3 = RGB

    def params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `None` means "the per-optimizer default", resolved in optimizers.py."""

    data: str = ""  # a prepared .pt file or a data_prep run id
    model: str = "seed_cnn"
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0  # cross_entropy only
    # Learning-rate schedule, stepped per optimizer step (pipeline/schedulers.py).
    scheduler: str = "none"  # the notebook: a constant lr
    warmup_steps: int = 0  # linear warm-up before any schedule; 0 = none
    step_size: int = 1  # step: epochs between decays
    gamma: float = 0.1  # step: factor of each decay
    eta_min_fraction: float = 0.0  # cosine: the last step's lr, as a fraction of lr
    pct_start: float = 0.3  # onecycle: share of the steps spent rising to lr
    epochs: int = 10
    batch_size: int = 128
    seed: int = 42
    device: str = "auto"
    log_every: int = 1  # steps between logged train/* points
    print_every: int = 0  # the notebook's "Epoch e, step i" line; 0 = off
    amp: bool = False  # bfloat16 autocast; worth it on CUDA only
    compile: bool = False  # torch.compile; pays off on CUDA for larger models
    # Stop after this many epochs without improvement of `monitor`; 0 = off.
    early_stopping_patience: int = 0
    monitor: str = "val/loss"
    early_stopping_model: str = "best"  # the model logged: the best epoch's, or the last

    @property
    def run_name(self) -> str:
        return f"{self.optimizer}-{self.loss}-{self.model}"


PREP_DEFAULTS = asdict(PrepConfig())

# torch.manual_seed and torch.Generator.manual_seed take [-2**63, 2**64 - 1] and map a
# negative seed s to 2**64 + s (-1 and 2**64 - 1 give the same numbers): non-negative
# seeds only, so that each seed has one spelling in the params.
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class Range:
    """The finite numbers from `low` to `high` (None: no upper bound), ends open or closed."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # an int is; a huge one
            return False  # would overflow math.isfinite
        above = value > self.low if self.low_open else value >= self.low
        if self.high is None:
            return above
        return above and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low_open and self.high_open:
            return f"between {low} and {high} (exclusive)"
        if not self.low_open and not self.high_open:
            return f"between {low} and {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


FRACTION = Range(0, 1, low_open=True, high_open=True)
SEED = Range(0, SEED_MAX, integer=True)
RANGES = {
    "val_fraction": FRACTION,
    "test_fraction": FRACTION,
    "split_seed": SEED,
    # 12: the smallest input lenet5's two 5x5 convs and 2x2 pools leave a pixel of.
    "image_size": Range(12, 1024, integer=True),
    "lr": Range(0, low_open=True),  # None (auto) is checked by its caller
    "momentum": Range(0),
    "weight_decay": Range(0),
    "label_smoothing": Range(0, 1, high_open=True),
    "warmup_steps": Range(0, integer=True),
    "step_size": Range(1, integer=True),
    "gamma": Range(0, 1, low_open=True),  # a decay: 1 keeps the lr, above 1 would grow it
    "eta_min_fraction": Range(0, 1),
    "pct_start": FRACTION,
    "epochs": Range(1, integer=True),
    "batch_size": Range(1, integer=True),
    "seed": SEED,
    "log_every": Range(1, integer=True),
    "print_every": Range(0, integer=True),
    "early_stopping_patience": Range(0, integer=True),
}


def check_range(name: str, value: object, where: str | None = None) -> None:
    """Raise PipelineError unless `value` is valid for the field `name` of RANGES.

    The message starts with `where` (default: the field's name), e.g.
    `lr must be a finite number > 0, got nan`; None (auto) is valid for lr and momentum.
    """
    rng = RANGES[name]
    where = where or name
    if value is None and name in ("lr", "momentum"):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if rng.integer else "a number"
        raise PipelineError(f"{where} must be {kind} {rng}, got {quote(value)}")
    if rng.integer and not isinstance(value, int):
        raise PipelineError(f"{where} must be an integer {rng}, got {quote(value)}")
    if value not in rng:
        finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
        raise PipelineError(f"{where} must be {finite}{rng}, got {quote(value)}")


# What MLflow stores. A value it refuses, or cuts, is refused here before a run exists, not
# half-way through one. Lengths from mlflow/utils/validation.py (MLflow 3.17) and, where
# stricter, from its SQL schema (mlflow/store/tracking/dbmodels/models.py), which a
# PostgreSQL or MySQL store enforces and sqlite does not. tests/test_values.py checks them
# against the installed MLflow.
MAX_EXPERIMENT_NAME = 256  # validation allows 500; the experiments.name column is String(256)
MAX_RUN_NAME = 250  # the runs.name column is String(250)
MAX_PARAM_VALUE = 6000  # MAX_PARAM_VAL_LENGTH: longer values are cut with a warning
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH: likewise
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH: param, tag and metric names
# validate_param_and_metric_name off Windows: alphanumerics, _ - . space : and /
_KEY_CHARS = re.compile(r"[/\w.\- :]*")


def check_length(what: str, text: str, limit: int) -> None:
    """Raise PipelineError if `text` (`what` names it) is longer than MLflow's `limit`."""
    if len(text) > limit:
        raise PipelineError(
            f"{what} {quote(text, 80)} is {len(text)} characters; MLflow takes at most {limit}"
        )


def check_key(what: str, key: str) -> None:
    """Raise PipelineError unless MLflow takes `key` as a param, tag or metric name."""
    if not _KEY_CHARS.fullmatch(key):
        raise PipelineError(
            f"{what} {quote(key)} is not a valid MLflow key; it may only contain letters, "
            "digits, spaces and _ - . : /"
        )
    # MLflow refuses names that a path normalisation would change: a//b, a/./b, ../a, /a
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        raise PipelineError(f"{what} {quote(key)} is not a valid MLflow key (not a clean path)")
    check_length(what, key, MAX_KEY)
