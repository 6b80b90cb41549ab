"""`pipeline sweep FILE` for a file with a `search` section, and `pipeline worker FILE`.

The sweep process opens the parent run, prepares the data once, opens one Optuna study per
group and plans each to its budget (study.plan), then runs the trials: itself, or in
`--workers N` processes, or with `pipeline worker` processes on other hosts joining in.
Once every study is done it trains the best setting of every group again with each of
`final.seeds` (the runs `compare` ranks), then compares them. Running the same command
again resumes: finished trials count, interrupted ones are retried, finished final runs are
reused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from pipeline import store, tracking
from pipeline.errors import PipelineError
from pipeline.experiments import Experiment, Trial, load_experiment
from pipeline.search import study as studies
from pipeline.search.spec import SearchSpec
from pipeline.search.trial import Context, work
from pipeline.tracking import search as tracking_search

DATA_TAG = "pipeline.search_data"  # the data_prep run id every trial trains on


def storage_url(spec: SearchSpec, given: str | None) -> str:
    return given or spec.storage or studies.default_storage(tracking.tracking_uri())


def open_studies_storage(exp: Experiment, storage: str | None) -> tuple[str, object]:
    """(URL, opened Optuna storage) of the search's studies."""
    url = storage_url(exp.search, storage)
    return url, studies.open_storage(url)


def run_search(exp: Experiment, experiment_id: str, resume: str | None, workers: int,
               storage: tuple[str, object]):  # fmt: skip
    """The search, its final runs and their comparison, under one parent run; returns the
    final runs' outcomes (sweep.Outcome). `storage`: `open_studies_storage`'s."""
    from pipeline.steps import prep_or_reuse
    from pipeline.sweep import _end_orphans, _finish, _start_parent

    spec = exp.search
    url, opened = storage
    with tracking.start_run(
        "sweep", f"sweep-{exp.path.stem}", experiment_id=experiment_id, run_id=resume
    ) as parent:
        _start_parent(exp, parent.experiment_id, workers, resume)
        tracking.set_tags({tracking_search.SEARCH_TAG: "true",
                           tracking_search.STORAGE_TAG: store.redact(url)})  # fmt: skip
        if not resume:
            tracking.log_params(_params(spec))
        if resume:
            _end_orphans(parent.experiment_id, resume)
        prepared = prep_or_reuse(exp.prep, parent.experiment_id)
        tracking.set_tags({DATA_TAG: prepared.run_id})
        ctx = Context(spec, parent.experiment_id, parent.run_id, prepared.run_id, nested=True)
        groups = [
            (g, studies.open_study(opened, spec, studies.study_name(exp.name, exp.digest, g), i))
            for i, g in enumerate(spec.groups)
        ]
        left = sum(studies.plan(study, spec, g) for g, study in groups)
        print(f"search {exp.name!r}: {len(groups)} studies x {spec.n_trials} trials "
              f"({spec.sampler}, pruner {spec.pruner}), {left} to run"
              + (f" in {workers} workers" if workers > 1 else "")
              + f"; studies in {store.redact(url)}")  # fmt: skip
        pool = None
        try:
            if workers > 1:
                from pipeline.workers import Pool

                pool = Pool(workers)
                task = {"kind": "search", "file": str(exp.path.resolve()), "storage": url,
                        "experiment_id": parent.experiment_id, "parent_run_id": parent.run_id,
                        "data": prepared.run_id}  # fmt: skip
                pool.run([task | {"offset": i} for i in range(workers)])
                work(ctx, groups, wait=True)  # what `pipeline worker`s elsewhere still run
            else:
                work(ctx, groups, wait=True)
            summary = _summary(groups, spec)
            tracking.log_dict(summary, "search.json")
            outcomes = _finals(exp, summary, ctx, prepared, pool)
        finally:
            if pool is not None:
                pool.close()
                from pipeline.sweep import _keep_logs

                _keep_logs(pool.logs, parent.run_id)
        tracking.log_dict(
            [{"name": o.trial.name, "status": o.status, "run_id": o.run_id} for o in outcomes],
            "trials.json",
        )
        _print_summary(summary)
        if any(o.status != "failed" for o in outcomes):
            from pipeline.compare import compare

            compare(parent.run_id, exp.metric, exp.direction)
        _finish(exp, outcomes, parent.run_id)
    return outcomes


def print_plan(exp: Experiment, storage: str | None) -> None:
    """What a search would run: its studies, what each searches, the budget, the finals."""
    spec = exp.search
    print(f"experiment {exp.name!r}: search with {spec.sampler}, {spec.n_trials} trials per "
          f"study, pruner {spec.pruner}, objective {spec.objective} ({spec.direction}); "
          f"{len(spec.final_seeds)} final seeds per group ranked by {exp.metric}; "
          f"studies in {store.redact(storage_url(spec, storage))}")  # fmt: skip
    for i, g in enumerate(spec.groups, 1):
        dims = " ".join(f"{d.key}={d.kind}{list(d.values)}" for d in g.dims)
        print(f"{i:3d}. {studies.study_name(exp.name, exp.digest, g)}  {dims}")


def _params(spec: SearchSpec) -> dict[str, object]:
    space = {d.key: d.kind if d.kind != "choice" else "choice" for g in spec.groups for d in g.dims}
    return {"search_sampler": spec.sampler, "search_n_trials": spec.n_trials,
            "search_pruner": spec.pruner, "search_groups": len(spec.groups),
            "search_objective": spec.objective, "search_seed": spec.seed,
            "search_space": json.dumps(space), "final_seeds": len(spec.final_seeds)}  # fmt: skip


def _summary(groups: list, spec: SearchSpec) -> list[dict]:
    """Per study: its trials by outcome, and its best completed trial."""
    out = []
    for group, study in groups:
        best = studies.best(study)
        counts = studies.counts(study)
        if counts["running"] or counts["waiting"]:  # a worker on another host is still at it
            raise PipelineError(
                f"study {study.study_name!r} still has {counts['running']} running and "
                f"{counts['waiting']} waiting trials; run the sweep again once they end"
            )
        out.append({
            "group": group.name, "study": study.study_name, "counts": counts,
            "best_value": best.value if best else None,
            "best_params": best.params if best else None,
            "best_trial": best.number if best else None,
            "objective": spec.objective,
        })  # fmt: skip
    return out


def _print_summary(summary: list[dict]) -> None:
    for s in summary:
        c = s["counts"]
        best = (f"best {s['objective']}={s['best_value']:.4f} " + " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in s["best_params"].items())) if s["best_params"] is not None else "no trial completed"  # fmt: skip  # noqa: E501
        print(f"search: {s['group']}: {c['complete']} complete, {c['pruned']} pruned, "
              f"{c['diverged']} diverged, {c['failed']} failed; {best}")  # fmt: skip


def _finals(exp: Experiment, summary: list[dict], ctx: Context, prepared, pool):
    """The best setting of every group once per final seed, as child runs tagged `final`."""
    from pipeline.sweep import Outcome, _at, _run_here, _skipped

    spec = exp.search
    trials, tags = [], {}
    for group, s in zip(spec.groups, summary, strict=True):
        if s["best_params"] is None:
            continue
        for seed in spec.final_seeds:
            config = replace(spec.config(group, s["best_params"]), seed=seed, data=ctx.data)
            name = f"{group.name}-seed{seed}"
            trials.append(Trial(name, config, {**group.values, **s["best_params"], "seed": seed}))
            tags[name] = {tracking_search.ROLE_TAG: "final", tracking_search.GROUP_TAG: group.name,
                          tracking_search.STUDY_TAG: s["study"],
                          tracking_search.TRIAL_TAG: str(s["best_trial"])}  # fmt: skip
    if not trials:
        return []
    done = _skipped(trials, prepared, ctx.experiment_id)
    pending = [t for t in trials if t.name not in done]
    print(f"search: {len(trials)} final runs ({len(spec.final_seeds)} seeds of each best "
          f"setting), {len(done)} already finished, {len(pending)} to run")  # fmt: skip
    # `auto` among the search's own runs: an interrupted final run goes on from its checkpoint.
    checkpoints = replace(exp.checkpoints, scope=ctx.parent_run_id)
    if pool is None:
        ran = _run_here(pending, ctx.experiment_id, checkpoints)
        for o in ran:
            if o.run_id:
                tracking_search.tag_run(o.run_id, tags[o.trial.name])
    else:
        tasks = [{"kind": "train", "config": asdict(t.config), "name": t.name,
                  "experiment_id": ctx.experiment_id, "parent_run_id": ctx.parent_run_id,
                  "tags": tags[t.name], "checkpoints": asdict(checkpoints)}
                 for t in pending]  # fmt: skip
        results = pool.run(tasks)
        ran = []
        for t, r in zip(pending, results, strict=True):
            message = _at(r["at"]) if r["status"] == "diverged" else r.get("message", "")
            ran.append(Outcome(t, r["status"], r.get("run_id"), message))
    outcomes = {**done, **{o.trial.name: o for o in ran}}
    return [outcomes[t.name] for t in trials]


def join(task: dict, offset: int = 0) -> int:
    """Run WAITING trials of a started search until none is left (a `--workers` process, or
    `pipeline worker` on any host); returns how many this process ran."""
    exp = load_experiment(task["file"])
    if exp.search is None:
        raise PipelineError(f"{exp.path}: has no 'search' section; nothing to work on")
    opened = studies.open_storage(task["storage"])
    groups = [
        (g, studies.load_study(opened, exp.search, studies.study_name(exp.name, exp.digest, g), i))
        for i, g in enumerate(exp.search.groups)
    ]
    ctx = Context(exp.search, task["experiment_id"], task["parent_run_id"], task["data"],
                  nested=False)  # fmt: skip
    return work(ctx, groups, offset)


def run_worker(path: str, storage: str | None) -> int:
    """`pipeline worker FILE`: join the RUNNING search of FILE (same bytes) in the tracking
    store of MLFLOW_TRACKING_URI, with its studies at `storage`."""
    import os

    from pipeline import signals

    exp = load_experiment(path)
    if exp.search is None:
        raise PipelineError(f"{exp.path}: has no 'search' section; `pipeline worker` joins "
                            "searches, run grids with `pipeline sweep`")  # fmt: skip
    parent = tracking_search.running_search(exp.name, exp.digest)
    if parent is None:
        raise PipelineError(
            f"no running search of {exp.path.name} in experiment {exp.name!r} at "
            f"{store.redact(tracking.tracking_uri())}; start it with `pipeline sweep {path}`"
        )
    data = parent.data.tags.get(DATA_TAG)
    if data is None:
        raise PipelineError(f"search run {parent.info.run_id} has not prepared its data yet; "
                            "try again in a moment")  # fmt: skip
    url = storage or exp.search.storage or parent.data.tags.get(tracking_search.STORAGE_TAG)
    if not url or "***" in url:
        raise PipelineError("give the study storage with --storage URL (its credentials are "
                            "not stored in the run)")  # fmt: skip
    print(f"worker: joining search run {parent.info.run_id} ({exp.name!r}); studies in "
          f"{store.redact(url)}")  # fmt: skip
    task = {"file": path, "storage": url, "experiment_id": parent.info.experiment_id,
            "parent_run_id": parent.info.run_id, "data": data}  # fmt: skip
    with signals.stop_signals_raise(), tracking.keep_writers():  # one writer, trial after trial
        ran = join(task, offset=os.getpid())
    print(f"worker: ran {ran} trials; no trial left waiting")
    return ran
