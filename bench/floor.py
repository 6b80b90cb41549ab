"""The compute floor: FLOPs one training sample costs, over what this CPU can multiply."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def flops_per_sample(model: nn.Module, batch: int = 128, forward=None) -> float:
    """Forward + backward FLOPs of one sample, counted by torch from the ops that run.

    `forward` replaces the model's own forward (e.g. the project's collapsed one); batch-
    independent work is spread over the batch.
    """
    x = torch.zeros(batch, 1, 28, 28)
    y = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy((forward or model)(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_flops_per_second(n: int = 1024, repeats: int = 20) -> float:
    """The best of `repeats` n x n float32 matrix products: a peak this core really reaches."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
