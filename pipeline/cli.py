"""The `pipeline` command: prep, train and main, as the MLproject entry points call them."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from pipeline.config import DATASETS, DEVICES, LOSSES, MODELS, OPTIMIZERS, PrepConfig, TrainConfig
from pipeline.errors import PipelineError

PREP, TRAIN = PrepConfig(), TrainConfig()


class AutoFloat(click.ParamType):
    """A float with a lower bound, or 'auto' (None): the per-optimizer default."""

    name = "auto|float"

    def __init__(self, minimum: float, open_min: bool) -> None:
        self.minimum, self.open_min = minimum, open_min

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.lower() in ("auto", "none", "")):
            return None
        try:
            number = float(value)
        except ValueError:
            self.fail(f"{value!r} is not 'auto' or a number", param, ctx)
        if number < self.minimum or (self.open_min and number == self.minimum):
            op = ">" if self.open_min else ">="
            self.fail(f"{value!r} must be 'auto' or a number {op} {self.minimum}", param, ctx)
        return number


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
                     help="Where raw data sets live and prepared files are written."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=PREP.val_fraction, show_default=True),
        click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=PREP.test_fraction, show_default=True,
                     help="mnist-sample only; torchvision sets use their official test split."),
        click.option("--split-seed", type=int, default=PREP.split_seed, show_default=True),
    ]
)  # fmt: skip

train_options = _options(
    [
        click.option("--model", type=click.Choice(MODELS), default=TRAIN.model, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=TRAIN.optimizer,
                     show_default=True),
        click.option("--lr", type=AutoFloat(0, open_min=True), default="auto", show_default=True,
                     help="Learning rate; auto = the optimizer's default."),
        click.option("--momentum", type=AutoFloat(0, open_min=False), default="auto",
                     show_default=True, help="sgd, momentum, nesterov, rmsprop only."),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=TRAIN.weight_decay,
                     show_default=True),
        click.option("--loss", type=click.Choice(LOSSES), default=TRAIN.loss, show_default=True),
        click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True),
                     default=TRAIN.label_smoothing, show_default=True,
                     help="cross_entropy only."),
        click.option("--epochs", type=click.IntRange(min=1), default=TRAIN.epochs,
                     show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=TRAIN.batch_size,
                     show_default=True),
        click.option("--seed", type=int, default=TRAIN.seed, show_default=True),
        click.option("--device", type=click.Choice(DEVICES), default=TRAIN.device,
                     show_default=True, help="auto = cuda, then mps, then cpu."),
        click.option("--log-every", type=click.IntRange(min=1), default=TRAIN.log_every,
                     show_default=True, help="Steps between logged train/* points."),
        click.option("--print-every", type=click.IntRange(min=0), default=TRAIN.print_every,
                     show_default=True, help="Print the notebook's loss/acc line every N steps."),
        click.option("--amp/--no-amp", default=TRAIN.amp, show_default=True,
                     help="bfloat16 autocast (CUDA)."),
        click.option("--compile/--no-compile", "compile_", default=TRAIN.compile,
                     show_default=True, help="torch.compile the model (CUDA)."),
    ]
)  # fmt: skip


def _train_config(data: str, compile_: bool, **kwargs) -> TrainConfig:
    return TrainConfig(data=data, compile=compile_, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train PyTorch image classifiers and track them with MLflow."""


@cli.command()
@prep_options
def prep(**kwargs) -> None:
    """data_prep: split a data set into train/val/test and log the prepared file."""
    from pipeline.steps import run_prep

    run_prep(PrepConfig(**kwargs))


@cli.command()
@click.option("--data", required=True, help="A prepared .pt file or a data_prep run id.")
@train_options
def train(data: str, compile_: bool, **kwargs) -> None:
    """train: fit one model on prepared data and log everything to MLflow."""
    from pipeline.steps import run_train

    run_train(_train_config(data, compile_, **kwargs))


@cli.command()
@prep_options
@train_options
def main(dataset, data_dir, val_fraction, test_fraction, split_seed, compile_, **kwargs) -> None:
    """main: data_prep then train, as child runs of one parent run."""
    from pipeline.steps import run_main

    prep_cfg = PrepConfig(dataset, data_dir, val_fraction, test_fraction, split_seed)
    run_main(prep_cfg, _train_config("", compile_, **kwargs))


def entry() -> None:
    """Run the CLI; every error is one line on stderr and a non-zero exit status."""
    try:
        code = cli.main(standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (click.ClickException, PipelineError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"Error: {message}", err=True)
        sys.exit(1)
    except (click.Abort, KeyboardInterrupt) as exc:
        # click turns KeyboardInterrupt (and so our SIGTERM exception) into Abort.
        from pipeline.tracking import Terminated

        terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
        click.echo(f"Interrupted by {'SIGTERM' if terminated else 'SIGINT'}", err=True)
        sys.exit(143 if terminated else 130)
    _exit_now(code if isinstance(code, int) else 0)


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
