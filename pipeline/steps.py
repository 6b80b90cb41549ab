"""The pipeline's steps as Python functions: data_prep, train, and main chaining the two.

Each validates its input before a run exists, so bad input never leaves a run behind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.config import DATASETS, LOSSES, MODELS, PrepConfig, TrainConfig
from pipeline.console import ConsoleReporter, Fanout
from pipeline.data import (
    class_counts,
    file_digest,
    load_prepared,
    prepare,
    prepared_path,
    save_prepared,
    to_model_input,
)
from pipeline.device import device_name, resolve_device
from pipeline.errors import PipelineError
from pipeline.loop import TrainState, evaluate, train_epoch
from pipeline.losses import build_loss
from pipeline.models import build_model, count_parameters, training_forward
from pipeline.optimizers import build_optimizer, resolve_hparams


@dataclass(frozen=True)
class PrepResult:
    run_id: str
    path: Path
    digest: str
    reused: bool = False


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    test_loss: float
    test_accuracy: float
    model_uri: str  # "" while the model is kept for an unreachable server (pipeline.spool)
    model: torch.nn.Module  # the trained network, on the CPU


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
            f"dataset {cfg.dataset!r} is invalid; valid choices: {', '.join(DATASETS)}"
        )
    for name in ("val_fraction", "test_fraction"):
        if not 0 < getattr(cfg, name) < 1:
            raise PipelineError(
                f"{name} must be between 0 and 1 (exclusive), got {getattr(cfg, name)}"
            )


def validate_train(cfg: TrainConfig) -> tuple[float, float | None]:
    """Check every choice and range of `cfg`; returns the resolved (lr, momentum)."""
    if cfg.model not in MODELS:
        raise PipelineError(f"unknown model {cfg.model!r}; valid choices: {', '.join(MODELS)}")
    if cfg.loss not in LOSSES:
        raise PipelineError(f"unknown loss {cfg.loss!r}; valid choices: {', '.join(LOSSES)}")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise PipelineError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    build_loss(cfg.loss, cfg.label_smoothing)
    resolve_device(cfg.device)
    return resolve_hparams(cfg.optimizer, cfg.lr, cfg.momentum)


def resolve_data(ref: str) -> tuple[Path, str]:
    """(path, sha256) for `ref`: a prepared file, or the id of a data_prep run."""
    if not ref:
        raise PipelineError("no data given; pass --data FILE or --data DATA_PREP_RUN_ID")
    path = Path(ref)
    if path.is_file():
        return path.resolve(), file_digest(path)
    if path.suffix or "/" in ref:
        raise PipelineError(f"data file {ref!r} does not exist; run `pipeline prep` first")
    return tracking.prepared_file_of(ref)


def run_train(
    cfg: TrainConfig,
    *,
    nested: bool = False,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
):
    """Train, evaluate and log one model; returns its run id and test metrics.

    `parent_run_id` nests the run under a run of another process (a sweep's parallel trials).
    """
    t0 = time.perf_counter()
    lr, momentum = validate_train(cfg)
    device = resolve_device(cfg.device)
    store = tracking.open_store_in_background()
    path, digest = resolve_data(cfg.data)
    data = load_prepared(path)
    # Whole splits go to the device once; batches are then slices, never host copies.
    x = {s: to_model_input(split.images, device) for s, split in data.splits.items()}
    y = {s: split.labels.to(device) for s, split in data.splits.items()}
    t_data = time.perf_counter()
    writer = tracking.WriterProcess()  # its start-up overlaps the rest of ours

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes).to(device)
    optimizer = build_optimizer(
        cfg.optimizer, list(model.parameters()), lr, momentum, cfg.weight_decay, device
    )
    state = TrainState(model, optimizer, torch.Generator().manual_seed(cfg.seed))
    if cfg.compile:
        state.forward = torch.compile(model)
    else:
        state.forward = training_forward(model)  # same result, a fraction of the arithmetic
    loss_fn = build_loss(cfg.loss, cfg.label_smoothing)
    steps_per_epoch = -(-len(y["train"]) // cfg.batch_size)
    tracking.import_end_of_run()
    store.join()

    params = _requested(cfg) | {
        "data": str(path),
        "effective_lr": lr,
        "effective_momentum": momentum,
        "data_digest": digest,
        "dataset": data.dataset,
        "n_params": count_parameters(model),
        "train_size": len(y["train"]),
    }
    with tracking.start_run(
        "train",
        run_name or cfg.run_name,
        nested=nested,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        system_metrics=True,
        writer_process=writer,
    ) as run:
        tracking.log_params(params)
        tracking.set_tags(
            {
                "device": str(device),
                "device_name": device_name(device),
                # CPU results change with the thread count (float summation order).
                "torch_num_threads": str(torch.get_num_threads()),
            }
        )
        console = ConsoleReporter(cfg.epochs * steps_per_epoch, cfg.print_every)
        tracker = Fanout([run.tracker, console])
        t_loop = time.perf_counter()
        for _ in range(cfg.epochs):
            train_epoch(
                state,
                x["train"],
                y["train"],
                loss_fn,
                tracker,
                cfg.batch_size,
                cfg.log_every,
                cfg.amp,
            )
            val = evaluate(model, x["val"], y["val"], loss_fn, data.num_classes)
            tracker.log_metrics({"val/loss": val.loss, "val/accuracy": val.accuracy}, state.epoch)
        loop_seconds = time.perf_counter() - t_loop
        console.close()
        test = evaluate(model, x["test"], y["test"], loss_fn, data.num_classes)
        tracking.log_evaluation("test", test, data.classes, step=state.step)
        example = to_model_input(data.splits["test"].images[:2]).numpy()
        info = tracking.log_model(model.cpu(), example)
        tracking.log_metrics(
            {
                "time/startup_seconds": _process_age() - (time.perf_counter() - t0),
                "time/data_seconds": t_data - t0,
                "time/setup_seconds": t_loop - t0,
                "time/loop_seconds": loop_seconds,
                "time/model_log_seconds": time.perf_counter() - t_loop - loop_seconds,
                "time/samples_per_second": cfg.epochs * len(y["train"]) / loop_seconds,
            }
        )
    model_uri = info.model_uri  # "" while kept: see spool.KeptModel
    print(
        f"train: test/loss={test.loss:.4f} test/accuracy={test.accuracy:.4f} "
        f"run_id={run.run_id} model={model_uri or '(kept for pipeline sync)'}"
    )
    return TrainResult(run.run_id, test.loss, test.accuracy, model_uri, model)


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
    found = tracking.find_prep_run(experiment_id, prep.params())
    if found is not None and Path(found.data.params["data_path"]).is_file():
        prepared = PrepResult(
            found.info.run_id,
            Path(found.data.params["data_path"]),
            found.data.params["data_digest"],
            reused=True,
        )
        print(f"data_prep: reusing run {prepared.run_id} ({prepared.path})")
        return prepared
    return run_prep(prep, nested=True, experiment_id=experiment_id)


def run_main(prep: PrepConfig, train: TrainConfig) -> TrainResult:
    """data_prep then train as child runs of one parent; a matching data_prep run is reused."""
    validate_train(train)
    with tracking.start_run("main", f"main-{train.run_name}") as parent:
        tracking.log_params(prep.params() | _requested(train))
        prepared = prep_or_reuse(prep, parent.experiment_id)
        tracking.set_tags(
            {"data_prep_run_id": prepared.run_id, "data_prep_reused": str(prepared.reused)}
        )
        result = run_train(
            replace(train, data=prepared.run_id), nested=True, experiment_id=parent.experiment_id
        )
        tracking.set_tags({"train_run_id": result.run_id})
    return result
