"""The scheduling examples under deploy/: the crontab line and the systemd units are checked,
and the wrapper they call is run for real, as cron would, against a temporary store; then
models:/NAME@champion is served with `mlflow models serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from pipeline.data import load_prepared, prepared_path, to_model_input
from pipeline.retrain import load_config

from .conftest import ROOT, free_port, wait_http
from .test_retrain import _env

DEPLOY = ROOT / "deploy"
PREFIX = "/opt/pytorch-mlflow-pipeline"  # where the examples assume the project is installed
NAME = "digits-cron"
CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _crontab() -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    """(environment lines, [(five schedule fields, command)]) of deploy/crontab."""
    env, jobs = {}, []
    for line in (DEPLOY / "crontab").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Z_][A-Z0-9_]*=", line):
            key, value = line.split("=", 1)
            env[key] = value
            continue
        fields = line.split(None, 5)
        jobs.append((fields[:5], fields[5]))
    return env, jobs


def _valid_cron_field(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and not step.isdigit():
            return False
        if base == "*":
            continue
        bounds = base.split("-")
        if not all(b.isdigit() and low <= int(b) <= high for b in bounds) or len(bounds) > 2:
            return False
    return True


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_crontab_line_calls_the_wrapper_with_the_tracking_uri():
    env, jobs = _crontab()
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://", "sqlite:///"))
    (schedule, command), *rest = jobs
    assert not rest
    for field, (low, high) in zip(schedule, CRON_FIELDS, strict=True):
        assert _valid_cron_field(field, low, high), field
    assert command == f"{PREFIX}/deploy/retrain.sh"
    assert os.access(DEPLOY / "retrain.sh", os.X_OK)


def test_systemd_units_run_the_wrapper_and_accept_the_lock_code(tmp_path):
    service = _unit(DEPLOY / "pipeline-retrain.service")["Service"]
    timer = _unit(DEPLOY / "pipeline-retrain.timer")
    assert _values(service, "Type") == ["oneshot"]
    assert _values(service, "ExecStart") == [f"{PREFIX}/deploy/retrain.sh"]
    assert _values(service, "WorkingDirectory") == [PREFIX]
    assert "75" in _values(service, "SuccessExitStatus")[0].split()
    assert _values(service, "EnvironmentFile")
    env = dict(v.split("=", 1) for v in _values(service, "Environment"))
    assert env["PIPELINE_LOG_DIR"] == "/var/log/pipeline"
    assert _values(timer["Timer"], "Unit") == ["pipeline-retrain.service"]
    assert _values(timer["Install"], "WantedBy") == ["timers.target"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the units were parsed, not verified")
    calendar = _values(timer["Timer"], "OnCalendar")[0]
    subprocess.run(["systemd-analyze", "calendar", calendar], check=True, capture_output=True)
    # verify wants ExecStart to exist and User= to be known: point them at this checkout.
    for name in ("pipeline-retrain.service", "pipeline-retrain.timer"):
        text = (DEPLOY / name).read_text().replace(PREFIX, str(ROOT))
        text = re.sub(r"(?m)^(User|Group)=.*$", r"\1=root", text)
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "pipeline-retrain.service", "pipeline-retrain.timer"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"Failed to parse|Unknown key|[Ii]gnoring", proc.stderr), proc.stderr


def test_wrapper_needs_a_tracking_uri(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIPELINE_ENV_FILE": "/nonexistent"}
    proc = subprocess.run(
        [str(DEPLOY / "retrain.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert "MLFLOW_TRACKING_URI: is not set" in proc.stderr


@pytest.mark.slow
def test_cron_runs_the_wrapper_and_the_champion_serves(tracking, tmp_path):
    config = tmp_path / "retrain.yaml"
    body = {
        "model_name": NAME,
        "prep": {"data_dir": str(tmp_path / "data")},
        "train": {"epochs": 1},
    }
    config.write_text(yaml.safe_dump(body))
    cron_env, [(_, command)] = _crontab()
    home = tmp_path / "home"
    # cron's environment: almost nothing, plus the crontab's own assignments.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh", **cron_env}
    env |= {
        "MLFLOW_TRACKING_URI": tracking,  # instead of the example's server
        "PIPELINE_PYTHON": sys.executable,  # the project's venv, wherever it lives here
        "PIPELINE_RETRAIN_CONFIG": str(config),
    }
    command = command.replace(PREFIX, str(ROOT))
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # cron mails nothing for a good run
    log = (home / ".local/state/pipeline/logs/retrain.log").read_text()
    assert f"retrain: promote {NAME} v1" in log and log.rstrip().endswith("exit 0")
    assert list((home / ".cache/pipeline/locks").glob(f"{NAME}-*.lock"))

    # A failing run: non-zero, and its tail on stderr; the tracking URI from an env file.
    env_file = tmp_path / "retrain.env"
    env_file.write_text(f"MLFLOW_TRACKING_URI={tracking}\n")
    bad = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    bad |= {"PIPELINE_ENV_FILE": str(env_file), "PIPELINE_RETRAIN_CONFIG": "missing.yaml"}
    proc = subprocess.run(["/bin/sh", "-c", command], env=bad, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Error: retrain config 'missing.yaml' does not exist" in proc.stderr
    assert f"tracking {tracking}" in (home / ".local/state/pipeline/logs/retrain.log").read_text()

    _serve_champion(tmp_path, load_config(config))


def _serve_champion(tmp_path: Path, cfg) -> None:
    """POST real digits to `mlflow models serve -m models:/NAME@champion`."""
    uri = f"models:/{cfg.model_name}@champion"
    x = to_model_input(load_prepared(prepared_path(cfg.prep)).splits["test"].images[:8]).numpy()
    expected = mlflow.pyfunc.load_model(uri).predict(x)
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.asarray(json.loads(response.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=30)
    np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-4)
