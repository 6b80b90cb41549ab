"""Classifiers by name. `seed_cnn` is the teaching notebook's model, exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def training_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A faster forward with the same result up to float rounding, or None if none applies.

    For a plain conv followed straight by Flatten and Linear, as in `seed_cnn` (no activation
    between them), the two layers compose into one linear map of the input image:
    logits = x @ W_eff.T + b_eff, where W_eff is the linear weight carried back through the
    conv (a transposed conv) and b_eff folds in both biases. Both cost a few batch-independent
    MFLOPs, so a step needs ~16 kFLOP per sample instead of ~520k, and never materialises the
    8x26x26 activation. The parameters, their gradients (through autograd, via W_eff) and
    the optimizer are the same; only the order of the sums changes.
    """
    if not isinstance(model, nn.Sequential) or len(model) != 3:
        return None
    conv, flatten, linear = model
    if not (
        isinstance(conv, nn.Conv2d)
        and isinstance(flatten, nn.Flatten)
        and isinstance(linear, nn.Linear)
        and (flatten.start_dim, flatten.end_dim) == (1, -1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.bias is not None
        and linear.bias is not None
    ):
        return None

    def forward(x: torch.Tensor) -> torch.Tensor:
        kh, kw = conv.kernel_size
        out_h, out_w = x.shape[2] - kh + 1, x.shape[3] - kw + 1
        w = linear.weight.view(linear.out_features, conv.out_channels, out_h, out_w)
        w_eff = F.conv_transpose2d(w, conv.weight).flatten(1)  # [classes, C * H * W]
        b_eff = linear.bias + w.sum((2, 3)) @ conv.bias
        return torch.addmm(b_eff, x.flatten(1), w_eff.t())

    return forward
