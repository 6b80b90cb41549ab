"""Classifiers by name. `seed_cnn` is the teaching notebook's model, exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

Size = tuple[int, int]  # (height, width) in pixels


def seed_cnn(num_classes: int = 10, channels: int = 1, size: Size = (28, 28)) -> nn.Module:
    """The notebook's model: one 3x3 conv, no activation, straight into a linear layer.

    At the defaults, exactly the notebook's Conv2d(1, 8, 3) -> Flatten -> Linear(8*26*26, 10);
    other inputs [N, channels, H, W] change only the conv's input channels and the linear
    layer's width, 8 * (H - 2) * (W - 2).
    """
    h, w = size
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3),
        nn.Flatten(),
        nn.Linear(8 * (h - 2) * (w - 2), num_classes),
    )


def lenet5(num_classes: int = 10, channels: int = 1, size: Size = (28, 28)) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) for inputs [N, channels, H, W]; H, W >= 12.

    Padding 2 on the first conv stands in for the original's 32x32 inputs at 28x28; the first
    linear layer takes whatever the two conv+pool stages leave, 16x5x5 at 28x28.
    """
    h, w = ((d // 2 - 4) // 2 for d in size)  # conv 5 pad 2 keeps d; pool halves; conv 5 -4
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h * w, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def mlp(num_classes: int = 10, channels: int = 1, size: Size = (28, 28)) -> nn.Module:
    """A one-hidden-layer perceptron: the baseline any conv net has to beat."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * size[0] * size[1], 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"seed_cnn": seed_cnn, "lenet5": lenet5, "mlp": mlp}


def build_model(
    name: str, num_classes: int = 10, channels: int = 1, size: Size = (28, 28)
) -> nn.Module:
    """A freshly initialised model for float inputs [N, channels, H, W] (size = (H, W)) and
    `num_classes` logits; initialisation draws from torch's global RNG."""
    if name not in MODELS:
        raise PipelineError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    return MODELS[name](num_classes, channels, tuple(size))


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
