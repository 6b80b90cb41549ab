"""The comparison charts, drawn with matplotlib's file-only Agg backend; no MLflow here.

Colour tells the optimizer and line style the loss, the same in every chart. Runs are told
apart by id (names repeat); values that are not finite are never drawn as numbers: a run
that diverged is labelled so, and never sets a bar's height or a chart's scale.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.patches import Patch  # noqa: E402

from pipeline.config import LOSSES, OPTIMIZERS  # noqa: E402

LINE_STYLES = ("-", "--", ":", "-.")
DIVERGED = 10.0  # a run whose (smoothed) loss ends this many times above its start


@dataclass
class Series:
    """One run's curve (or single final value) with what it is labelled and coloured by."""

    key: str  # the run id: run names repeat, ids do not
    label: str  # the name shown in the legend
    optimizer: str
    loss: str
    points: list[tuple[int, float]]
    diverged: bool = False  # training stopped at a loss that was not finite


def _finite_points(s: Series) -> list[tuple[int, float]]:
    return [p for p in s.points if math.isfinite(p[1])]


def _ordered(names: set[str], known: tuple[str, ...]) -> list[str]:
    """`names` in the order config.py lists them (sgd, momentum, ... nadam), others last."""
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


def _styles(series: list[Series]) -> tuple[dict[str, object], dict[str, str]]:
    optimizers = _ordered({s.optimizer for s in series}, OPTIMIZERS)
    losses = _ordered({s.loss for s in series}, LOSSES)
    cmap = plt.get_cmap("tab10" if len(optimizers) <= 10 else "tab20")
    colors = {o: cmap(i % cmap.N) for i, o in enumerate(optimizers)}
    styles = {loss: LINE_STYLES[i % len(LINE_STYLES)] for i, loss in enumerate(losses)}
    return colors, styles


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-batch losses are too noisy to compare raw."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves(series: list[Series], path: Path) -> None:
    """Every run's train/loss against the step, on one log-scale chart.

    A run that stopped at a loss that was not finite, or whose loss ends far above where it
    started, diverged: it is labelled so (its last finite point marked with an x), and the
    y axis is scaled to the other runs, so one blow-up does not flatten every other curve.
    """
    colors, styles = _styles(series)
    finite = {s.key: _finite_points(s) for s in series}
    longest = max((len(p) for p in finite.values()), default=1)
    window = max(1, longest // 15)
    smoothed = {k: _smooth([p[1] for p in pts], window) for k, pts in finite.items() if pts}
    stopped = {s.key for s in series if s.diverged or len(finite[s.key]) < len(s.points)}
    diverged = stopped | {k for k, v in smoothed.items() if not v[-1] < DIVERGED * v[0]}
    fig, ax = plt.subplots(figsize=(10, 6))
    for s in (s for s in series if s.key in smoothed):
        label = f"{s.label} (diverged)" if s.key in diverged else s.label
        xs = [p[0] for p in finite[s.key]]
        ax.plot(xs, smoothed[s.key], color=colors[s.optimizer], linestyle=styles[s.loss],
                label=label)  # fmt: skip
        if s.key in stopped:
            ax.plot(xs[-1], smoothed[s.key][-1], marker="x", markersize=9,
                    color=colors[s.optimizer])  # fmt: skip
    ax.set_yscale("log")
    kept = [v for k, values in smoothed.items() if k not in diverged for v in values if v > 0]
    if diverged and kept:
        ax.set_ylim(min(kept) / 1.5, max(kept) * 3)
    smoothing = f", moving average of {window} logged steps" if window > 1 else ""
    ax.set(xlabel="step", ylabel="train/loss (log scale)",
           title=f"Training loss per step{smoothing}")  # fmt: skip
    _finish(fig, ax, path)


def val_accuracy(series: list[Series], path: Path) -> None:
    """Every run's val/accuracy after each epoch (a run that diverged: its full epochs)."""
    colors, styles = _styles(series)
    fig, ax = plt.subplots(figsize=(10, 6))
    for s in series:
        points = _finite_points(s)
        label = f"{s.label} (diverged)" if s.diverged else s.label
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                color=colors[s.optimizer], linestyle=styles[s.loss], label=label)  # fmt: skip
    epochs = sorted({p[0] for s in series for p in s.points})
    ax.set_xticks(epochs)
    ax.set(xlabel="epoch", ylabel="val/accuracy", title="Validation accuracy per epoch")
    _finish(fig, ax, path)


def metric_bars(series: list[Series], metric: str, path: Path) -> dict[tuple[str, str], float]:
    """`metric` per optimizer (groups) and loss (bars: `Series.loss` may name more settings);
    the mean, with min-max whiskers when several runs (seeds) share a bar.

    Values that are not finite are left out of the mean and counted on the bar instead (a
    bar of only such values is a label at 0). Returns the heights drawn, by (optimizer, loss).
    """
    colors, _ = _styles(series)
    optimizers = _ordered({s.optimizer for s in series}, OPTIMIZERS)
    losses = _ordered({s.loss for s in series}, LOSSES)
    width = 0.8 / len(losses)
    fig, ax = plt.subplots(figsize=(max(8, 2 + 0.5 * len(optimizers) * len(losses)), 5.5))
    hatches = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
    heights = {}
    for j, loss in enumerate(losses):
        for i, opt in enumerate(optimizers):
            group = [s for s in series if (s.optimizer, s.loss) == (opt, loss)]
            if not group:
                continue
            x = i + (j - (len(losses) - 1) / 2) * width
            values = [s.points[-1][1] for s in group if math.isfinite(s.points[-1][1])]
            # A run with no finite value has no height to add: it is counted, never averaged.
            nan = [s for s in group if not math.isfinite(s.points[-1][1])]
            bad, word = len(nan), "diverged" if all(s.diverged for s in nan) else "nan"
            if not values:
                ax.annotate(f"{bad} {word}", (x, 0), ha="center", va="bottom", fontsize=7,
                            rotation=90, xytext=(0, 3), textcoords="offset points")  # fmt: skip
                continue
            mean = heights[opt, loss] = statistics.fmean(values)
            err = [[mean - min(values)], [max(values) - mean]] if len(values) > 1 else None
            ax.bar(x, mean, width, yerr=err, capsize=3, color=colors[opt], edgecolor="black",
                   hatch=hatches[j % len(hatches)])  # fmt: skip
            text = f"{mean:.3f}" + (f" (+{bad} {word})" if bad else "")
            ax.annotate(text, (x, max(values)), ha="center", va="bottom", fontsize=7,
                        rotation=90, xytext=(0, 3), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(optimizers)), optimizers, rotation=30, ha="right")
    several = len({(s.optimizer, s.loss) for s in series}) < len(series)
    note = "\n(mean over seeds; whiskers: min to max)" if several else ""
    ax.set(ylabel=metric, title=f"Final {metric} by optimizer and loss{note}")
    ax.margins(y=0.15)
    handles = [Patch(facecolor="white", edgecolor="black", hatch=hatches[j % len(hatches)],
                     label=loss) for j, loss in enumerate(losses)]  # fmt: skip
    ax.legend(handles=handles, title="loss", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return heights


def _finish(fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_figure(matrix: list[list[int]], classes: list[str]):
    """The confusion matrix (`matrix[true][predicted]`, counts) as a labelled heat map."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test)",
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    peak = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            color = "white" if n > peak / 2 else "black"
            ax.text(j, i, n, ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    plt.close(fig)
    return fig


# --- statistics over seeds and searches ----------------------------------------------------


@dataclass
class GroupBar:
    """One group's mean over seeds with its 95% interval (infinite with one seed)."""

    label: str
    optimizer: str
    mean: float
    low: float
    high: float
    n: int
    not_finite: int = 0


def group_errorbars(groups: list[GroupBar], metric: str, path: Path) -> None:
    """The mean of `metric` per group, best first as given, with 95% interval error bars.

    A group with one seed has no interval: its point is drawn without a bar and labelled
    n=1. A group with a value that is not finite has no mean: it is named at the axis with
    how many of its seeds were not finite, never drawn as a number.
    """
    colors, _ = _styles([Series(g.label, g.label, g.optimizer, "", []) for g in groups])
    fig, ax = plt.subplots(figsize=(max(8, 1 + 0.45 * len(groups)), 5.5))
    finite = [g.mean for g in groups if math.isfinite(g.mean)]
    floor = min(finite) if finite else 0.0
    for i, g in enumerate(groups):
        if not math.isfinite(g.mean):
            ax.annotate(f"{g.not_finite}/{g.n} not finite", (i, floor), ha="center",
                        va="bottom", fontsize=7, rotation=90)  # fmt: skip
            continue
        bounded = math.isfinite(g.low) and math.isfinite(g.high)
        err = [[g.mean - g.low], [g.high - g.mean]] if bounded else None
        ax.errorbar(i, g.mean, yerr=err, fmt="o", capsize=4, color=colors[g.optimizer])
        if not bounded:
            ax.annotate("n=1", (i, g.mean), xytext=(4, 0), textcoords="offset points",
                        fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=45, ha="right")
    ax.set(ylabel=metric, title=f"{metric} by group: mean over seeds, 95% t interval")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Band:
    """A group's training-loss curves, one per seed, as (step, value) points."""

    label: str
    optimizer: str
    loss: str
    curves: list[list[tuple[int, float]]]


def loss_bands(bands: list[Band], path: Path) -> None:
    """Per group, the mean train/loss over seeds at each step (smoothed as in `loss_curves`)
    with a band from the lowest to the highest seed; only steps every seed logged, finite."""
    colors, styles = _styles([Series(b.label, b.label, b.optimizer, b.loss, []) for b in bands])
    fig, ax = plt.subplots(figsize=(10, 6))
    for b in bands:
        by_step = [dict(c) for c in b.curves]
        steps = sorted(set.intersection(*(set(d) for d in by_step))) if by_step else []
        rows = [[d[s] for d in by_step] for s in steps]
        keep = [(s, r) for s, r in zip(steps, rows, strict=True) if all(map(math.isfinite, r))]
        if not keep:
            continue
        window = max(1, len(keep) // 15)
        xs = [s for s, _ in keep]
        mean = _smooth([statistics.fmean(r) for _, r in keep], window)
        low = _smooth([min(r) for _, r in keep], window)
        high = _smooth([max(r) for _, r in keep], window)
        color = colors[b.optimizer]
        ax.plot(xs, mean, color=color, linestyle=styles[b.loss],
                label=f"{b.label} ({len(b.curves)} seeds)")  # fmt: skip
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="train/loss (log scale)",
           title="Final runs' training loss: mean over seeds, band from min to max")  # fmt: skip
    _finish(fig, ax, path)


@dataclass
class TrialPoint:
    """One search trial: its group, lr and the validation metric it reached (or was pruned
    at), and its outcome (complete, pruned, diverged, failed)."""

    group: str
    optimizer: str
    loss: str
    lr: float
    value: float
    state: str
    number: int


def lr_sensitivity(points: list[TrialPoint], metric: str, path: Path) -> None:
    """`metric` against the learning rate (log x axis), one line per optimizer and loss
    through its completed trials; pruned trials as hollow markers at the value they were
    stopped at; diverged and failed ones as x at the bottom of the axis."""
    series = [Series(p.group, p.group, p.optimizer, p.loss, []) for p in points]
    colors, styles = _styles(series)
    fig, ax = plt.subplots(figsize=(10, 6))
    finite = [p.value for p in points if math.isfinite(p.value)]
    bottom = min(finite) if finite else 0.0
    for opt, loss in sorted({(p.optimizer, p.loss) for p in points}):
        mine = sorted((p for p in points if (p.optimizer, p.loss) == (opt, loss)),
                      key=lambda p: p.lr)  # fmt: skip
        done = [p for p in mine if p.state == "complete" and math.isfinite(p.value)]
        ax.plot([p.lr for p in done], [p.value for p in done], marker="o", markersize=4,
                color=colors[opt], linestyle=styles[loss], label=f"{opt} {loss}")  # fmt: skip
        pruned = [p for p in mine if p.state == "pruned" and math.isfinite(p.value)]
        ax.scatter([p.lr for p in pruned], [p.value for p in pruned], facecolors="none",
                   edgecolors=colors[opt], s=25)  # fmt: skip
        bad = [p for p in mine if p.state in ("diverged", "failed") or not math.isfinite(p.value)]
        ax.scatter([p.lr for p in bad], [bottom] * len(bad), marker="x", color=colors[opt], s=25)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel=f"{metric} of the trial",
           title="Learning-rate sensitivity (o: pruned, x: diverged or failed)")  # fmt: skip
    _finish(fig, ax, path)


def optimization_history(
    study: str, points: list[TrialPoint], metric: str, direction: str, path: Path
) -> None:
    """One study: each trial's `metric` by trial number (pruned: hollow; diverged or failed:
    x at the bottom), and the best completed value so far as a step line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted(points, key=lambda p: p.number)
    finite = [p.value for p in points if math.isfinite(p.value)]
    bottom = min(finite) if finite else 0.0
    done = [p for p in points if p.state == "complete" and math.isfinite(p.value)]
    pruned = [p for p in points if p.state == "pruned" and math.isfinite(p.value)]
    bad = [p for p in points if p not in done and p not in pruned]
    ax.scatter([p.number for p in done], [p.value for p in done], label="complete")
    ax.scatter([p.number for p in pruned], [p.value for p in pruned], facecolors="none",
               edgecolors="grey", label="pruned (value when stopped)")  # fmt: skip
    ax.scatter([p.number for p in bad], [bottom] * len(bad), marker="x", color="red",
               label="diverged or failed")  # fmt: skip
    best, xs, ys = None, [], []
    for p in done:
        if best is None or (p.value > best if direction == "max" else p.value < best):
            best = p.value
        xs.append(p.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"Optimization history: {study}")
    _finish(fig, ax, path)
