"""Learning-rate schedules by name, built from PyTorch's own `torch.optim.lr_scheduler`.

Every schedule is stepped once per optimizer step (not per epoch), so `train/lr` draws it
point by point. Lengths given in epochs are turned into optimizer steps here.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from pipeline.config import SCHEDULERS, TrainConfig
from pipeline.errors import PipelineError, quote

# The parameters each schedule reads; any other one set away from its default is an error,
# as `momentum` is for an optimizer without momentum.
SCHEDULER_PARAMS = {
    "none": (),
    "step": ("step_size", "gamma"),
    "cosine": ("eta_min_fraction",),
    "onecycle": ("pct_start",),
}
ALL_PARAMS = ("step_size", "gamma", "eta_min_fraction", "pct_start")


def check_scheduler(cfg: TrainConfig) -> None:
    """Raise PipelineError for an unknown scheduler, or a parameter set for another one.

    Ranges are checked with the other fields (config.RANGES); this checks only that each
    parameter away from its default belongs to `cfg.scheduler`.
    """
    if cfg.scheduler not in SCHEDULERS:
        raise PipelineError(
            f"unknown scheduler {quote(cfg.scheduler)}; valid choices: {', '.join(SCHEDULERS)}"
        )
    default = TrainConfig()
    for name in ALL_PARAMS:
        value = getattr(cfg, name)
        if value != getattr(default, name) and name not in SCHEDULER_PARAMS[cfg.scheduler]:
            owner = next(s for s, params in SCHEDULER_PARAMS.items() if name in params)
            raise PipelineError(
                f"{name}={quote(value)} applies to scheduler {owner!r} only; "
                f"scheduler is {cfg.scheduler!r}"
            )


def check_warmup(cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Raise PipelineError if the warm-up leaves no step of the run for the schedule."""
    total = cfg.epochs * steps_per_epoch
    if cfg.warmup_steps and cfg.warmup_steps >= total:
        raise PipelineError(
            f"warmup_steps={cfg.warmup_steps} must be less than the run's {total} steps "
            f"({cfg.epochs} epochs x {steps_per_epoch} steps); lower it or train longer"
        )


def build_scheduler(
    cfg: TrainConfig, optimizer: Optimizer, steps_per_epoch: int
) -> LRScheduler | None:
    """The schedule `cfg.scheduler` over the whole run, after `cfg.warmup_steps` of warm-up.

    None for `none` without warm-up (the notebook: a constant lr). Call `.step()` once after
    each `optimizer.step()`. With a warm-up of N steps, step i (1-based, i <= N) trains at
    i / (N + 1) of the lr the schedule starts at (`LinearLR`), and the schedule proper starts
    at step N + 1 (`SequentialLR`). The schedules, over the T steps after the warm-up:

    - `step`: `StepLR`, the lr times `gamma` every `step_size` epochs;
    - `cosine`: `CosineAnnealingLR` from the lr down to `eta_min_fraction` x lr, reached on
      the run's last step (T_max = T - 1);
    - `onecycle`: `OneCycleLR` with max_lr = the lr, rising for `pct_start` of T from
      max_lr / 25 then annealing (cosine) to max_lr / 1e5 on the last step (torch's
      div_factor and final_div_factor). Momentum is not cycled: the run keeps the momentum
      it logs (`cycle_momentum=False`).

    Raises PipelineError as `check_scheduler` and `check_warmup` do.
    """
    check_scheduler(cfg)
    check_warmup(cfg, steps_per_epoch)
    warmup = cfg.warmup_steps
    after = cfg.epochs * steps_per_epoch - warmup
    main: LRScheduler | None = None
    if cfg.scheduler == "step":
        main = StepLR(optimizer, cfg.step_size * steps_per_epoch, cfg.gamma)
    elif cfg.scheduler == "cosine":
        lr = optimizer.param_groups[0]["lr"]
        main = CosineAnnealingLR(optimizer, max(after - 1, 1), eta_min=cfg.eta_min_fraction * lr)
    elif cfg.scheduler == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        main = OneCycleLR(
            optimizer, lr, total_steps=after, pct_start=cfg.pct_start, cycle_momentum=False
        )
    if not warmup:
        return main
    # Built after `main`: OneCycleLR sets the lr it starts at, and the ramp leads up to it.
    ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    if main is None:
        return ramp
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
