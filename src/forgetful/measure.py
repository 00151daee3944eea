"""Measuring wall time and peak memory of a piece of model work, on CUDA and on the CPU.

* Time: warm-up runs first, then the median of repeated runs; on CUDA between CUDA events (the
  work is asynchronous), on the CPU with ``perf_counter``.
* Memory: on CUDA, ``max_memory_allocated`` above what was allocated before (weights excluded);
  on the CPU, the peak of live tensor storage created by the work, tracked by a
  ``TorchDispatchMode`` with a finalizer per storage (exact for tensors that ops return; kernel
  scratch space is not seen).
* Agreement: :func:`gradient_cosine`, how closely a gradient points where a reference does.
"""

from __future__ import annotations

import math
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


#: Elements per slice when :func:`gradient_cosine` sums in float64 (a 1B model's LM head gradient
#: has 2.6e8: never a float64 copy of the whole).
COSINE_SLICE = 1 << 24


def gradient_cosine(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of ``got`` and ``ref`` (any shape, dtype, device; the same number of
    elements), summed in float64 slice by slice. Two zero tensors agree (1.0); a zero tensor and a
    non-zero one do not (0.0). Identical tensors give exactly 1.0; the value stays within [-1, 1]."""
    from .errors import ForgetfulError

    a, b = got.detach().reshape(-1), ref.detach().reshape(-1)
    if a.numel() != b.numel():
        raise ForgetfulError(f"gradient_cosine: {a.numel()} elements against a reference of {b.numel()}")
    b = b.to(a.device)
    dot = norm_a = norm_b = 0.0
    for s in range(0, a.numel(), COSINE_SLICE):
        x, y = a[s : s + COSINE_SLICE].double(), b[s : s + COSINE_SLICE].double()
        dot += float(x @ y)
        norm_a += float(x @ x)
        norm_b += float(y @ y)
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 if norm_a == norm_b else 0.0
    cosine = dot / math.sqrt(norm_a * norm_b)  # sqrt(x * x) == x exactly: identical tensors give 1.0
    return max(-1.0, min(1.0, cosine))  # rounding can step past +-1


def git_commit() -> str | None:
    """The commit the code runs from: ``$FORGETFUL_COMMIT`` (set it where the checkout has no .git,
    e.g. a copy on another machine), else ``git rev-parse HEAD`` beside the package, with
    ``-dirty`` when files differ from it; None when neither says."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("FORGETFUL_COMMIT"):
        return os.environ["FORGETFUL_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def run_environment(device: torch.device | str) -> dict:
    """Where a result was measured: date, versions, the device (GPU name or CPU), the git commit and
    the command line."""
    import datetime
    import platform
    import sys
    from pathlib import Path

    import accelerate
    import transformers

    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env
