"""Clocks and peaks for the bench sections: median step times, peak memory, matmul peak.

Times are medians of repeated runs after untimed warm-up ones, synchronised on CUDA; peak
memory is CUDA's peak allocated or, on a CPU, the process's peak resident set size (VmHWM, reset
through ``/proc/self/clear_refs`` on Linux); the peak a section's FLOP/s is compared with is the
best achieved fp32 ``n x n`` matmul rate, measured on the same device in the same run.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA stats; CPU: Linux ``clear_refs`` resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logger.debug("cannot reset the peak RSS; it covers the whole process")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: peak resident set size (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(n: int, device: torch.device, repeats: int = 10) -> float:
    """Best achieved fp32 FLOP/s of ``n x n @ n x n`` matmuls on ``device`` (2 n^3 each)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
