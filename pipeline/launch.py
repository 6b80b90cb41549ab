"""`pipeline train --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]`:
start the ranks of a data-parallel training through PyTorch's elastic launcher.

This process does what `torchrun` does, through the same API
(`torch.distributed.launcher.api.elastic_launch`, https://pytorch.org/docs/stable/elastic/run.html):
a c10d rendezvous with the other hosts' launchers (127.0.0.1 on a free port for one host),
then N processes of `python -m pipeline train ...` with RANK, WORLD_SIZE, LOCAL_RANK, ...
set; pipeline.distributed takes it from there. It is not a rank and writes nothing to
MLflow itself, with one exception: a run left RUNNING by a rank 0 that died without
ending it (SIGKILL) is ended KILLED, as a resumed sweep would.

No restarts (`max_restarts=0`): a rank that fails or is killed stops every other rank
(SIGTERM, then SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT s, 30 by default), and this
command fails with one line naming that rank. A stop signal to this process reaches every
rank of this host; rank 0 ends the run KILLED and this process exits 128 + the signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import signals, tracking
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, quote

RDZV_ID = "pipeline"  # the same on every host, as torchrun's --rdzv-id must be


@dataclass(frozen=True)
class Launch:
    """How many ranks, on how many hosts; N = 1 on one host: no launcher, one process."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # with c10d only says which launcher hosts the rendezvous
    rdzv_endpoint: str | None = None

    @property
    def needed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1 or self.rdzv_endpoint is not None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        """PipelineError for options that cannot form a group, before anything starts."""
        from pipeline.distributed import launched

        if launched():
            raise PipelineError(
                "--nproc-per-node/--nnodes/--rdzv-endpoint given to a rank that torchrun "
                "started; give them to torchrun or to `pipeline train`, not both"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise PipelineError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the same on every "
                "host (HOST: the one that runs --node-rank 0)"
            )
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise PipelineError(
                f"--node-rank {self.node_rank} is invalid for --nnodes {self.nnodes}; valid "
                f"choices: 0 to {self.nnodes - 1}"
            )
        if self.rdzv_endpoint is not None:
            _parse_endpoint(self.rdzv_endpoint)


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host and port.isdigit() and 1 <= int(port) <= 65535:
        return host, int(port)
    raise PipelineError(
        f"--rdzv-endpoint {quote(text)} is invalid; give HOST:PORT, e.g. 10.0.0.1:29400"
    )


def train_args(cfg: TrainConfig) -> list[str]:
    """`pipeline train` options that give back `cfg` exactly (floats by repr)."""
    args = []
    for key, value in asdict(cfg).items():
        option = "--" + key.replace("_", "-")
        if value is None:
            value = "auto"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, float):
            value = repr(value)
        args += [option, str(value)]
    return args


def checkpoint_args(ck) -> list[str]:
    """`pipeline train` options that give back the CheckpointConfig `ck` (None: defaults)."""
    if ck is None:
        return []
    from pipeline.checkpointing import parse_every

    parse_every(ck.every)  # a bad value is one line here, not one per rank
    args = ["--checkpoint-every", ck.every, "--keep-checkpoints", "true" if ck.keep else "false"]
    args += ["--resume", ck.resume or "none"]
    if ck.directory:
        args += ["--checkpoint-dir", ck.directory]
    return args


def launch_train(
    cfg: TrainConfig,
    launch: Launch,
    *,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    checkpoints=None,
) -> str | None:
    """Train `cfg` on `launch.world_size` ranks; returns rank 0's run id (None on the hosts
    that do not run rank 0).

    Checks the options and the training parameters first (one-line errors, nothing
    started). `checkpoints` (checkpointing.CheckpointConfig) reaches every rank as the
    same options; rank 0 decides what `--resume` resumes. Raises PipelineError when a
    rank fails, and `signals.Terminated` when this process gets a stop signal (the ranks
    then end the run KILLED).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pipeline.distributed import RUN_ID_FILE_ENV, check_batch_size
    from pipeline.steps import resolve_data, validate_train

    launch.check()
    validate_train(cfg)
    check_batch_size(cfg.batch_size, launch.world_size)
    if parent_run_id is None:
        resolve_data(cfg.data)  # a bad --data is one line here, not one per rank
    args = ["-m", "pipeline", "train", *train_args(cfg), *checkpoint_args(checkpoints)]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id, "--experiment-id", experiment_id]
    with tempfile.TemporaryDirectory(prefix="pipeline-ddp-") as folder:
        run_id_file = Path(folder, "run_id")
        config = LaunchConfig(
            min_nodes=launch.nnodes,
            max_nodes=launch.nnodes,
            nproc_per_node=launch.nproc_per_node,
            run_id=RDZV_ID,
            rdzv_backend="c10d",
            rdzv_endpoint=launch.rdzv_endpoint or "127.0.0.1:0",
            rdzv_configs={} if launch.node_rank is None else {"is_host": launch.node_rank == 0},
            max_restarts=0,
            # torchrun's default folder is a /tmp/torchelastic_* left behind; ours is removed.
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(folder, "logs"))),
        )
        handlers = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
        try:
            with _env(RUN_ID_FILE_ENV, str(run_id_file)):
                elastic_launch(config, sys.executable)(*args)
        except SignalException as exc:
            # The launcher stopped the ranks with the same signal; deliver it to our own
            # handler now, which records it and raises Terminated (runs above end KILLED).
            _restore(handlers)
            tracking.keep_killed_under_mlflow_run(_read(run_id_file))
            signal.raise_signal(exc.sigval)
            raise signals.Terminated(exc.sigval) from None  # a handler that did not raise
        except ChildFailedError as exc:
            _restore(handlers)
            tracking.end_if_orphaned(_read(run_id_file))
            raise PipelineError(_describe_failure(exc)) from None
        finally:
            _restore(handlers)
        return _read(run_id_file)


@contextlib.contextmanager
def _env(name: str, value: str):
    """os.environ[name] = value while the ranks start (they inherit this environment)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _restore(handlers: dict) -> None:
    """Our stop-signal handlers back: the elastic agent installs its own and leaves them."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _describe_failure(exc) -> str:
    """'rank 1 (local rank 1, pid 123) was killed by SIGKILL; ...': the first rank to fail.

    torchelastic times failures in whole seconds (`ProcessFailure.timestamp`) and its
    `get_first_failure` breaks ties by the lowest rank. A rank killed by a signal, a peer
    that exited because it went away and a peer stopped with SIGTERM fail within the same
    second: among the failures of the first second, one killed by a signal other than
    SIGTERM is named first, then one that exited with a status, then the lowest rank.
    """

    def cause_first(item) -> tuple[int, int, int]:
        rank, failure = item
        code = failure.exitcode
        cause = 0 if code < 0 and -code != signal.SIGTERM else 1 if code > 0 else 2
        return failure.timestamp, cause, rank

    rank, failure = min(exc.failures.items(), key=cause_first)
    if failure.exitcode < 0:
        how = f"was killed by {signals.name(-failure.exitcode)}"
    else:
        how = f"exited with status {failure.exitcode}"
    return (
        f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how}; the other "
        "ranks were stopped"
    )
