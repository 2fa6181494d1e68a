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

Time, in two clocks: :func:`clock_pair` times one forward + backward in wall seconds
(``time.perf_counter``) and in this process's CPU seconds (``time.process_time``, which leaves out
the time other processes held the core). The benchmark (:mod:`.run`) keeps the wall times of each
run (:func:`time_pair`); the complexity sweep (:mod:`.complexity`) runs the pair again and again
(:func:`time_passes`), keeps the best of each clock and flags the runs that did not get a core to
themselves (:func:`summarise`), all on one thread (:func:`one_thread`). :func:`best_seconds` is the
best of several runs of one call (the machine's limits, :mod:`.limits`; the tiled path's parts,
:mod:`.breakdown`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import limited_threads

MiB = 2.0**20
MAX_RUNS = 50  # time_passes' runs of one pass at most
DISTURBED_SHARE = 0.8  # a process with less than this share of a core while timed was disturbed


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


Timings = dict[str, list[float]]  # "forward_wall", "backward_wall", "forward_cpu", "backward_cpu": one entry a run


def _no_sync() -> None:
    """NumPy's work is done when its call returns: nothing to wait for."""


def clock_pair(
    fwd: Callable[[], Any], bwd: Callable[[Any], Any], sync: Callable[[], None] = _no_sync
) -> dict[str, float]:
    """One run of ``state = fwd()`` and then ``bwd(state)``, each ended by ``sync()``: the wall seconds
    (``"forward_wall"``, ``"backward_wall"``) and this process's CPU seconds (``"forward_cpu"``, ``"backward_cpu"``)."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    state = fwd()
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    grads = bwd(state)
    sync()
    t2, c2 = time.perf_counter(), time.process_time()
    del state, grads
    return {"forward_wall": t1 - t0, "backward_wall": t2 - t1, "forward_cpu": c1 - c0, "backward_cpu": c2 - c1}


def time_pair(fwd: Callable[[], Any], bwd: Callable[[Any], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds taken by ``state = fwd()`` and then ``bwd(state)``, each ended by ``sync()`` (wall time)."""
    run = clock_pair(fwd, bwd, sync)
    return run["forward_wall"], run["backward_wall"]


def best_seconds(
    run: Callable[[], Any],
    repeats: int,
    *,
    sync: Callable[[], None] = _no_sync,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The least time of ``repeats`` runs of ``run()``, each ended by ``sync()``, after one run to warm up (page
    in, start the BLAS threads): wall seconds, or this process's CPU seconds with ``clock=time.process_time``."""
    run()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        run()
        sync()
        best = min(best, clock() - t0)
    return best


def time_passes(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: tuple[Any, ...],
    dout: Any,
    repeats: int,
    min_time: float,
    timings: Timings | None = None,
    *,
    max_runs: int = MAX_RUNS,
) -> Timings:
    """Time ``forward(*inputs) -> (out, cache)`` and ``backward(dout, cache)`` in CPU and wall seconds, run after run.

    Runs the pair at least ``repeats`` times, and again while these runs took less than ``min_time``
    seconds in all (at most ``max_runs``). Appends to ``timings`` when given (so that runs made
    at different moments add up) and returns it; :func:`summarise` turns it into the report's fields.
    """
    timings = timings if timings is not None else {}
    for key in ("forward_wall", "backward_wall", "forward_cpu", "backward_cpu"):
        timings.setdefault(key, [])

    def fwd() -> Any:
        return forward(*inputs)

    def bwd(state: Any) -> Any:
        _, cache = state
        return backward(dout, cache)

    runs, spent = 0, 0.0
    while runs < repeats or (spent < min_time and runs < max_runs):
        run = clock_pair(fwd, bwd)
        for key, seconds in run.items():
            timings[key].append(seconds)
        runs, spent = runs + 1, spent + run["forward_wall"] + run["backward_wall"]
    return timings


def summarise(timings: Timings) -> dict[str, Any]:
    """The report's time fields from :func:`time_passes`' runs: the best of each, and how disturbed they were.

    The minimum is the run least disturbed by everything else on the machine; CPU time
    (``time.process_time``) leaves out the time other processes held the core.
    ``cpu_share`` = total CPU time ÷ total wall time of the runs; ``disturbed`` when it is under
    :data:`DISTURBED_SHARE`.
    """
    wall = sum(timings["forward_wall"]) + sum(timings["backward_wall"])
    cpu = sum(timings["forward_cpu"]) + sum(timings["backward_cpu"])
    share = cpu / wall if wall > 0 else 1.0
    return {
        "forward_s": min(timings["forward_wall"]),
        "backward_s": min(timings["backward_wall"]),
        "forward_cpu_s": min(timings["forward_cpu"]),
        "backward_cpu_s": min(timings["backward_cpu"]),
        "runs": len(timings["forward_wall"]),
        "cpu_share": share,
        "disturbed": share < DISTURBED_SHARE,
    }


@contextlib.contextmanager
def one_thread() -> Iterator[bool]:
    """Everything on one thread inside: the library's and BLAS's (:func:`attention_ref.backend.limited_threads`).

    Yields whether BLAS could be limited (it can where ``threadpoolctl`` is installed).
    """
    with limited_threads(1):
        yield importlib.util.find_spec("threadpoolctl") is not None


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


def peak_memory_bytes(run: Callable[[], Any], method: str) -> int | None:
    """Peak memory in bytes allocated while ``run()`` executes (its results included), by ``method``
    (None where ``"rss"`` cannot be measured)."""
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
    return max(peak, 0)


def peak_memory_mib(run: Callable[[], Any], method: str) -> float | None:
    """:func:`peak_memory_bytes` in MiB."""
    peak = peak_memory_bytes(run, method)
    return None if peak is None else peak / MiB


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
