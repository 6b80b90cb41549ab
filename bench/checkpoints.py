"""What checkpointing costs the training thread: per step, and per checkpoint.

Per model, one epoch through `pipeline.loop.train_epoch` (the forward `pipeline train` uses,
a tracker that only keeps the rows) three ways, alternating: without a step hook, with a
`Checkpointer` that never writes (the per-step check alone, plus the signal-safe update
window every step has anyway), and writing a checkpoint every `EVERY` steps (written on a
thread, as in `pipeline train`, to a local folder; no upload). Then, per checkpoint: the
stall (the state copy on the training thread), the write on the thread (torch.save, fsync,
rename) and the file's size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline import signals
from pipeline.checkpointing import CheckpointConfig, Checkpointer, write_atomic
from pipeline.loop import TrainState, train_epoch
from pipeline.losses import build_loss
from pipeline.models import build_model, training_forward
from pipeline.optimizers import build_optimizer
from pipeline.tracking.resume import PointLog

EVERY = 20  # steps between checkpoints in the third way: far more often than the default


class _Rows:
    def log_steps(self, rows) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        pass


def _state(name: str, x: torch.Tensor) -> TrainState:
    torch.manual_seed(0)
    model = build_model(name, 10, x.shape[1], tuple(x.shape[2:]))
    optimizer = build_optimizer("adam", list(model.parameters()), 1e-3, None, 0.0, x.device)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(0))
    state.forward = training_forward(model)
    return state


def _epoch(name: str, x, y, hook: str | None, folder: Path) -> tuple[float, Checkpointer | None]:
    state = _state(name, x)
    ck = None
    if hook is not None:
        config = CheckpointConfig(every=hook, directory=str(folder))
        ck = Checkpointer("bench", config, {}, PointLog())
    t0 = time.perf_counter()
    train_epoch(state, x, y, build_loss("cross_entropy"), _Rows(), 128, 1, False, ck)
    if ck is not None:
        ck.join()
    return len(x) / (time.perf_counter() - t0), ck


def _per_step(name: str, x, folder: Path, n: int = 200_000) -> float:
    """Seconds per step of what checkpointing adds to every step: the hook's `due` check
    and the signal-safe window around the update (`signals.deferred`)."""
    state = _state(name, x)
    ck = Checkpointer("bench", CheckpointConfig(every="epoch,60s", directory=str(folder)),
                      {}, PointLog())  # fmt: skip
    t0 = time.perf_counter()
    for step in range(n):
        state.step = step
        ck.due(state)
        with signals.deferred:
            pass
    return (time.perf_counter() - t0) / n


def measure(models: list[str], x, y, repeats: int) -> dict[str, dict]:
    """Per model: samples/s of the three ways, and per-checkpoint stall, write and size."""
    out = {}
    ways = {"no hook": None, "hook, never due": "none", f"every {EVERY} steps": str(EVERY)}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-ckpt-") as tmp:
        for name in models:
            rates: dict[str, list[float]] = {w: [] for w in ways}
            stalls, writes, sizes = [], [], []
            for _ in range(repeats + 1):  # the first round warms up
                for way, every in ways.items():
                    rate, ck = _epoch(name, x, y, every, Path(tmp) / name)
                    rates[way].append(rate)
                    if ck is not None and ck.count:
                        stalls.append(ck.stall_s / ck.count)
                        state = _state(name, x)
                        path = Path(tmp) / "one.pt"
                        t0 = time.perf_counter()
                        write_atomic(path, {"state": state.state_dict()})
                        writes.append(time.perf_counter() - t0)
                        sizes.append(path.stat().st_size)
            out[name] = {
                "rates": {w: statistics.median(r[1:]) for w, r in rates.items()},
                "per_step": _per_step(name, x, Path(tmp)),
                "stall": statistics.median(stalls),
                "write": statistics.median(writes),
                "size": statistics.median(sizes),
            }
    return out


def report(results: dict[str, dict], repeats: int, images: int) -> None:
    print(
        f"\ncheckpointing, per model: 1 epoch of {images} images through train_epoch, "
        f"samples/s medians of {repeats}; per step = the hook's check and the signal-safe "
        "update window, timed alone; per checkpoint = the training thread's stall (state "
        "copy), the thread's write (torch.save + fsync + rename) and the file"
    )
    ways = list(next(iter(results.values()))["rates"])
    print(f"{'model':10s}" + "".join(f"{w:>20s}" for w in ways) + f"{'per step':>12s}"
          f"{'stall/ckpt':>12s}{'write/ckpt':>12s}{'size':>10s}")  # fmt: skip
    for name, r in results.items():
        rates = r["rates"]
        base = rates[ways[0]]
        per_step = r["per_step"]
        cells = "".join(f"{rates[w]:12.0f} {rates[w] / base:5.2f}x " for w in ways)
        print(f"{name:10s}{cells}{per_step * 1e6:9.1f} us{r['stall'] * 1e3:9.2f} ms"
              f"{r['write'] * 1e3:9.1f} ms{r['size'] / 1e6:7.2f} MB")  # fmt: skip
