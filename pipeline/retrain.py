"""Scheduled retraining: a challenger is trained on fresh data and replaces the champion
only if it is better by at least `min_delta`.

Order of writes, so that a crash anywhere leaves the `champion` alias on a finished,
evaluated version: prep -> train -> evaluate both -> register (decision `pending`) ->
move the alias (promote only) -> record the decision. A version left `pending` by a crash is
settled by the next retrain: `promote` if the alias already points at it, else `abandoned`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from pipeline import configfile, registry, signals, tracking
from pipeline.checkpointing import CheckpointConfig
from pipeline.config import PrepConfig, TrainConfig
from pipeline.data import load_prepared, to_model_input
from pipeline.errors import PipelineError, first_line, quote
from pipeline.lock import default_lock_dir, exclusive, lock_path
from pipeline.loop import Evaluation, evaluate
from pipeline.losses import build_loss

DEFAULT_CONFIG = "experiments/retrain.yaml"
METRICS = {"accuracy": "maximize", "loss": "minimize"}  # on the current test split
PARAMS_FROM = ("config", "champion")
FAIL_AFTER_ENV = "PIPELINE_FAIL_AFTER"  # failure injection for tests: a stage name below
STAGES = ("prep", "train", "evaluate", "register", "promote")


RULE_KEYS = ("model_name", "metric", "direction", "min_delta")
TOP_KEYS = (*RULE_KEYS, "prep", "train", *configfile.CHECKPOINT_KEYS)


@dataclass(frozen=True)
class RetrainConfig:
    """What `experiments/retrain.yaml` holds: the model, the rule, and the run parameters."""

    model_name: str = "digits-classifier"
    metric: str = "accuracy"
    direction: str = "maximize"
    min_delta: float = 0.0
    prep: PrepConfig = field(default_factory=PrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # `resume: auto` (default): a challenger whose retrain was killed while it trained goes
    # on from its checkpoint when the next retrain trains it on the same data.
    checkpoints: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(resume="auto"))


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str

    @property
    def word(self) -> str:
        return registry.PROMOTE if self.promote else registry.KEEP


@dataclass(frozen=True)
class RetrainResult:
    run_id: str
    version: str
    decision: str
    reason: str
    challenger: float
    champion: float | None
    data_digest: str


# --- the config file --------------------------------------------------------------------


def load_config(path: str | Path) -> RetrainConfig:
    """Read and validate a retrain YAML file; any bad key or value names the file and key."""
    path = Path(path)
    _, raw = configfile.read_yaml(path, "retrain config")
    err = configfile.FileErrors(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise err(f"expected a mapping of keys, got {type(raw).__name__}")
    err.unknown_keys(raw, TOP_KEYS, "the top level")
    prep = configfile.prep_config(err, raw.get("prep"), "prep")
    train = configfile.train_values(
        err, configfile.mapping(err, raw.get("train"), "train"), "train"
    )
    hints = typing.get_type_hints(RetrainConfig)
    values = {k: configfile.convert(err, k, v, hints[k]) for k, v in raw.items() if k in RULE_KEYS}
    if "metric" in values and "direction" not in values:
        values["direction"] = METRICS.get(values["metric"], "maximize")
    checkpoints = configfile.checkpoint_config(err, raw)
    cfg = RetrainConfig(**values, prep=prep, train=TrainConfig(**train), checkpoints=checkpoints)
    validate(cfg, str(path))
    return cfg


def validate(cfg: RetrainConfig, source: str = "retrain config") -> None:
    """Every choice and range, before any lock, run or version exists."""
    from pipeline.lock import MODEL_NAME
    from pipeline.steps import validate_prep, validate_train

    if not MODEL_NAME.match(cfg.model_name):
        raise PipelineError(
            f"{source}: invalid model_name {quote(cfg.model_name)}; use 1 to 100 letters, "
            "digits, '.', '_', '-'"
        )
    if cfg.metric not in METRICS:
        raise PipelineError(
            f"{source}: unknown metric {quote(cfg.metric)}; valid choices: {', '.join(METRICS)}"
        )
    if cfg.direction != METRICS[cfg.metric]:
        raise PipelineError(
            f"{source}: direction {quote(cfg.direction)} does not fit metric {cfg.metric!r}; "
            f"valid choice: {METRICS[cfg.metric]}"
        )
    if not (cfg.min_delta >= 0 and math.isfinite(cfg.min_delta)):
        raise PipelineError(f"{source}: min_delta must be a number >= 0, got {cfg.min_delta}")
    try:
        validate_prep(cfg.prep)
    except PipelineError as exc:
        raise PipelineError(f"{source}: prep.{exc}") from None
    try:
        validate_train(cfg.train)
    except PipelineError as exc:
        raise PipelineError(f"{source}: train: {exc}") from None


# --- the decision -----------------------------------------------------------------------


def decide(cfg: RetrainConfig, challenger: float, champion: float | None, version: str) -> Decision:
    """Promote when there is no champion, or the challenger beats it by at least min_delta.

    A score that is not finite (NaN, inf: a model whose outputs are not numbers) is the
    worst there is: such a challenger is never promoted, not even as the first version,
    and such a champion never keeps out a challenger with a finite score.
    """
    metric = cfg.metric
    if not math.isfinite(challenger):
        against = "no champion yet" if champion is None else f"champion v{version} kept"
        return Decision(False, f"challenger {metric}={challenger} is not a finite number: "
                               f"not promoted, {against}")  # fmt: skip
    if champion is None:
        return Decision(True, f"no champion yet: first version promoted ({metric}="
                              f"{challenger:.4f})")  # fmt: skip
    if not math.isfinite(champion):
        return Decision(True, f"champion v{version} {metric}={champion} is not a finite number "
                              f"on the current test split: challenger ({metric}="
                              f"{challenger:.4f}) promoted")  # fmt: skip
    gain = _gain(cfg, challenger, champion)
    compare = (
        f"challenger {metric}={challenger:.4f} vs champion v{version} {metric}="
        f"{champion:.4f} (improvement {gain:+.4f}, min_delta {cfg.min_delta:g})"
    )
    if gain >= cfg.min_delta - 1e-12:
        return Decision(True, f"{compare}: better, promoted")
    return Decision(False, f"{compare}: not better by min_delta, champion kept")


def _keep_diverged(cfg: RetrainConfig, trained, before, run_id: str, digest: str):
    """A challenger that diverged has no model: nothing to score or register, champion kept."""
    champion = "no champion yet" if before is None else f"champion v{before.version} kept"
    decision = Decision(False, f"challenger diverged at step {trained.diverged_at} (train run "
                               f"{trained.run_id}): no model to register, {champion}")  # fmt: skip
    tracking.set_tags({"retrain.decision": decision.word, "retrain.reason": decision.reason,
                       "retrain.champion_after": _v(before)})  # fmt: skip
    print(f"retrain: {decision.word} {cfg.model_name} (no new version): {decision.reason}")
    return RetrainResult(run_id, "none", decision.word, decision.reason, math.nan, None, digest)


# --- the run ----------------------------------------------------------------------------


def retrain(
    cfg: RetrainConfig, *, params_from: str = "config", lock_dir: str | Path | None = None
) -> RetrainResult:
    """Lock, then prepare, train, evaluate, register and decide; see the module docstring."""
    validate(cfg)
    if params_from not in PARAMS_FROM:
        raise PipelineError(
            f"unknown params_from {params_from!r}; valid choices: {', '.join(PARAMS_FROM)}"
        )
    fail_after = _fail_after()
    lock = lock_path(Path(lock_dir or default_lock_dir()), cfg.model_name, tracking.tracking_uri())
    with exclusive(lock):
        tracking.open_store()  # before the registry's first call: creating a store is serialised
        settle_crashed(cfg.model_name)
        return _retrain_locked(cfg, params_from, fail_after)


def _fail_after() -> str | None:
    stage = os.environ.get(FAIL_AFTER_ENV) or None
    if stage is not None and stage not in STAGES:
        raise PipelineError(
            f"{FAIL_AFTER_ENV}={stage!r} is not a stage; valid choices: {', '.join(STAGES)}"
        )
    return stage


def _checkpoint(stage: str, fail_after: str | None) -> None:
    """Injected failure for crash tests: raise right after `stage` when asked to."""
    if stage == fail_after:
        raise RuntimeError(f"injected failure after {stage} ({FAIL_AFTER_ENV}={stage})")


def _retrain_locked(cfg: RetrainConfig, params_from: str, fail_after: str | None):
    """One retrain run with the data_prep and train runs nested in it."""
    from pipeline.steps import run_prep

    name = cfg.model_name
    before = registry.champion(name)
    train_cfg = _challenger_config(cfg, params_from, before)
    late: list[int] = []  # stop signals that arrived while the decision was being written
    # stop_signals_raise outermost: `commit` holds signals past the run's end, and handlers
    # must be put back in the reverse order they were set.
    with (
        signals.stop_signals_raise(),
        contextlib.ExitStack() as commit,
        tracking.start_run("retrain", f"retrain-{name}") as parent,
    ):
        _end_orphaned_retrains(name, parent.experiment_id)
        _log_start(cfg, params_from, train_cfg, before)
        prepared = run_prep(cfg.prep, nested=True, experiment_id=parent.experiment_id)
        tracking.set_tags({"data_digest": prepared.digest, "data_prep_run_id": prepared.run_id})
        _checkpoint("prep", fail_after)
        trained = _train(train_cfg, prepared.run_id, parent.experiment_id, cfg.checkpoints)
        _checkpoint("train", fail_after)
        if trained.diverged_at is not None:
            return _keep_diverged(cfg, trained, before, parent.run_id, prepared.digest)
        if not trained.model_uri:  # kept in the spool: the registry needs it on the server
            raise PipelineError(
                f"the challenger (run {trained.run_id}) could not be logged to the tracking "
                "server; nothing was registered; run `pipeline sync`, then retrain again"
            )
        scores = _evaluate_both(cfg, trained.model_uri, prepared.path, before)
        _checkpoint("evaluate", fail_after)
        lineage = {"data_digest": prepared.digest, "data_prep_run_id": prepared.run_id,
                   "source_run_id": trained.run_id, "retrain_run_id": parent.run_id}  # fmt: skip
        tags = _version_tags(cfg, before, scores) | lineage
        with signals.held():  # a version is registered with its `pending` tag, or not at all
            version = registry.register(name, trained.model_uri, tags)
            tracking.set_tags({"retrain.version": version.version})
        _checkpoint("register", fail_after)
        decision = decide(cfg, scores.challenger, scores.champion, _v(before))
        # The commit point. From here to the end of the run, stop signals wait, and then have
        # nothing left to stop: the decision lands whole, the run ends FINISHED and the
        # command exits 0. Before it, a signal leaves the champion and the registry unchanged
        # but for a `pending` version, which the next retrain settles.
        late = commit.enter_context(signals.held(deliver=False))
        _apply(cfg, decision, version.version, before, fail_after)
    print(f"retrain: {decision.word} {name} v{version.version}: {decision.reason}")
    if late:
        print(
            f"retrain: {signals.name(late[0])} arrived while the decision was being recorded; "
            "it was recorded in full first",
            file=sys.stderr,
        )
    return RetrainResult(
        parent.run_id, version.version, decision.word, decision.reason, scores.challenger,
        scores.champion, prepared.digest,
    )  # fmt: skip


@dataclass(frozen=True)
class Scores:
    """Both models on the current test split; `champion` is None when there is none."""

    challenger_eval: Evaluation
    challenger: float
    champion: float | None


def _challenger_config(cfg: RetrainConfig, params_from: str, before) -> TrainConfig:
    if params_from == "config":
        return cfg.train
    if before is None:
        print("retrain: no champion yet; training with the config's parameters")
        return cfg.train
    return champion_train_config(before)


def _log_start(cfg: RetrainConfig, params_from: str, train_cfg: TrainConfig, before) -> None:
    from pipeline.steps import _requested

    rule = {"registered_model": cfg.model_name, "metric": cfg.metric, "min_delta": cfg.min_delta,
            "direction": cfg.direction, "params_from": params_from}  # fmt: skip
    tracking.log_params(rule | cfg.prep.params() | _requested(train_cfg))
    tracking.set_tags({"retrain.model_name": cfg.model_name, "retrain.champion_before": _v(before)})


def _train(train_cfg: TrainConfig, data_run_id: str, experiment_id: str, checkpoints):
    from pipeline.steps import run_train

    trained = run_train(
        replace(train_cfg, data=data_run_id),
        nested=True,
        experiment_id=experiment_id,
        checkpoints=checkpoints,
    )
    tracking.set_tags({"train_run_id": trained.run_id})
    return trained


def _evaluate_both(cfg: RetrainConfig, model_uri: str, data_path: Path, before) -> Scores:
    """Score the logged challenger (as it will be served) and the champion, in this run."""
    data = load_prepared(data_path)
    challenger = _evaluate(registry.load_logged_model(model_uri), data)
    tracking.log_evaluation("challenger/test", challenger, data.classes, step=0)
    if before is None:
        return Scores(challenger, getattr(challenger, cfg.metric), None)
    champ = _evaluate_champion(cfg.model_name, before.version, data)
    tracking.log_evaluation("champion/test", champ, data.classes, step=0)
    value, champ_value = getattr(challenger, cfg.metric), getattr(champ, cfg.metric)
    tracking.log_metrics({"retrain/improvement": _gain(cfg, value, champ_value)})
    return Scores(challenger, value, champ_value)


def _version_tags(cfg: RetrainConfig, before, scores: Scores) -> dict[str, str]:
    """Tags of a new version: its scores, the champion it faced, and `pending` until decided."""
    champ = "none" if scores.champion is None else f"{scores.champion:.6f}"
    return {
        "test_accuracy": f"{scores.challenger_eval.accuracy:.6f}",
        "test_loss": f"{scores.challenger_eval.loss:.6f}",
        "retrain.metric": cfg.metric,
        "retrain.champion_version": _v(before),
        "retrain.champion_value": champ,
        registry.DECISION: registry.PENDING,
    }


def _apply(cfg: RetrainConfig, decision: Decision, version: str, before, fail_after) -> None:
    """Move the alias (promote only), then record the decision on the version and the run."""
    decided_at = _now()
    if decision.promote:
        registry.move_champion(cfg.model_name, version)
        _checkpoint("promote", fail_after)
    record = {"retrain.reason": decision.reason, "retrain.decided_at": decided_at}
    if decision.promote:
        record |= {"promoted_at": decided_at, "previous_champion": _v(before)}
    registry.record_decision(cfg.model_name, version, decision.word, record)
    after = version if decision.promote else _v(before)
    tracking.set_tags({"retrain.decision": decision.word, "retrain.reason": decision.reason,
                       "retrain.champion_after": after})  # fmt: skip


def _v(version: registry.Version | None) -> str:
    return "none" if version is None else version.version


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _gain(cfg: RetrainConfig, value: float, champ: float) -> float:
    return value - champ if cfg.direction == "maximize" else champ - value


class _Inference(torch.nn.Module):
    """A module that stays in inference mode: exported (pt2) graphs refuse `.eval()`, and
    `evaluate` calls it."""

    def __init__(self, module) -> None:
        super().__init__()
        with contextlib.suppress(NotImplementedError):  # pt2: already in inference mode
            module.eval()
        self.module = module

    def train(self, mode: bool = True) -> _Inference:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _evaluate(module, data) -> Evaluation:
    """Cross-entropy loss and accuracy on the test split: the same yardstick for both models,
    whatever loss each was trained with."""
    test = data.splits["test"]
    loss_fn = build_loss("cross_entropy")
    x = to_model_input(test.images)
    return evaluate(_Inference(module), x, test.labels, loss_fn, data.num_classes)


def _evaluate_champion(name: str, version: str, data) -> Evaluation:
    try:
        return _evaluate(registry.load_model(name, version), data)
    except Exception as exc:
        reason = first_line(exc)
        raise PipelineError(
            f"could not evaluate champion {name} v{version} on the current test split "
            f"({reason}); the champion is unchanged"
        ) from None


def champion_train_config(version: registry.Version) -> TrainConfig:
    """The train parameters the champion's own train run used.

    MLflow keeps params as text: each is read back as the YAML scalar it spells
    (`128`, `True`, `0.001`; `none` is an unset lr or momentum, and scheduler `none`).
    """
    params = tracking.get_run(version.tags.get("source_run_id") or version.run_id).data.params
    err = configfile.FileErrors(f"champion v{version.version} params")
    values = {k: v if k == "scheduler" else _scalar(v) for k, v in params.items()
              if k in configfile.TRAIN_KEYS}  # fmt: skip
    return TrainConfig(**configfile.train_values(err, values, "train"))


def _scalar(text: str) -> object:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return None if value == "none" else value


# --- after a crash, and the history -----------------------------------------------------


def settle_crashed(name: str) -> None:
    """Give every version whose decision a crash left unwritten or half-written its final one.

    The decision tag is written last, so `pending` marks a decision not (fully) written: it
    becomes `promote` if the alias already points at the version, else `abandoned`, with all
    its decision tags rewritten. A decision word without its reason or time (written first
    by earlier versions of this code) keeps its word and gets the missing tags.
    """
    current = registry.champion(name)
    for v in registry.versions(name):
        if not _half_written(v):
            continue
        champion = current is not None and current.version == v.version
        if champion or v.decision == registry.PROMOTE:
            word, tags = registry.PROMOTE, _settled_promote(v)
        elif v.decision == registry.KEEP:
            word, tags = registry.KEEP, _SETTLED_KEEP
        else:
            word, tags = registry.ABANDONED, _SETTLED_ABANDONED
        tags = tags | {"retrain.decided_at": _now()}
        if v.decision != registry.PENDING:  # complete what it wrote, keep what it wrote
            tags = {k: val for k, val in tags.items() if k not in v.tags}
        registry.record_decision(name, v.version, word, tags)
        print(f"retrain: {name} v{v.version} was left {v.decision} by a crash; now {word}")


def _half_written(v: registry.Version) -> bool:
    if v.decision == registry.PENDING:
        return True
    if v.decision not in (registry.PROMOTE, registry.KEEP):
        return False
    needed = ["retrain.reason", "retrain.decided_at"]
    if v.decision == registry.PROMOTE:
        needed += ["promoted_at", "previous_champion"]
    return any(k not in v.tags for k in needed)


_SETTLED_KEEP = {
    "retrain.reason": "champion kept; its retrain stopped while recording the decision",
}
_SETTLED_ABANDONED = {
    "retrain.reason": "its retrain crashed before a decision; it was never champion",
}


def _settled_promote(v: registry.Version) -> dict[str, str]:
    return {
        "promoted_at": _now(),
        "previous_champion": v.tags.get("retrain.champion_version", "none"),
        "retrain.reason": "promoted, but its retrain crashed before recording the decision",
    }


def _end_orphaned_retrains(name: str, experiment_id: str) -> None:
    """End KILLED the runs of earlier retrains of `name` left RUNNING by a process that is
    gone (SIGKILL, power cut), and their nested runs. The lock says no other retrain of
    `name` runs on this host; runs of another host's process are left as they are."""
    orphans = tracking.end_orphaned_runs(tracking.running_retrains(experiment_id, name))
    for run_id in orphans:
        tracking.end_orphaned_runs(tracking.running_children(experiment_id, run_id))
        print(f"retrain: run {run_id} was left RUNNING by a process that is gone; now KILLED")


def history(name: str) -> tuple[registry.Version | None, list[registry.Version]]:
    """(current champion, every version that went through a retrain decision, oldest first)."""
    tracking.open_store()
    registry.require_model(name)
    return registry.champion(name), [v for v in registry.versions(name) if v.decision]
