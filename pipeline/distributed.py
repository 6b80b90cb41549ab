"""Data-parallel training: this process as one rank of a group that `torchrun` (or
`pipeline train --nproc-per-node N`, see launch.py) started.

A process is a rank when the elastic launcher set its environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT; see
https://pytorch.org/docs/stable/elastic/run.html#environment-variables). Otherwise `setup`
returns a group of one and every function here is the identity: one process trains exactly
as before.

What makes a DDP run the same training as one process with the same parameters:

- every rank draws the same permutation per epoch (same seed) and takes its contiguous part
  of each global batch (`BatchSplit`): `batch_size` stays the global batch;
- DistributedDataParallel averages gradients over ranks (the all-reduce sum divided by the
  world size: https://pytorch.org/docs/stable/notes/ddp.html); each rank's loss is weighted
  by `local_n * world_size / global_n`, so that average is the gradient of the global
  batch's mean, also for a last batch that does not split evenly:
  (1/W) sum_r (n_r W / n) mean_r = (1/n) sum_i loss_i;
- logged `train/loss` and `train/accuracy` are the global batch's mean, reduced once per
  report of the loop (`StepReducer`), and each split is evaluated once, in parts
  (`Group.evaluate`).

Only rank 0 talks to MLflow; every other rank gets `NoTracking`, which writes nothing and
never opens the store. Checkpoints follow the same rule: rank 0 decides what to resume,
loads the checkpoint and sends that state to every rank (`Group.share_state`); rank 0 alone
writes, at points every rank decides alike (`checkpoint_session`). The system metrics of
hosts other than rank 0's are sampled there and logged by rank 0 (`pipeline.hostmetrics`).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from pipeline import signals
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.loop import Diverged, Evaluation, StepLog, Tracker

if TYPE_CHECKING:
    from pipeline.hostmetrics import HostMetrics

THREADS_ENV = "PIPELINE_THREADS_PER_RANK"  # overrides cpus / ranks on this host
RUN_ID_FILE_ENV = "PIPELINE_RUN_ID_FILE"  # launch.py: where rank 0 writes the run id
NODE_ID_ENV = "MLFLOW_SYSTEM_METRICS_NODE_ID"  # MLflow's: system/<node id>/... metric keys


def launched() -> bool:
    """Whether an elastic launcher (torchrun) started this process as a rank."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank from the launcher's environment; 0 when not launched."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass
class Group:
    """This process's place in the training: rank 0 of 1 unless a launcher started it.

    `device` is the one this rank trains on: for CUDA, GPU `local_rank` of its host.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    backend: str | None = None  # None: one process, no process group
    split: BatchSplit | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes to MLflow (and would write checkpoints)."""
        return self.rank == 0

    @property
    def nnodes(self) -> int:
        return self.world_size // self.local_world_size

    def params(self) -> dict[str, object]:
        """What a DDP run logs about its group; nothing for one process."""
        if not self.active:
            return {}
        return {"world_size": self.world_size, "nnodes": self.nnodes, "backend": self.backend}

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, compute: Callable[[], object]):
        """`compute()` run on rank 0 only, its result (or its PipelineError) on every rank.

        For what only rank 0 may do, such as resolving a data_prep run id in the tracking
        store. The other ranks raise `MainRankFailed` with rank 0's message.
        """
        if not self.active:
            return compute()
        outcome: tuple[str, object] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", compute())
            except PipelineError as exc:
                outcome = ("error", str(exc))
                self.broadcast(outcome)
                raise
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise MainRankFailed(str(value))
        return value

    def local_copy(self, path: Path, digest: str) -> Path:
        """The prepared file rank 0 resolved (`path`, sha256 `digest`) on this rank's host.

        `path` itself where it holds that content; elsewhere (another host, without shared
        storage) rank 0 sends the file's bytes to every rank, and a rank that lacks it keeps
        them in the data cache, by digest, as a data_prep run's download would be
        ($PIPELINE_DATA_CACHE, else ~/.cache/pipeline/data/<digest>/). A collective: every
        rank calls it.
        """
        if not self.active:
            return path
        from pipeline.data import file_digest

        have = path.is_file() and file_digest(path) == digest
        lacking = self._all_reduce(torch.tensor([0 if have else 1]), dist.ReduceOp.MAX).item()
        if not lacking:
            return path
        box = [path.read_bytes() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        if have:
            return path
        from pipeline.lock import cache_dir
        from pipeline.tracking.artifacts import DATA_CACHE_ENV

        cached = cache_dir(DATA_CACHE_ENV, "data") / digest[:16] / path.name
        if not (cached.is_file() and file_digest(cached) == digest):
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Whole or not at all, also with several ranks of this host writing it at once.
            part = cached.with_name(f".{cached.name}.{os.getpid()}")
            part.write_bytes(box[0])
            os.replace(part, cached)
        return cached

    def agree(self, value: bool) -> bool:
        """Rank 0's `value` on every rank: one decision where the ranks' own could differ
        (a checkpoint due after so many seconds of each rank's clock). A collective."""
        if not self.active:
            return value
        flag = torch.tensor([int(bool(value)) if self.is_main else 0])
        return bool(self._all_reduce(flag).item())

    def share_state(self, state) -> None:
        """Rank 0's training state (`loop.TrainState.state_dict`: weights, optimizer,
        scheduler, early stopping, position, RNGs), loaded by every other rank: the
        checkpoint rank 0 resumed from, sent as `torch.save` bytes over the process group
        (no shared filesystem needed) and read with `torch.load(weights_only=True)`. A
        collective: every rank calls it."""
        if not self.active:
            return
        import io

        from pipeline.checkpointing import _copy

        blob = None
        if self.is_main:
            buffer = io.BytesIO()
            torch.save(_copy(state.state_dict()), buffer)
            blob = buffer.getvalue()
        blob = self.broadcast(blob)
        if not self.is_main:
            state.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu",
                                             weights_only=True))  # fmt: skip

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap(
        self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The training forward as DistributedDataParallel runs it: gradients are averaged
        over ranks in backward. `forward` (a faster stand-in for `model`, or None) is kept:
        DDP wraps a module whose forward calls it, over the same parameters. One process:
        `forward` as given. The model itself stays unwrapped (evaluation, state dicts)."""
        if not self.active:
            return forward
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_Forward(model, forward), device_ids=ids)

    def shard(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, float]] | None:
        """The loop's `shard`: this rank's part of each global batch; None for one process."""
        return self.split if self.active else None

    def tracker(
        self, inner: Tracker, train_size: int, batch_size: int, logged: dict[str, int] | None = None
    ) -> Tracker:
        """`inner` for one process; else a `StepReducer` that forwards to it on rank 0, and
        that brings the other hosts' system metrics with it (`hostmetrics.HostMetrics`; a
        resumed run's `logged`: its last step of each key). A collective with several hosts."""
        if not self.active:
            return inner
        hosts = None
        if self.nnodes > 1:
            from pipeline.hostmetrics import HostMetrics

            hosts = HostMetrics(self, logged)
        return StepReducer(inner, self, train_size, batch_size, hosts)

    def finish(self, tracker: Tracker) -> None:
        """After the training loop, on every rank: the other hosts' last system metrics go
        to rank 0's run (`StepReducer.finish`, a collective). Nothing for one process."""
        if isinstance(tracker, StepReducer):
            tracker.finish()

    def evaluate(
        self,
        evaluate: Callable[..., Evaluation],
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn,
        num_classes: int,
    ) -> Evaluation:
        """`evaluate` (loop.evaluate) over the whole split, each rank evaluating one part:
        every sample once (DistributedSampler would pad with repeats). Every rank gets the
        split's mean loss, accuracy and confusion matrix; they equal one process's up to
        the order of float sums."""
        if not self.active:
            return evaluate(model, x, y, loss_fn, num_classes)
        lo, hi = _part(len(x), self.rank, self.world_size)
        sums = torch.zeros(1 + num_classes * num_classes, dtype=torch.float64)
        if hi > lo:
            part = evaluate(model, x[lo:hi], y[lo:hi], loss_fn, num_classes)
            sums[0] = part.loss * (hi - lo)
            sums[1:] = torch.tensor(part.confusion, dtype=torch.float64).flatten()
        sums = self._all_reduce(sums)
        matrix = sums[1:].round().long().view(num_classes, num_classes).tolist()
        loss = sums[0].item() / len(x)
        if not math.isfinite(loss):
            return Evaluation(loss, math.nan, matrix)
        correct = sum(matrix[i][i] for i in range(num_classes))
        return Evaluation(loss, correct / len(x), matrix)

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) of a host tensor over ranks, through the group's device (NCCL
        reduces only device tensors)."""
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=op or dist.ReduceOp.SUM)
        return on_device.cpu()


class MainRankFailed(PipelineError):
    """Rank 0 stopped on an error (its message); the other ranks stop with it, quietly."""

    quiet = True  # the CLI prints nothing for it: rank 0 printed the error


class _Forward(nn.Module):
    """`model`'s parameters behind `forward`: what DDP wraps when the training forward is a
    stand-in for the model's own (models.training_forward, torch.compile)."""

    def __init__(self, model: nn.Module, forward) -> None:
        super().__init__()
        self.model = model
        self._forward = forward or model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def _part(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of part `rank` when `n` items are cut into `world` contiguous parts whose
    sizes differ by at most one, the larger first (as torch.tensor_split cuts)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@dataclass(frozen=True)
class BatchSplit:
    """Each global batch (indices from the epoch's shared permutation) cut into `world`
    contiguous parts; rank `rank` trains on its part, weighted by its share of the batch.

    Returns (indices, weight): the loss's weight, `n_local * world / n_global`, makes DDP's
    average of per-rank gradients the gradient of the global batch's mean. A rank left
    with no sample (a last batch smaller than the world) takes the batch's first sample at
    weight 0: it must still run backward, since DDP's gradient all-reduce is collective.
    """

    rank: int
    world: int

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        n_global = len(idx)
        lo, hi = _part(n_global, self.rank, self.world)
        if hi == lo:
            return idx[:1], 0.0
        return idx[lo:hi], (hi - lo) * self.world / n_global

    def sizes(self, n_global: int) -> int:
        """How many samples of a global batch of `n_global` this rank trains on."""
        lo, hi = _part(n_global, self.rank, self.world)
        return hi - lo


class StepReducer:
    """The loop's tracker on every rank: turns each report's per-rank rows into rows of the
    global batch, and forwards them to `inner` on rank 0 only.

    The loop reports every `loop.SYNC_EVERY` logged steps, at the same steps on every rank,
    so this costs two small all-reduces per report, none per step. For each step, the loss
    is sum(local mean x local n) / global n and the accuracy sum(local correct) / global n:
    the global batch's own mean. The first step whose reduced loss is not finite ends the
    rows, and `Diverged` is raised on every rank alike (one rank's rows may stop earlier
    than another's: the loop cuts at its own first non-finite loss).

    A report made while an exception is on its way out of the loop (a stop signal, a crash)
    is not reduced and not logged: the other ranks are not at that point, and a collective
    would wait for them forever. Those steps (at most one report's) are lost, rather than
    logged as if one rank's numbers were the global ones.

    With several hosts, the first all-reduce also carries rank 0's "system metrics due"
    flag (`hostmetrics.HostMetrics.due`); when it is set, one gather brings the other
    hosts' system metrics to rank 0, which logs them through `inner` at their own steps
    and timestamps. No collective is added to a report that is not due.
    """

    def __init__(self, inner: Tracker, group: Group, train_size: int, batch_size: int,
                 hosts: HostMetrics | None = None) -> None:  # fmt: skip
        self.inner, self.group, self.hosts = inner, group, hosts
        self.train_size, self.batch_size = train_size, batch_size

    def _global_n(self, epoch_step: int) -> int:
        return min(self.batch_size, self.train_size - epoch_step * self.batch_size)

    def log_steps(self, rows: list[StepLog]) -> None:
        if sys.exc_info()[0] is not None:
            return
        group, split = self.group, self.group.split
        due = self.hosts is not None and self.hosts.due()  # rank 0's clock decides
        flags = group._all_reduce(torch.tensor([len(rows), int(due)]), dist.ReduceOp.MAX)
        longest, due = flags.tolist()
        sums = torch.zeros(longest, 3, dtype=torch.float64)  # loss x n, correct, ranks present
        for j, r in enumerate(rows):
            n = split.sizes(self._global_n(r.epoch_step))
            if n:  # a rank without samples (weight 0) adds nothing
                correct = round(r.accuracy * n) if math.isfinite(r.accuracy) else math.nan
                sums[j, 0], sums[j, 1] = r.loss * n, correct
            sums[j, 2] = 1
        sums = group._all_reduce(sums).tolist()
        reduced = []
        for j, (loss_sum, correct, present) in enumerate(sums):
            if present < group.world_size:  # a rank stopped before: at a non-finite loss
                break
            n = self._global_n(rows[j].epoch_step)
            loss = loss_sum / n
            accuracy = correct / n if math.isfinite(loss) else math.nan
            reduced.append(rows[j]._replace(loss=loss, accuracy=accuracy))
            if not math.isfinite(loss):
                break
        if group.is_main and reduced:
            self.inner.log_steps(reduced)
        if due:
            self._log_hosts(self.hosts.exchange())
        if reduced and not math.isfinite(reduced[-1].loss):
            raise Diverged(reduced[-1].step, reduced[-1].loss)

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None:
        """Metrics every rank has already reduced (validation): rank 0 forwards them."""
        if self.group.is_main:
            self.inner.log_metrics(metrics, step, timestamp)

    def finish(self) -> None:
        """The other hosts' system metrics not gathered yet, to rank 0; their samplers stop.
        A collective, for the end of training (never on the way out of an exception)."""
        if self.hosts is not None:
            self._log_hosts(self.hosts.exchange(last=True))

    def _log_hosts(self, samples: list[tuple[dict[str, float], int, float]]) -> None:
        for metrics, step, timestamp in samples:  # rank 0's only; [] on the others
            self.inner.log_metrics(metrics, step, timestamp)


def setup(requested_device: str, batch_size: int) -> Group:
    """This process's `Group`, with the process group initialised when launched as a rank.

    The backend is NCCL on CUDA (each rank on GPU `local_rank`, `torch.cuda.set_device`),
    gloo on CPU. Torch threads per rank: cpus of this host / ranks on it (at least 1), or
    $PIPELINE_THREADS_PER_RANK. Ranks other than 0 print nothing on stdout. Raises
    PipelineError when `batch_size` does not divide among the ranks, when there is no GPU
    for this local rank, or for MPS (no distributed backend).
    """
    device = resolve_device(requested_device)
    if not launched():
        return Group(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    check_batch_size(batch_size, world)
    if device.type == "mps":
        raise PipelineError("device 'mps' cannot train in several processes (PyTorch has no "
                            "distributed backend for it); use --device cpu")  # fmt: skip
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(
                f"local rank {local_rank} has no GPU: torch sees {torch.cuda.device_count()} "
                f"CUDA device(s) on this host; use --nproc-per-node <= "
                f"{torch.cuda.device_count()}"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.set_num_threads(threads_per_rank(local_world))
    # The death of the launcher (even by SIGKILL) stops this rank as SIGTERM would.
    signals.die_with_parent(os.getppid())
    backend = "nccl" if device.type == "cuda" else "gloo"
    node_rank = int(os.environ.get("GROUP_RANK", "0"))
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    atexit.register(_teardown)
    if rank == 0:
        from pipeline.hostmetrics import node_id

        os.environ[NODE_ID_ENV] = node_id(node_rank)
    else:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return Group(device, rank, world, local_rank, local_world, node_rank, backend,
                 BatchSplit(rank, world))  # fmt: skip


def check_batch_size(batch_size: int, world_size: int) -> None:
    """PipelineError unless the global `batch_size` splits evenly among `world_size` ranks."""
    if batch_size % world_size:
        raise PipelineError(
            f"batch_size {batch_size} does not divide among {world_size} ranks (world size "
            f"= nproc_per_node x nnodes); give a multiple of {world_size}"
        )


def threads_per_rank(local_world_size: int) -> int:
    """$PIPELINE_THREADS_PER_RANK, else this host's cpus / its ranks, at least 1."""
    if raw := os.environ.get(THREADS_ENV):
        try:
            if int(raw) >= 1:
                return int(raw)
        except ValueError:
            pass
        raise PipelineError(f"{THREADS_ENV}={raw!r} is invalid; give an integer >= 1")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // local_world_size)


def explain(exc: BaseException) -> str | None:
    """One line for an error of the process group (a rank that died mid-collective: gloo's
    'Connection reset by peer', NCCL's errors), else None."""
    text = str(exc)
    if isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text)
    ):
        reason = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        return f"rank {env_rank()} lost the other ranks of its training: {reason[:300]}"
    return None


def _teardown() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def note_run_id(run_id: str) -> None:
    """Tell the launcher which run rank 0 writes to (launch.py reads it): to tag a parent
    run with it, and to end it should rank 0 die without ending it (SIGKILL)."""
    if path := os.environ.get(RUN_ID_FILE_ENV):
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(run_id)


class Quiet:
    """A tracker that drops everything: the progress bar of ranks other than 0."""

    def log_steps(self, rows: list[StepLog]) -> None:
        pass

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp: float | None = None
    ) -> None:
        pass

    def close(self) -> None:
        pass


class NoTracking:
    """What the steps call on `pipeline.tracking`, for ranks other than 0: nothing is
    written and the tracking store is never opened. Rank 0 broadcasts the run's id, which
    `start_run` here receives."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def open_store_in_background(self):
        return SimpleNamespace(join=lambda: None)

    def writer_process(self):
        return None

    def import_end_of_run(self) -> None:
        pass

    @contextlib.contextmanager
    def start_run(self, step: str, run_name: str, **kwargs) -> Iterator[SimpleNamespace]:
        run_id = self.group.broadcast(None)
        yield SimpleNamespace(
            run_id=run_id, experiment_id=None, tracker=Quiet(), flush=lambda *a, **k: {}
        )
        signals.raise_if_received()

    def log_params(self, params) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_metrics(self, metrics, step=None, model_id=None, dataset=None) -> None:
        pass

    def log_model(self, model, example, **kwargs):
        return SimpleNamespace(model_uri=None, model_id=None)

    def split_dataset(self, *args):
        return None

    def log_evaluation(self, *args, **kwargs) -> None:
        pass


def checkpoint_session(group: Group, run, state, config, meta: dict, resumed, writer):
    """The run's checkpoints: `checkpointing.Session` on rank 0 (and for one process), which
    alone resumes, reads MLflow and writes; `checkpointing.Follower` on the other ranks.
    Seconds triggers follow rank 0's clock (`Group.agree`); a stopped DDP run writes no
    checkpoint on its way out (see `Session`)."""
    from pipeline import checkpointing

    agree = group.agree if group.active else None
    if group.is_main:
        return checkpointing.Session(run, state, config, meta, resumed, writer.proc.pid,
                                     agree=agree, signal_checkpoint=not group.active)  # fmt: skip
    return checkpointing.Follower(run, state, config, agree)


def tracking_for(group: Group):
    """`pipeline.tracking` on rank 0 (and for one process); `NoTracking` on the others."""
    if group.is_main:
        from pipeline import tracking

        return tracking
    return NoTracking(group)


def share_run_id(group: Group, run_id: str | None) -> str | None:
    """Rank 0's run id, on every rank: rank 0 sends it (and tells the launcher, see
    `note_run_id`); the other ranks received it in `NoTracking.start_run`."""
    if not (group.active and group.is_main):
        return run_id
    note_run_id(run_id)
    return group.broadcast(run_id)
