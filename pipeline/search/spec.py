"""The `search` section of an experiment file, checked in full before anything runs.

    search:
      sampler: tpe            # grid, random, tpe, qmc, gp (Optuna's samplers)
      n_trials: 8             # per group: every group gets the same budget
      group_by: [optimizer, loss]
      space:
        optimizer: [sgd, adam]          # a list: a choice (group_by keys must be lists)
        loss: [cross_entropy, mse]
        lr: {log_uniform: [1e-4, 1.0]}
        momentum: {uniform: [0.0, 0.99], when: {optimizer: [momentum, nesterov]}}
        batch_size: [64, 128]
      pruner: median          # median, hyperband or none (off)
      final: {seeds: 5}       # the best setting of each group, again with seeds 1..5
      seed: 0                 # the sampler's seed
      storage: sqlite:///optuna.db      # default: next to the tracking store

A space parameter that does not apply to a group (momentum for adam, label_smoothing for
mse), or whose `when` the group does not match, is not searched in that group. Every
problem is a one-line PipelineError naming the file and the key.
"""

from __future__ import annotations

import itertools
import typing
from dataclasses import asdict, dataclass, replace

from pipeline.config import TrainConfig, check_range
from pipeline.configfile import TRAIN_KEYS, FileErrors, train_value
from pipeline.errors import PipelineError, quote

SAMPLERS = ("grid", "random", "tpe", "qmc", "gp")
PRUNERS = ("median", "hyperband", "none")
SEARCH_KEYS = ("sampler", "n_trials", "space", "group_by", "pruner", "final", "seed", "storage")
FINAL_KEYS = ("seeds",)
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "log_int")
NOT_SEARCHED = ("seed", "device", "log_every", "print_every", "amp", "compile")
MAX_TRIALS = 10_000


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a choice among `values`, or a range `values = (low, high)`."""

    key: str
    kind: str  # "choice" or one of DISTRIBUTIONS
    values: tuple
    when: tuple[tuple[str, tuple], ...] = ()  # searched only where these keys have these values

    def suggest(self, trial) -> object:
        """The value Optuna's `trial` proposes (or was given, for an enqueued trial)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self.values
        if self.kind in ("int", "log_int"):
            return trial.suggest_int(self.key, low, high, log=self.kind == "log_int")
        return trial.suggest_float(self.key, low, high, log=self.kind == "log_uniform")


@dataclass(frozen=True)
class Group:
    """The trials that share the group_by values: one Optuna study."""

    name: str  # the group_by values joined by '-', e.g. adam-cross_entropy
    values: dict[str, object]
    dims: tuple[Dimension, ...]  # what is searched in this group

    def grid(self) -> list[dict[str, object]]:
        """Every combination of the choices, for the grid sampler."""
        lists = {d.key: d.values for d in self.dims}
        return [dict(zip(lists, c, strict=True)) for c in itertools.product(*lists.values())]


@dataclass(frozen=True)
class SearchSpec:
    sampler: str
    n_trials: int  # per group
    groups: tuple[Group, ...]
    pruner: str
    final_seeds: tuple[int, ...]
    seed: int
    storage: str | None
    objective: str  # the validation metric each trial reports per epoch and ends with
    direction: str  # "max" or "min"
    base: dict[str, object]

    def config(self, group: Group, values: dict[str, object]) -> TrainConfig:
        return replace(TrainConfig(), **{**self.base, **group.values, **values})


def parse_search(
    err: FileErrors, section: object, base: dict[str, object], metric: str, direction: str
) -> SearchSpec:
    """The SearchSpec of a `search` section; `base` is the file's checked base values."""
    if not isinstance(section, dict) or not section:
        raise err("key 'search' must be a mapping with sampler, n_trials, space, ...")
    err.unknown_keys(section, SEARCH_KEYS, "search")
    sampler = section.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise err(f"search.sampler {quote(sampler)} is invalid; valid choices: "
                  f"{', '.join(SAMPLERS)}")  # fmt: skip
    pruner = section.get("pruner", "none")
    if pruner is False or pruner is None:  # YAML reads `off` and `no` as false
        pruner = "none"
    if pruner not in PRUNERS:
        raise err(f"search.pruner {quote(pruner)} is invalid; valid choices: "
                  f"{', '.join(PRUNERS)} (or off)")  # fmt: skip
    seed = _int(err, section.get("seed", 0), "search.seed", 0, 2**32 - 1)
    storage = section.get("storage")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise err(f"search.storage must be a database URL such as sqlite:///optuna.db or "
                  f"postgresql://host/db, got {quote(storage)}")  # fmt: skip
    objective = _objective(err, metric)
    dims = _space(err, section.get("space"))
    group_by = _group_by(err, section.get("group_by", []), dims)
    groups = _groups(err, base, dims, group_by, sampler)
    n_trials = _budget(err, section, sampler, groups)
    seeds = _final(err, section.get("final"))
    return SearchSpec(sampler, n_trials, groups, pruner, seeds, seed, storage, objective,
                      direction, base)  # fmt: skip


def _int(err: FileErrors, value: object, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise err(f"{where} must be an integer between {low} and {high}, got {quote(value)}")
    return value


def _objective(err: FileErrors, metric: str) -> str:
    """Trials are judged on validation data; the test split is kept for the final runs."""
    split, _, name = metric.partition("/")
    if split not in ("test", "val"):
        raise err(f"metric {quote(metric)} cannot guide a search; use test/accuracy, "
                  "test/loss, val/accuracy or val/loss")  # fmt: skip
    return f"val/{name}"


def _space(err: FileErrors, space: object) -> list[Dimension]:
    if not isinstance(space, dict) or not space:
        raise err("search.space must be a mapping of parameter: [choices] or "
                  "{log_uniform: [low, high]} (also uniform, int, log_int)")  # fmt: skip
    hints = typing.get_type_hints(TrainConfig)
    dims = []
    for key, spec in space.items():
        where = f"search.space.{key}"
        if key not in TRAIN_KEYS:
            raise err(f"unknown key {quote(key)} in search.space; valid keys: "
                      f"{', '.join(k for k in TRAIN_KEYS if k not in NOT_SEARCHED)}")  # fmt: skip
        if key in NOT_SEARCHED:
            why = "final.seeds repeats the best setting" if key == "seed" else "it is not tuned"
            raise err(f"{where}: {key} cannot be searched ({why})")
        if isinstance(spec, list):
            if not spec:
                raise err(f"{where} must be a non-empty list of choices")
            values = tuple(train_value(err, where, key, v) for v in spec)
            if len(set(map(repr, values))) != len(values):
                raise err(f"{where} {quote(spec)} repeats a value")
            dims.append(Dimension(key, "choice", values))
            continue
        when = spec.pop("when", None) if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise err(f"{where} must be a list of choices or one of {{uniform: [low, high]}}, "
                      f"log_uniform, int, log_int, got {quote(spec)}")  # fmt: skip
        kind, bounds = next(iter(spec.items()))
        bounds = _bounds(err, where, key, kind, bounds, hints[key])
        dims.append(Dimension(key, kind, bounds, _when(err, f"{where}.when", when)))
    return dims


def _when(err: FileErrors, where: str, when: object) -> tuple[tuple[str, tuple], ...]:
    """`when: {optimizer: [momentum, nesterov]}`: searched only in the groups that match."""
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise err(f"{where} must be a mapping of key: [values], got {quote(when)}")
    out = []
    for key, values in when.items():
        if key not in TRAIN_KEYS:
            raise err(f"unknown key {quote(key)} in {where}; valid keys: {', '.join(TRAIN_KEYS)}")
        if not isinstance(values, list) or not values:
            raise err(f"{where}.{key} must be a non-empty list of values, got {quote(values)}")
        out.append((key, tuple(train_value(err, f"{where}.{key}", key, v) for v in values)))
    return tuple(out)


def _bounds(err: FileErrors, where: str, key: str, kind: str, bounds: object, hint: object):
    integer = kind in ("int", "log_int")
    if integer and hint is not int:
        raise err(f"{where}: {key} is a number, not an integer; use uniform or log_uniform")
    if not integer and hint is int:
        raise err(f"{where}: {key} is an integer; use int or log_int")
    if hint not in (int, float, float | None):
        raise err(f"{where}: {key} is not a number; give a list of choices")
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise err(f"{where}.{kind} must be [low, high], got {quote(bounds)}")
    low, high = (train_value(err, f"{where}.{kind}", key, b) for b in bounds)
    if low is None or high is None:
        raise err(f"{where}.{kind} must be two numbers, got {quote(bounds)}")
    if not low < high:
        raise err(f"{where}.{kind} must be [low, high] with low < high, got {quote(bounds)}")
    if kind.startswith("log_") and low <= 0:
        raise err(f"{where}.{kind} needs low > 0 (a log scale), got {quote(low)}")
    return low, high


def _group_by(err: FileErrors, group_by: object, dims: list[Dimension]) -> list[str]:
    if not isinstance(group_by, list) or not all(isinstance(k, str) for k in group_by):
        raise err(f"search.group_by must be a list of space keys, got {quote(group_by)}")
    choices = {d.key for d in dims if d.kind == "choice"}
    for key in group_by:
        if key not in choices:
            valid = ", ".join(sorted(choices)) or "none: give them as lists in search.space"
            raise err(f"search.group_by key {quote(key)} is not a list of choices in "
                      f"search.space; valid keys: {valid}")  # fmt: skip
    if len(set(group_by)) != len(group_by):
        raise err(f"search.group_by {quote(group_by)} repeats a key")
    if len(group_by) == len(dims):
        raise err("search.space has nothing left to search once group_by splits it")
    return group_by


def _groups(
    err: FileErrors, base: dict, dims: list[Dimension], group_by: list[str], sampler: str
) -> tuple[Group, ...]:
    by_key = {d.key: d for d in dims}
    searched = [d for d in dims if d.key not in group_by]
    if sampler == "grid" and (ranged := [d.key for d in searched if d.kind != "choice"]):
        raise err(f"search.sampler grid needs lists of choices; search.space.{ranged[0]} "
                  "is a range")  # fmt: skip
    groups = []
    for combo in itertools.product(*(by_key[k].values for k in group_by)):
        values = dict(zip(group_by, combo, strict=True))
        name = "-".join(str(v) for v in combo) or "all"
        groups.append(Group(name, values, tuple(_applying(err, base, values, name, searched))))
    return tuple(groups)


def _applying(
    err: FileErrors, base: dict, values: dict, name: str, dims: list[Dimension]
) -> list[Dimension]:
    """The dimensions that apply to this group, each checked at its ends (or every choice)."""
    from pipeline.steps import validate_train

    def check(extra: dict) -> str | None:
        config = replace(TrainConfig(), **{**base, **values, **extra})
        try:
            validate_train(config)
        except PipelineError as exc:
            return str(exc)
        return None

    if problem := check({}):
        raise err(f"search group {name!r}: {problem}")
    kept = []
    config = {**asdict(TrainConfig()), **base, **values}
    for dim in dims:
        if any(config[k] not in allowed for k, allowed in dim.when):
            continue
        problems = [check({dim.key: v}) for v in dim.values]
        if any(p and ("does not apply" in p or "applies to" in p) for p in problems):
            continue  # e.g. momentum for adam: not searched in this group
        if bad := next((p for p in problems if p), None):
            raise err(f"search.space.{dim.key} in group {name!r}: {bad}")
        kept.append(dim)
    if not kept:
        raise err(f"search group {name!r} has nothing to search: no space key applies to it")
    return kept


def _budget(err: FileErrors, section: dict, sampler: str, groups: tuple[Group, ...]) -> int:
    if sampler == "grid":
        sizes = {len(g.grid()) for g in groups}
        size = max(sizes)
        if "n_trials" in section and section["n_trials"] != size:
            raise err(f"search.n_trials {quote(section['n_trials'])} does not match the grid; "
                      f"sampler grid runs every combination: {size} per group")  # fmt: skip
        return size
    if "n_trials" not in section:
        raise err("search.n_trials is missing: give the number of trials per group")
    return _int(err, section["n_trials"], "search.n_trials", 1, MAX_TRIALS)


def _final(err: FileErrors, final: object) -> tuple[int, ...]:
    if final is None:
        return ()
    if not isinstance(final, dict):
        raise err(f"search.final must be a mapping such as {{seeds: 5}}, got {quote(final)}")
    err.unknown_keys(final, FINAL_KEYS, "search.final")
    seeds = final.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return tuple(range(1, _int(err, seeds, "search.final.seeds", 1, 1000) + 1))
    if not isinstance(seeds, list) or not seeds:
        raise err(f"search.final.seeds must be a count or a list of seeds, got {quote(seeds)}")
    for s in seeds:
        try:
            check_range("seed", s, "search.final.seeds")
        except PipelineError as exc:
            raise err(str(exc)) from None
    if len(set(seeds)) != len(seeds):
        raise err(f"search.final.seeds {quote(seeds)} repeats a value")
    return tuple(seeds)
