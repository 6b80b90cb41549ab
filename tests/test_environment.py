"""The lock files against pyproject.toml and conda.yaml; what a run records of its environment."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import tomllib
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline import environment
from pipeline.config import TrainConfig
from pipeline.steps import run_train

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"runtime": None, "dev": "dev", "bench": "bench"}  # lock file stem -> extra it adds


def _lock_problems(pyproject: dict, lock: Path, extra: str | None) -> list[str]:
    """Where `lock` no longer matches the project's requirements (plus `extra`'s)."""
    project = pyproject["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"].get(extra, [])]
    pins = environment.read_lock(lock)
    locked = {pin.name for pin in pins}
    direct = {pin.name for pin in pins if environment.PROJECT in pin.via}
    problems = []
    for req in declared:
        name = canonicalize_name(req.name)
        if name not in direct:
            problems.append(f"missing: {req}")
        for pin in (p for p in pins if p.name == name):
            if not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{pin.name}=={pin.version} does not meet {req}")
    problems += [f"stale: {name} (no longer in pyproject.toml)" for name in direct - {
        canonicalize_name(r.name) for r in declared}]  # fmt: skip
    for pin in pins:
        if pin.name not in direct and not any(v in locked for v in pin.via):
            problems.append(f"stale: {pin.name} (required by nothing locked: {pin.via})")
    return problems


@pytest.mark.parametrize("stem", LOCKS)
def test_lock_matches_pyproject(stem):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = _lock_problems(pyproject, ROOT / f"requirements/{stem}.txt", LOCKS[stem])
    assert not problems, f"requirements/{stem}.txt is out of date, run `make lock`: {problems}"


def test_lock_check_catches_added_removed_and_tightened_requirements():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    mlxtend = next(d for d in deps if d.startswith("mlxtend"))
    deps[deps.index(mlxtend)] = "mlxtend>=99"  # tightened: the pin no longer meets it
    deps.remove(next(d for d in deps if d.startswith("psutil")))  # removed, still locked
    deps.append("tensorboard>=2")  # added without relocking
    problems = _lock_problems(pyproject, ROOT / "requirements/runtime.txt", None)
    assert "missing: tensorboard>=2" in problems
    assert "mlxtend==0.25.0 does not meet mlxtend>=99" in problems
    assert "stale: psutil (no longer in pyproject.toml)" in problems
    assert len(problems) == 3, problems


def test_dev_and_bench_locks_keep_every_runtime_pin():
    runtime = {pin.line() for pin in environment.read_lock(ROOT / "requirements/runtime.txt")}
    for stem in ("dev", "bench"):
        extended = {pin.line() for pin in environment.read_lock(ROOT / f"requirements/{stem}.txt")}
        assert runtime <= extended, f"{stem}.txt repins {sorted(runtime - extended)}"


def _shell_digest(lock: Path) -> str:
    """The digest by the README's shell recipe."""
    cmd = f"grep -Ev '^\\s*(#|$)' {lock} | sha256sum | cut -c1-12"
    done = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def test_conda_yaml_installs_the_runtime_lock_and_names_its_digest():
    text = (ROOT / "conda.yaml").read_text()
    pip = next(d for d in yaml.safe_load(text)["dependencies"] if isinstance(d, dict))["pip"]
    assert pip == ["-r requirements/runtime.txt"]
    digest = _shell_digest(ROOT / "requirements/runtime.txt")
    assert environment.lock_digest() == digest
    assert f"\n# lock: requirements/runtime.txt sha256 {digest}\n" in text, "run `make lock`"


def test_stamp_conda_yaml_rewrites_the_digest_line(tmp_path):
    lock = tmp_path / "requirements" / "runtime.txt"
    lock.parent.mkdir()
    lock.write_text("# made by hand\nclick==8.1.0\n    # via pipeline (pyproject.toml)\n\n")
    conda = tmp_path / "conda.yaml"
    conda.write_text("# a comment\n# lock: requirements/runtime.txt sha256 none\nname: x\n")
    environment.stamp_conda_yaml(conda, lock)
    digest = hashlib.sha256(b"click==8.1.0\n").hexdigest()[:12]  # comments do not count
    assert _shell_digest(lock) == digest
    assert conda.read_text().splitlines()[1] == f"# lock: requirements/runtime.txt sha256 {digest}"
    conda.write_text("name: x\n")
    with pytest.raises(ValueError, match="# lock: "):
        environment.stamp_conda_yaml(conda, lock)


def test_tags_name_every_package_that_is_not_the_locks(tmp_path):
    click = importlib.metadata.version("click")
    lock = tmp_path / "runtime.txt"
    lock.write_text(
        "# written by hand, as uv writes them\n"
        "click==0.1 \\\n    --hash=sha256:00\n    # via pipeline (pyproject.toml)\n"
        "pyyaml==6.0.4\n    # via\n    #   -c x.txt\n    #   pipeline (pyproject.toml)\n"
        "no-such-package==1.0\n    # via click\n"
        "pywin32==312 ; sys_platform == 'no-such-platform'\n    # via click\n"
    )
    tags = environment.tags(lock)
    assert tags["pipeline.lock_digest"] == _shell_digest(lock)
    assert tags["pipeline.lock_mismatch"] == (
        f"click {click} (lock 0.1); no-such-package missing (lock 1.0)"
    )
    # Direct dependencies only, with what is installed, not what the lock says.
    assert tags["pipeline.versions"] == f"click=={click} pyyaml=={yaml.__version__}"
    assert environment.model_constraints(lock) is None
    gone = tmp_path / "absent.txt"
    assert environment.tags(gone)["pipeline.lock_mismatch"] == "no lock file"
    assert environment.model_constraints(gone) is None


def test_run_records_its_environment_and_the_model_requires_the_locks_pins(
    tracking, sample_file, tmp_path
):
    import torch

    result = run_train(TrainConfig(data=str(sample_file), epochs=1, log_every=1000))
    tags = MlflowClient().get_run(result.run_id).data.tags
    lock = ROOT / "requirements/runtime.txt"
    assert tags["pipeline.lock_digest"] == _shell_digest(lock)
    assert tags["pipeline.lock_mismatch"] == "none", (
        "this environment is not the lock's; `make test` installs it from requirements/dev.txt"
    )
    versions = dict(v.split("==") for v in tags["pipeline.versions"].split())
    assert versions["torch"] == torch.__version__ and versions["mlflow"] == mlflow.__version__
    assert set(versions) == {pin.name for pin in environment.read_lock(lock)
                             if environment.PROJECT in pin.via}  # fmt: skip

    model = Path(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path)))
    locked = {pin.name: pin.version for pin in environment.read_lock(lock)}
    requirements = (model / "requirements.txt").read_text().split("\n")
    pinned = dict(r.split("==") for r in requirements if "==" in r)
    assert pinned == {name: locked[name] for name in ("mlflow", "torch", "numpy")}
    assert "-c constraints.txt" in requirements
    constraints = (model / "constraints.txt").read_text().splitlines()
    assert sorted(constraints) == sorted(pin.line() for pin in environment.read_lock(lock))
