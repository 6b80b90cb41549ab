"""The `pipeline` command: prep, train, main and retrain, as the MLproject entry points call
them, champion, which shows a registered model's champion and its history, sync, which
writes what runs kept while their tracking server was unreachable, and cleanup, which ends
KILLED the runs whose process is gone."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import fields

import click

from pipeline.config import (
    CHOICES,
    DATASETS,
    DEVICES,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    RANGES,
    SCHEDULERS,
    PrepConfig,
    TrainConfig,
)
from pipeline.errors import PipelineError, quote

PREP, TRAIN = PrepConfig(), TrainConfig()
CKPT_EVERY = "epoch,60s"  # checkpointing.DEFAULT_EVERY, without importing torch for --help
PREP_KEYS = tuple(f.name for f in fields(PrepConfig))
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint")


class Number(click.ParamType):
    """A finite float in the range config.RANGES gives `field`; with `auto`, also 'auto' (None).

    click.FloatRange lets nan through (every comparison with nan is false) and takes inf.
    """

    name = "float"

    def __init__(self, field: str, auto: bool = False) -> None:
        self.range, self.auto = RANGES[field], auto
        if auto:
            self.name = "auto|float"

    def convert(self, value, param, ctx):
        if self.auto and (
            value is None or (isinstance(value, str) and value.lower() in ("auto", "none", ""))
        ):
            return None
        either = "'auto' or " if self.auto else ""
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{quote(value)} is not {either}a number", param, ctx)
        if number not in self.range:
            finite = "finite " if not math.isfinite(number) else ""
            self.fail(f"{quote(value)} must be {either}a {finite}number {self.range}", param, ctx)
        return number


def _typed(field: str, auto: bool = False) -> click.ParamType:
    """The option type of a numeric field, from its range in config.RANGES."""
    rng = RANGES[field]
    if rng.integer:
        return click.IntRange(rng.low, rng.high, min_open=rng.low_open, max_open=rng.high_open)
    return Number(field, auto)


def _options(options: list[Callable]) -> Callable:
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


prep_options = _options(
    [
        click.option("--dataset", type=click.Choice(DATASETS), default=PREP.dataset,
                     show_default=True),
        click.option("--data-dir", default=PREP.data_dir, show_default=True,
                     help="Raw data: a root holding <Name>/raw/, a folder of IDX files, or "
                     "(folder) one subfolder of images per class."),
        click.option("--val-fraction", type=_typed("val_fraction"),
                     default=PREP.val_fraction, show_default=True),
        click.option("--test-fraction", type=_typed("test_fraction"),
                     default=PREP.test_fraction, show_default=True,
                     help="mnist-sample and folder; IDX sets use their official test split."),
        click.option("--split-seed", type=_typed("split_seed"), default=PREP.split_seed,
                     show_default=True),
        click.option("--image-size", type=_typed("image_size"), default=PREP.image_size,
                     show_default=True,
                     help="folder only: images are resized to SIZE x SIZE pixels."),
        click.option("--channels", type=click.Choice(CHOICES["channels"]),
                     default=PREP.channels, show_default=True,
                     help="folder only: 1 = grayscale, 3 = RGB."),
    ]
)  # fmt: skip

train_options = _options(
    [
        click.option("--model", type=click.Choice(MODELS), default=TRAIN.model, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=TRAIN.optimizer,
                     show_default=True),
        click.option("--lr", type=_typed("lr", auto=True), default="auto", show_default=True,
                     help="Learning rate; auto = the optimizer's default."),
        click.option("--momentum", type=_typed("momentum", auto=True), default="auto",
                     show_default=True, help="sgd, momentum, nesterov, rmsprop only."),
        click.option("--weight-decay", type=_typed("weight_decay"), default=TRAIN.weight_decay,
                     show_default=True),
        click.option("--loss", type=click.Choice(LOSSES), default=TRAIN.loss, show_default=True),
        click.option("--label-smoothing", type=_typed("label_smoothing"),
                     default=TRAIN.label_smoothing, show_default=True,
                     help="cross_entropy only."),
        click.option("--scheduler", type=click.Choice(SCHEDULERS), default=TRAIN.scheduler,
                     show_default=True, help="Learning-rate schedule, stepped every step."),
        click.option("--warmup-steps", type=_typed("warmup_steps"), default=TRAIN.warmup_steps,
                     show_default=True, help="Linear warm-up steps before the schedule."),
        click.option("--step-size", type=_typed("step_size"), default=TRAIN.step_size,
                     show_default=True, help="step: epochs between decays."),
        click.option("--gamma", type=_typed("gamma"), default=TRAIN.gamma, show_default=True,
                     help="step: lr factor of each decay."),
        click.option("--eta-min-fraction", type=_typed("eta_min_fraction"),
                     default=TRAIN.eta_min_fraction, show_default=True,
                     help="cosine: last step's lr, as a fraction of lr."),
        click.option("--pct-start", type=_typed("pct_start"), default=TRAIN.pct_start,
                     show_default=True, help="onecycle: share of steps rising to lr."),
        click.option("--epochs", type=_typed("epochs"), default=TRAIN.epochs,
                     show_default=True),
        click.option("--batch-size", type=_typed("batch_size"), default=TRAIN.batch_size,
                     show_default=True),
        click.option("--seed", type=_typed("seed"), default=TRAIN.seed, show_default=True),
        click.option("--device", type=click.Choice(DEVICES), default=TRAIN.device,
                     show_default=True, help="auto = cuda, then mps, then cpu."),
        click.option("--log-every", type=_typed("log_every"), default=TRAIN.log_every,
                     show_default=True, help="Steps between logged train/* points."),
        click.option("--print-every", type=_typed("print_every"), default=TRAIN.print_every,
                     show_default=True, help="Print the notebook's loss/acc line every N steps."),
        # `--amp` alone or `--amp true|false`, so MLproject can pass the value through.
        click.option("--amp", type=click.BOOL, is_flag=False, flag_value=True,
                     default=TRAIN.amp, show_default=True, help="bfloat16 autocast (CUDA)."),
        click.option("--compile", "compile_", type=click.BOOL, is_flag=False, flag_value=True,
                     default=TRAIN.compile, show_default=True,
                     help="torch.compile the model (CUDA)."),
        click.option("--early-stopping-patience", type=_typed("early_stopping_patience"),
                     default=TRAIN.early_stopping_patience, show_default=True,
                     help="Stop after N epochs without improvement of --monitor; 0 = off."),
        click.option("--monitor", type=click.Choice(CHOICES["monitor"]), default=TRAIN.monitor,
                     show_default=True, help="Early stopping's metric; a loss is minimised."),
        click.option("--early-stopping-model", type=click.Choice(CHOICES["early_stopping_model"]),
                     default=TRAIN.early_stopping_model, show_default=True,
                     help="With early stopping: log the best epoch's model or the last."),
    ]
)  # fmt: skip

checkpoint_options = _options(
    [
        click.option("--resume", default=None, metavar="RUN_ID|auto",
                     help="Resume this unfinished run from its checkpoint, or (auto) the newest "
                     "one with the same parameters, data and code; none: a new run."),
        click.option("--checkpoint-every", default=CKPT_EVERY, show_default=True,
                     help="When to checkpoint: comma-separated 'epoch', N steps, Ns seconds; "
                     "or 'none'."),
        click.option("--keep-checkpoints", type=click.BOOL, is_flag=False, flag_value=True,
                     default=False, show_default=True,
                     help="Keep a finished run's final checkpoint (local and artifact)."),
        click.option("--checkpoint-dir", default=None,
                     help="Local checkpoint folder [default: $PIPELINE_CHECKPOINT_DIR or "
                     "~/.cache/pipeline/checkpoints]."),
    ]
)  # fmt: skip


def _checkpoint_config(kwargs: dict):
    """The checkpoint options, taken out of `kwargs`; `--resume none` (or empty) is no resume."""
    from pipeline.checkpointing import CheckpointConfig

    resume = kwargs.pop("resume")
    resume = None if resume is None or resume.lower() in ("", "none") else resume
    return CheckpointConfig(kwargs.pop("checkpoint_every"), kwargs.pop("keep_checkpoints"),
                            resume, kwargs.pop("checkpoint_dir"))  # fmt: skip


launch_options = _options(
    [
        click.option("--nproc-per-node", type=click.IntRange(min=1), default=1,
                     show_default=True,
                     help="Ranks on this host: > 1 trains data-parallel (DDP), each rank "
                     "batch_size / ranks of every batch, through torch's elastic launcher."),
        click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Hosts; run this command on each, with the same --rdzv-endpoint."),
        click.option("--node-rank", type=click.IntRange(min=0), default=None,
                     help="This host's number; node 0 hosts the rendezvous."),
        click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                     help="c10d rendezvous of the hosts. [default: 127.0.0.1, a free port]"),
    ]
)  # fmt: skip


def _launch(nproc_per_node: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None):
    from pipeline.launch import Launch

    return Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)


def _writer_ahead(launcher: bool = False) -> contextlib.AbstractContextManager:
    """For a command that trains in this process: its metric writer process, started before
    torch and MLflow are imported here. It imports MLflow and creates the store on the other
    core meanwhile (`tracking.writer.keep_writers`); killed unused if the command fails
    first. Not in a launcher (its ranks train) nor on ranks other than 0 (they log nothing)."""
    if launcher or _other_rank():
        return contextlib.nullcontext()
    from pipeline.tracking.writer import keep_writers

    return keep_writers(ahead=True)


def _train_config(data: str, compile_: bool, **kwargs) -> TrainConfig:
    return TrainConfig(data=data, compile=compile_, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Train PyTorch image classifiers and track them with MLflow."""
    if ctx.invoked_subcommand != "sync" and "--help" not in sys.argv and "-h" not in sys.argv:
        if _other_rank():  # rank 0 alone talks to the tracking store
            return
        from pipeline import store
        from pipeline.tracking.spool import check_settings, sync_quietly

        check_settings()
        # Writes that earlier commands kept for an unreachable server (see `sync`).
        sync_quietly(store.uri())


@cli.command(short_help="Split a data set into train/val/test and log it.")
@prep_options
def prep(**kwargs) -> None:
    """data_prep: split a data set into train/val/test and log the prepared file."""
    from pipeline.steps import run_prep

    run_prep(PrepConfig(**kwargs))


@cli.command(short_help="Fit one model on prepared data, log it to MLflow.")
@click.option("--data", required=True, help="A prepared .pt file or a data_prep run id.")
@train_options
@checkpoint_options
@launch_options
# What `main --nproc-per-node` passes its ranks: nest the train run under main's parent.
@click.option("--parent-run-id", default=None, hidden=True)
@click.option("--experiment-id", default=None, hidden=True)
def train(data: str, compile_: bool, parent_run_id, experiment_id, **kwargs) -> None:
    """train: fit one model on prepared data and log everything to MLflow."""
    launch = _launch(*(kwargs.pop(k) for k in LAUNCH_KEYS))
    checkpoints = _checkpoint_config(kwargs)
    cfg = _train_config(data, compile_, **kwargs)
    with _writer_ahead(launch.needed):
        from pipeline.steps import run_train

        if launch.needed:
            from pipeline.launch import launch_train

            launch_train(cfg, launch, checkpoints=checkpoints)
            return
        run_train(cfg, experiment_id=experiment_id, parent_run_id=parent_run_id,
                  checkpoints=checkpoints)  # fmt: skip


@cli.command(short_help="data_prep then train, as children of one run.")
@prep_options
@train_options
@checkpoint_options
@launch_options
def main(compile_, **kwargs) -> None:
    """main: data_prep then train, as child runs of one parent run."""
    launch = _launch(*(kwargs.pop(k) for k in LAUNCH_KEYS))
    checkpoints = _checkpoint_config(kwargs)
    prep_cfg = PrepConfig(**{k: kwargs.pop(k) for k in PREP_KEYS})
    with _writer_ahead(launch.needed):
        from pipeline.steps import run_main

        run_main(prep_cfg, _train_config("", compile_, **kwargs), checkpoints, launch)


@cli.command(short_help="Train a challenger; promote it only if better.")
@click.option(
    "--config",
    "config_path",
    default="experiments/retrain.yaml",
    show_default=True,
    help="Retrain YAML: model name, metric, min_delta, prep and train parameters.",
)
@click.option(
    "--params-from",
    type=click.Choice(["config", "champion"]),
    default="config",
    show_default=True,
    help="Train the challenger with the config's parameters or "
    "with those of the current champion's train run.",
)
@click.option("--model-name", default="", help="Registered model name; overrides the config.")
@click.option(
    "--lock-dir",
    default=None,
    help="Where per-model lock files live "
    "[default: $PIPELINE_LOCK_DIR or ~/.cache/pipeline/locks].",
)
def retrain(config_path: str, params_from: str, model_name: str, lock_dir: str | None) -> None:
    """retrain: fresh data, a challenger, and `champion` moved to it only if it is better.

    Exits 0 whether it promoted or kept the champion, 75 if another retrain of the same
    model holds the lock on this host, and 1 on any failure (the champion is then unchanged).
    """
    from dataclasses import replace

    from pipeline.retrain import load_config
    from pipeline.retrain import retrain as run_retrain

    cfg = load_config(config_path)
    if model_name:
        cfg = replace(cfg, model_name=model_name)
    run_retrain(cfg, params_from=params_from, lock_dir=lock_dir)


@cli.command(short_help="A model's champion and every retrain decision.")
@click.argument("name")
def champion(name: str) -> None:
    """champion: the current champion of NAME and every retrain decision, oldest first."""
    from pipeline.retrain import history

    current, decided = history(name)
    if current is None:
        click.echo(f"{name}: no champion")
    else:
        t = current.tags
        click.echo(
            f"{name}: champion v{current.version} since {t.get('promoted_at', '?')} "
            f"test_accuracy={t.get('test_accuracy', '?')} test_loss={t.get('test_loss', '?')} "
            f"data={t.get('data_digest', '?')[:12]} run={t.get('source_run_id', current.run_id)}"
        )
    header = ["version", "decision", "decided_at", "accuracy", "loss", "data",
              "champion_before", "reason"]  # fmt: skip
    rows = [
        [
            f"v{v.version}",
            v.decision or "?",
            v.tags.get("retrain.decided_at", "-"),
            v.tags.get("test_accuracy", "-"),
            v.tags.get("test_loss", "-"),
            v.tags.get("data_digest", "-")[:12],
            v.tags.get("retrain.champion_version", "-"),
            v.tags.get("retrain.reason", "-"),
        ]
        for v in decided
    ]
    for line in aligned([header, *rows]):
        click.echo(line)


def aligned(rows: list[list[str]]) -> list[str]:
    """Rows as lines of left-aligned columns two spaces apart; the last column unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


@cli.command(short_help="Every trial of an experiment file, as child runs.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Trials run at once, each in its own process.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Long-lived worker processes, each running trial after trial.",
)
@click.option("--storage", default=None, help="Optuna storage URL of a search's studies "
              "[default: the file's, else optuna.db beside the tracking store].")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="List the trials without running them.")
def sweep(file: str, parallel: int, workers: int, storage: str | None, dry_run: bool) -> None:
    """sweep: every trial of an experiment file (experiments/*.yaml) as child runs."""
    from pipeline.sweep import run_sweep

    run_sweep(file, parallel, dry_run, workers, storage)


@cli.command(short_help="Join a running search from this host.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--storage", default=None, help="Optuna storage URL of the search's studies.")
def worker(file: str, storage: str | None) -> None:
    """worker: run trials of the RUNNING search of FILE (same file, same tracking server)
    until none is left waiting; its runs nest under the search's parent run."""
    from pipeline.search.run import run_worker

    run_worker(file, storage)


@cli.command(hidden=True)
@click.argument("sweep_pid", type=int)
def serve(sweep_pid: int) -> None:
    """A `--workers` process: tasks as JSON lines on stdin (pipeline/workers.py)."""
    from pipeline.workers import serve as run_serve

    run_serve(sweep_pid)


@cli.command(short_help="Rank the train runs of an experiment or a sweep.")
@click.argument("target")
@click.option(
    "--metric", default=None, help="Rank by this metric. [default: the sweep's, else test/accuracy]"
)
@click.option(
    "--direction",
    type=click.Choice(["max", "min"]),
    default=None,
    help="[default: min for losses and times, else max]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write the tables and plots to this folder.",
)
def compare(target: str, metric: str | None, direction: str | None, out: str | None) -> None:
    """compare: rank the train runs of an EXPERIMENT or a sweep's PARENT_RUN_ID."""
    from pathlib import Path

    from pipeline.compare import compare as run_compare

    run_compare(target, metric, direction, Path(out) if out else None)


@cli.command(hidden=True)
@click.argument("spec")
def trial(spec: str) -> None:
    """One sweep trial from a JSON spec; what `sweep --parallel` starts in each process."""
    with _writer_ahead():
        from pipeline.sweep import run_trial_spec

        run_trial_spec(spec)


@cli.command(short_help="Write what runs kept while the server was unreachable.")
def sync() -> None:
    """sync: write what runs kept while the tracking server was unreachable.

    Runs keep, in ~/.cache/pipeline/spool (or $PIPELINE_SPOOL_DIR), every write the tracking
    server of MLFLOW_TRACKING_URI did not take; this writes them, in order, with each run's
    final status, and removes them. Exits 1 if the server is still unreachable.
    """
    from pipeline import store, tracking
    from pipeline.tracking import spool

    uri = tracking.tracking_uri()
    lines, left = spool.sync(uri)
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo(f"sync: nothing kept for {store.redact(uri)}")
    elif left:
        click.echo(f"sync: {left} run(s) still being written by their process; run sync later")


@cli.command(short_help="End KILLED the runs whose process is gone.")
@click.option("--experiment", "experiments", multiple=True,
              help="Only this experiment (repeatable). [default: every experiment]")  # fmt: skip
def cleanup(experiments: tuple[str, ...]) -> None:
    """cleanup: end KILLED every RUNNING run whose process is gone (SIGKILL, a power cut).

    A run's process is gone when, on this host, no process has its pid and start time
    (tag pipeline.process); on another host, when its heartbeat (tag pipeline.heartbeat) is
    over 150 s old. A run of another host without a heartbeat is left alone. Ended runs
    keep their checkpoints: `train --resume RUN_ID` goes on from there.
    """
    from pipeline.tracking import resume as tracking_resume

    for run_id, why in tracking_resume.end_dead_runs(tracking_resume.experiment_ids(experiments)):
        click.echo(f"cleanup: run {run_id} ended KILLED ({why})")


def entry() -> None:
    """Run the CLI; every error is one line on stderr and a non-zero exit status.

    Nothing printed shows the credentials of a tracking URI (`store.redact`), tracebacks of
    unexpected errors included. Under `mlflow run`, a command that stops before starting its
    run marks the run MLflow created for it (`tracking.mark_not_started`).
    A stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT) ends the open runs KILLED and exits with
    128 + its number, as a shell reports a process that signal killed: 130, 143, 129, 131.
    Output to a closed pipe (`pipeline train ... | head`) is dropped; the command goes on.
    """
    from pipeline import signals, startup, store

    startup.postpone_full_collections()  # until the command's imports are done: see startup
    sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
    if "@" in store.uri():  # a URI with credentials: whatever this process prints, hide them
        sys.stdout, sys.stderr = (
            store.RedactingStream(sys.stdout),
            store.RedactingStream(sys.stderr),
        )
    with signals.stop_signals_raise():
        code = _main()
    _exit_now(code)


def _other_rank() -> bool:
    """Whether torchrun started this process as a rank other than 0 (pipeline.distributed)."""
    return "LOCAL_RANK" in os.environ and os.environ.get("RANK", "0") != "0"


def _main() -> int:
    from pipeline import signals, store

    if _other_rank():
        # Only rank 0 adopts the run `mlflow run` made; the others never touch it, not even
        # to mark it when they fail (`_fail`).
        os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        store.resolve_under_mlflow_run()
        _die_with_mlflow_run()
        code = cli.main(standalone_mode=False)
    except click.UsageError as exc:
        return _fail(exc.format_message(), 2)
    except (click.Abort, KeyboardInterrupt):
        # click turns KeyboardInterrupt (and so our stop signals' exception) into Abort.
        return _interrupted()
    except (click.ClickException, PipelineError) as exc:
        if signals.received() is not None:  # the error is the signal's doing
            return _interrupted()
        if getattr(exc, "quiet", False):  # another process has said it (rank 0)
            return 1
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        return _fail(message, getattr(exc, "exit_code", 1))
    except Exception as exc:
        if signals.received() is not None:  # e.g. a library wrapped our exception in its own
            return _interrupted()
        from pipeline.tracking.spool import explain

        if "LOCAL_RANK" in os.environ:  # a rank of a DDP training: a peer that went away
            from pipeline.distributed import explain as explain_group

            if (message := explain_group(exc)) is not None:
                return _fail(message, 1)
        # A full disk or an unreachable tracking server: the path or the server, and why.
        if (message := explain(exc)) is not None:
            return _fail(message, 1)
        if not isinstance(exc, OSError) or exc.filename is None:  # a bug: show where
            return _traceback()
        # A folder that is a file, a path that cannot be created or read: the path and why.
        return _fail(f"{exc.filename}: {exc.strerror or exc}", 1)
    if signals.received() is not None:  # its exception was swallowed, but it still counts
        return _interrupted()
    return code if isinstance(code, int) else 0


def _interrupted() -> int:
    import signal

    from pipeline import signals

    signum = signals.received() or signal.SIGINT  # None: Python's own Ctrl-C handler raised
    click.echo(f"Interrupted by {signals.name(signum)}", err=True)
    return signals.exit_code(signum)


def _die_with_mlflow_run() -> None:
    """Under `mlflow run`, end with it: killing `mlflow run` (SIGTERM, SIGKILL) kills only
    that process, and its command would otherwise train on, unseen, to FINISHED."""
    import os

    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    from pipeline import signals
    from pipeline.tracking import mlflow_run_pid

    if (pid := mlflow_run_pid()) is not None:
        signals.die_with_parent(pid)


class _PipeSafe:
    """A text stream that drops what it cannot write to a closed pipe.

    Python ignores SIGPIPE, so writing to a pipe whose reader has gone (`| head`) raises
    BrokenPipeError wherever a line is printed; that must not fail a training. The first
    such error points the descriptor at /dev/null, so every later write succeeds unseen.
    """

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _fail(message: str, code: int) -> int:
    """Print `Error: message` (credentials hidden); returns `code`, the exit status."""
    import os

    from pipeline.lock import EX_TEMPFAIL
    from pipeline.store import redact

    message = redact(message)
    if os.environ.get("MLFLOW_RUN_ID"):  # still set: our run never started
        from pipeline import tracking

        tracking.mark_not_started(message, "busy" if code == EX_TEMPFAIL else "invalid")
    click.echo(f"Error: {message}", err=True)
    return code


def _traceback() -> int:
    """An unexpected error: its traceback, with credentials hidden; returns exit status 1."""
    import traceback

    from pipeline.store import redact

    sys.stderr.write(redact(traceback.format_exc()))
    return 1


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of every loaded module.

    With torch, torch.export and MLflow loaded that teardown takes 1.5-2 s and does nothing a
    finished command needs. What matters still runs, in the interpreter's own order:
    non-daemon threads are joined, then atexit handlers (logging, MLflow) run.
    """
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # joins threads, as Py_Finalize does
    if shutdown is None:  # not CPython as we know it: exit the ordinary way
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
