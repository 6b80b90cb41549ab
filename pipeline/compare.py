"""`pipeline compare`: the train runs of an experiment or a sweep, ranked, tabled and plotted.

The table (terminal, CSV, Markdown) shows the params that vary and the final metrics, best
run first. Plots (loss curves, validation accuracy per epoch, the final metric by optimizer
and loss) and the tables become artifacts of the sweep's parent run, so they show in the
MLflow UI; comparing a whole experiment logs them to a new `compare` run there.
"""

from __future__ import annotations

import csv
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import tracking
from pipeline.config import TrainConfig
from pipeline.configfile import TRAIN_KEYS
from pipeline.errors import PipelineError
from pipeline.experiments import DIRECTIONS, default_direction

if TYPE_CHECKING:
    from mlflow.entities import Run

PARAM_KEYS = (*TRAIN_KEYS, "effective_lr", "effective_momentum")
METRIC_COLUMNS = ("test/accuracy", "test/loss", "val/accuracy", "train/loss", "time/loop_seconds")
ARTIFACT_DIR = "compare"
BAR_GROUPED = ("optimizer", "loss", "seed", "effective_lr", "effective_momentum")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Comparison:
    """Ranked rows of one comparison, and where its artifacts went."""

    title: str
    metric: str
    direction: str
    runs: list[Run]  # best first
    params: list[str]  # the params that vary between the runs
    metrics: list[str]
    log_run_id: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    def rows(self) -> list[dict[str, str]]:
        out = []
        for rank, run in enumerate(self.runs, 1):
            row = {"rank": "best" if rank == 1 else str(rank), "run": run.info.run_name}
            row |= {p: run.data.params.get(p, "") for p in self.params}
            row |= {m: _fmt(run.data.metrics.get(m)) for m in self.metrics}
            out.append(row | {"run_id": run.info.run_id})
        return out


def compare(
    target: str, metric: str | None = None, direction: str | None = None, out: Path | None = None
) -> Comparison:
    """Rank the FINISHED train runs of `target` (experiment name or sweep parent run id)."""
    parent = tracking.find_run(target) if RUN_ID.match(target) else None
    if parent is not None:
        runs = _sweep_runs(parent)
        metric = metric or parent.data.params.get("metric", "test/accuracy")
        direction = direction or parent.data.params.get("direction")
        title = f"sweep {parent.info.run_name} ({parent.info.run_id})"
    else:
        experiment = tracking.experiment_by_name(target)
        runs = tracking.train_runs(experiment.experiment_id)
        metric = metric or "test/accuracy"
        title = f"experiment {experiment.name}"
    direction = direction or default_direction(metric)
    if direction not in DIRECTIONS:
        raise PipelineError(f"direction {direction!r} is invalid; valid choices: max, min")
    comparison = _rank(title, [r for r in runs if r.info.status == "FINISHED"], metric, direction)
    print(format_text(comparison))
    if parent is not None:
        log_to = parent.info.run_id
    else:  # a run of its own to hold an experiment-wide comparison's artifacts
        log_to = tracking.create_finished_run(
            experiment.experiment_id, f"compare-{experiment.name}", "compare"
        )
    _write_artifacts(comparison, log_to, out)
    return comparison


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


def _rank(title: str, runs: list[Run], metric: str, direction: str) -> Comparison:
    """Sort best first by `metric`; the columns are the params that vary between runs."""
    if not runs:
        raise PipelineError(f"{title} has no FINISHED train runs to compare")
    have = sorted({m for r in runs for m in r.data.metrics if "class_accuracy" not in m})
    if metric not in have:
        raise PipelineError(f"no run has metric {metric!r}; metrics: {', '.join(have)}")
    sign = -1 if direction == "max" else 1
    runs = sorted(
        runs,
        key=lambda r: (metric not in r.data.metrics, sign * r.data.metrics.get(metric, 0.0)),
    )
    params = [p for p in PARAM_KEYS if len({r.data.params.get(p) for r in runs}) > 1]
    metrics = list(dict.fromkeys([metric, *METRIC_COLUMNS]))
    return Comparison(title, metric, direction, runs, params or ["optimizer", "loss"], metrics)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"


def format_text(c: Comparison) -> str:
    """An aligned plain-text table with a heading line."""
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in c.rows()]
    columns = list(rows[0])
    width = {k: max(len(k), *(len(r[k]) for r in rows)) for k in columns}
    lines = [f"{c.title}: {len(rows)} runs ranked by {c.metric} ({c.direction})"]
    lines.append("  ".join(k.ljust(width[k]) for k in columns))
    lines.append("  ".join("-" * width[k] for k in columns))
    lines += ["  ".join(r[k].ljust(width[k]) for k in columns) for r in rows]
    return "\n".join(lines)


def format_markdown(c: Comparison) -> str:
    """A Markdown table; the best run's row is bold."""
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in c.rows()]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for i, r in enumerate(rows):
        cells = [f"**{r[k]}**" if i == 0 and r[k] else r[k] for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(c: Comparison, path: Path) -> None:
    rows = c.rows()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_artifacts(c: Comparison, run_id: str, out: Path | None) -> None:
    """Tables and plots to `run_id` under compare/, and to `out` when given."""
    from pipeline import plots

    folder = Path(tempfile.mkdtemp(prefix="pipeline-compare-"))
    write_csv(c, folder / "table.csv")
    (folder / "table.md").write_text(format_markdown(c))
    plots.loss_curves(_series(c.runs, "train/loss"), folder / "loss_curves.png")
    plots.val_accuracy(_series(c.runs, "val/accuracy"), folder / "val_accuracy.png")
    finals = [
        plots.Series(r.info.run_name, r.data.params.get("optimizer", "?"),
                     _bar_label(r, c.params), [(0, r.data.metrics[c.metric])])
        for r in c.runs
        if c.metric in r.data.metrics
    ]  # fmt: skip
    plots.metric_bars(finals, c.metric, folder / "metric_by_optimizer_loss.png")
    tracking.log_artifacts_to(run_id, folder, ARTIFACT_DIR)
    c.log_run_id = run_id
    c.files = {p.name: p for p in folder.iterdir()}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, path in c.files.items():
            shutil.copy(path, out / name)
    print(f"compare: tables and plots logged to run {run_id} under {ARTIFACT_DIR}/")


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


def _series(runs: list[Run], key: str):
    """Each run's full history of `key`, in step order."""
    from pipeline.plots import Series

    return [
        Series(
            r.info.run_name,
            r.data.params.get("optimizer", "?"),
            r.data.params.get("loss", "?"),
            tracking.metric_history(r.info.run_id, key),
        )
        for r in runs
    ]
