"""`make bench-ddp`: samples/s of one process against data-parallel ranks on this machine.

Trains `lenet5` for one epoch on the bench's 60000 MNIST-format images (the offline sample
tiled, read through torchvision's IDX reader; `pipeline prep`'s split leaves 54000 to
train on) with `pipeline train`, as a user runs it: once as one process and once with
`--nproc-per-node N`, N = 2 on a CPU machine and the number of GPUs on a CUDA one, in
alternating order over the repeats, each on a fresh sqlite store. samples/s is the run's
own `time/samples_per_second`: the training loop alone (all ranks' samples over its wall
time), without start-up, evaluation and model logging.

Threads: each rank gets cores / ranks (pipeline.distributed.threads_per_rank); the one
process runs twice, with torch's default (this machine's cores: the same cores as the ranks)
and with one thread (OMP_NUM_THREADS=1), since on a loaded machine several threads of one
process can be far slower than one, which would flatter the ranks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `pipeline`
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import costs  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=costs.TRAIN_IMAGES, help="training images")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--ranks", type=int, default=None, help="[default: GPUs on CUDA, else 2]")
    p.add_argument("--log-every", type=int, default=50, help="steps between logged points")
    return p.parse_args()


def train(
    data: Path, workdir: Path, args: argparse.Namespace, ranks: int, one_thread: bool = False
) -> dict[str, float]:
    """One `pipeline train` on a fresh store; its samples/s, loop seconds, test accuracy."""
    from mlflow.tracking import MlflowClient

    workdir.mkdir(parents=True)
    store = f"sqlite:///{workdir}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    if one_thread:
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline", "train", "--data", str(data), "--model",
               args.model, "--epochs", "1", "--log-every", str(args.log_every)]  # fmt: skip
    if ranks > 1:
        command += ["--nproc-per-node", str(ranks)]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs(["0"], "tags.`pipeline.step` = 'train'")
    m = run.data.metrics
    return {"samples/s": m["time/samples_per_second"], "loop": m["time/loop_seconds"],
            "test/accuracy": m["test/accuracy"]}  # fmt: skip


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        root = costs.write_mnist_folder(Path(tmp) / "raw", args.images)
        data, _ = costs.time_prep(root)
        names = {"1": "1 process", "1t": "1 process, 1 thread",
                 "n": f"{ranks} ranks (--nproc-per-node {ranks})"}  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {key: [] for key in names}
        load = os.getloadavg()[0]
        for repeat in range(args.repeats):
            order = list(names) if repeat % 2 == 0 else list(reversed(names))
            for key in order:
                n = ranks if key == "n" else 1
                workdir = Path(tmp) / f"r{repeat}-{key}"
                results[key].append(train(data, workdir, args, n, one_thread=key == "1t"))
        load_end = os.getloadavg()[0]
    print(
        f"samples/s of the training loop, `pipeline train --model {args.model} --epochs 1 "
        f"--log-every {args.log_every}`, {args.images} images (54000-image train split of "
        f"60000 by default), {args.repeats} repeats in alternating order; {device}; load "
        f"average {load:.1f} at the start, {load_end:.1f} at the end"
    )
    print(f"{'processes':<30}{'min':>9}{'median':>9}{'max':>9}  test/accuracy")
    medians = {}
    for key, rows in results.items():
        speeds = [r["samples/s"] for r in rows]
        medians[key] = statistics.median(speeds)
        accuracy = " ".join(f"{r['test/accuracy']:.4f}" for r in rows)
        print(f"{names[key]:<30}{min(speeds):>9.0f}{medians[key]:>9.0f}{max(speeds):>9.0f}"
              f"  {accuracy}")  # fmt: skip
    best = max(medians["1"], medians["1t"])
    print(f"ratio {ranks} ranks / the faster 1 process (medians): {medians['n'] / best:.2f}x"
          f"  (/ 1 process at default threads: {medians['n'] / medians['1']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench-ddp took {time.perf_counter() - t0:.0f} s")
