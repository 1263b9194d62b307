"""Timing a piece of device work: CUDA events around each call on the GPU, the host clock on the CPU."""

from __future__ import annotations

import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # device work is asynchronous: the events bracket it, not the launch
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    return times
