"""System metrics of every host of a data-parallel training, in its one MLflow run.

Rank 0's host is MLflow's own: its `SystemMetricsMonitor` (started by `tracking.start_run`)
logs `system/node<R>/...` under the node id `distributed.setup` gives it. Every other host
is sampled here, by its local rank 0, with the same monitor classes
(`mlflow.system_metrics.metrics`: CPU, disk, network, and the NVIDIA or AMD GPU monitor
when one starts, as `SystemMetricsMonitor` picks them), at the same interval and aggregated
as it aggregates them: same names, same units. The samples travel to rank 0 with the
loop's reports (`HostMetrics`), which logs them into the run as
`system/node<R>/<MLflow's name>`. Nothing here opens the tracking store: the ranks that
sample never do.

Mirrors mlflow/system_metrics/system_metrics_monitor.py (MLflow 3.17): one aggregate every
`interval x samples_before_logging` seconds, timestamped when it is made; a stop drops the
samples of an aggregate not yet complete.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.distributed import Group

PREFIX = "system/"  # MLflow's prefix of system metric keys
Sample = tuple[float, dict[str, float]]  # (time.time() when aggregated, {MLflow's name: value})


def node_id(node_rank: int) -> str:
    """A host's node id in metric keys: `node<R>`, R its node rank (torchrun's GROUP_RANK)."""
    return f"node{node_rank}"


def settings() -> tuple[float, int]:
    """(seconds between samples, samples per logged aggregate) as MLflow's monitor reads
    them: MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else the project's
    tracking.runs.SYSTEM_METRICS_INTERVAL_S; MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
    else 1. A value that is not a number counts as unset (MLflow's own monitor then does
    not start, and never stops the training either)."""
    from mlflow.environment_variables import (
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
    )

    from pipeline.tracking.runs import SYSTEM_METRICS_INTERVAL_S

    def read(variable, default):
        try:
            return variable.get() or default
        except ValueError:
            return default

    interval = read(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, SYSTEM_METRICS_INTERVAL_S)
    return float(interval), int(read(MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING, 1))


def monitors() -> list:
    """MLflow's monitors of this host, as `SystemMetricsMonitor.__init__` builds them."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):  # NVIDIA, else AMD; neither without its library
        try:
            found.append(gpu())
            break
        except Exception:  # noqa: BLE001, S112 - MLflow skips GPU metrics alike
            continue
    return found


class Sampler:
    """This host's system metrics, sampled on a daemon thread: every `interval` s a sample
    from each of MLflow's monitors, every `samples` samples one aggregate (`take`)."""

    def __init__(self, interval: float, samples: int = 1) -> None:
        self.interval, self.samples = interval, samples
        self._monitors = monitors()
        self._done: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for _ in range(self.samples):
                    for monitor in self._monitors:
                        monitor.collect_metrics()
                    if self._stop.wait(self.interval):
                        return  # as MLflow's monitor: an incomplete aggregate is dropped
                metrics: dict[str, float] = {}
                for monitor in self._monitors:
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
                with self._lock:
                    self._done.append((time.time(), metrics))
        except Exception as exc:  # noqa: BLE001 - a failed sample never stops the training
            print(f"Warning: system metrics of this host stopped: {exc}", file=sys.stderr)

    def take(self) -> list[Sample]:
        """The aggregates made since the last `take`, oldest first."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def stop(self) -> list[Sample]:
        """Stop sampling; the aggregates not taken yet."""
        self._stop.set()
        self._thread.join()
        return self.take()


class HostMetrics:
    """The other hosts' system metrics on their way into rank 0's run.

    Local rank 0 of every host but rank 0's runs a `Sampler`. Rank 0 says when they are due
    (`due`: an aggregate's period elapsed on its clock since the last exchange), and
    `exchange`, a collective every rank calls when rank 0 said so, gathers what the samplers
    made to rank 0 (gather_object; on NCCL through each rank's current CUDA device, which
    `distributed.setup` sets). Rank 0 numbers each node's aggregates 0, 1, 2, ... as
    MLflow's monitor numbers its own (`_logging_step`); a resumed run goes on after the
    last step it has of that node (`logged`: the run's last step of each key).

    Construction is a collective too: every rank samples at rank 0's settings, the run's.
    """

    def __init__(self, group: Group, logged: dict[str, int] | None = None) -> None:
        interval, samples = group.broadcast(settings() if group.is_main else None)
        self.group, self.period = group, interval * samples
        self.sampler = None
        if group.local_rank == 0 and not group.is_main:  # every host but rank 0's, once
            self.sampler = Sampler(interval, samples)
        self._logged = logged or {}
        self._next: dict[int, int] = {}  # rank 0: node rank -> its next step
        self._exchanged = time.monotonic()

    def due(self) -> bool:
        """On rank 0: whether an aggregate's period has passed since the last exchange."""
        return self.group.is_main and time.monotonic() - self._exchanged >= self.period

    def exchange(self, last: bool = False) -> list[tuple[dict[str, float], int, float]]:
        """Gather the samplers' aggregates; on rank 0, each as (metrics by full key, step,
        timestamp s), keys `system/node<R>/<name>`; [] on the other ranks. `last`: stop the
        samplers first (the end of training). A collective."""
        import torch.distributed as dist

        sampler = self.sampler
        mine = None
        if sampler is not None:
            mine = (self.group.node_rank, sampler.stop() if last else sampler.take())
        box = [None] * self.group.world_size if self.group.is_main else None
        dist.gather_object(mine, box, dst=0)
        self._exchanged = time.monotonic()
        if not self.group.is_main:
            return []
        out = []
        for node, samples in (item for item in box if item is not None):
            prefix = f"{PREFIX}{node_id(node)}/"
            step = self._next.get(node)
            if step is None:
                step = 1 + max((s for k, s in self._logged.items() if k.startswith(prefix)),
                               default=-1)  # fmt: skip
            for timestamp, metrics in samples:
                out.append(({prefix + k: v for k, v in metrics.items()}, step, timestamp))
                step += 1
            self._next[node] = step
        return out
