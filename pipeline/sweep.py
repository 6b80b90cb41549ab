"""`pipeline sweep`: every trial of an experiment file as a child run of one parent run.

The experiment is created up front, data_prep runs once (or is reused) and is shared, trials
that already finished with the same params, data and code are skipped, a failed trial is
recorded FAILED and the sweep goes on; a trial that diverged is an outcome like any other
(its run FINISHED, tagged diverged), ranked last by the comparison. Trials run in this
process, or with `parallel` > 1 in that many `pipeline trial` child processes, each nesting
its run under the parent by id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pipeline
from pipeline import signals, store, tracking
from pipeline.checkpointing import CheckpointConfig
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, first_line
from pipeline.experiments import Experiment, Trial, load_experiment
from pipeline.lock import default_lock_dir, exclusive, sweep_lock_path
from pipeline.steps import PrepResult, prep_or_reuse, requested_params, reusable_prep, run_train

POLL_SECONDS = 0.2


@dataclass
class Outcome:
    """What became of one trial: ran, diverged (stopped at a loss that was not finite),
    skipped (already finished) or failed."""

    trial: Trial
    status: str
    run_id: str | None = None
    message: str = ""


def run_sweep(
    path: str | Path,
    parallel: int = 1,
    dry_run: bool = False,
    workers: int = 1,
    storage: str | None = None,
) -> list[Outcome]:
    """Run the experiment file at `path`; raises PipelineError naming any failed trials.

    One sweep of a file runs at a time per store and host: while one runs, another raises
    `LockHeld` (the CLI exits 75) instead of resuming it. When the newest sweep of the file
    finished and every trial is still finished, it returns them all skipped and creates no
    run ("nothing to do"). `workers` > 1: that many long-lived worker processes
    (pipeline/workers.py). A file with a `search` runs as pipeline/search/run.py says, its
    studies at `storage` (an Optuna storage URL; default: beside the tracking store).
    """
    if parallel < 1 or workers < 1:
        raise PipelineError(f"--parallel and --workers must be >= 1, got {parallel}, {workers}")
    if parallel > 1 and workers > 1:
        raise PipelineError("--parallel starts a process per trial, --workers keeps N; use one")
    exp = load_experiment(path)
    if exp.search is not None and parallel > 1:
        raise PipelineError("a search runs in --workers N processes, not --parallel")
    if dry_run:
        print_plan(exp, storage)
        return []
    if run_id := os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: its run is the parent
        _check_mlflow_run_experiment(exp, run_id)
    if exp.search is not None:  # a storage that cannot be opened fails before anything exists
        from pipeline.search.run import open_studies_storage

        opened = open_studies_storage(exp, storage)
    lock = sweep_lock_path(default_lock_dir(), exp.name, exp.digest, tracking.tracking_uri())
    with (
        exclusive(lock, f"another sweep of {exp.path.name} (experiment {exp.name!r})"),
        tracking.keep_writers(),  # trials run here run one after another: one metric writer
    ):
        experiment_id = tracking.ensure_experiment(exp.name)
        if exp.search is not None:
            from pipeline.search.run import run_search

            resume = None if run_id else tracking.find_unfinished_sweep(experiment_id, exp.digest)
            return run_search(exp, experiment_id, resume, workers, opened)
        if not run_id and (done := _all_done(exp, experiment_id)) is not None:
            return done
        resume = None if run_id else tracking.find_unfinished_sweep(experiment_id, exp.digest)
        return _sweep(exp, experiment_id, resume, parallel, workers)


def _sweep(exp: Experiment, experiment_id: str, resume: str | None, parallel: int, workers: int):
    """The parent run, data_prep, the trials, the comparison: what `run_sweep` does once it
    holds the sweep's lock."""
    with tracking.start_run(
        "sweep", f"sweep-{exp.path.stem}", experiment_id=experiment_id, run_id=resume
    ) as parent:
        _start_parent(exp, parent.experiment_id, max(parallel, workers), resume)
        if resume:
            _end_orphans(parent.experiment_id, resume)
        prepared = prep_or_reuse(exp.prep, parent.experiment_id)
        outcomes = _run_trials(
            exp, prepared, parent.experiment_id, parent.run_id, parallel, workers
        )
        tracking.log_dict(
            [{"name": o.trial.name, "status": o.status, "run_id": o.run_id} for o in outcomes],
            "trials.json",
        )
        if any(o.status != "failed" for o in outcomes):  # else there is nothing to compare
            from pipeline.compare import compare

            compare(parent.run_id, exp.metric, exp.direction)
        _finish(exp, outcomes, parent.run_id)
    return outcomes


def _all_done(exp: Experiment, experiment_id: str) -> list[Outcome] | None:
    """Every trial skipped, if the newest sweep of this file finished and nothing changed
    since (same data_prep run, every trial finished), so that running it again creates no
    new, empty parent run; else None."""
    last = tracking.find_sweep(experiment_id, exp.digest)
    if last is None or last.info.status != "FINISHED":
        return None
    prepared = reusable_prep(exp.prep, experiment_id)
    if prepared is None:
        return None
    outcomes = _skipped(exp.trials, prepared, experiment_id)
    if len(outcomes) < len(exp.trials):
        return None
    print(
        f"sweep {exp.name!r}: all {len(outcomes)} trials already finished (parent run "
        f"{last.info.run_id}); nothing to do"
    )
    return [outcomes[t.name] for t in exp.trials]


def print_plan(exp: Experiment, storage: str | None = None) -> None:
    """The trials a sweep would run, one per line, with what the file sets for each."""
    if exp.search is not None:
        from pipeline.search.run import print_plan as print_search

        print_search(exp, storage)
        return
    print(f"experiment {exp.name!r}: {len(exp.trials)} trials, ranked by {exp.metric} "
          f"({exp.direction}); data: {exp.prep.dataset}")  # fmt: skip
    for i, trial in enumerate(exp.trials, 1):
        values = " ".join(f"{k}={v}" for k, v in trial.overrides.items())
        print(f"{i:3d}. {trial.name}  {values}")


def _check_mlflow_run_experiment(exp: Experiment, run_id: str) -> None:
    """`mlflow run` made the parent run already; its experiment must be the file's."""
    run = tracking.find_run(run_id)
    if run is None:  # not in this store: `tracking.start_run` says what to do
        return
    name = tracking.experiment_name(run.info.experiment_id)
    if name != exp.name:
        raise PipelineError(
            f"{exp.path} names experiment {exp.name!r} but `mlflow run` logs to {name!r}; "
            f"add --experiment-name {exp.name}"
        )


def _start_parent(exp: Experiment, experiment_id: str, parallel: int, resume: str | None) -> None:
    """Tags, params and the experiment file itself on the parent run."""
    if resume:
        print(f"sweep: resuming run {resume}")
    tags = {tracking.SWEEP_FILE_TAG: exp.digest}
    tracking.set_tags(tags | ({"mlflow.note.content": exp.description} if exp.description else {}))
    params = {"experiment_file": exp.path.name, "n_trials": len(exp.trials),
              "metric": exp.metric, "direction": exp.direction, "parallel": parallel,
              **exp.prep.params()}  # fmt: skip
    if resume:  # how it runs and where the file lies may change; what it runs may not
        params = {k: v for k, v in params.items() if k not in ("parallel", "experiment_file")}
    tracking.log_params(params)
    tracking.log_artifact(exp.path, "experiment")


def _end_orphans(experiment_id: str, parent_id: str) -> None:
    """End KILLED the child runs an interrupted sweep left RUNNING with no process behind
    them (a SIGKILL, a power cut); their trials then run again like any unfinished one."""
    orphans = tracking.end_orphaned_runs(tracking.running_children(experiment_id, parent_id))
    for run_id in orphans:
        print(f"sweep: run {run_id} was left RUNNING by a process that is gone; now KILLED")


def _run_trials(
    exp: Experiment,
    prepared: PrepResult,
    experiment_id: str,
    parent_id: str,
    parallel: int,
    workers: int = 1,
) -> list[Outcome]:
    """Skip the finished trials, run the rest, and return an outcome per trial in file order."""
    trials = [replace(t, config=replace(t.config, data=str(prepared.path))) for t in exp.trials]
    outcomes = _skipped(trials, prepared, experiment_id)
    pending = [t for t in trials if t.name not in outcomes]
    print(
        f"sweep {exp.name!r}: {len(trials)} trials, {len(outcomes)} already finished, "
        f"{len(pending)} to run"
        + (f" in {parallel} processes" if parallel > 1 else "")
        + (f" in {workers} workers" if workers > 1 else "")
    )
    # `auto` looks among this sweep's own trials: an interrupted one goes on where it stopped.
    checkpoints = replace(exp.checkpoints, scope=parent_id)
    if workers > 1 and pending:
        ran = _run_in_workers(pending, experiment_id, parent_id, workers, checkpoints)
    elif parallel == 1:
        ran = _run_here(pending, experiment_id, checkpoints)
    else:
        ran = _run_in_processes(pending, experiment_id, parent_id, parallel, checkpoints)
    outcomes.update({o.trial.name: o for o in ran})
    return [outcomes[t.name] for t in trials]


def _skipped(trials: list[Trial], prepared: PrepResult, experiment_id: str) -> dict[str, Outcome]:
    """The trials that already finished with the same params, data and code, by name."""
    done = tracking.finished_runs(experiment_id, "train")
    outcomes: dict[str, Outcome] = {}
    for trial in trials:
        wanted = requested_params(trial.config) | {"data_digest": prepared.digest}
        found = next((r for r in done if tracking.params_match(r.data.params, wanted)), None)
        if found is not None:
            outcomes[trial.name] = Outcome(trial, "skipped", found.info.run_id)
    return outcomes


def _run_here(
    trials: list[Trial], experiment_id: str, checkpoints: CheckpointConfig
) -> list[Outcome]:
    """Each trial as a nested run in this process; a failure is recorded and the sweep goes on."""
    outcomes = []
    for i, trial in enumerate(trials, 1):
        print(f"[{i}/{len(trials)}] {trial.name}")
        try:
            result = run_train(
                trial.config,
                nested=True,
                experiment_id=experiment_id,
                run_name=trial.name,
                checkpoints=checkpoints,
            )
        except Exception as exc:  # any failure of one trial; KeyboardInterrupt stops the sweep
            sys.stderr.write(store.redact(traceback.format_exc()))
            reason = store.redact(first_line(exc, with_type=True))[:200]
            outcomes.append(Outcome(trial, "failed", message=reason))
            print(f"[{i}/{len(trials)}] {trial.name} FAILED: {reason}", file=sys.stderr)
            continue
        if result.diverged_at is not None:
            outcomes.append(Outcome(trial, "diverged", result.run_id, _at(result.diverged_at)))
        else:
            outcomes.append(Outcome(trial, "ran", result.run_id))
    return outcomes


def _at(step: int | str) -> str:
    return f"at step {step}"


def _run_in_processes(
    trials: list[Trial],
    experiment_id: str,
    parent_id: str,
    parallel: int,
    checkpoints: CheckpointConfig,
) -> list[Outcome]:
    """`parallel` `pipeline trial` processes at a time, each logging to its own file.

    If the sweep itself is interrupted, the running trials get SIGTERM, so they end KILLED.
    The trials' output goes to the parent run (`trial_logs/<trial>.log`), not left in /tmp.
    """
    logs = Path(tempfile.mkdtemp(prefix="pipeline-sweep-"))
    queue, running, outcomes = list(trials), {}, []
    try:
        while queue or running:
            while queue and len(running) < parallel:
                trial = queue.pop(0)
                with signals.held():  # a process started but not yet in `running` is never stopped
                    proc = _spawn(trial, experiment_id, parent_id, parallel, logs, checkpoints)
                    running[proc] = trial
            time.sleep(POLL_SECONDS)
            for proc in [p for p in running if p.poll() is not None]:
                trial = running.pop(proc)
                outcomes.append(_collect(trial, proc.returncode, logs / f"{trial.name}.log"))
                print(f"[{len(outcomes)}/{len(trials)}] {trial.name}: {_describe(outcomes[-1])}")
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait(timeout=60)
        _keep_logs(logs, parent_id)
    return outcomes


def _run_in_workers(
    trials: list[Trial],
    experiment_id: str,
    parent_id: str,
    workers: int,
    checkpoints: CheckpointConfig,
) -> list[Outcome]:
    """The trials on `workers` long-lived processes (pipeline/workers.py)."""
    from pipeline.workers import Pool

    pool = Pool(min(workers, len(trials)))
    outcomes: list[Outcome] = []

    def report(result: dict) -> None:
        trial = trials[result["n"]]
        message = _at(result["at"]) if result["status"] == "diverged" else ""
        outcomes.append(Outcome(trial, result["status"], result.get("run_id"),
                                result.get("message", message)))  # fmt: skip
        print(f"[{len(outcomes)}/{len(trials)}] {trial.name}: {_describe(outcomes[-1])}")

    tasks = [
        {"kind": "train", "config": asdict(t.config), "name": t.name,
         "experiment_id": experiment_id, "parent_run_id": parent_id,
         "checkpoints": asdict(checkpoints)}
        for t in trials
    ]  # fmt: skip
    try:
        pool.run(tasks, report)
    finally:
        pool.close()
        _keep_logs(pool.logs, parent_id)
    return outcomes


def _keep_logs(logs: Path, parent_id: str) -> None:
    """Attach the trials' output to the parent run, then remove the temporary folder.

    The output is what explains a failed trial; a store that cannot take it (a server that
    is down) costs the logs, never the sweep.
    """
    try:
        if any(logs.iterdir()):
            tracking.log_artifacts_to(parent_id, logs, "trial_logs")
    except Exception as exc:  # noqa: BLE001 - the logs are a courtesy
        print(f"sweep: trial logs not kept in the run: {first_line(exc)}", file=sys.stderr)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _spawn(
    trial: Trial,
    experiment_id: str,
    parent_id: str,
    parallel: int,
    logs: Path,
    checkpoints: CheckpointConfig,
) -> subprocess.Popen:
    """Start `python -m pipeline trial SPEC` with this code, this store and a share of CPUs."""
    spec = json.dumps(
        {"config": asdict(trial.config), "name": trial.name, "experiment_id": experiment_id,
         "parent_run_id": parent_id, "sweep_pid": os.getpid(),
         "checkpoints": asdict(checkpoints)}
    )  # fmt: skip
    root = str(Path(pipeline.__file__).resolve().parent.parent)  # the code this sweep runs
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cpus or 1) // parallel))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env |= {
        "PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])),
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    with open(logs / f"{trial.name}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "trial", spec],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _collect(trial: Trial, returncode: int, log: Path) -> Outcome:
    """The outcome of a finished trial process, read from its exit status and log."""
    text = log.read_text(errors="replace")
    if returncode == 0 and (m := re.search(r"^train: .* run_id=(\w+)", text, re.M)):
        if d := re.search(r"^train: diverged at step (\d+)", text, re.M):
            return Outcome(trial, "diverged", m.group(1), _at(d.group(1)))
        return Outcome(trial, "ran", m.group(1))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    reason = (errors or lines or [f"exit status {returncode}"])[-1]
    kept = f"the sweep run's trial_logs/{log.name}"
    sys.stderr.write(f"--- {trial.name} failed (exit {returncode}); whole log in {kept}:\n")
    sys.stderr.write("\n".join(lines[-15:]) + "\n")
    return Outcome(trial, "failed", message=reason[:200])


def _describe(outcome: Outcome) -> str:
    if outcome.status == "failed":
        return f"FAILED: {outcome.message}"
    if outcome.status == "diverged":
        return f"diverged {outcome.message} run_id={outcome.run_id}"
    return f"{outcome.status} run_id={outcome.run_id}"


def run_trial_spec(spec: str) -> None:
    """The `pipeline trial` process: one trial as a child of the sweep's parent run.

    It gets SIGTERM, and so ends its run KILLED, when the sweep process ends, even by SIGKILL.
    """
    doc = json.loads(spec)
    if "sweep_pid" in doc:
        signals.die_with_parent(doc["sweep_pid"])
    run_train(
        TrainConfig(**doc["config"]),
        experiment_id=doc["experiment_id"],
        parent_run_id=doc["parent_run_id"],
        run_name=doc["name"],
        checkpoints=CheckpointConfig(**doc.get("checkpoints", {})),
    )


def _finish(exp: Experiment, outcomes: list[Outcome], parent_id: str) -> None:
    """Print the summary; raise (so the parent ends FAILED) if any trial failed.

    A diverged trial is not a failure: its loss went to NaN or inf for the params it was
    given, which is what an lr sweep is there to find out.
    """
    statuses = ("ran", "diverged", "skipped", "failed")
    count = {s: sum(o.status == s for o in outcomes) for s in statuses}
    print(f"sweep {exp.name!r} done: {count['ran']} ran, {count['diverged']} diverged, "
          f"{count['skipped']} skipped (already finished), {count['failed']} failed; "
          f"parent run {parent_id}")  # fmt: skip
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = "; ".join(f"{o.trial.name} ({o.message})" for o in failed)
        raise PipelineError(
            f"{len(failed)} of {len(outcomes)} trials failed: {names}; "
            "run the sweep again to retry them"
        )
