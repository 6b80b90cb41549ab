"""Classifiers by name. `seed_cnn` is the teaching notebook's model, exactly."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.errors import PipelineError


def seed_cnn(num_classes: int = 10) -> nn.Module:
    """The notebook's model: one 3x3 conv, no activation, straight into a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.Flatten(),
        nn.Linear(8 * 26 * 26, num_classes),
    )


def lenet5(num_classes: int = 10) -> nn.Module:
    """LeNet-5 for 28x28 inputs (padding 2 stands in for the original 32x32 images)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def mlp(num_classes: int = 10) -> nn.Module:
    """A one-hidden-layer perceptron: the baseline any conv net has to beat."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


MODELS: dict[str, Callable[[int], nn.Module]] = {"seed_cnn": seed_cnn, "lenet5": lenet5, "mlp": mlp}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model; initialisation draws from torch's global RNG."""
    if name not in MODELS:
        raise PipelineError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    return MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
