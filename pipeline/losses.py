"""Loss functions by name, each taking (logits, integer targets)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mse(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # On softmax probabilities, not logits: against a one-hot target this is the Brier score,
    # bounded and on the same scale as the target. MSE on raw logits would instead regress
    # every logit to exactly 0 or 1, a goal unrelated to the argmax we score with.
    probs = logits.softmax(dim=1)
    one_hot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return F.mse_loss(probs, one_hot)


def build_loss(name: str, label_smoothing: float = 0.0) -> LossFn:
    """The loss named `name`; `label_smoothing` applies to cross_entropy only."""
    if name == "cross_entropy":
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if label_smoothing:
        raise PipelineError(
            f"label_smoothing={label_smoothing} applies to loss 'cross_entropy' only, not {name!r}"
        )
    if name == "mse":
        return _mse
    if name == "nll":
        return lambda logits, y: F.nll_loss(F.log_softmax(logits, dim=1), y)
    if name == "multi_margin":
        return F.multi_margin_loss
    raise PipelineError(
        f"unknown loss {name!r}; valid choices: cross_entropy, mse, nll, multi_margin"
    )
