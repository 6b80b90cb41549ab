"""Experiment files: a YAML sweep of training runs, loaded and checked before anything runs.

A file names the MLflow experiment, a `base` of TrainConfig values, a `grid` (cartesian
product) and/or explicit `runs`, optional `seeds`, or instead a `search` (pipeline/search),
optional `data` (PrepConfig values) and the metric to rank by. Every problem is a one-line
PipelineError naming the file and the key.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.checkpointing import CheckpointConfig
from pipeline.config import (
    MAX_EXPERIMENT_NAME,
    MAX_RUN_NAME,
    MAX_TAG_VALUE,
    PrepConfig,
    TrainConfig,
    check_length,
    check_range,
)
from pipeline.configfile import (
    CHECKPOINT_KEYS,
    TRAIN_KEYS,
    FileErrors,
    checkpoint_config,
    mapping,
    prep_config,
    read_yaml,
    train_value,
    train_values,
)
from pipeline.errors import PipelineError, quote
from pipeline.search.spec import SearchSpec, parse_search
from pipeline.steps import validate_train

TOP_KEYS = ("experiment", "description", "data", "base", "grid", "runs", "seeds", "search",
            "metric", "direction", *CHECKPOINT_KEYS)  # fmt: skip
RANK_METRICS = (
    "test/accuracy",
    "test/loss",
    "val/accuracy",
    "val/loss",
    "train/accuracy",
    "train/loss",
    "time/loop_seconds",
    "time/samples_per_second",
)
DIRECTIONS = ("max", "min")
NAME_KEYS = ("optimizer", "loss", "model")  # always in a trial's name, in this order


@dataclass(frozen=True)
class Trial:
    """One training run of a sweep: its name and the full config (data filled in later)."""

    name: str
    config: TrainConfig
    overrides: dict[str, object]  # what the file set for this trial, base included


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file."""

    path: Path
    name: str
    description: str
    prep: PrepConfig
    trials: list[Trial]
    metric: str
    direction: str
    digest: str  # sha256 of the file's bytes: identifies the sweep for resuming
    text: str
    # `resume: auto` (default): an interrupted trial goes on from its checkpoint.
    checkpoints: CheckpointConfig = CheckpointConfig(resume="auto")
    search: SearchSpec | None = None  # a `search` section: trials come from Optuna instead


def default_direction(metric: str) -> str:
    """Losses and times are minimised, everything else maximised."""
    return "min" if "loss" in metric or metric.endswith("seconds") else "max"


def load_experiment(path: str | Path) -> Experiment:
    """Read, parse and validate `path`; raises PipelineError naming the file and the key."""
    path = Path(path)
    text, doc = read_yaml(path, "experiment file")
    return _parse(path, text, doc)


def _parse(path: Path, text: str, doc: object) -> Experiment:
    err = FileErrors(path)
    if not isinstance(doc, dict):
        raise err("the file must be a mapping with keys experiment, base, grid/runs, ...")
    err.unknown_keys(doc, TOP_KEYS, "the top level")
    name = doc.get("experiment")
    if not isinstance(name, str) or not name.strip():
        raise err("key 'experiment' must be a non-empty string naming the MLflow experiment")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise err("key 'description' must be a string")
    # MLflow's limits: the experiment's name, the parent run's name and its note (a tag)
    _mlflow_length(err, "experiment", name, MAX_EXPERIMENT_NAME)
    _mlflow_length(err, "description", description, MAX_TAG_VALUE)
    _mlflow_length(err, "the parent run's name", f"sweep-{path.stem}", MAX_RUN_NAME)
    metric = doc.get("metric", "test/accuracy")
    if metric not in RANK_METRICS:
        raise err(
            f"metric {quote(metric)} is not rankable; valid choices: {', '.join(RANK_METRICS)}"
        )
    direction = doc.get("direction", default_direction(metric))
    if direction not in DIRECTIONS:
        raise err(
            f"direction {quote(direction)} is invalid; valid choices: {', '.join(DIRECTIONS)}"
        )
    prep = prep_config(err, doc.get("data"), "data")
    base = _values(err, mapping(err, doc.get("base"), "base"), "base")
    if "search" in doc:
        if given := [k for k in ("grid", "runs", "seeds") if k in doc]:
            raise err(f"key {given[0]!r} cannot be used with 'search': the search's space, "
                      "group_by and final.seeds say what runs")  # fmt: skip
        search = parse_search(err, doc["search"], base, metric, direction)
        digest = hashlib.sha256(text.encode()).hexdigest()
        return Experiment(path, name, description, prep, [], metric, direction, digest, text,
                          checkpoint_config(err, doc), search=search)  # fmt: skip
    combos = _grid(err, doc) + _runs(err, doc)
    seeds = _seeds(err, doc, base, combos)
    trials = _trials(err, base, combos, seeds)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Experiment(path, name, description, prep, trials, metric, direction, digest, text,
                      checkpoint_config(err, doc))  # fmt: skip


def _values(err: FileErrors, mapping: dict, where: str) -> dict[str, object]:
    """TrainConfig values from one mapping of the file; the data is the sweep's own."""
    if "data" in mapping:
        raise err(f"key 'data' in {where} is set by the sweep; put PrepConfig values under "
                  "the top-level 'data' key")  # fmt: skip
    return train_values(err, mapping, where)


def _grid(err: FileErrors, doc: dict) -> list[dict[str, object]]:
    """The cartesian product of the grid's lists, keys in file order."""
    if "grid" not in doc:
        if "runs" not in doc:
            raise err("needs a 'grid' and/or a list of 'runs'; neither is given")
        return []
    grid = doc["grid"]
    if grid is not None and not isinstance(grid, dict):
        raise err(f"key 'grid' must be a mapping of parameter: [values, ...], got {quote(grid)}")
    if not grid:
        raise err("key 'grid' is empty; give it parameter: [values, ...] entries")
    err.unknown_keys(grid, TRAIN_KEYS, "grid")
    lists = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise err(f"grid.{key} must be a non-empty list of values, got {quote(values)}")
        lists[key] = [train_value(err, f"grid.{key}", key, v) for v in values]
    return [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]


def _runs(err: FileErrors, doc: dict) -> list[dict[str, object]]:
    runs = doc.get("runs", [])
    if not isinstance(runs, list) or ("runs" in doc and not runs):
        raise err("key 'runs' must be a non-empty list of parameter mappings")
    out = []
    for i, run in enumerate(runs):
        out.append(_values(err, mapping(err, run, f"runs[{i}]"), f"runs[{i}]"))
    return out


def _seeds(err: FileErrors, doc: dict, base: dict, combos: list[dict]) -> list[int] | None:
    if "seeds" not in doc:
        return None
    seeds = doc["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise err("key 'seeds' must be a non-empty list of integers")
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool):
            raise err(f"seeds must be integers, got {quote(s)}")
        try:
            check_range("seed", s, "seeds")
        except PipelineError as exc:
            raise err(str(exc)) from None
    if len(set(seeds)) != len(seeds):
        raise err(f"seeds {quote(seeds)} repeat a value")
    if "seed" in base or any("seed" in c for c in combos):
        raise err("key 'seed' is set in base, grid or runs and also by 'seeds'; use one")
    return seeds


def _trials(
    err: FileErrors, base: dict, combos: list[dict], seeds: list[int] | None
) -> list[Trial]:
    """Every combination over `base`, once per seed, each validated as a whole config."""
    settings = [{**base, **c} for c in combos]
    if seeds is not None:
        settings = [{**s, "seed": seed} for s in settings for seed in seeds]
    varying = _varying_keys(settings)
    trials, names = [], set()
    for values in settings:
        config = replace(TrainConfig(), **values)
        name = _trial_name(config, varying, seeds is not None)
        _mlflow_length(err, "trial name", name, MAX_RUN_NAME)
        if name in names:
            raise err(f"trial {name!r} is listed twice (grid and runs give the same values)")
        names.add(name)
        try:
            validate_train(config)
        except PipelineError as exc:
            raise err(f"trial {name!r}: {exc}") from None
        trials.append(Trial(name, config, values))
    return trials


def _mlflow_length(err: FileErrors, what: str, text: str, limit: int) -> None:
    try:
        check_length(what, text, limit)
    except PipelineError as exc:
        raise err(str(exc)) from None


def _varying_keys(settings: list[dict]) -> list[str]:
    """Keys, other than the name keys, whose value differs between trials."""
    keys = dict.fromkeys(k for s in settings for k in s)
    default = TrainConfig()
    return [
        k
        for k in keys
        if k not in NAME_KEYS and len({repr(s.get(k, getattr(default, k))) for s in settings}) > 1
    ]


def _trial_name(config: TrainConfig, varying: list[str], seeded: bool) -> str:
    """e.g. `adam-mse-seed_cnn-seed1`, with every other varying key as `-keyVALUE`."""
    parts = [str(getattr(config, k)) for k in NAME_KEYS]
    parts += [f"{k}{_short(getattr(config, k))}" for k in varying if k != "seed"]
    if seeded or "seed" in varying:
        parts.append(f"seed{config.seed}")
    return "-".join(parts)


def _short(value: object) -> str:
    return "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
