"""Array backends: where an array comes from, and how to bring it back to NumPy.

Every function in attention_ref takes its array namespace from its inputs::

    xp = namespace(q, k, v)

and then calls only Array API standard functions on ``xp``. NumPy arrays give
NumPy arrays back, CuPy arrays give CuPy arrays, ``array_api_strict`` arrays give
``array_api_strict`` arrays, and torch tensors (through ``array_api_compat``)
give torch tensors. Plotting code converts with :func:`to_numpy`.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "available_backends",
    "device_of",
    "exp_inplace",
    "from_numpy",
    "namespace",
    "namespace_name",
    "to_numpy",
]

_OPTIONAL = ("array_api_strict", "torch", "cupy")


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


def device_of(x: Any) -> Any:
    """The device an array lives on (``"cpu"`` for NumPy)."""
    return array_api_compat.device(x)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of an array from any backend, for plotting and printing."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if np.isscalar(x) or isinstance(x, (list, tuple)):
        return np.asarray(x)
    return np.from_dlpack(x)


def from_numpy(a: Any, like: Any) -> Any:
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


def exp_inplace(xp: ModuleType, x: Any) -> Any:
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
