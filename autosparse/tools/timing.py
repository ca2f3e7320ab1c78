"""The one timing rule of the benchmark scripts and ``autosparse bench``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from autosparse.kernels.tuning import gpu_ms

__all__ = ["gpu_ms", "median_ms"]


def median_ms(fn: Callable[[], Any], reps: int, device: torch.device | str = "cuda", warmup: int = 2) -> float:
    """Median time of ``fn`` in ms after ``warmup`` calls: CUDA events around each call, then a
    synchronize (GPU time of the whole call, host gaps included, as a pipeline sees it); wall time on
    the CPU (smoke runs: exercises the code, the number means nothing)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)
