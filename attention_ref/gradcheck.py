r"""Gradient checking by central finite differences, in NumPy float64.

For a function ``f`` and an upstream gradient ``dout`` the scalar
``L(x) = ⟨f(x), dout⟩ = Σ f(x) · dout`` has gradient ``∂L/∂x = Jᵀ dout`` — exactly
what a backward pass returns. Perturbing one entry at a time,

.. math:: \frac{\partial L}{\partial x_i} \approx \frac{L(x + h e_i) - L(x - h e_i)}{2h},

with error ``O(h²)`` from truncation and ``O(ε·|L|/h)`` from rounding; ``h = 1e-6``
balances the two in float64, so a correct backward agrees to about 1e-8 relative
or better. Costs two evaluations of ``f`` per entry: use small inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .backend import Array, to_numpy

__all__ = ["check_backward", "numerical_gradient", "rel_error"]


def numerical_gradient(f: Callable[[np.ndarray], Array], x: np.ndarray, dout: Array, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of ``⟨f(x), dout⟩`` with respect to ``x``.

    Inputs:
        f: takes ``x`` (it is perturbed in place and restored) and returns an array.
        x: NumPy float64 array, any shape.
        dout: array of ``f(x)``'s shape.
        h: step.

    Returns:
        NumPy array of ``x``'s shape.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise TypeError(
            f"numerical_gradient needs a NumPy float64 array, got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    dout = to_numpy(dout)
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = float(np.sum(to_numpy(f(x)) * dout))
        x[i] = old - h
        minus = float(np.sum(to_numpy(f(x)) * dout))
        x[i] = old
        grad[i] = (plus - minus) / (2.0 * h)
    return grad


def rel_error(a: Array, b: Array, floor: float = 1e-300) -> float:
    """Normwise relative error ``max|a − b| / max(max|a|, max|b|)``.

    Scale-free, and unlike an entry-by-entry ratio it does not blow up on
    entries that are zero up to rounding. Two all-zero arrays give 0. Arrays
    from any backend are accepted; shapes must match.
    """
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes {a.shape} and {b.shape} differ")
    if a.size == 0:
        return 0.0
    diff = np.max(np.abs(a - b))
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), floor)
    return float(diff / scale)


def check_backward(
    forward: Callable[..., tuple[Array, Any]],
    backward: Callable[[Array, Any], Mapping[str, Array]],
    inputs: Mapping[str, np.ndarray],
    *,
    h: float = 1e-6,
    seed: int = 0,
) -> dict[str, float]:
    """Compare an analytic backward pass with finite differences, input by input.

    Inputs:
        forward: ``forward(**inputs) -> (out, cache)``; bind options with
            ``functools.partial``.
        backward: ``backward(dout, cache) -> {name: grad}``.
        inputs: the arrays to differentiate, NumPy float64, by keyword name.
        h: finite-difference step.
        seed: for the random ``dout``.

    Returns:
        ``{name: rel_error(analytic, numerical)}`` for every name in ``inputs``.
    """
    inputs = {name: np.array(value, dtype=np.float64) for name, value in inputs.items()}
    out, cache = forward(**inputs)
    dout = np.random.default_rng(seed).standard_normal(np.shape(to_numpy(out)))
    analytic = backward(dout, cache)
    errors = {}
    for name in inputs:
        if name not in analytic:
            raise KeyError(f"the backward pass returned no gradient for {name!r}; it returned {sorted(analytic)}")

        def f(x: np.ndarray, name: str = name) -> Array:
            return forward(**{**inputs, name: x})[0]

        numeric = numerical_gradient(f, inputs[name].copy(), dout, h)
        errors[name] = rel_error(analytic[name], numeric)
    return errors
