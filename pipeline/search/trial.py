"""One Optuna trial as one MLflow child run, and the loop a worker runs them in.

The training loop stays free of Optuna and MLflow: `run_train` calls `on_epoch_end` after each
epoch's validation, and this module reports that value to the trial and raises `Pruned` when
the pruner says so. The outcome goes to both places: Optuna's trial state (COMPLETE, PRUNED,
FAIL) and the run's status and tags (`tracking_search`).
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, replace

import optuna
from optuna.trial import TrialState

from pipeline import signals, store
from pipeline.errors import first_line
from pipeline.search import study as studies
from pipeline.search.spec import Group, SearchSpec
from pipeline.tracking import search as tracking_search


class Pruned(Exception):  # noqa: N818 - an outcome of a trial, not an error
    """The pruner stopped the trial after epoch `epoch`."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


@dataclass
class Context:
    """What every trial of one search shares, in whichever process runs it."""

    spec: SearchSpec
    experiment_id: str
    parent_run_id: str
    data: str  # the data_prep run id: resolved to a local file, or downloaded, by run_train
    nested: bool  # True in the process that holds the parent run open


def run_trial(ctx: Context, group: Group, study: optuna.Study, trial: optuna.Trial) -> str:
    """Train the trial's parameters; returns its outcome (complete, pruned, diverged, failed).

    A stop signal marks the trial interrupted (to be retried) and is raised on.
    """
    from pipeline.steps import run_train

    spec = ctx.spec
    values = {d.key: d.suggest(trial) for d in group.dims}
    config = replace(spec.config(group, values), data=ctx.data)
    name = f"{group.name}-t{trial.number}"
    seen: dict[str, object] = {}

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        seen["run_id"], seen["value"] = tracking_search.active_run_id(), metrics[spec.objective]
        trial.report(metrics[spec.objective], epoch)
        # After the last epoch there is nothing left to save: the trial completes.
        if epoch < config.epochs and trial.should_prune():
            raise Pruned(epoch)

    tags = {tracking_search.ROLE_TAG: "trial", tracking_search.GROUP_TAG: group.name,
            tracking_search.STUDY_TAG: study.study_name,
            tracking_search.TRIAL_TAG: str(trial.number)}  # fmt: skip
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())  # fmt: skip
    print(f"search: {name} {shown}", flush=True)
    t0 = time.perf_counter()
    status, run_id, extra = None, None, {}
    try:
        kwargs = {"nested": True} if ctx.nested else {"parent_run_id": ctx.parent_run_id}
        result = run_train(config, experiment_id=ctx.experiment_id, run_name=name,
                           on_epoch_end=on_epoch_end, **kwargs)  # fmt: skip
    except Pruned as exc:
        outcome, run_id, status = "pruned", seen.get("run_id"), "KILLED"
        extra = {tracking_search.PRUNED_EPOCH_TAG: str(exc.epoch)}
        with signals.held():
            study.tell(trial, state=TrialState.PRUNED)
    except KeyboardInterrupt:
        outcome = studies.INTERRUPTED
        with signals.held():
            _tag(ctx, name, seen.get("run_id"), tags | {tracking_search.STATE_TAG: outcome})
            studies.interrupt(study, trial._trial_id, trial.number)
        raise
    except Exception as exc:  # any failure of one trial; the search goes on
        sys.stderr.write(store.redact(traceback.format_exc()))
        outcome, run_id = "failed", seen.get("run_id")
        extra = {"pipeline.error": store.redact(first_line(exc, with_type=True))[:500]}
        with signals.held():
            trial.set_user_attr(studies.OUTCOME, outcome)
            study.tell(trial, state=TrialState.FAIL)
    else:
        run_id = result.run_id
        with signals.held():
            trial.set_user_attr(studies.RUN_ID, run_id)
            if result.diverged_at is not None:
                outcome = "diverged"
                trial.set_user_attr(studies.OUTCOME, outcome)
                study.tell(trial, state=TrialState.FAIL)
            else:
                outcome = "complete"
                study.tell(trial, seen["value"])
    _tag(ctx, name, run_id, tags | extra | {tracking_search.STATE_TAG: outcome}, status)
    value = seen.get("value")
    print(f"search: {name} {outcome}"
          + (f" {spec.objective}={value:.4f}" if value is not None else "")
          + f" ({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    return outcome


def _tag(ctx: Context, name: str, run_id, tags: dict[str, str], status=None) -> None:
    """The trial's tags (and status) on its run, found by name if it failed before epoch 1."""
    run_id = run_id or tracking_search.child_named(ctx.experiment_id, ctx.parent_run_id, name)
    if run_id is None:  # it failed before its run existed: the study has it
        return
    try:
        tracking_search.tag_run(run_id, tags, status)
    except Exception as exc:  # noqa: BLE001 - the study holds the outcome either way
        print(f"search: run {run_id} not tagged: {first_line(exc)}", file=sys.stderr)


def work(
    ctx: Context, groups: list[tuple[Group, optuna.Study]], offset: int = 0, wait: bool = False
) -> int:
    """Take WAITING trials, one group after the other, until none is left; returns how many
    this process ran. `offset` staggers where workers start, so the groups advance alike.

    `wait` (the process that planned the studies): then also wait for the trials other
    processes are running, taking any retry a dead one's trial leaves (`study.plan`).
    """
    ran = 0
    while True:
        took = False
        for i in range(len(groups)):
            group, study = groups[(offset + i) % len(groups)]
            trial = studies.take(study)
            if trial is None:
                continue
            run_trial(ctx, group, study, trial)
            took, ran = True, ran + 1
        if took:
            continue
        if not wait or not _others_running(ctx, groups):
            return ran
        time.sleep(WAIT_SECONDS)


WAIT_SECONDS = 2.0


def _others_running(ctx: Context, groups: list[tuple[Group, optuna.Study]]) -> bool:
    """Whether other processes still run trials; plans a retry for any whose process died."""
    running = 0
    for group, study in groups:
        studies.plan(study, ctx.spec, group)
        running += studies.counts(study)["running"]
    return running > 0
