"""The pipeline's steps as Python functions: data_prep, train, and main chaining the two.

Each validates its input before a run exists, so bad input never leaves a run behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline import checkpointing, distributed, signals, startup, tracking
from pipeline.checkpointing import CheckpointConfig
from pipeline.config import (
    CHOICES,
    DATASETS,
    MAX_PARAM_VALUE,
    RANGES,
    PrepConfig,
    TrainConfig,
    check_length,
    check_range,
)
from pipeline.console import ConsoleReporter, Fanout
from pipeline.data import (
    check_image_options,
    class_counts,
    file_digest,
    load_prepared,
    prepare,
    prepared_path,
    save_prepared,
    to_model_input,
)
from pipeline.device import device_name, resolve_device
from pipeline.early_stopping import EarlyStopping
from pipeline.errors import PATH_MAX, PipelineError, first_line, quote
from pipeline.loop import Diverged, Evaluation, TrainState, evaluate, train_epoch
from pipeline.losses import build_loss
from pipeline.models import build_model, count_parameters, training_forward
from pipeline.optimizers import build_optimizer, resolve_hparams
from pipeline.schedulers import build_scheduler, check_scheduler, check_warmup
from pipeline.tracking import resume as tracking_resume


@dataclass(frozen=True)
class PrepResult:
    run_id: str
    path: Path
    digest: str
    reused: bool = False


DIVERGED_TAG = "pipeline.diverged"  # "true" or "false" on every train run that ends FINISHED
DIVERGED_STEP_TAG = "pipeline.diverged_at_step"  # the global step whose loss was not finite


@dataclass(frozen=True)
class TrainResult:
    """A FINISHED train run; when it diverged, test metrics are NaN and there is no model."""

    run_id: str
    test_loss: float
    test_accuracy: float
    model_uri: str | None  # None: diverged, no model; "": kept for an unreachable server
    model: torch.nn.Module  # the trained network, on the CPU
    diverged_at: int | None = None  # global step of the first loss that was not finite


def run_prep(cfg: PrepConfig, *, nested: bool = False, experiment_id: str | None = None):
    """Prepare the data set into one file and record it as a data_prep run."""
    data = prepare(cfg)
    path = prepared_path(cfg).resolve()
    digest = save_prepared(data, path)
    sizes = {name: len(split.labels) for name, split in data.splits.items()}
    with tracking.start_run(
        "data_prep", f"data_prep-{cfg.dataset}", nested=nested, experiment_id=experiment_id
    ) as run:
        tracking.log_params(
            {**cfg.params(), "data_path": path, "data_digest": digest}
            | {f"{s}_size": n for s, n in sizes.items()}
        )
        tracking.log_prepared_data(path, digest, sizes, data.source, class_counts(data))
    print(f"data_prep: {path} sha256={digest[:12]} sizes={sizes} run_id={run.run_id}")
    return PrepResult(run.run_id, path, digest)


def validate_prep(cfg: PrepConfig) -> None:
    """Check the choice and ranges of `cfg`; each message starts with the field it names."""
    if cfg.dataset not in DATASETS:
        raise PipelineError(
            f"dataset {quote(cfg.dataset)} is invalid; valid choices: {', '.join(DATASETS)}"
        )
    check_image_options(cfg)
    if not isinstance(cfg.data_dir, str):
        raise PipelineError(f"data_dir must be a string, got {quote(cfg.data_dir)}")
    # data_prep logs the prepared file's absolute path as a param
    check_length("data_dir", str(prepared_path(cfg).absolute()), MAX_PARAM_VALUE)


def validate_train(cfg: TrainConfig) -> tuple[float, float | None]:
    """Check every choice and range of `cfg`; returns the resolved (lr, momentum).

    Ranges are config.RANGES's, so a value the CLI refuses is refused here too (the Python
    API, experiment files, retrain.yaml, a champion's params).
    """
    for name in ("model", "loss", "device", "scheduler", "monitor", "early_stopping_model"):
        if getattr(cfg, name) not in CHOICES[name]:
            raise PipelineError(f"unknown {name} {quote(getattr(cfg, name))}; valid choices: "
                                f"{', '.join(CHOICES[name])}")  # fmt: skip
    for name in RANGES:
        if hasattr(cfg, name):
            check_range(name, getattr(cfg, name))
    if not isinstance(cfg.data, str):
        raise PipelineError(f"data must be a string, got {quote(cfg.data)}")
    check_length("data", cfg.data, MAX_PARAM_VALUE)
    check_scheduler(cfg)
    build_loss(cfg.loss, cfg.label_smoothing)
    resolve_device(cfg.device)
    lr, momentum = resolve_hparams(cfg.optimizer, cfg.lr, cfg.momentum)
    if cfg.optimizer == "nesterov" and momentum == 0:
        raise PipelineError(
            "optimizer 'nesterov' needs momentum > 0, got 0.0; use optimizer 'sgd' for none"
        )
    return lr, momentum


def resolve_data(ref: str) -> tuple[Path, str]:
    """(path, sha256) for `ref`: a prepared file, or the id of a data_prep run.

    Only the reference is resolved here; `load_prepared(path, digest)` then checks that the
    content it loads is the content with this digest.
    """
    if not ref:
        raise PipelineError("no data given; pass --data FILE or --data DATA_PREP_RUN_ID")
    path, shown = Path(ref), quote(ref, PATH_MAX)
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError as exc:  # e.g. a name over the file system's 255 bytes
        raise PipelineError(f"data {shown} is not a usable path ({first_line(exc)})") from None
    if is_file:
        return path.resolve(), file_digest(path)
    if exists:
        raise PipelineError(f"data {shown} is not a file; pass a file written by `pipeline prep` "
                            "or a data_prep run id")  # fmt: skip
    if path.suffix or "/" in ref:
        raise PipelineError(f"data file {shown} does not exist; run `pipeline prep` first")
    return tracking.prepared_file_of(ref)


def run_train(
    cfg: TrainConfig,
    *,
    nested: bool = False,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    checkpoints: CheckpointConfig | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
):
    """Train, evaluate and log one model; returns its run id and test metrics.

    `parent_run_id` nests the run under a run of another process (a sweep's parallel trials).
    `checkpoints`: when to write checkpoints and which run to resume (`CheckpointConfig`).
    `on_epoch_end(epoch, {"val/loss": ..., "val/accuracy": ...})` is called after each
    epoch's validation (a search's pruner); whatever it raises ends the run FAILED.
    Started by torchrun, this process is one rank of a data-parallel training
    (pipeline.distributed): one run, written by rank 0 alone, which alone decides what to
    resume and writes checkpoints; every rank trains on from the same state.
    """
    t0 = time.perf_counter()
    lr, momentum = validate_train(cfg)
    ck = checkpoints or CheckpointConfig()
    checkpointing.parse_every(ck.every)
    group = distributed.setup(cfg.device, cfg.batch_size)
    device = group.device
    tracking = distributed.tracking_for(group)  # on ranks other than 0: one that writes nothing
    store = tracking.open_store_in_background()
    try:
        path, digest = group.from_main(lambda: resolve_data(cfg.data))
        data = load_prepared(group.local_copy(path, digest), digest)
        steps_per_epoch = -(-len(data.splits["train"].labels) // cfg.batch_size)
        check_warmup(cfg, steps_per_epoch)
    except PipelineError:
        store.join()  # a store cut off half-way through its migrations is unusable
        raise
    # Whole splits go to the device once; batches are then slices, never host copies.
    x = {s: to_model_input(split.images, device) for s, split in data.splits.items()}
    y = {s: split.labels.to(device) for s, split in data.splits.items()}
    t_data = time.perf_counter()
    writer = tracking.writer_process()  # a new one's start-up overlaps the rest of ours

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.channels, data.image_size).to(device)
    optimizer = build_optimizer(
        cfg.optimizer, list(model.parameters()), lr, momentum, cfg.weight_decay, device
    )
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(cfg.seed), scheduler)
    if cfg.early_stopping_patience:
        state.early_stopping = EarlyStopping(cfg.early_stopping_patience, cfg.monitor)
    if cfg.compile:
        state.forward = torch.compile(model)
    else:
        state.forward = training_forward(model)  # same result, a fraction of the arithmetic
    state.forward = group.wrap(model, state.forward)
    loss_fn = build_loss(cfg.loss, cfg.label_smoothing)
    tracking.import_end_of_run()
    store.join()

    params = _requested(cfg) | {
        # As given (what `mlflow run -P data=...` logs too) and as resolved.
        "data": cfg.data,
        "data_path": str(path),
        "effective_lr": lr,
        "effective_momentum": momentum,
        "data_digest": digest,
        "dataset": data.dataset,
        "n_params": count_parameters(model),
        "train_size": len(y["train"]),
        **group.params(),  # world_size, nnodes, backend of a DDP run
    }
    meta = {"params": requested_params(cfg), "data_digest": digest,
            "code_version": _code_version()}  # fmt: skip
    found: dict = {}

    def target() -> str | None:  # rank 0 alone: it reads the tracking store
        found["run"] = checkpointing.resume_target(
            ck, meta["params"] | {"data_digest": digest}, "train", experiment_id,
            ck.scope or parent_run_id,
        )  # fmt: skip
        return None if found["run"] is None else found["run"].info.run_id

    resumed_id = group.from_main(target)
    resumed = found.get("run")  # the mlflow Run, on rank 0
    start_step = 0
    with (
        tracking.start_run(
            "train",
            run_name or cfg.run_name,
            nested=nested,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            run_id=resumed_id,
            system_metrics=True,
            writer_process=writer,
        ) as run,
        distributed.checkpoint_session(group, run, state, ck, meta, resumed, writer) as session,
    ):
        run.run_id = distributed.share_run_id(group, run.run_id)
        if resumed_id is not None:
            group.share_state(state)  # rank 0's checkpoint, loaded by every rank
        # A resume on another machine reads the data from another path: the run keeps its own
        # (its identity, params and data digest, was checked before it was reopened).
        tracking.log_params({k: v for k, v in params.items() if not session.resumed
                             or k not in ("data", "data_path")})  # fmt: skip
        tracking.set_tags(
            {
                "device": str(device),
                "device_name": device_name(device),
                # CPU results change with the thread count (float summation order).
                "torch_num_threads": str(torch.get_num_threads()),
            }
        )
        console = ConsoleReporter(cfg.epochs * steps_per_epoch, cfg.print_every)
        console = console if group.is_main else distributed.Quiet()  # one progress bar: rank 0's
        tracker = group.tracker(Fanout([session.tracker, console]), len(y["train"]),
                                cfg.batch_size, session.last)  # fmt: skip
        start_step, es = state.step, state.early_stopping
        startup.settle()  # a rank other than 0 opens no run of its own
        t_loop = time.perf_counter()
        diverged = None
        try:
            while not session.trained(cfg.epochs):
                if state.batch < steps_per_epoch:  # else only its validation is left
                    train_epoch(state, x["train"], y["train"], loss_fn, tracker, cfg.batch_size,
                                cfg.log_every, cfg.amp, session.checkpointer,
                                group.shard())  # fmt: skip
                checkpointing.kill_point("val", state.epoch, session.checkpointer.settle)
                val = group.evaluate(evaluate, model, x["val"], y["val"], loss_fn, data.num_classes)
                # At the epoch's last global step, on train/*'s x axis; `epoch` lets the UI
                # plot any metric against epochs instead.
                tracker.log_metrics(
                    {"val/loss": val.loss, "val/accuracy": val.accuracy, "epoch": state.epoch},
                    state.step,
                )
                if not math.isfinite(val.loss):  # logged train steps can miss it (log_every)
                    raise Diverged(state.step, val.loss, "val/loss")
                with signals.held():  # the epoch closes whole: early stopping and counters
                    if es is not None:
                        es.update(state.epoch, getattr(val, cfg.monitor[4:]), model)
                    state.batch = 0
                session.checkpointer.epoch_end(state)
                checkpointing.kill_point("epoch", state.epoch, session.checkpointer.settle)
                if on_epoch_end is not None:
                    on_epoch_end(state.epoch, {"val/loss": val.loss, "val/accuracy": val.accuracy})
        except Diverged as exc:  # an outcome, not a failure: the run ends FINISHED
            diverged = exc
        loop_seconds = time.perf_counter() - t_loop
        group.finish(tracker)  # the other hosts' last system metrics, before the model's log
        console.close()
        info = None
        model_step = state.step
        if diverged is None:
            if es is not None:
                model_step = _early_stopping_end(
                    es, state, model, cfg, steps_per_epoch, session.logged("best_epoch"), tracking
                )
            test = group.evaluate(evaluate, model, x["test"], y["test"], loss_fn,
                                  data.num_classes)  # fmt: skip
            example = to_model_input(data.splits["test"].images[:2]).numpy()
            # Every point written first: log_model attaches to the model the run's metrics
            # at its step (the last step's train/*, val/*, epoch), whichever got there.
            run.flush()
            model_params = {k: "none" if v is None else v for k, v in params.items()}
            checkpointing.kill_point(  # tests: `model+until`, while the model is PENDING
                "model", until=lambda: tracking.pending_models(run.run_id, run.experiment_id)
            )
            info = resumed_model(run, model_step) if session.resumed else None
            if not info:
                info = tracking.log_model(model.cpu(), example, classes=data.classes,
                                          step=model_step, params=model_params)  # fmt: skip
            if not session.logged("test/loss"):  # a resumed run that had logged it has it
                # The model first: its test metrics and test split are then the model's too.
                test_split = tracking.split_dataset(path, digest, data.source, "test")
                tracking.log_evaluation("test", test, data.classes, state.step, info.model_id,
                                        test_split)  # fmt: skip
            tracking.set_tags({DIVERGED_TAG: "false"})
        else:
            test = _diverged(diverged, tracking)
            model.cpu()
        samples = _samples_trained(state.epoch, state.step, steps_per_epoch, len(y["train"]),
                                   cfg.batch_size)  # fmt: skip
        if not session.logged("time/loop_seconds"):
            tracking.log_metrics(
                {
                    "time/startup_seconds": _process_age() - (time.perf_counter() - t0),
                    "time/data_seconds": t_data - t0,
                    "time/setup_seconds": t_loop - t0,
                    "time/loop_seconds": loop_seconds,
                    "time/model_log_seconds": time.perf_counter() - t_loop - loop_seconds,
                    # This process's share: a resumed run trained only part of them here.
                    "time/samples_per_second": (samples - _samples_before(
                        start_step, steps_per_epoch, len(y["train"]), cfg.batch_size))
                    / loop_seconds,
                }
            )  # fmt: skip
    model_uri = info.model_uri if info is not None else None  # "" while kept: spool.KeptModel
    if diverged is None:
        print(
            f"train: test/loss={test.loss:.4f} test/accuracy={test.accuracy:.4f} "
            f"run_id={run.run_id} model={model_uri or '(kept for pipeline sync)'}"
        )
    else:
        print(
            f"train: diverged at step {diverged.step} ({diverged.key}={diverged.loss}) in epoch "
            f"{state.epoch} of {cfg.epochs}: stopped, no model logged; run_id={run.run_id}"
        )
    at = diverged.step if diverged is not None else None
    return TrainResult(run.run_id, test.loss, test.accuracy, model_uri, model, at)


def _code_version() -> str:
    """The code version checkpoints record; computed without the tracking store, on every
    rank (`tracking` in run_train is a stand-in on ranks other than 0)."""
    return tracking.code_version()


def _diverged(exc: Diverged, tracking=tracking) -> Evaluation:
    """Record a diverged run: tags, and NaN test metrics at the step it diverged.

    The test split is not evaluated: weights that produced a loss that is not finite are not
    a model, and the accuracy of their argmax would be a number that means nothing.
    """
    tracking.set_tags({DIVERGED_TAG: "true", DIVERGED_STEP_TAG: str(exc.step)})
    tracking.log_metrics({"test/loss": math.nan, "test/accuracy": math.nan}, step=exc.step)
    return Evaluation(math.nan, math.nan, [])


def _early_stopping_end(
    es: EarlyStopping,
    state: TrainState,
    model,
    cfg: TrainConfig,
    steps_per_epoch: int,
    logged: bool,
    tracking=tracking,
) -> int:
    """Log `best_epoch` and `stopped_epoch` (the last epoch trained, whether or not it stopped
    early; unless a resumed run has them) and load the best epoch's weights unless the last
    are asked for; returns the global step of the weights the model is logged with."""
    if not logged:
        tracking.log_metrics(
            {"best_epoch": es.best_epoch, "stopped_epoch": es.stopped_epoch or state.epoch},
            step=state.step,
        )
    tracking.set_tags({"pipeline.early_stopped": str(bool(es.stopped_epoch)).lower()})
    if cfg.early_stopping_model == "last" or es.best_weights is None:
        return state.step
    model.load_state_dict(es.best_weights)
    return es.best_epoch * steps_per_epoch


def resumed_model(run, step: int):
    """The model a resumed run logged (READY) before it was killed, if it got that far, so
    it is not logged twice; None otherwise."""
    from pipeline.tracking import resume as tracking_resume

    found = tracking_resume.ready_model(run.run_id, run.experiment_id, step)
    if found is None:
        return None
    return _LoggedModel(*found)


@dataclass(frozen=True)
class _LoggedModel:
    model_id: str
    model_uri: str


def _samples_before(step: int, steps_per_epoch: int, size: int, batch: int) -> int:
    """Training samples of the first `step` global steps (those of an earlier process)."""
    if step == 0:
        return 0
    epoch = -(-step // steps_per_epoch)
    return _samples_trained(epoch, step, steps_per_epoch, size, batch)


def _samples_trained(epoch: int, step: int, steps_per_epoch: int, size: int, batch: int) -> int:
    """Training samples the loop went through: every epoch, the last one maybe in part."""
    in_last = step - (epoch - 1) * steps_per_epoch
    return (epoch - 1) * size + min(in_last * batch, size)


def _process_age() -> float:
    """Seconds since this process started: interpreter and imports before the step ran."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _requested(cfg: TrainConfig) -> dict[str, object]:
    """Train params as the user gave them ("auto" where a per-optimizer default applies)."""
    params = {k: v for k, v in asdict(cfg).items() if k != "data"}
    for key in ("lr", "momentum"):
        params[key] = "auto" if params[key] is None else params[key]
    return params


def requested_params(cfg: TrainConfig) -> dict[str, str]:
    """Train params as a train run logs them (strings), to find a run with the same ones."""
    return {k: "none" if v is None else str(v) for k, v in _requested(cfg).items()}


def prep_or_reuse(prep: PrepConfig, experiment_id: str) -> PrepResult:
    """A FINISHED data_prep run with these params whose file is still there, else a new one
    as a child of the active run."""
    prepared = reusable_prep(prep, experiment_id)
    if prepared is not None:
        print(f"data_prep: reusing run {prepared.run_id} ({prepared.path})")
        return prepared
    return run_prep(prep, nested=True, experiment_id=experiment_id)


def reusable_prep(prep: PrepConfig, experiment_id: str) -> PrepResult | None:
    """The newest FINISHED data_prep run of this code version with these params (compared
    as `tracking.canonical` values: `mlflow run` stores some quoted) whose prepared file is
    still there, or None."""
    found = tracking.find_prep_run(experiment_id, prep.params())
    if found is None or not Path(found.data.params["data_path"]).is_file():
        return None
    params = found.data.params
    return PrepResult(
        found.info.run_id, Path(params["data_path"]), params["data_digest"], reused=True
    )


def run_main(
    prep: PrepConfig,
    train: TrainConfig,
    checkpoints: CheckpointConfig | None = None,
    launch=None,
) -> TrainResult | None:
    """data_prep then train as child runs of one parent; a matching data_prep run is reused.

    `checkpoints.resume` names a main run (or `auto`): it is reopened, and its unfinished
    train child resumed from its checkpoint. With `launch` (pipeline.launch.Launch) asking
    for more than one process, train runs on that many ranks, its one run still a child of
    the parent; returns None then.
    """
    validate_prep(prep)
    validate_train(train)
    if distributed.launched():  # every rank would prepare data and open a parent run
        raise PipelineError(
            "`pipeline main` is not a torchrun worker; run `pipeline main --nproc-per-node N` "
            "(or torchrun ... -m pipeline train --data RUN_ID)"
        )
    if launch is not None and launch.needed:
        from pipeline.distributed import check_batch_size

        launch.check()
        check_batch_size(train.batch_size, launch.world_size)
    ck = checkpoints or CheckpointConfig()
    checkpointing.parse_every(ck.every)
    wanted = prep.params() | requested_params(train)
    resumed = checkpointing.resume_target(ck, wanted, "main")
    with (
        tracking.start_run(
            "main", f"main-{train.run_name}",
            run_id=None if resumed is None else resumed.info.run_id,
        ) as parent,
        tracking_resume.Heartbeat(parent.run_id),  # its train child beats for itself
    ):  # fmt: skip
        tracking.log_params(prep.params() | _requested(train))
        prepared = prep_or_reuse(prep, parent.experiment_id)
        tracking.set_tags(
            {"data_prep_run_id": prepared.run_id, "data_prep_reused": str(prepared.reused)}
        )
        train = replace(train, data=prepared.run_id)
        child = replace(ck, resume="auto" if resumed else None, scope=parent.run_id)
        if launch is not None and launch.needed:
            from pipeline.launch import launch_train

            result = None
            # The ranks' `auto` looks among the children of --parent-run-id: the scope.
            run_id = launch_train(
                train, launch, parent_run_id=parent.run_id,
                experiment_id=parent.experiment_id, checkpoints=child,
            )  # fmt: skip
        else:
            result = run_train(
                train, nested=True, experiment_id=parent.experiment_id, checkpoints=child
            )
            run_id = result.run_id
        if run_id is not None:  # None: rank 0 runs on another host
            tracking.set_tags({"train_run_id": run_id})
    return result
