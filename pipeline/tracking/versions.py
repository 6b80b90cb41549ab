"""What made a run: library versions, the environment, and a digest of this code."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import mlflow

import pipeline
from pipeline.tracking.tags import CODE_VERSION_TAG


def code_version() -> str:
    """A digest of the package's source: changes whenever the code that made a result does."""
    h = hashlib.sha256()
    root = Path(pipeline.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def version_tags() -> dict[str, str]:
    """Versions, code digest and environment (pipeline.environment.tags) of a new run."""
    import importlib.metadata

    import torch

    from pipeline import environment

    return {
        "torch_version": torch.__version__,
        # From the installed metadata: importing torchvision only to read this costs ~1 s.
        "torchvision_version": importlib.metadata.version("torchvision"),
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        CODE_VERSION_TAG: code_version(),
        **environment.tags(),
    }
