"""A command's start-up runs no full garbage collection (pipeline.startup)."""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys

import pytest

from pipeline import startup
from pipeline.tracking import writer
from tests.conftest import ROOT, _cli_env

# Reports on stderr every full collection with the number of frozen objects at that moment
# (0: before `startup.settle`), and the first time it sees objects frozen.
WATCH = """
import gc, sys
seen = [False]
def watch(phase, info):
    frozen = gc.get_freeze_count()
    if phase == "start" and info["generation"] == 2:
        print(f"full collection, frozen {frozen}", file=sys.stderr, flush=True)
    if frozen and not seen[0]:
        seen[0] = True
        print(f"frozen {frozen}", file=sys.stderr, flush=True)
gc.callbacks.append(watch)
"""
# `python -m pipeline ARGS`, watched.
WATCHED_CLI = (
    WATCH
    + """
import runpy
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""
)


def _frozen_after_startup(stderr: str) -> int:
    """How many objects were frozen; fails if a full collection came before the freeze."""
    lines = stderr.splitlines()
    early = [line for line in lines if line == "full collection, frozen 0"]
    assert not early, f"{len(early)} full collections before the imports were frozen"
    frozen = [int(line.split()[1]) for line in lines if line.startswith("frozen ")]
    assert frozen, stderr
    return frozen[0]


@pytest.mark.slow
def test_train_imports_everything_before_any_full_collection(tracking, sample_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WATCHED_CLI, "train", "--data", str(sample_file), "--epochs", "1"],
        cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # torch, MLflow, SQLAlchemy: hundreds of thousands of objects, out of every later walk.
    assert _frozen_after_startup(proc.stderr) > 100_000


@pytest.mark.slow
def test_the_writer_process_freezes_mlflow_before_it_writes(tracking):
    # Its real code, told to open the test's store (objects made, young collections run)
    # and then given no run: it exits at the end of its input.
    proc = subprocess.run(
        [sys.executable, "-c", WATCH + writer.WRITER_CODE, str(ROOT)],
        input=pickle.dumps((writer.OPEN, tracking)), capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == writer.OPENED
    assert _frozen_after_startup(proc.stderr.decode()) > 100_000


def test_settle_restores_the_thresholds_once():
    before = gc.get_threshold()
    try:
        startup.postpone_full_collections()
        startup.postpone_full_collections()  # a second call keeps the first thresholds
        assert gc.get_threshold()[:2] == before[:2]
        assert gc.get_threshold()[2] > 10**9
        startup.settle()
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        startup.settle()  # not postponed: nothing to do
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        startup._postponed = None
