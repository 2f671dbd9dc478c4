"""How `adrenaline profile` times a call and averages its samples."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: torch.device) -> float:
    """Milliseconds one call takes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1000


def typical(values: list[float]) -> float:
    """The mean, without samples over twice the median: a worker pays a step's usual spread
    (allocator, garbage collection, cache misses) on every step, so the lower end alone would
    be optimistic; a sample that long is another process's doing, which the simulator adds
    from its own count of them (--sim-cpu-competitors)."""
    median = statistics.median(values)
    kept = [v for v in values if v <= 2 * median]
    return sum(kept) / len(kept)
