"""Optimizers by name, with the learning rate each is usually run at."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import OPTIMIZERS
from pipeline.errors import PipelineError

# torch's own defaults where it has one. Plain SGD has none: 0.01 is the largest power of ten
# at which the seed model (no activation, a 5408-wide linear layer) does not diverge with
# cross_entropy; 0.05 sends its loss to 1e30 within an epoch.
DEFAULT_LR = {
    "sgd": 0.01,
    "momentum": 0.01,
    "nesterov": 0.01,
    "adam": 1e-3,
    "adamw": 1e-3,
    "rmsprop": 1e-3,
    "adagrad": 1e-2,
    "adadelta": 1.0,
    "radam": 1e-3,
    "nadam": 2e-3,
}
DEFAULT_MOMENTUM = {"sgd": 0.0, "momentum": 0.9, "nesterov": 0.9, "rmsprop": 0.0}


def resolve_hparams(
    name: str, lr: float | None, momentum: float | None
) -> tuple[float, float | None]:
    """(lr, momentum) with per-optimizer defaults filled in; momentum is None where unused."""
    if name not in OPTIMIZERS:
        raise PipelineError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")
    if lr is not None and lr <= 0:
        raise PipelineError(f"lr must be > 0, got {lr}")
    if name not in DEFAULT_MOMENTUM:
        if momentum:
            raise PipelineError(
                f"momentum={momentum} does not apply to optimizer {name!r}; "
                f"it applies to: {', '.join(DEFAULT_MOMENTUM)}"
            )
        momentum = None
    elif momentum is None:
        momentum = DEFAULT_MOMENTUM[name]
    return (DEFAULT_LR[name] if lr is None else lr), momentum


def build_optimizer(
    name: str,
    params: list[nn.Parameter],
    lr: float,
    momentum: float | None,
    weight_decay: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """The optimizer named `name`; fused kernels where torch has them for this device."""
    # Fused Adam/AdamW/SGD do the whole update in one kernel per parameter group instead of
    # a dozen elementwise ops per tensor; same math, float-rounding-level differences.
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    wd = {"weight_decay": weight_decay}
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=name == "nesterov", **wd, **fused
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **wd, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **wd, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, **wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, **wd)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, **wd)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, **wd)
    return torch.optim.NAdam(params, lr=lr, **wd)
