"""Array backends: where an array comes from, and how to bring it back to NumPy.

Every function in attention_ref takes its array namespace from its inputs::

    xp = namespace(q, k, v)

and then calls only Array API standard functions on ``xp``. NumPy arrays give
NumPy arrays back, CuPy arrays give CuPy arrays, ``array_api_strict`` arrays give
``array_api_strict`` arrays, and torch tensors (through ``array_api_compat``)
give torch tensors. Plotting code converts with :func:`to_numpy`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeAlias, TypeVar

import array_api_compat
import numpy as np

__all__ = [
    "Array",
    "SMALL_PRODUCT",
    "available_backends",
    "blas_threads_for",
    "cpu_model",
    "cpu_workers",
    "device_of",
    "exp_inplace",
    "from_numpy",
    "is_out_of_memory",
    "limited_threads",
    "matmul_into",
    "namespace",
    "namespace_name",
    "overflow_unreported",
    "parallel_map",
    "thread_count",
    "to_numpy",
]

_OPTIONAL = ("array_api_strict", "torch", "cupy")

#: An array of any Array API backend (NumPy, CuPy, array_api_strict, torch). Python has no common
#: type for them, so this alias is ``Any`` to the type checker; in a signature it tells the reader
#: "an array", where ``Any`` would say "anything".
Array: TypeAlias = Any

T = TypeVar("T")
R = TypeVar("R")


def namespace(*arrays: Any) -> ModuleType:
    """The Array API namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises ``TypeError`` when the arrays come from different libraries, or when
    one of them is not an array at all (a list, a Python float).
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("expected at least one array, got none")
    for a in present:
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"expected an array, got {type(a).__name__}")
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as err:  # mixed libraries
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in present})
        raise TypeError(f"arrays come from different libraries: {kinds}") from err


def namespace_name(xp: ModuleType) -> str:
    """A short name for a namespace: "numpy", "array_api_strict", "torch", "cupy"."""
    name = xp.__name__
    for short in ("numpy", "array_api_strict", "torch", "cupy"):
        if short in name.split("."):
            return short
    return name


def available_backends() -> list[str]:
    """Names of the backends that can be used here, NumPy first.

    "cupy" is listed only when CuPy imports *and* sees a CUDA device.
    """
    names = ["numpy"]
    for name in _OPTIONAL:
        if importlib.util.find_spec(name) is None:
            continue
        if name == "cupy":
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() < 1:
                    continue
            except Exception:  # no driver, no device: not available
                continue
        names.append(name)
    return names


def device_of(x: Array) -> Any:
    """The device an array lives on (``"cpu"`` for NumPy)."""
    return array_api_compat.device(x)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of an array from any backend (or of anything NumPy reads, such as a PIL
    image), for plotting and printing."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if np.isscalar(x) or isinstance(x, (list, tuple)):
        return np.asarray(x)
    if not hasattr(x, "__dlpack__") and (hasattr(x, "__array__") or hasattr(x, "__array_interface__")):  # a PIL image
        return np.asarray(x)
    return np.from_dlpack(x)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says an allocation failed: NumPy's ``MemoryError``, torch's ``OutOfMemoryError``
    (CUDA) or the ``RuntimeError`` of its CPU allocator, CuPy's ``OutOfMemoryError``."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in message or "not enough memory" in message)


def from_numpy(a: Array, like: Array) -> Array:
    """``a`` (NumPy or a Python number) as an array of ``like``'s backend and device."""
    xp = namespace(like)
    return xp.asarray(np.asarray(a), device=device_of(like))


# ---------------------------------------------------------------- in-place helpers
#
# The Array API has in-place operators (``x -= m``, ``x *= p``, ``x /= s``) but no
# in-place functions: ``xp.exp(x)`` always allocates a new array. On the large
# N×N matrices of attention that allocation (and the page faults of touching
# fresh memory) costs as much as the exponential itself, so the one call that
# matters gets a helper: NumPy and CuPy write the result into ``x`` through their
# ``out=`` argument; every other namespace takes the standard call.


def exp_inplace(xp: ModuleType, x: Array) -> Array:
    """``exp(x)``, written over ``x`` where the backend allows it (NumPy, CuPy), else a new array.

    Use the return value, not ``x``: only NumPy and CuPy overwrite ``x``. Call it
    only on an array the caller owns (a temporary it created), never on an input.
    """
    if array_api_compat.is_numpy_array(x):
        return np.exp(x, out=x)
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy.exp(x, out=x)
    return xp.exp(x)


def matmul_into(xp: ModuleType, a: Array, b: Array, out: Array | None) -> Array:
    """``a @ b``, written into ``out`` where the backend allows it (NumPy, CuPy) and ``out`` is given.

    For a loop that forms a product of the same shape again and again (the tiles of the tiled path):
    written into one buffer, the product stays in the CPU's cache instead of landing in fresh memory
    each time. Use the return value; ``out`` must be the caller's own scratch array of the product's shape.
    """
    if out is not None and (array_api_compat.is_numpy_array(out) or array_api_compat.is_cupy_array(out)):
        return xp.matmul(a, b, out=out)
    return a @ b


def overflow_unreported() -> contextlib.AbstractContextManager[Any]:
    """A context in which NumPy does not warn of overflow (``inf``) and invalid results (``inf · 0 = NaN``).

    For code that checks its results for ``inf`` and NaN itself (the tiled path's shifted tiles). It
    covers NumPy and the backends built on it (array_api_strict); the others do not warn.
    """
    return np.errstate(over="ignore", invalid="ignore")


# ---------------------------------------------------------------- CPU threads
#
# NumPy releases the GIL inside its ufuncs and its BLAS calls, so independent
# tiles of work can run on several cores from plain Python threads. Two
# conditions make that pay: the arrays are NumPy's (CuPy already runs on a GPU,
# torch has its own threads), and each thread's BLAS call runs single-threaded —
# otherwise every thread's matrix product asks OpenBLAS for all cores at once
# and they fight over them. The BLAS limit comes from ``threadpoolctl`` (the
# ``fast`` extra); without it the work runs in the calling thread, in order.
#
# Small matrix products are the other way round: handing a product of a few
# hundred microseconds to a second BLAS thread costs more than it gives, and on a
# busy machine the hand-over waits for a core. :func:`blas_threads_for` runs them
# on one thread. Whole programs (the toys, ``figures``, ``bench``) take their
# thread count from :func:`limited_threads`.

_BLAS_CONTROLLER: Any = None
_HAS_THREADPOOLCTL: bool | None = None
_THREADS_OVERRIDE: int | None = None  # set by limited_threads

#: Matrix products with fewer multiply-adds than this run on one BLAS thread inside :func:`blas_threads_for`:
#: 2^24 is about 0.2 ms of float32 work on one core of the development machines (AMD EPYC, AVX-512).
SMALL_PRODUCT = 1 << 24


def _threadpoolctl_installed() -> bool:
    global _HAS_THREADPOOLCTL
    if _HAS_THREADPOOLCTL is None:
        _HAS_THREADPOOLCTL = importlib.util.find_spec("threadpoolctl") is not None
    return _HAS_THREADPOOLCTL


def cpu_workers(like: Array) -> int:
    """How many threads :func:`parallel_map` spreads work over for arrays like ``like``.

    1 unless ``like`` is a NumPy array and ``threadpoolctl`` is installed; then :func:`thread_count`.
    """
    if not array_api_compat.is_numpy_array(like) or not _threadpoolctl_installed():
        return 1
    return thread_count()


def thread_count() -> int:
    """The number of threads attention_ref runs on.

    Inside :func:`limited_threads`, its count; else ``ATTENTION_REF_NUM_THREADS`` when set, else the
    number of CPUs this process may use. ``ValueError`` naming the variable unless it is a positive integer.
    """
    if _THREADS_OVERRIDE is not None:
        return _THREADS_OVERRIDE
    env = os.environ.get("ATTENTION_REF_NUM_THREADS", "").strip()
    if env:
        try:
            count = int(env)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"ATTENTION_REF_NUM_THREADS must be a positive integer (or unset), got {env!r}")
        return count
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _blas_limit(threads: int) -> Any:
    """A context in which BLAS calls use at most ``threads`` threads (a ``threadpoolctl`` limit, restored on exit)."""
    global _BLAS_CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=threads, user_api="blas")


def _single_threaded_blas() -> Any:
    """A context in which BLAS calls use one thread each."""
    return _blas_limit(1)


@contextlib.contextmanager
def limited_threads(threads: int | None = None) -> Iterator[int]:
    """Run the body on ``threads`` threads: attention_ref's own (:func:`parallel_map`) and BLAS's.

    ``threads=None`` takes :func:`thread_count` (``ATTENTION_REF_NUM_THREADS``, else every usable CPU).
    Yields the count. The BLAS limit needs ``threadpoolctl`` (without it BLAS keeps its own setting);
    both limits are process-wide while the body runs, and restored afterwards.
    """
    global _THREADS_OVERRIDE
    count = thread_count() if threads is None else int(threads)
    if count < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    previous = _THREADS_OVERRIDE
    with _blas_limit(count) if _threadpoolctl_installed() else contextlib.nullcontext():
        _THREADS_OVERRIDE = count
        try:
            yield count
        finally:
            _THREADS_OVERRIDE = previous


def blas_threads_for(like: Array, multiply_adds: int) -> contextlib.AbstractContextManager[Any]:
    """A context for matrix products of at most ``multiply_adds`` each: one BLAS thread when that is
    below :data:`SMALL_PRODUCT` (NumPy with ``threadpoolctl``), BLAS's own setting otherwise."""
    if multiply_adds < SMALL_PRODUCT and array_api_compat.is_numpy_array(like) and _threadpoolctl_installed():
        return _single_threaded_blas()
    return contextlib.nullcontext()


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, like: Array) -> list[R]:
    """``[fn(item) for item in items]``, spread over :func:`cpu_workers` threads where that pays.

    Results come back in the order of ``items``. ``fn`` must not write to memory
    another item reads or writes: each call gets its own slices and returns its
    own results. With one worker, or one item, this is the plain list comprehension.
    """
    workers = min(cpu_workers(like), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with _single_threaded_blas(), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
