"""The environment a run ran in: the lock file, its digest, and where the installed packages differ.

`make lock` (uv) writes `requirements/runtime.txt`: every runtime package pinned with its
hashes, for every platform (an environment marker says where a pin applies); `dev.txt` and
`bench.txt` extend it with the same pins. A run is tagged with the runtime lock's digest, the
versions of the project's direct dependencies it ran with, and every installed package that
is not what the lock pins, so a published figure can be traced to the environment that made it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import pipeline

LOCK_FILE = Path(pipeline.__file__).resolve().parent.parent / "requirements" / "runtime.txt"
PROJECT = "pipeline (pyproject.toml)"  # how uv's `# via` names this project's own requirements
IMPORT_NAMES = {"pyyaml": "yaml"}  # direct dependencies whose module is named otherwise
CONDA_LOCK_LINE = "# lock: "
_HEADER = re.compile(r"^(Name|Version):[ \t]*(\S+)[ \t]*$", re.MULTILINE)  # core metadata
MAX_LISTED = 20  # mismatches named in the tag; a tag value holds at most a few thousand chars


@dataclass(frozen=True)
class Pin:
    """One package of a lock file: `name==version ; marker` and what requires it."""

    requirement: Requirement
    via: tuple[str, ...]  # uv's `# via` annotation: packages, `pipeline (pyproject.toml)`, `-c X`

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str:
        return next(iter(self.requirement.specifier)).version

    def applies(self) -> bool:
        """Whether the pin's marker holds for this interpreter and platform."""
        marker = self.requirement.marker
        return marker is None or marker.evaluate()

    def line(self) -> str:
        """The pin as a requirement line without hashes, e.g. `triton==3.8.0 ; sys_platform == 'linux'`."""  # noqa: E501
        marker = self.requirement.marker
        return f"{self.name}=={self.version}" + (f" ; {marker}" if marker else "")


def lock_digest(path: Path = LOCK_FILE) -> str:
    """sha256 of the lock's lines less comments and blank lines, first 12 hex digits, as
    `grep -Ev '^\\s*(#|$)' FILE | sha256sum | cut -c1-12`; 'none' if there is no file.

    Only pins, hashes and options count: uv's `# via` annotations name the constraint files of
    the machine that locked, and do not change what gets installed.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "none"
    kept = (line for line in text.splitlines(keepends=True) if line.strip()[:1] not in ("", "#"))
    return hashlib.sha256("".join(kept).encode()).hexdigest()[:12]


@functools.cache
def read_lock(path: Path = LOCK_FILE) -> tuple[Pin, ...]:
    """The pins of a lock file written by `uv pip compile` (requirements format, `--hash` lines
    and `# via` annotations); a package pinned per platform appears once per marker.

    Raises FileNotFoundError without the file, packaging's InvalidRequirement on a bad pin.
    """
    pins: list[tuple[Requirement, list[str]]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if raw[:1].isalnum():
            pins.append((Requirement(line.rstrip("\\").strip()), []))
        elif pins and line.startswith("# via"):
            via = line.removeprefix("# via").strip()
            pins[-1][1].extend([via] if via else [])
        elif pins and line.startswith("#   "):
            pins[-1][1].append(line.removeprefix("#").strip())
    return tuple(Pin(req, tuple(via)) for req, via in pins)


@functools.cache
def installed_versions() -> dict[str, str]:
    """Every installed distribution's version by canonical name, in one pass over sys.path."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        # The header's Name and Version lines alone: `dist.metadata` parses each whole file as
        # an email message, ~110 ms for a venv like this project's against ~10 ms.
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        head = dict(_HEADER.findall(text.split("\n\n", 1)[0]))
        if "Name" in head and "Version" in head:
            found.setdefault(canonicalize_name(head["Name"]), head["Version"])
    return found


def lock_mismatches(path: Path = LOCK_FILE) -> list[str]:
    """Each pin that applies here but is not what is installed: `name 2.15.0 (lock 2.14.1)` or
    `name missing (lock 2.14.1)`; [] when the environment is the lock's.

    A local version label the pin lacks is ignored, as pip does: torch `2.14.1+cpu` meets
    `torch==2.14.1`. Raises FileNotFoundError without the lock file.
    """
    installed = installed_versions()
    wrong = []
    for pin in read_lock(path):
        if not pin.applies():
            continue
        have = installed.get(pin.name)
        if have is None:
            wrong.append(f"{pin.name} missing (lock {pin.version})")
        elif not pin.requirement.specifier.contains(have, prereleases=True):
            wrong.append(f"{pin.name} {have} (lock {pin.version})")
    return wrong


def direct_versions(path: Path = LOCK_FILE) -> dict[str, str]:
    """The project's direct runtime dependencies (pyproject.toml's, as the lock records them)
    and the versions this process runs: the module's own `__version__` once it is imported
    (torch's names its build, e.g. `2.14.1+cu130` or `2.14.1+cpu`), else the installed one.
    """
    installed = installed_versions()
    found = {}
    for pin in read_lock(path):
        if PROJECT not in pin.via or not pin.applies():
            continue
        module = sys.modules.get(IMPORT_NAMES.get(pin.name, pin.name.replace("-", "_")))
        # vars(): a module-level __getattr__ (click's) warns that __version__ is deprecated.
        version = vars(module).get("__version__") if module else None
        version = version or installed.get(pin.name)
        found[pin.name] = str(version) if version else "missing"
    return dict(sorted(found.items()))


def tags(path: Path = LOCK_FILE) -> dict[str, str]:
    """The run tags naming the environment: `pipeline.lock_digest`, `pipeline.versions`
    (space-separated `name==version`) and `pipeline.lock_mismatch` ('none' when the installed
    packages are the lock's, 'no lock file' without one).
    """
    if not path.exists():
        return {"pipeline.lock_digest": "none", "pipeline.lock_mismatch": "no lock file"}
    wrong = lock_mismatches(path)
    listed = "; ".join(wrong[:MAX_LISTED]) + (
        f"; and {len(wrong) - MAX_LISTED} more" if len(wrong) > MAX_LISTED else ""
    )
    return {
        "pipeline.lock_digest": lock_digest(path),
        "pipeline.versions": " ".join(f"{n}=={v}" for n, v in direct_versions(path).items()),
        "pipeline.lock_mismatch": listed or "none",
    }


def model_constraints(path: Path = LOCK_FILE) -> list[str] | None:
    """The lock's pins as constraint lines for a logged model (no hashes, so that a CPU-only
    build of the same torch version also meets them), or None when this environment is not the
    lock's: the model then declares only what it ran with.
    """
    if not path.exists() or lock_mismatches(path):
        return None
    return [pin.line() for pin in read_lock(path)]


def stamp_conda_yaml(conda_yaml: Path, path: Path = LOCK_FILE) -> None:
    """Rewrite conda.yaml's `# lock: ` line with the lock's digest.

    MLflow names the conda environment it builds after conda.yaml's text, and conda.yaml takes
    its pip packages from the lock with `-r`: without this line a new lock would reuse the old
    environment. Raises ValueError if conda.yaml has no such line.
    """
    lines = conda_yaml.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.startswith(CONDA_LOCK_LINE)]
    if len(at) != 1:
        raise ValueError(f"{conda_yaml}: needs exactly one line starting {CONDA_LOCK_LINE!r}")
    rel = path.relative_to(conda_yaml.resolve().parent) if path.is_absolute() else path
    lines[at[0]] = f"{CONDA_LOCK_LINE}{rel} sha256 {lock_digest(path)}\n"
    conda_yaml.write_text("".join(lines))


if __name__ == "__main__":
    stamp_conda_yaml(Path(sys.argv[1]))
