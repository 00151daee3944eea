"""Measuring wall time and peak memory of a piece of model work, on CUDA and on the CPU.

* Time: warm-up runs first, then the median of repeated runs; on CUDA between CUDA events (the
  work is asynchronous), on the CPU with ``perf_counter``.
* Memory: on CUDA, ``max_memory_allocated`` above what was allocated before (weights excluded);
  on the CPU, the peak of live tensor storage created by the work, tracked by a
  ``TorchDispatchMode`` with a finalizer per storage (exact for tensors that ops return; kernel
  scratch space is not seen).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorMemory(TorchDispatchMode):
    """Tracks bytes of live tensor storage created inside the block; ``peak`` is the maximum."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live:
                    nbytes = storage.nbytes()
                    self._live.add(key)
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Wall time of each of ``repeats`` runs of ``fn()`` in milliseconds, after ``warmup`` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return statistics.median(timings_ms(fn, device, warmup, repeats))


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> tuple[float, str]:
    """Peak memory of ``fn()`` above the memory in use before it, and how it was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda_max_allocated"
    tracker = LiveTensorMemory()
    with tracker:
        result = fn()
    del result
    return tracker.peak / 2**20, "cpu_live_tensors"
