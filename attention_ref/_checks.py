"""Input checks and broadcasting helpers shared by every layer.

Bad input gets a clear error that names the shapes or dtypes involved; nothing
is broadcast silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .backend import Array

Shape = tuple[int, ...]


#: The dtypes every layer takes (float16 only where the backend has it; array_api_strict has not).
FLOAT_DTYPES = ("float16", "float32", "float64")


def _is(xp: ModuleType, dtype: Any, name: str) -> bool:
    """Whether ``dtype`` is the namespace's dtype ``name`` (False when the namespace has no such dtype)."""
    return hasattr(xp, name) and dtype == getattr(xp, name)


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for NumPy's, torch's (``torch.float32``) or array_api_strict's float32 alike."""
    return str(dtype).rsplit(".", 1)[-1]


def require_floating(xp: ModuleType, name: str, x: Array) -> None:
    """``TypeError`` unless ``x`` is float16, float32 or float64 (not bfloat16, not an integer or bool)."""
    if not any(_is(xp, x.dtype, supported) for supported in FLOAT_DTYPES):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, float32 or float64), got {dtype_name(x.dtype)}"
        )


def require_dout_shape(where: str, dout: Array, shape: Sequence[int]) -> None:
    """``ValueError`` unless ``dout`` has exactly the forward output's ``shape`` (no broadcasting)."""
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"{where}: dout of shape {tuple(dout.shape)} does not match the output shape {tuple(shape)}")


def require_same_dtype(where: str, **arrays: Array | None) -> None:
    """``TypeError`` unless every given array has one dtype (no silent promotion)."""
    given = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name} {dtype_name(dtype)}" for name, dtype in given.items())
        raise TypeError(f"{where}: the inputs must share one dtype, got {listed}")


def require_bool(xp: ModuleType, name: str, x: Array) -> None:
    """``TypeError`` unless ``x`` is a boolean array."""
    if not _is(xp, x.dtype, "bool"):
        raise TypeError(f"{name} must be a boolean array (True = may attend), got dtype {x.dtype}")


def working_dtype(xp: ModuleType, dtype: Any) -> Any:
    """The dtype a layer computes in for inputs of ``dtype``: float32 for float16, else ``dtype`` itself.

    Half precision has 11 significant bits and overflows at 65,504: a sum of squares or of
    exponentials in float16 loses most of its digits or becomes ``inf``. So, as torch does on the
    CPU, softmax and the norms compute in float32 and round their results back to float16.
    """
    return xp.float32 if _is(xp, dtype, "float16") else dtype


def as_dtype(xp: ModuleType, x: Array, dtype: Any) -> Array:
    """``x`` in ``dtype``: ``x`` itself when it has that dtype already, else a converted copy."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def in_working_dtype(xp: ModuleType, *arrays: Array | None) -> list[Array | None]:
    """Each array in its :func:`working_dtype` (float16 → float32, others as they are); ``None`` stays ``None``."""
    return [None if a is None else as_dtype(xp, a, working_dtype(xp, a.dtype)) for a in arrays]


def require_ndim(name: str, x: Array, ndim: int | Sequence[int]) -> None:
    """``ValueError`` unless ``x.ndim`` is ``ndim`` (or one of them)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")


def broadcast_shape(a: Shape, b: Shape) -> Shape:
    """The NumPy broadcast of two shapes, or ``ValueError`` naming both."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da != db and 1 not in (da, db):
            raise ValueError(f"shapes {a} and {b} cannot be broadcast together")
        out.append(max(da, db) if 1 in (da, db) else da)
    return tuple(reversed(out))


def require_broadcastable_to(name: str, shape: Shape, target: Shape) -> None:
    """``ValueError`` unless an array of ``shape`` broadcasts *to* ``target`` exactly.

    "Exactly" means the broadcast result is ``target`` itself: ``shape`` may not
    have more dimensions than ``target`` nor grow any of its axes.
    """
    try:
        ok = len(shape) <= len(target) and broadcast_shape(shape, target) == tuple(target)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(shape)} does not broadcast to {tuple(target)}")


def sum_to_shape(xp: ModuleType, g: Array, shape: Shape) -> Array:
    """Sum ``g`` over the axes that broadcasting added or stretched, back to ``shape``.

    This is the backward of ``broadcast_to(x, g.shape)`` for an ``x`` of ``shape``.
    """
    shape = tuple(shape)
    lead = g.ndim - len(shape)
    if lead > 0:
        g = xp.sum(g, axis=tuple(range(lead)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = xp.sum(g, axis=stretched, keepdims=True)
    return g


def common_float_dtype(xp: ModuleType, *arrays: Array) -> Any:
    """The promoted floating dtype of ``arrays`` (all must be floating)."""
    return xp.result_type(*[a.dtype for a in arrays])


def require_dout(where: str, dout: Array, shape: Sequence[int], dtype: Any) -> None:
    """``ValueError`` unless ``dout`` has the forward output's ``shape``; ``TypeError`` unless its ``dtype``.

    A float64 ``dout`` for a float32 forward would otherwise give float64 gradients without a word, and a
    ``dout`` that broadcasts would give gradients of the wrong size.
    """
    if not hasattr(dout, "shape") or not hasattr(dout, "dtype"):
        raise TypeError(f"{where}: dout must be an array, got {type(dout).__name__}")
    require_dout_shape(where, dout, shape)
    if dout.dtype != dtype:
        raise TypeError(
            f"{where}: dout has dtype {dtype_name(dout.dtype)}, but the forward ran in {dtype_name(dtype)}: "
            "cast dout to it"
        )
