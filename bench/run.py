"""`make bench`: four ways to train the seed model, side by side, plus what surrounds a run.

Prints samples/s (min / median / max over repeats, in alternating order) of
  (1) the teaching notebook's loop, (2) a bare PyTorch loop without logging,
  (3) this project's step logging every step to MLflow, (4) Lightning + MLFlowLogger,
then, for every model of the zoo, (3) against (2) through the same forward, the compute
floor, data_prep's time, and a whole `pipeline train` split into phases beside the naive
MLflow script (bench/naive.py) timed the same way, and the per-trial overhead of a sweep
in-process, with --parallel and with --workers (bench/sweeps.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `pipeline`
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import checkpoints  # noqa: E402
import costs  # noqa: E402
import floor  # noqa: E402
import sweeps  # noqa: E402
import torch  # noqa: E402
import variants  # noqa: E402

from pipeline.data import to_model_input  # noqa: E402
from pipeline.models import MODELS, training_forward  # noqa: E402

TARGET = 0.95  # issue 13: logging every step keeps >= this fraction of the bare loop's speed

VARIANTS = ("notebook", "bare", "project", "lightning")
NAMES = {
    "notebook": "(1) notebook: transforms + DataLoader",
    "bare": "(2) bare PyTorch loop, no logging",
    "project": "(3) pipeline step, MLflow every step",
    "project loop": "(3) its loop alone, without the final wait",
    "lightning": "(4) Lightning + MLFlowLogger every step",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=costs.TRAIN_IMAGES, help="training images")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")  # fmt: skip
    p.add_argument("--models", default=",".join(MODELS), help="zoo models for the per-model ratio")
    # The per-model ratio has a target: 5 repeats left its median ~3% from one run to the next.
    p.add_argument("--model-repeats", type=int, default=11, help="repeats of the per-model part")
    p.add_argument("--no-train-run", action="store_true", help="skip the `pipeline train` run")
    p.add_argument("--only-checkpoints", action="store_true",
                   help="only the checkpointing costs (per step, per checkpoint)")  # fmt: skip
    p.add_argument("--no-sweeps", action="store_true",
                   help="skip the per-trial overhead of sweeps (bench/sweeps.py)")  # fmt: skip
    args = p.parse_args()
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; valid choices: {', '.join(VARIANTS)}")
    return args


def quiet(lightning: bool) -> None:
    """Lightning and MLflow talk a lot; the bench's table is what should be read."""
    if lightning:
        import lightning  # noqa: F401 - its import sets up the loggers silenced below

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def runner(name: str, raw_root: Path, x: torch.Tensor, y: torch.Tensor, tmp: Path):
    """A zero-argument call that trains variant `name` for one epoch on the shared data."""
    if name == "notebook":
        return lambda: variants.notebook(raw_root)
    if name == "bare":
        return lambda: variants.bare(x, y)
    store = lambda: variants.sqlite_store(tmp)  # noqa: E731 - a fresh store every repeat
    if name == "project":
        return lambda: variants.project(x, y, store())
    return lambda: variants.lightning(x, y, store())


def measure(calls: dict, repeats: int) -> dict[str, list[float]]:
    """samples/s of every variant, `repeats` times, forward then backward order in turn; a
    variant that also times its loop alone (`project`) adds "<name> loop"."""
    rates: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples, seconds, *loop = calls[name]()
            rates[name].append(samples / seconds)
            if loop:
                rates.setdefault(f"{name} loop", []).append(samples / loop[0])
            print(f"  repeat {r + 1}/{repeats} {name:9s} {samples / seconds:9.0f} samples/s")
    return rates


def print_table(rates: dict[str, list[float]], repeats: int, images: int) -> None:
    base = statistics.median(rates["bare"]) if "bare" in rates else None
    print(
        f"\nsamples/s, 1 epoch of {images} images, batch {variants.BATCH}, seed_cnn, Adam, "
        f"torch.set_num_threads(1), {repeats} repeats in alternating order"
    )
    print(f"{'variant':42s} {'min':>8s} {'median':>8s} {'max':>8s} {'vs (2)':>7s}")
    for name, values in rates.items():
        med = statistics.median(values)
        ratio = f"{med / base:6.2f}x" if base else "-"
        print(f"{NAMES[name]:42s} {min(values):8.0f} {med:8.0f} {max(values):8.0f} {ratio:>7s}")
    if {"project", "notebook", "lightning"} <= rates.keys():
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(
            f"(3)/(1) = {med['project'] / med['notebook']:.2f}x   "
            f"(3)/(4) = {med['project'] / med['lightning']:.2f}x"
        )


def measure_models(
    models: list[str], x: torch.Tensor, y: torch.Tensor, tmp: Path, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Per model, samples/s of (2) and (3) through the same forward, alternating."""
    out = {}
    for name in models:
        cpu: list[float] = []
        calls = {
            "bare": lambda n=name: variants.bare(x, y, n, same_forward=True),
            "project": lambda n=name, cpu=cpu: variants.project(
                x, y, variants.sqlite_store(tmp), n, writer_cpu=cpu
            ),
        }
        print(f"{name}: warm-up, then {repeats} repeats:")
        for call in calls.values():
            call()
        cpu.clear()
        out[name] = measure(calls, repeats)
        out[name]["writer us/step"] = cpu
    return out


def print_models(per_model: dict[str, dict[str, list[float]]], repeats: int, images: int) -> None:
    """Each ratio is the median of per-repeat ratios: within a repeat (2) and (3) run back
    to back, so the machine's drift over the whole measurement (up to ~20% within minutes
    on a shared VM) cancels out of each ratio; the range shows what is left of the noise.

    The target (issue 13: >= 0.95) is judged on the loop, timed as `pipeline train` times
    it (`time/loop_seconds`): until the loop returns, every point handed to the writer. The
    wait for the writer to write the last ones is shown too: it comes once per run, not per
    step, and `pipeline train` counts it in its fixed cost (wall time minus the loop),
    which has its own target. Every point is checked to have been written either way."""
    print(
        f"\nper model: (3) logging every step vs (2) without logging, through the SAME forward "
        f"(the one `pipeline train` uses), {images} images, samples/s medians of {repeats}; "
        f"ratios: medians of the {repeats} back-to-back (3)/(2) ratios [lowest, highest]; "
        f"loop: the clock stopped when the loop returns; +wait: once every point is written; "
        f"writer: the writer process's CPU, us a step (median)"
    )
    print(f"{'model':10s} {'(2) bare':>9s} {'(3) project':>12s} {'loop':>7s} {'range':>13s}"
          f" {'+wait':>7s} {'range':>13s} {'writer':>7s}")  # fmt: skip
    for name, rates in per_model.items():
        bare, proj = statistics.median(rates["bare"]), statistics.median(rates["project loop"])
        loop, spread = _paired(rates["project loop"], rates["bare"])
        waited, waited_spread = _paired(rates["project"], rates["bare"])
        cpu = rates.get("writer us/step")
        writer = f"{statistics.median(cpu):7.0f}" if cpu else f"{'-':>7s}"
        mark = "" if loop >= TARGET else f"   below {TARGET}"
        print(f"{name:10s} {bare:9.0f} {proj:12.0f} {loop:6.3f}x {spread:>13s} {waited:6.3f}x"
              f" {waited_spread:>13s} {writer}{mark}")  # fmt: skip


def _paired(rates: list[float], bare: list[float]) -> tuple[float, str]:
    """Median of the per-repeat ratios, and their range as text."""
    pairs = [r / b for r, b in zip(rates, bare, strict=True)]
    return statistics.median(pairs), f"[{min(pairs):.2f}, {max(pairs):.2f}]"


def print_floor(rates: dict[str, list[float]]) -> None:
    model = variants._fresh_model()
    flops = floor.flops_per_sample(model)
    collapsed = floor.flops_per_sample(model, forward=training_forward(model))
    peak = floor.matmul_flops_per_second()
    ceiling = peak / flops
    print(
        f"\ncompute floor: {flops / 1e6:.3f} MFLOP per training sample (forward + backward, "
        f"counted by torch); 1024x1024 matmul at {peak / 1e9:.1f} GFLOP/s on one thread "
        f"-> at most {ceiling:,.0f} samples/s"
    )
    for name in ("bare", "project"):
        if name in rates:
            print(f"  {NAMES[name]} reaches {statistics.median(rates[name]) / ceiling:.2f} of it")
    print(
        f"  (3) trains through the collapsed forward (pipeline.models.training_forward): "
        f"{collapsed / 1e6:.3f} MFLOP per sample, same result up to float rounding"
    )


def print_phases(title: str, phases: dict[str, float]) -> None:
    print(f"\n{title}")
    for key, seconds in phases.items():
        print(f"  {key:28s} {seconds:7.2f} s")


def main() -> None:
    args = parse_args()
    quiet("lightning" in args.variants.split(","))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp_name:
        tmp = Path(tmp_name)
        raw_root = costs.write_mnist_folder(tmp / "data", args.images)
        prepared, prep = costs.time_prep(tmp / "data")
        from torchvision.datasets import MNIST

        train = MNIST(str(raw_root), train=True)  # the same 60000 images for every variant
        x, y = to_model_input(train.data), train.targets
        if args.only_checkpoints:
            checkpoints.report(checkpoints.measure(args.models.split(","), x, y, args.repeats),
                               args.repeats, len(x))  # fmt: skip
            return
        calls = {n: runner(n, raw_root, x, y, tmp) for n in args.variants.split(",")}
        print(f"warm-up, then {args.repeats} repeats:")
        for call in calls.values():
            call()
        started = time.perf_counter()
        rates = measure(calls, args.repeats)
        print(f"(timed repeats took {time.perf_counter() - started:.0f} s)")
        print_table(rates, args.repeats, len(x))
        per_model = measure_models(args.models.split(","), x, y, tmp, args.model_repeats)
        print_models(per_model, args.model_repeats, len(x))
        ckpt = checkpoints.measure(args.models.split(","), x, y, args.repeats)
        checkpoints.report(ckpt, args.repeats, len(x))
        print_floor(rates)
        print_phases(f"data_prep of {args.images} IDX images (in-process, no MLflow run)", prep)
        if not args.no_train_run:
            # Alternating, so both see the same load: pipeline, naive, naive, pipeline.
            phases = costs.time_pipeline_train(prepared, tmp / "train-run")
            naive = [costs.time_naive(prepared, tmp / f"naive-{i}") for i in range(2)]
            second = costs.time_pipeline_train(prepared, tmp / "train-run-1")
            print_phases("`python -m pipeline train --epochs 1` on the prepared file", phases)
            fixed = [p["fixed (wall - loop)"] for p in (phases, second)]
            naive_fixed = [p["fixed (wall - loop)"] for p in naive]
            print(
                f"  fixed cost, 2 runs each in the order pipeline, naive, naive, pipeline: "
                f"pipeline train {min(fixed):.2f} / {max(fixed):.2f} s, naive script "
                f"(bench/naive.py) {min(naive_fixed):.2f} / {max(naive_fixed):.2f} s "
                f"(loop {naive[0]['training loop']:.2f} s); means {sum(fixed) / 2:.2f} vs "
                f"{sum(naive_fixed) / 2:.2f} s: {sum(fixed) / sum(naive_fixed):.2f}x"
            )
            again = costs.time_pipeline_train(prepared, tmp / "train-run-2", hide_lightning=False)
            print(
                f"  the same with the bench's Lightning importable (mlflow.pytorch imports it): "
                f"wall {again['wall']:.2f} s, fixed {again['fixed (wall - loop)']:.2f} s"
            )
    if not args.no_sweeps:  # in-process vs --parallel 2 vs --workers 2 on optimizers.yaml
        sweeps.main([])


if __name__ == "__main__":
    main()
