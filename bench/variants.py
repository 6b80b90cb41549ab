"""The four training loops the bench compares, each timed over one epoch of the same data.

Every variant builds the same model from the same seed, trains with Adam at lr 1e-3 on
cross-entropy in batches of 128, and returns (samples, seconds) for its training loop only:
run creation and other fixed costs are measured separately, per whole `pipeline train`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.models import MODELS, training_forward

BATCH = 128
LR = 1e-3
SEED = 0


def _fresh_model(name: str = "seed_cnn") -> nn.Module:
    torch.manual_seed(SEED)
    return MODELS[name](10)


def notebook(raw_root: Path) -> tuple[int, float]:
    """(1) The teaching notebook's loop: per-image torchvision transforms and a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    dataset = datasets.MNIST(str(raw_root), train=True, download=False, transform=transform)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    model = _fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
    return len(dataset), time.perf_counter() - start


def bare(
    x: torch.Tensor, y: torch.Tensor, name: str = "seed_cnn", same_forward: bool = False
) -> tuple[int, float]:
    """(2) The best plain PyTorch loop without logging: in-memory tensors, fused Adam.

    With `same_forward`, through the forward `pipeline train` picks for model `name` (the
    collapsed one for seed_cnn), so that against `project` only the logging differs.
    """
    model = _fresh_model(name)
    forward = (training_forward(model) if same_forward else None) or model
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), BATCH):
        idx = order[i : i + BATCH]
        # index_select: the rows x[idx] gives, gathered as the project's loop gathers them.
        loss = criterion(forward(x.index_select(0, idx)), y.index_select(0, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(x), time.perf_counter() - start


def project(
    x: torch.Tensor,
    y: torch.Tensor,
    store: str,
    name: str = "seed_cnn",
    writer_cpu: list[float] | None = None,
) -> tuple[int, float, float]:
    """(3) The project's own training step, logging loss/accuracy/lr on every step.

    Uses the real `train_epoch`, the forward `pipeline train` picks, and the real
    `MlflowTracker` / `MetricWriter` (and its writer process) against a sqlite store, with
    the terminal's `ConsoleReporter` alongside as `pipeline train` has it. The
    clock starts once the writer is up and stops only once it has written every point; the
    run is then checked to hold exactly one train/loss point per step.

    Returns (samples, seconds, seconds of the loop alone): `pipeline train` waits for the
    last points only once per run, while it evaluates the test split (its fixed cost).
    `writer_cpu`, where given (Linux only), gets the writer process's CPU time from the
    clock's start to its stop, in us a step: what it takes from another core, or from this
    one where the host has no other free.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.console import ConsoleReporter, Fanout
    from pipeline.loop import TrainState, train_epoch
    from pipeline.losses import build_loss
    from pipeline.optimizers import build_optimizer

    mlflow.set_tracking_uri(store)
    model = _fresh_model(name)
    optimizer = build_optimizer("adam", list(model.parameters()), LR, None, 0.0, x.device)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(SEED))
    state.forward = training_forward(model)  # as `pipeline train` does
    loss_fn = build_loss("cross_entropy")
    with tracking.start_run("train", "bench-project") as run:
        # The writer process is up and has opened the run once `run.tracker` returns.
        console = ConsoleReporter(-(-len(x) // BATCH))
        tracker = Fanout([run.tracker, console])
        writer = Path(f"/proc/{run.tracker.writer.process.proc.pid}/stat")
        cpu_start = _cpu_seconds(writer)
        start = time.perf_counter()
        train_epoch(state, x, y, loss_fn, tracker, BATCH, log_every=1)
        loop_seconds = time.perf_counter() - start
        run.flush()  # wait for every point to be written
        seconds = time.perf_counter() - start
        if writer_cpu is not None and cpu_start is not None:
            writer_cpu.append((_cpu_seconds(writer) - cpu_start) / state.step * 1e6)
        console.close()
    points = len(MlflowClient().get_metric_history(run.run_id, "train/loss"))
    if points != state.step:
        raise AssertionError(f"project: {points} train/loss points for {state.step} steps")
    return len(x), seconds, loop_seconds


def _cpu_seconds(stat: Path) -> float | None:
    """User + system CPU seconds of the process whose /proc/<pid>/stat is `stat`; None
    where there is no /proc (fields 14 and 15, in clock ticks: proc(5))."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lightning(x: torch.Tensor, y: torch.Tensor, store: str) -> tuple[int, float]:
    """(4) PyTorch Lightning with its MLFlowLogger, logging the same three metrics per step.

    Given the fastest input Lightning accepts here (whole batches indexed from in-memory
    tensors), so the gap to (3) is Lightning's and its logger's overhead, not data loading.
    """
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _fresh_model()
            self.criterion = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            logits = self.model(xb)
            loss = self.criterion(logits, yb)
            self.log("train/loss", loss)
            self.log("train/accuracy", (logits.argmax(1) == yb).float().mean())
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR, fused=True)

    gen = torch.Generator().manual_seed(SEED)
    sampler = BatchSampler(RandomSampler(range(len(x)), generator=gen), BATCH, drop_last=False)
    loader = DataLoader(TensorDataset(x, y), sampler=sampler, batch_size=None)
    module = Module()
    logger = MLFlowLogger(experiment_name="bench-lightning", tracking_uri=store)
    _ = logger.experiment, logger.run_id  # create the run before the clock starts
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    points = len(logger.experiment.get_metric_history(logger.run_id, "train/loss"))
    if points != len(loader):
        raise AssertionError(f"lightning: {points} train/loss points for {len(loader)} steps")
    return len(x), seconds


def sqlite_store(folder: Path) -> str:
    """A fresh sqlite tracking store in its own temporary folder under `folder`."""
    return f"sqlite:///{tempfile.mkdtemp(dir=folder)}/mlflow.db"
