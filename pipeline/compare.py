"""`pipeline compare`: the train runs of an experiment or a sweep, ranked, tabled and plotted.

The table (terminal, CSV, Markdown) shows the params that vary and the final metrics, best
run first. A value that is not finite (a run that diverged) is the worst there is: ranked
last, never `best`, shown as `nan (diverged)`. Runs are told apart by id, and labelled by
name plus the params that differ between runs of the same name.

The direction follows the metric unless given (losses and times: min, else max). Plots
(loss curves, validation accuracy per epoch, the final metric by optimizer and loss) and the
tables are drawn first, then logged under `compare/` of the sweep's parent run, or of the
experiment's one `compare` run (created on first use, reused after): the sweep's own metric,
or test/accuracy for an experiment, goes to `compare/`, any other to `compare/<metric>/`
beside it, so one comparison never replaces another.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import tracking
from pipeline.config import TrainConfig
from pipeline.configfile import TRAIN_KEYS
from pipeline.errors import PipelineError
from pipeline.experiments import DIRECTIONS, default_direction
from pipeline.stats import GroupStats, rank_groups
from pipeline.steps import DIVERGED_STEP_TAG, DIVERGED_TAG
from pipeline.tracking import search as tracking_search

if TYPE_CHECKING:
    from mlflow.entities import Run

PARAM_KEYS = (*TRAIN_KEYS, "effective_lr", "effective_momentum")
METRIC_COLUMNS = ("test/accuracy", "test/loss", "val/accuracy", "train/loss", "time/loop_seconds")
ARTIFACT_DIR = "compare"
DEFAULT_METRIC = "test/accuracy"
BAR_GROUPED = ("optimizer", "loss", "seed", "effective_lr", "effective_momentum")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Comparison:
    """Ranked rows of one comparison, and where its artifacts went."""

    title: str
    metric: str
    direction: str
    runs: list[Run]  # best first; those without a finite `metric` last
    params: list[str]  # the params that vary between the runs
    metrics: list[str]
    labels: dict[str, str] = field(default_factory=dict)  # run id -> name shown
    log_run_id: str = ""
    artifact_dir: str = ARTIFACT_DIR
    groups: list[GroupStats] = field(default_factory=list)  # over seeds, when runs repeat
    trials: list[Run] = field(default_factory=list)  # a search's trial runs (not ranked)

    def label(self, run: Run) -> str:
        return self.labels.get(run.info.run_id) or run.info.run_name

    def is_best(self, rank: int) -> bool:
        """Rank 1 is best only with a finite value: no run wins by diverging."""
        return rank == 1 and _finite(self.runs[0].data.metrics.get(self.metric))

    def rows(self, plain: bool = False) -> list[dict[str, str]]:
        """One row per run, best first. `plain`: values as numbers only (CSV), with a
        `diverged_at_step` column when any run diverged; otherwise `nan (diverged)`."""
        any_diverged = any(_diverged_at(r) for r in self.runs)
        out = []
        for rank, run in enumerate(self.runs, 1):
            row = {"rank": "best" if self.is_best(rank) else str(rank), "run": self.label(run)}
            row |= {p: run.data.params.get(p, "") for p in self.params}
            for m in self.metrics:
                value = run.data.metrics.get(m)
                row[m] = _fmt(value) if plain else _cell(value, bool(_diverged_at(run)))
            if plain and any_diverged:
                row["diverged_at_step"] = _diverged_at(run)
            out.append(row | {"run_id": run.info.run_id})
        return out

    def not_finite(self) -> int:
        return sum(not _finite(r.data.metrics.get(self.metric)) for r in self.runs)


def compare(
    target: str, metric: str | None = None, direction: str | None = None, out: Path | None = None
) -> Comparison:
    """Rank the FINISHED train runs of `target` (experiment name or sweep parent run id).

    `metric` defaults to the sweep's own (else test/accuracy); `direction` to the sweep's
    for its own metric, else the metric's natural one (`default_direction`). Raises
    PipelineError for an unknown target, metric or direction, or no runs to compare; no
    run is created or written to before the tables and plots are drawn.
    """
    parent = tracking.find_run(target) if RUN_ID.match(target) else None
    trials: list[Run] = []
    if parent is not None:
        runs = _sweep_runs(parent)
        if parent.data.tags.get(tracking_search.SEARCH_TAG) == "true":
            # The final runs are the result; the trials only chose their settings.
            runs = [r for r in runs if r.data.tags.get(tracking_search.ROLE_TAG) != "trial"]
            studies = {r.data.tags.get(tracking_search.STUDY_TAG) for r in runs} - {None}
            trials = tracking_search.trials_of(parent.info.experiment_id, studies)
        own_metric = parent.data.params.get("metric", DEFAULT_METRIC)
        own_direction = parent.data.params.get("direction") or default_direction(own_metric)
        title = f"sweep {parent.info.run_name} ({parent.info.run_id})"
    else:
        experiment = tracking.experiment_by_name(target)
        runs = tracking.train_runs(experiment.experiment_id)
        own_metric, own_direction = DEFAULT_METRIC, default_direction(DEFAULT_METRIC)
        title = f"experiment {experiment.name}"
    metric = metric or own_metric
    if direction is None:
        direction = own_direction if metric == own_metric else default_direction(metric)
    if direction not in DIRECTIONS:
        raise PipelineError(f"direction {direction!r} is invalid; valid choices: max, min")
    comparison = _rank(title, [r for r in runs if r.info.status == "FINISHED"], metric, direction)
    comparison.trials = trials
    comparison.groups = group_stats(comparison)
    if (metric, direction) != (own_metric, own_direction):
        comparison.artifact_dir = f"{ARTIFACT_DIR}/{_slug(metric, direction)}"
    print(format_text(comparison))
    with tempfile.TemporaryDirectory(prefix="pipeline-compare-") as tmp:
        folder = Path(tmp)
        _draw(comparison, folder)
        if parent is not None:
            log_to = parent.info.run_id
        else:  # the experiment's one run for comparisons, made once there is something to log
            log_to = tracking.compare_run(experiment.experiment_id, f"compare-{experiment.name}")
        tracking.log_artifacts_to(log_to, folder, comparison.artifact_dir)
        comparison.log_run_id = log_to
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, out, dirs_exist_ok=True)
    print(f"compare: tables and plots logged to run {log_to} under {comparison.artifact_dir}/")
    return comparison


def _slug(metric: str, direction: str) -> str:
    """`test/loss` -> `test-loss`; the direction is added when it is not the metric's own."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", metric).strip("-")
    return slug if direction == default_direction(metric) else f"{slug}-{direction}"


def _sweep_runs(parent: Run) -> list[Run]:
    """The parent's train children, plus finished runs it reused from earlier sweeps."""
    runs = tracking.train_runs(parent.info.experiment_id, parent.info.run_id)
    seen = {r.info.run_id for r in runs}
    # trials.json is missing when the sweep was interrupted before its end.
    for entry in tracking.load_json_artifact(parent.info.run_id, "trials.json") or []:
        if entry.get("run_id") and entry["run_id"] not in seen:
            runs.append(tracking.get_run(entry["run_id"]))
            seen.add(entry["run_id"])
    return runs


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _diverged_at(run: Run) -> str:
    """The global step a run diverged at, or "" if it did not."""
    if run.data.tags.get(DIVERGED_TAG) != "true":
        return ""
    return run.data.tags.get(DIVERGED_STEP_TAG, "?")


def _rank(title: str, runs: list[Run], metric: str, direction: str) -> Comparison:
    """Sort best first by `metric`; the columns are the params that vary between runs.

    A value that is not finite is the worst in either direction: after every finite one,
    then runs without the metric. Ties keep the order MLflow returned.
    """
    if not runs:
        raise PipelineError(f"{title} has no FINISHED train runs to compare")
    have = sorted({m for r in runs for m in r.data.metrics if "class_accuracy" not in m})
    if metric not in have:
        raise PipelineError(f"no run has metric {metric!r}; metrics: {', '.join(have)}")
    sign = -1 if direction == "max" else 1

    def key(run: Run) -> tuple[int, float]:
        value = run.data.metrics.get(metric)
        if _finite(value):
            return 0, sign * value
        return (1 if value is not None else 2), 0.0

    runs = sorted(runs, key=key)
    params = [p for p in PARAM_KEYS if len({r.data.params.get(p) for r in runs}) > 1]
    metrics = list(dict.fromkeys([metric, *METRIC_COLUMNS]))
    return Comparison(
        title, metric, direction, runs, params or ["optimizer", "loss"], metrics, run_labels(runs)
    )


def run_labels(runs: list[Run]) -> dict[str, str]:
    """Run id -> a name that tells runs apart: the run name, plus for runs that share it the
    params that differ between them (`adam-cross_entropy-seed_cnn epochs=2`), plus the
    start of the run id where even those are the same."""
    by_name: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_name[run.info.run_name or run.info.run_id[:8]].append(run)
    labels = {}
    for name, group in by_name.items():
        differ = [p for p in PARAM_KEYS if len({r.data.params.get(p) for r in group}) > 1]
        named = {
            r.info.run_id: " ".join([name, *(f"{p}={r.data.params.get(p, '')}" for p in differ)])
            for r in group
        }
        counts = defaultdict(int)
        for label in named.values():
            counts[label] += 1
        for run_id, label in named.items():
            labels[run_id] = label if counts[label] == 1 else f"{label} #{run_id[:8]}"
    return labels


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    return f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"


def _cell(value: float | None, diverged: bool) -> str:
    """A metric as the tables show it: `nan (diverged)` where a diverged run has no value."""
    text = _fmt(value)
    if diverged and value is not None and not math.isfinite(value):
        return f"{text} (diverged)"
    return text


def format_text(c: Comparison) -> str:
    """An aligned plain-text table with a heading line."""
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in c.rows()]
    columns = list(rows[0])
    width = {k: max(len(k), *(len(r[k]) for r in rows)) for k in columns}
    heading = f"{c.title}: {len(rows)} runs ranked by {c.metric} ({c.direction})"
    if bad := c.not_finite():
        heading += f"; {bad} without a finite {c.metric}, ranked last"
    lines = [heading]
    lines.append("  ".join(k.ljust(width[k]) for k in columns))
    lines.append("  ".join("-" * width[k] for k in columns))
    lines += ["  ".join(r[k].ljust(width[k]) for k in columns) for r in rows]
    if c.groups:
        lines += ["", *format_groups(c)]
    return "\n".join(lines)


def format_markdown(c: Comparison) -> str:
    """A Markdown table; the best run's row is bold (no row is when none has a finite value)."""
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in c.rows()]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for i, r in enumerate(rows):
        bold = c.is_best(i + 1)
        cells = [f"**{r[k]}**" if bold and r[k] else r[k] for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(c: Comparison, path: Path) -> None:
    """Numbers as numbers (`nan` for no value), full run ids, `diverged_at_step` if any."""
    rows = c.rows(plain=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _draw(c: Comparison, folder: Path) -> None:
    """The tables and the three charts, as files in `folder`."""
    from pipeline import plots

    write_csv(c, folder / "table.csv")
    (folder / "table.md").write_text(format_markdown(c))
    plots.loss_curves(_series(c, "train/loss"), folder / "loss_curves.png")
    plots.val_accuracy(_by_epoch(_series(c, "val/accuracy")), folder / "val_accuracy.png")
    finals = [
        plots.Series(r.info.run_id, c.label(r), r.data.params.get("optimizer", "?"),
                     _bar_label(r, c.params), [(0, r.data.metrics[c.metric])],
                     bool(_diverged_at(r)))
        for r in c.runs
        if c.metric in r.data.metrics
    ]  # fmt: skip
    plots.metric_bars(finals, c.metric, folder / "metric_by_optimizer_loss.png")
    if c.groups:
        _draw_groups(c, folder)


def _bar_label(run: Run, varying: list[str]) -> str:
    """The loss, plus any other varying param not at its default (`cross_entropy
    label_smoothing=0.1`), so bars average over seeds only, never over settings."""
    defaults = TrainConfig()
    extra = [
        f"{p}={run.data.params.get(p)}"
        for p in varying
        if p not in BAR_GROUPED
        and run.data.params.get(p) != str(getattr(defaults, p)).replace("None", "auto")
    ]
    return " ".join([run.data.params.get("loss", "?"), *extra])


def _series(c: Comparison, key: str):
    """Each run's full history of `key`, in step order, keyed by run id."""
    from pipeline.plots import Series

    return [
        Series(
            r.info.run_id,
            c.label(r),
            r.data.params.get("optimizer", "?"),
            r.data.params.get("loss", "?"),
            tracking.metric_history(r.info.run_id, key),
            bool(_diverged_at(r)),
        )
        for r in c.runs
    ]


def _by_epoch(series: list):
    """Each point's step as the epoch it ended (the run's `epoch` metric at that step).

    val/* is logged at the global step that ends its epoch; runs from before that logged
    it at step = epoch and have no `epoch` metric, so their steps are kept as they are.
    """
    for s in series:
        epochs = dict(tracking.metric_history(s.key, "epoch"))
        s.points = [(int(epochs.get(step, step)), value) for step, value in s.points]
    return series


# --- statistics over seeds ------------------------------------------------------------------


def group_stats(c: Comparison) -> list[GroupStats]:
    """The runs grouped by everything but the seed (a search's final runs: by their group),
    ranked by their mean; empty when no group holds more than one run."""
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in c.runs:
        by_key[_group_key(run)].append(run)
    if all(len(runs) < 2 for runs in by_key.values()):
        return []
    groups = [
        GroupStats(key, _group_label(runs[0]), [_value(r, c.metric) for r in runs], runs)
        for key, runs in by_key.items()
    ]
    return rank_groups(groups, c.direction)


def _group_key(run: Run) -> str:
    if group := run.data.tags.get(tracking_search.GROUP_TAG):
        return group
    return " ".join(f"{p}={run.data.params.get(p, '')}" for p in PARAM_KEYS if p != "seed")


def _group_label(run: Run) -> str:
    if group := run.data.tags.get(tracking_search.GROUP_TAG):
        return group
    return re.sub(r"-seed\d+$", "", run.info.run_name or run.info.run_id[:8])


def _value(run: Run, metric: str) -> float:
    value = run.data.metrics.get(metric)
    return math.nan if value is None else value


def group_rows(c: Comparison) -> list[dict[str, str]]:
    """One row per group, best first: n, mean, std, the 95% interval, the params that tell
    the groups apart, and for a search the trials it spent and their mean wall time."""
    varying = [p for p in c.params if p != "seed"]
    budget = _budgets(c.trials)
    rows = []
    for g in c.groups:
        low, high = g.interval
        first = g.members[0]
        row = {"rank": g.rank, "group": g.label, "n": str(g.n), "mean": _fmt(g.mean),
               "std": _fmt(g.std), "ci95_low": _fmt(low), "ci95_high": _fmt(high)}  # fmt: skip
        if g.not_finite:
            row["mean"] = f"nan ({g.not_finite} of {g.n} not finite)"
        row |= {p: first.data.params.get(p, "") for p in varying}
        if budget:
            spent = budget.get(g.label, {})
            row["trials"] = spent.get("trials", "0")
            row["seconds_per_trial"] = spent.get("seconds", "")
        rows.append(row)
    return rows


def _budgets(trials: list[Run]) -> dict[str, dict[str, str]]:
    """Per search group: trials by outcome (`8 (5 complete, 3 pruned)`) and their mean wall
    time, start to end of the run (set-up, loop, evaluation, logging)."""
    by_group: dict[str, list[Run]] = defaultdict(list)
    for run in trials:
        by_group[run.data.tags.get(tracking_search.GROUP_TAG, "?")].append(run)
    out = {}
    for group, runs in by_group.items():
        states: dict[str, int] = defaultdict(int)
        for run in runs:
            states[run.data.tags.get(tracking_search.STATE_TAG, "running")] += 1
        ended = [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time]
        detail = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        out[group] = {
            "trials": f"{len(runs)} ({detail})",
            "seconds": f"{sum(ended) / len(ended):.1f}" if ended else "",
        }
    return out


def format_groups(c: Comparison) -> list[str]:
    """The group table as aligned text lines, with a heading that says how to read it."""
    rows = group_rows(c)
    columns = list(rows[0])
    width = {k: max(len(k), *(len(r[k]) for r in rows)) for k in columns}
    heading = (f"{len(rows)} groups by mean {c.metric} over seeds, 95% t interval; "
               "~best: interval overlaps the best one's, not distinguishable from it")  # fmt: skip
    lines = [heading, "  ".join(k.ljust(width[k]) for k in columns)]
    lines.append("  ".join("-" * width[k] for k in columns))
    lines += ["  ".join(r[k].ljust(width[k]) for k in columns) for r in rows]
    return lines


def _write_groups(c: Comparison, folder: Path) -> None:
    rows = group_rows(c)
    with open(folder / "groups.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        bold = r["rank"] == "best"
        lines.append("| " + " | ".join(f"**{r[k]}**" if bold and r[k] else r[k]
                                       for k in columns) + " |")  # fmt: skip
    (folder / "groups.md").write_text("\n".join(lines) + "\n")


def _draw_groups(c: Comparison, folder: Path) -> None:
    """Error bars per group, the final runs' training loss with a band over seeds, and for
    a search the lr sensitivity of its trials and each study's optimization history."""
    from pipeline import plots

    _write_groups(c, folder)
    bars = [
        plots.GroupBar(g.label, g.members[0].data.params.get("optimizer", "?"), g.mean,
                       *g.interval, g.n, g.not_finite)
        for g in c.groups
    ]  # fmt: skip
    plots.group_errorbars(bars, c.metric, folder / "metric_by_group.png")
    bands = [
        plots.Band(g.label, g.members[0].data.params.get("optimizer", "?"),
                   g.members[0].data.params.get("loss", "?"),
                   [tracking.metric_history(r.info.run_id, "train/loss") for r in g.members])
        for g in c.groups
    ]  # fmt: skip
    plots.loss_bands(bands, folder / "loss_band_over_seeds.png")
    if not c.trials:
        return
    objective = next((m for m in ("val/accuracy", "val/loss") if c.metric.endswith(m[4:])),
                     "val/accuracy")  # fmt: skip
    points = []
    for run in c.trials:
        params = run.data.params
        if "effective_lr" not in params:
            continue
        points.append(plots.TrialPoint(
            run.data.tags.get(tracking_search.GROUP_TAG, "?"), params.get("optimizer", "?"),
            params.get("loss", "?"), float(params["effective_lr"]),
            _value(run, objective), run.data.tags.get(tracking_search.STATE_TAG, "?"),
            int(run.data.tags.get(tracking_search.TRIAL_TAG, "0")),
        ))  # fmt: skip
    plots.lr_sensitivity(points, objective, folder / "lr_sensitivity.png")
    history = folder / "history"
    history.mkdir()
    for group in sorted({p.group for p in points}):
        mine = [p for p in points if p.group == group]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", group)
        plots.optimization_history(group, mine, objective, c.direction, history / f"{name}.png")
