"""Where the benchmark runs and how it measures: wall time with device sync, and peak memory.

A :class:`Device` wraps the array library the benchmark feeds (NumPy on the CPU,
CuPy on a GPU): it converts NumPy inputs, waits for queued work before a clock
is read, and measures the peak memory of one run.

Peak memory, by what can see the allocations:

* ``"tracemalloc"`` — NumPy reports every array buffer to :mod:`tracemalloc`, so
  this is the exact peak of bytes allocated during the run (the measure the
  memory bound of the tiled path is stated in).
* ``"rss"`` — torch's CPU allocations are invisible to tracemalloc; for them the
  Linux resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above the resident size at the start, after the C
  heap has given its free pages back (``malloc_trim``), so that memory reused
  from earlier runs counts again.
* ``"cuda"`` — torch on a GPU: ``torch.cuda.max_memory_allocated`` above the start.
* ``"cupy-pool"`` — CuPy: growth of its default memory pool, emptied before the
  run (an upper bound on the peak: the pool only grows when a block is missing).
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

MiB = 2.0**20


@dataclass
class Device:
    """The array library the benchmark runs ours and the GEMM bound on: "numpy" (CPU) or "cupy" (GPU)."""

    name: str  # "numpy" or "cupy"
    xp: ModuleType

    @classmethod
    def create(cls, name: str) -> Device:
        if name == "numpy":
            return cls("numpy", np)
        if name == "cupy":
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("CuPy sees no CUDA device")
            return cls("cupy", cupy)
        raise ValueError(f"unknown backend {name!r}; expected 'numpy' or 'cupy'")

    @property
    def torch_device(self) -> str:
        """Where the torch peer runs: the same kind of device as ours."""
        return "cuda" if self.name == "cupy" else "cpu"

    def asarray(self, a: np.ndarray) -> Any:
        return a if self.name == "numpy" else self.xp.asarray(a)

    def sync(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()

    @property
    def memory_method(self) -> str:
        return "tracemalloc" if self.name == "numpy" else "cupy-pool"


def time_pair(fwd: Callable[[], Any], bwd: Callable[[Any], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds taken by ``state = fwd()`` and then ``bwd(state)``, each ended by ``sync()``."""
    sync()
    t0 = time.perf_counter()
    state = fwd()
    sync()
    t1 = time.perf_counter()
    grads = bwd(state)
    sync()
    t2 = time.perf_counter()
    del state, grads
    return t1 - t0, t2 - t1


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def rss_available() -> bool:
    """Whether the Linux peak-RSS reset (``/proc/self/clear_refs``) works here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
    except OSError:
        return False
    return True


def _give_back_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; nothing elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> bool:
    """Keep memory this process frees for its own reuse, instead of handing it back to the OS at once.

    glibc serves large blocks (above 32 MiB at most) with ``mmap`` and unmaps them when they are freed. On a
    virtual machine with free-page reporting (the development machines: ``virtio_balloon``) the host takes
    such pages back within seconds, and touching them again costs about a second per GiB: a run that
    allocates ``N×N`` matrices after a pause would pay that, one that tiles would not, and the times would
    measure the host rather than the arithmetic. With ``mmap`` off and the heap never trimmed, every run
    reuses the same pages (each implementation alike, torch's CPU allocator included). Returns whether
    glibc took the settings (``False`` elsewhere: nothing changed).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def peak_memory_mib(run: Callable[[], Any], method: str) -> float | None:
    """Peak memory in MiB allocated while ``run()`` executes (its results included), by ``method``."""
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            result = run()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    elif method == "rss":
        if not rss_available():
            return None
        _give_back_free_memory()  # so that reusing freed memory faults pages in, and shows in the RSS again
        rss_available()  # reset the high-water mark to the trimmed RSS
        base = _proc_status_kib("VmRSS")  # clear_refs above reset VmHWM to the current RSS
        result = run()
        peak = (_proc_status_kib("VmHWM") - base) * 1024
    elif method == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    elif method == "cupy-pool":
        import cupy

        pool = cupy.get_default_memory_pool()
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        base = pool.total_bytes()
        result = run()
        cupy.cuda.Device().synchronize()
        peak = pool.total_bytes() - base
    else:
        raise ValueError(f"unknown memory method {method!r}")
    del result
    return max(peak, 0) / MiB


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class OtherLoad:
    """The share of the machine's CPU time that *other* processes used between :meth:`start` and :meth:`stop`.

    Linux only (``/proc/stat`` and ``/proc/self/stat``); ``None`` elsewhere. 0 means
    the benchmark had the machine to itself; 0.5 on 2 cores means one core was
    busy with something else, and the times are not to be trusted.
    """

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        mine = int(own[11]) + int(own[12])  # utime + stime of every thread of this process
        return total, total - idle, mine

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        total, busy, mine = (e - s for e, s in zip(end, self._start, strict=True))
        return max(0.0, (busy - mine) / total)
