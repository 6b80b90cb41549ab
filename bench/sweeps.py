"""The cost per trial beyond its training loop: a sweep in-process, with `--parallel N` (a
process per trial) and with `--workers N` (long-lived processes).

Each mode runs `pipeline sweep FILE` from a fresh folder (its own sqlite store). From the
trial runs' own timestamps, the trials' window is the first trial's start to the last one's
end (data_prep before and the comparison after are left out; so are the workers' start-up
imports, paid once per sweep, not per trial). Then

    overhead per trial = (N x window - sum of time/loop_seconds) / trials

the process-seconds N concurrent slots spent per trial on anything but the training loop:
process start and imports, MLflow set-up, evaluation, logging the model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"in-process": [], "parallel": ["--parallel"], "workers": ["--workers"]}


def run_mode(mode: str, file: Path, n: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
        env |= {"PIPELINE_LOCK_DIR": f"{tmp}/locks", "PIPELINE_SPOOL_DIR": f"{tmp}/spool"}
        args = MODES[mode] + ([str(n)] if MODES[mode] else [])
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "sweep", str(file), *args],
            cwd=tmp, env=env, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: sweep failed:\n{proc.stderr[-2000:]}")
        client = MlflowClient(uri)
        runs = [r for e in client.search_experiments() for r in client.search_runs(
            [e.experiment_id], "tags.`pipeline.step` = 'train'", max_results=1000)]  # fmt: skip
        window = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1e3
        loops = sum(r.data.metrics["time/loop_seconds"] for r in runs)
        slots = n if MODES[mode] else 1
        return {"trials": len(runs), "wall": wall, "window": window, "loops": loops,
                "overhead": (slots * window - loops) / len(runs), "slots": slots}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=str(ROOT / "experiments/optimizers.yaml"))
    p.add_argument("--n", type=int, default=2, help="processes for --parallel and --workers")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args(argv)
    print(f"\nPer-trial overhead beyond the training loop, `pipeline sweep {Path(args.file).name}`"
          f" (load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")  # fmt: skip
    print(f"{'mode':<14}{'trials':>7}{'sweep s':>9}{'window s':>10}{'loops s':>9}"
          f"{'overhead s/trial':>18}")  # fmt: skip
    for mode in args.modes.split(","):
        r = run_mode(mode, Path(args.file).resolve(), args.n)
        label = mode if r["slots"] == 1 else f"{mode} {r['slots']}"
        print(f"{label:<14}{r['trials']:>7}{r['wall']:>9.1f}{r['window']:>10.1f}"
              f"{r['loops']:>9.1f}{r['overhead']:>18.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
