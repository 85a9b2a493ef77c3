"""What the benchmark scripts time with: the median of repeated calls after a warm-up call."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu"),
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` by ``clock``, after one warm-up call (index tables,
    kernel loading, the allocator); CUDA work is synchronised before and after each call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (clock() - start))
    return statistics.median(times)
