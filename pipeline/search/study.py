"""Optuna studies of a search: one per group, each planned to exactly its budget.

The budget is held by planning, not by counting after the fact: the process that starts (or
resumes) a search enqueues WAITING trials until the study's finished, running and waiting
trials make up its budget, and every worker, on any host, takes a WAITING trial by moving it
to RUNNING, a change the storage makes for one taker only (Optuna's own `Study.ask` takes
enqueued trials the same way). Nothing ever asks the study for a trial beyond the plan.

A trial counts toward the budget when it completed, was pruned, diverged or failed. One cut
short by a stop signal (or whose process is gone) is `interrupted`: it does not count, and
a new WAITING trial with the same parameters (`retry_of`) takes its place.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import store, tracking
from pipeline.errors import PipelineError, first_line
from pipeline.search.spec import Group, SearchSpec

INTERRUPTED = "interrupted"  # user attr: the trial was cut short; retried, never counted
RETRY_OF = "retry_of"  # user attr: the number of the interrupted trial this one retries
PROCESS = "process"  # user attr: host:pid:start of the process running the trial
OUTCOME = "outcome"  # user attr: complete, pruned, diverged, failed, interrupted
RUN_ID = "mlflow_run_id"  # user attr: the trial's MLflow run

optuna.logging.set_verbosity(logging.WARNING)


def default_storage(tracking_uri: str) -> str:
    """`optuna.db` beside the tracking store's file (sqlite) or folder (file store); in the
    current folder for a tracking server, which has no folder of ours."""
    path = store.local_path(tracking_uri)
    folder = path.expanduser().resolve().parent if path is not None else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage at `url` (created if new); a one-line PipelineError if it cannot
    be opened, the URL's credentials hidden."""
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - a driver's, SQLAlchemy's or Optuna's own
        raise PipelineError(
            f"cannot open the study storage {store.redact(url)}: {store.redact(first_line(exc))}"
        ) from None


def study_name(experiment: str, digest: str, group: Group) -> str:
    """Unique per experiment file (its bytes) and group: an edited file starts new studies."""
    return f"{experiment}/{digest[:12]}/{group.name}"


def sampler(spec: SearchSpec, index: int) -> optuna.samplers.BaseSampler:
    """The file's sampler, seeded per group (seed + the group's index) for repeatable plans."""
    seed = spec.seed + index
    if spec.sampler == "grid":
        group = spec.groups[index]
        return optuna.samplers.GridSampler({d.key: list(d.values) for d in group.dims}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Pruning by epoch (the step each trial reports its validation metric at).

    median: a trial stops when its metric is worse than the median of the earlier trials at
    the same epoch, once a quarter of the budget (at least one trial) has completed.
    hyperband: Li et al. 2018, from 1 epoch up to the configured epochs, a third kept.
    """
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, spec.n_trials // 4))
    if spec.pruner == "hyperband":
        epochs = int(spec.base.get("epochs", 10))
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2))
    return optuna.pruners.NopPruner()


def open_study(storage, spec: SearchSpec, name: str, index: int) -> optuna.Study:
    direction = "maximize" if spec.direction == "max" else "minimize"
    try:
        return optuna.create_study(
            storage=storage, study_name=name, sampler=sampler(spec, index),
            pruner=pruner(spec), direction=direction, load_if_exists=True,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"cannot open study {name!r}: {first_line(exc)}") from None


def load_study(storage, spec: SearchSpec, name: str, index: int) -> optuna.Study:
    """An existing study, for a worker that joins a search (it never creates one)."""
    try:
        return optuna.load_study(
            study_name=name, storage=storage, sampler=sampler(spec, index), pruner=pruner(spec)
        )
    except KeyError:
        raise PipelineError(f"study {name!r} is not in the storage; is the search started "
                            "(pipeline sweep FILE) with this storage?") from None  # fmt: skip


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by outcome: complete, pruned, diverged, failed (all count toward the budget),
    interrupted (retried instead), running and waiting."""
    out = dict.fromkeys(("complete", "pruned", "diverged", "failed", "interrupted", "running",
                         "waiting"), 0)  # fmt: skip
    for t in study.get_trials(deepcopy=False):
        out[_kind(t)] += 1
    return out


def _kind(t: optuna.trial.FrozenTrial) -> str:
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "pruned"
    return t.user_attrs.get(OUTCOME, "failed")  # diverged, failed or interrupted


def plan(study: optuna.Study, spec: SearchSpec, group: Group) -> int:
    """Enqueue what the budget still needs: a retry of each interrupted trial (same
    parameters), then new trials (grid: the combinations not yet there). Returns how many
    trials are left to run. Call with no other process planning this study."""
    _interrupt_orphans(study)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    for t in trials:
        if _kind(t) == INTERRUPTED and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
    trials = study.get_trials(deepcopy=False)
    planned = [t for t in trials if _kind(t) != INTERRUPTED]
    if spec.sampler == "grid":
        have = {_key(t.system_attrs.get("fixed_params", t.params)) for t in planned}
        for point in group.grid():
            if _key(point) not in have:
                study.enqueue_trial(point, skip_if_exists=False)
    else:
        for _ in range(spec.n_trials - len(planned)):
            study.enqueue_trial({}, skip_if_exists=False)
    return sum(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _interrupt_orphans(study: optuna.Study) -> None:
    """Trials left RUNNING by a process that is gone (SIGKILL, a crash): interrupted."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if tracking.process_alive(t.user_attrs.get(PROCESS)) is False:
            interrupt(study, t._trial_id, t.number)


def interrupt(study: optuna.Study, trial_id: int, number: int) -> None:
    """Record a trial as cut short: FAIL in Optuna, outcome `interrupted`."""
    with contextlib.suppress(Exception):  # already finished: nothing to record
        study._storage.set_trial_user_attr(trial_id, OUTCOME, INTERRUPTED)
        study.tell(number, state=TrialState.FAIL)


def take(study: optuna.Study) -> optuna.Trial | None:
    """A WAITING trial of `study`, now RUNNING and ours; None when none is left."""
    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                trial = optuna.trial.Trial(study, frozen._trial_id)
                trial.set_user_attr(PROCESS, tracking.process_tag()[tracking.PROCESS_TAG])
                return trial
        except Exception:  # noqa: BLE001, S112 - another worker took it first
            continue
    return None


def best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial, or None where none completed."""
    try:
        return study.best_trial
    except ValueError:
        return None
