"""Input checks and broadcasting helpers shared by every layer.

Bad input gets a clear error that names the shapes or dtypes involved; nothing
is broadcast silently.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat

from .backend import Array, namespace

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


def array_namespace(**arrays: Any) -> ModuleType:
    """The namespace of the named ``arrays`` (``None`` entries skipped), as :func:`attention_ref.backend.namespace`.

    ``TypeError`` naming the argument for anything that is not an array (a list, a float, ``None`` where
    an array is required is the caller's check), and for arrays of different libraries.
    """
    for name, a in arrays.items():
        if a is not None and not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"{name} must be an array (NumPy, CuPy, torch or array_api_strict), got {type(a).__name__}")
    return namespace(*arrays.values())


def require_array(name: str, x: Any) -> None:
    """``TypeError`` naming ``name`` unless ``x`` is an array (``None`` included: the argument is required)."""
    if x is None or not array_api_compat.is_array_api_obj(x):
        raise TypeError(f"{name} must be an array (NumPy, CuPy, torch or array_api_strict), got {type(x).__name__}")


def require_floating_arrays(where: str, *, optional: Sequence[str] = (), **arrays: Any) -> ModuleType:
    """The namespace of ``arrays``, after the checks an op's forward starts with: each is an array (``TypeError``
    naming it; one named in ``optional`` may be ``None``), all of one library, each of a real floating dtype,
    all of one dtype (``where`` names the op in that message)."""
    for name, a in arrays.items():
        if name not in optional:
            require_array(name, a)
    xp = array_namespace(**arrays)
    for name, a in arrays.items():
        if a is not None:
            require_floating(xp, name, a)
    require_same_dtype(where, **arrays)
    return xp


def require_dout(
    dout: Any,
    shape: Sequence[int],
    dtype: Any,
    *,
    where: str = "",
    name: str = "dout",
    like: Array | None = None,
) -> ModuleType:
    """Check a backward's upstream gradient as the forwards check their inputs; return its namespace.

    The one check of every backward's ``dout``: it must be an array (``TypeError``) of exactly the forward
    output's ``shape`` (``ValueError``, no broadcasting) and ``dtype`` (``TypeError``: an integer ``dout``
    would give integer gradients, a float64 one float64 gradients for a float32 forward, without a word).
    ``dtype=None`` (a cache made without one) asks only for a real floating dtype. ``like``, an array of the
    forward, asks for its library too (``TypeError``). ``where`` prefixes the messages ("softmax: ..."),
    ``name`` is what the backward calls its gradient (``dy``, ``dh_out``).
    """
    prefix = f"{where}: " if where else ""
    require_array(f"{prefix}{name}", dout)
    xp = namespace(dout)
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"{prefix}{name} of shape {tuple(dout.shape)} does not match the output shape {tuple(shape)}")
    if dtype is None:
        require_floating(xp, f"{prefix}{name}", dout)
    elif dout.dtype != dtype:
        raise TypeError(
            f"{prefix}{name} has dtype {dtype_name(dout.dtype)}, but the forward ran in {dtype_name(dtype)}: "
            f"cast {name} to it"
        )
    return xp if like is None else namespace(dout, like)


def check_cache(cache: Any, expected: type, backward: str) -> None:
    """``TypeError`` unless ``cache`` is an ``expected`` made for ``backward``; the message names the backward
    that takes it.

    Every cache class names the backwards that take it, in its ``backward_names`` (a class attribute; a
    property where one class serves two forwards, as the map blocks' cache does), so a cache from another
    forward is named, not only refused.
    """
    if isinstance(cache, expected) and backward in backward_names(cache):
        return
    got, matching = type(cache).__name__, backward_names(cache)
    hint = f"; it belongs to {' or '.join(matching)}" if matching else ""
    raise TypeError(f"{backward} needs the {expected.__name__} its forward returned, got a {got}{hint}")


def backward_names(cache: Any) -> tuple[str, ...]:
    """The backwards that take ``cache`` (its ``backward_names``); ``()`` for anything that is no cache of ours."""
    names = getattr(cache, "backward_names", ())
    return tuple(names) if isinstance(names, tuple) and all(isinstance(n, str) for n in names) else ()


def require_divisible(
    count: int, parts: int, what: str, unit: str, *, where: str = "", whose: str = "", hint: str = ""
) -> None:
    """``ValueError`` unless ``count`` ``what`` split evenly into ``parts`` ``unit``: "12 channels are not
    divisible into 5 heads", the one message of every head and group split. ``where`` prefixes it, ``whose``
    comes before the count ("the context's "), ``hint`` ends it ("; give head_dim")."""
    if count % parts:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{whose}{count} {what} are not divisible into {parts} {unit}{hint}")


# ---------------------------------------------------------------- options: axes, sizes, epsilons


def check_axis(axis: Any, x: Array, name: str = "axis") -> int:
    """``axis`` as an int in ``[-x.ndim, x.ndim)``: ``TypeError`` for anything but an int (a bool, a float,
    ``None``, a tuple), ``ValueError`` naming the shape when it is out of range (every axis of a 0-d ``x``)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int (one axis), got {type(axis).__name__} {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name} {axis} is out of range for x of shape {tuple(x.shape)} ({x.ndim} dimensions)")
    return int(axis)


def check_positive_int(name: str, value: Any, where: str = "") -> int:
    """``value`` as an int ≥ 1: ``TypeError`` for a bool, a float (``2.0``), ``None`` or a string,
    ``ValueError`` for 0 or less. NumPy integers count."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{prefix}{name} must be at least 1, got {value}")
    return int(value)


def check_real(
    name: str, value: Any, where: str = "", *, minimum: float | None = None, nonzero: bool = False
) -> float:
    """``value`` as a finite float: ``TypeError`` for anything but a real number (a bool, a string,
    ``None``, an array), ``ValueError`` for ``inf`` or NaN, below ``minimum``, or 0 when ``nonzero``.
    Any real scalar counts: ``1e-5``, ``1``, ``numpy.float32(0.5)``."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{prefix}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{prefix}{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{prefix}{name} must be at least {minimum}, got {value}")
    if nonzero and value == 0.0:
        raise ValueError(f"{prefix}{name} must not be 0 (the output is divided by it)")
    return value


def check_eps(name: str, value: Any, where: str = "") -> float:
    """A norm's epsilon: a finite real ≥ 0 (``-1`` or NaN would make every output NaN)."""
    return check_real(name, value, where, minimum=0.0)


def require_finite(xp: ModuleType, name: str, x: Array, where: str = "") -> None:
    """``ValueError`` when ``x`` has an infinite entry (NaN is allowed: it propagates)."""
    if bool(xp.any(xp.isinf(x))):
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}{name} has an infinite entry; it must be finite (NaN is allowed: it propagates). "
            "An infinite input has no attention output: its norm or its logits are inf - inf"
        )


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
    """The NumPy broadcast of two shapes, or ``ValueError`` naming both.

    NumPy's rule, axis by axis from the right: equal sizes stay; a size of 1 takes the other's size,
    0 included (``(1, 4)`` and ``(0, 4)`` give ``(0, 4)``); any other pair is an error.
    """
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == 1:
            out.append(db)
        elif db == 1 or da == db:
            out.append(da)
        else:
            raise ValueError(f"shapes {a} and {b} cannot be broadcast together")
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
