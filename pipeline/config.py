"""Every knob of a run, with its default, in one visible place.

The CLI, the MLproject and the experiment files all fill these dataclasses; nothing else
invents defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DATASETS = ("mnist-sample", "mnist", "fashion-mnist", "kmnist")
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


@dataclass(frozen=True)
class PrepConfig:
    """How to build the prepared train/val/test file."""

    dataset: str = "mnist-sample"
    data_dir: str = "data"
    val_fraction: float = 0.1  # carved from train, stratified
    test_fraction: float = 0.2  # mnist-sample only: torchvision sets ship an official test split
    split_seed: int = 0

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
    epochs: int = 10
    batch_size: int = 128
    seed: int = 42
    device: str = "auto"
    log_every: int = 1  # steps between logged train/* points
    print_every: int = 0  # the notebook's "Epoch e, step i" line; 0 = off
    amp: bool = False  # bfloat16 autocast; worth it on CUDA only
    compile: bool = False  # torch.compile; pays off on CUDA for larger models

    @property
    def run_name(self) -> str:
        return f"{self.optimizer}-{self.loss}-{self.model}"
