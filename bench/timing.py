"""Honest timing shared by the benchmarks: warm up, synchronise, time every run (or take their median)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def times_ms(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, iters: int = 7) -> list[float]:
    """Wall time of each of `iters` calls of fn() in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, iters: int = 7) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    return statistics.median(times_ms(fn, device, warmup, iters))


def read_bandwidth_gbs(device: str = "cpu", mib: int = 512) -> float:
    """Achievable read bandwidth: a large sum reads every byte once (the roofline's denominator)."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    ms = median_ms(lambda: x.sum(), device, warmup=2, iters=5)
    return x.numel() * 4 / (ms * 1e-3) / 1e9
