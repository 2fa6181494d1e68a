"""The precisions the oracle checks in: names, NumPy dtypes, resolution, rounding.

``float16`` and ``float32``/``float64`` are NumPy's own; ``bfloat16`` comes from
``ml_dtypes`` (imported only when it is asked for). Every function takes the
dtype's *name*, so callers never need ml_dtypes themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DTYPES", "dtype_name", "eps", "half_spacing", "numpy_dtype", "round_to"]

DTYPES = ("float16", "bfloat16", "float32", "float64")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype called ``name`` (one of :data:`DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as err:  # pragma: no cover - ml_dtypes ships with the test extra
            raise ImportError("bfloat16 needs the ml_dtypes package: pip install ml_dtypes") from err
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype: Any) -> str:
    """The name (one of :data:`DTYPES`) of ``dtype``: a name, a NumPy dtype or scalar type (``np.float16``,
    ``np.dtype("float32")``, ml_dtypes' ``bfloat16``) or a torch dtype (``torch.bfloat16``).

    ``ValueError`` naming the valid dtypes for anything else.
    """
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    elif type(dtype).__module__.startswith("torch"):  # torch.float16 is a torch.dtype; str() gives "torch.float16"
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (a name, a NumPy or a torch dtype); got {dtype!r}")
    return name


def eps(name: str) -> float:
    """Machine epsilon of ``name``: the spacing of the dtype's numbers just above 1.

    float16 2⁻¹⁰ ≈ 9.8e-4, bfloat16 2⁻⁷ ≈ 7.8e-3, float32 2⁻²³ ≈ 1.2e-7, float64 2⁻⁵² ≈ 2.2e-16.
    A number ``x`` rounded to the dtype moves by at most ``eps·|x|/2``.
    """
    bits = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}
    numpy_dtype(name)  # validates the name
    return 2.0 ** -bits[name]


def half_spacing(x: Any, name: str) -> np.ndarray:
    """Half the spacing of dtype ``name``'s numbers just above ``|x|``, per entry (float64): the most by which
    rounding to nearest can have moved a value that came out as ``x``.

    A value ``y`` rounded to the nearest number ``x`` of the dtype lies within half a spacing of ``x``; where ``x``
    is a power of two, ``y`` may also lie below it, where the spacing is half as large, so the spacing *above*
    ``|x|`` bounds both sides. Below the smallest normal number the spacing is that of the subnormals.
    """
    x = np.abs(np.asarray(x, dtype=np.float64))
    smallest_normal = 2.0 ** (2 - 2 ** (_EXPONENT_BITS[name] - 1))  # float16 2⁻¹⁴, bfloat16 and float32 2⁻¹²⁶
    _, exponent = np.frexp(x)  # x = f·2^e, 1/2 ≤ f < 1: the binade of x starts at 2^(e−1)
    binade = np.where(x >= smallest_normal, np.ldexp(1.0, exponent - 1), smallest_normal)
    return binade * eps(name) / 2


_EXPONENT_BITS = {"float16": 5, "bfloat16": 8, "float32": 8, "float64": 11}


def round_to(x: Any, name: str, what: str = "an array") -> np.ndarray | None:
    """``x`` (NumPy, any float dtype) rounded to the nearest number of dtype ``name``; ``None`` stays ``None``.

    ``ValueError`` naming ``what`` when a finite value is too large for the dtype (it would become ``inf``).
    """
    if x is None:
        return None
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        rounded = x.astype(numpy_dtype(name))
    overflow = np.isinf(rounded.astype(np.float64)) & np.isfinite(x)
    if np.any(overflow):
        big = float(np.max(np.abs(x[overflow])))
        raise ValueError(f"{what} does not fit in {name}: {big:.3g} rounds to inf")
    return rounded
