"""Pick the device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from pipeline.config import DEVICES
from pipeline.errors import PipelineError


def resolve_device(requested: str = "auto") -> torch.device:
    """The device for `requested`; asking for hardware that is not there is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested not in DEVICES:
        raise PipelineError(f"unknown device {requested!r}; valid choices: {', '.join(DEVICES)}")
    if requested == "cuda" and not cuda:
        raise PipelineError("device 'cuda' requested but torch sees no CUDA GPU; use auto or cpu")
    if requested == "mps" and not mps:
        raise PipelineError("device 'mps' requested but MPS is not available; use auto or cpu")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    """A human name for the device, e.g. 'NVIDIA H100 80GB HBM3'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"
