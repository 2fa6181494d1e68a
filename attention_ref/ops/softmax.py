r"""Softmax along any axis, its backward, and logsumexp — all max-subtracted and mask-aware.

Forward, along ``axis``, over the entries that ``mask`` allows:

.. math::
    m = \max_j x_j, \qquad e_j = \exp(x_j - m), \qquad p_j = \frac{e_j}{\sum_k e_k}

Subtracting the row maximum ``m`` changes nothing mathematically (it cancels
between numerator and denominator) but keeps every ``exp`` argument ≤ 0, so
logits in the thousands cannot overflow.

Rows without a softmax, and NaN:

* a masked entry (``mask`` False) gets ``p_j = 0``, whatever its value (NaN included);
* a row with no allowed entry — all masked, all ``-inf``, or an empty axis — gets all zeros, not NaN,
  and its logsumexp is ``-inf`` (the log of an empty sum);
* a NaN in an allowed entry makes its whole row NaN (and its logsumexp NaN);
* a ``+inf`` in an allowed entry makes its row NaN (``∞/∞`` has no value; its logsumexp is ``+inf``).

None of these raises a warning. float16 input is computed in float32 and the result rounded to
float16, as torch does (:func:`attention_ref._checks.working_dtype`).

Backward. With ``p = softmax(x)`` the Jacobian is ``∂p_i/∂x_j = p_i (δ_ij − p_j)``,
so for an upstream gradient ``dp``

.. math::
    dx_j = \sum_i dp_i \, p_i (\delta_{ij} - p_j) = p_j \Big(dp_j - \sum_i p_i\, dp_i\Big).

Masked entries have ``p_j = 0`` and hence ``dx_j = 0``; fully masked rows get
zeros throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

from .._checks import (
    array_namespace,
    as_dtype,
    check_axis,
    check_cache,
    require_array,
    require_bool,
    require_broadcastable_to,
    require_dout,
    require_floating,
    working_dtype,
)
from ..backend import Array, device_of

__all__ = ["SoftmaxCache", "logsumexp", "safe_shift", "softmax_backward", "softmax_forward", "stable_shift"]


@dataclass(frozen=True)
class SoftmaxCache:
    """What :func:`softmax_backward` needs: the probabilities and the axis."""

    backward_names: ClassVar[tuple[str, ...]] = ("softmax_backward",)  # the backward that takes it

    weights: Array  # p, same shape as x
    axis: int


def safe_shift(xp: ModuleType, m: Array) -> Array:
    """Row maxima ``m`` made safe to subtract from their rows.

    ``-inf`` (nothing allowed in the row) becomes 0, so that ``exp(-inf - 0) = 0`` rather than
    ``exp(-inf + inf) = NaN``. ``+inf`` (a ``+inf`` logit) becomes NaN: the row's softmax has no
    value, and ``x - NaN`` is NaN without the warning ``inf - inf`` raises. NaN stays NaN.
    """
    m = xp.where(m == -xp.inf, 0.0, m)
    return xp.where(m == xp.inf, xp.nan, m)


def _row_max(xp: ModuleType, x: Array, axis: int) -> Array:
    """``max_j x_j`` along ``axis``, kept as a size-1 axis; ``-inf`` (the max of nothing) for an empty axis."""
    if x.shape[axis] == 0:
        shape = tuple(1 if i == axis % x.ndim else n for i, n in enumerate(x.shape))
        return xp.full(shape, -xp.inf, dtype=x.dtype, device=device_of(x))
    return xp.max(x, axis=axis, keepdims=True)


def stable_shift(xp: ModuleType, x: Array, axis: int) -> Array:
    """The ``m`` to subtract before ``exp``: the row maximum along ``axis``, made safe (:func:`safe_shift`)."""
    return safe_shift(xp, _row_max(xp, x, axis))


def _masked(xp: ModuleType, x: Array, mask: Array | None) -> Array:
    """``x`` with ``-inf`` where ``mask`` is False (so those entries get ``exp = 0``); ``x`` itself without a mask."""
    if mask is None:
        return x
    require_bool(xp, "mask", mask)
    require_broadcastable_to("mask", tuple(mask.shape), tuple(x.shape))
    return xp.where(mask, x, -xp.inf)


def _check_x(x: Array, mask: Array | None) -> ModuleType:
    """The namespace of ``x`` (and ``mask``); ``TypeError`` unless ``x`` is a floating array."""
    require_array("x", x)
    xp = array_namespace(x=x, mask=mask)
    require_floating(xp, "x", x)
    return xp


def softmax_forward(x: Array, *, axis: int = -1, mask: Array | None = None) -> tuple[Array, SoftmaxCache]:
    """Softmax of ``x`` along ``axis``, with optional boolean ``mask`` (True = keep).

    Inputs:
        x: any shape with at least one axis, float16, float32 or float64.
        axis: the axis to normalise over, an int in ``[-x.ndim, x.ndim)``.
        mask: boolean, broadcastable to ``x.shape``; masked entries get weight 0.

    Returns:
        p: same shape and dtype as ``x``; each slice along ``axis`` sums to 1, or to 0 when
           the whole slice is masked.
        cache: :class:`SoftmaxCache` (``cache.weights`` is ``p``).

    Raises:
        TypeError for a non-array, another dtype or a non-boolean mask, an ``axis`` that is not an int;
        ValueError for an ``axis`` out of range (every axis of a 0-d ``x``) or a mask that does not broadcast.
    """
    xp = _check_x(x, mask)
    axis = check_axis(axis, x)
    dtype = x.dtype
    x = _masked(xp, as_dtype(xp, x, working_dtype(xp, dtype)), mask)
    # m = max_j x_j over the allowed entries, kept as a size-1 axis   (0 for a row with none)
    m = stable_shift(xp, x, axis)
    # e_j = exp(x_j - m)
    e = xp.exp(x - m)
    # Σ_k e_k, kept as a size-1 axis so it broadcasts back over the row
    total = xp.sum(e, axis=axis, keepdims=True)
    # p_j = e_j / Σ_k e_k   (a fully masked row has Σ = 0 and e = 0: divide by 1 instead)
    p = as_dtype(xp, e / xp.where(total == 0.0, 1.0, total), dtype)
    return p, SoftmaxCache(weights=p, axis=axis)


def softmax_backward(dout: Array, cache: SoftmaxCache) -> dict[str, Array]:
    """Gradient of the softmax: ``{"x": dx}``, ``dx`` the shape and dtype of ``dout``.

    dx_j = p_j (dp_j − Σ_i p_i dp_i)
    """
    check_cache(cache, SoftmaxCache, "softmax_backward")
    xp = require_dout(dout, cache.weights.shape, cache.weights.dtype, where="softmax")
    work = working_dtype(xp, dout.dtype)
    p, dp = as_dtype(xp, cache.weights, work), as_dtype(xp, dout, work)
    # Σ_i p_i dp_i, one dot product per row, kept as a size-1 axis
    inner = xp.expand_dims(xp.vecdot(p, dp, axis=cache.axis), axis=cache.axis)
    # dx_j = p_j (dp_j - Σ_i p_i dp_i)
    return {"x": as_dtype(xp, p * (dp - inner), dout.dtype)}


def logsumexp(x: Array, *, axis: int = -1, mask: Array | None = None, keepdims: bool = False) -> Array:
    """``log Σ_j exp(x_j)`` along ``axis`` over allowed entries, computed as ``m + log Σ_j exp(x_j − m)``.

    A row with no allowed entry gives ``-inf`` (the log of an empty sum), a row with a NaN gives NaN,
    a row with ``+inf`` (and no NaN) gives ``+inf``; none raises a warning. float16 is computed in
    float32 and rounded back. Shape: ``x.shape`` without ``axis`` (or with it as 1 when ``keepdims``).
    Errors as :func:`softmax_forward`'s.
    """
    xp = _check_x(x, mask)
    axis = check_axis(axis, x)
    if not isinstance(keepdims, bool):
        raise TypeError(f"keepdims must be a bool, got {type(keepdims).__name__}")
    dtype = x.dtype
    x = _masked(xp, as_dtype(xp, x, working_dtype(xp, dtype)), mask)
    # m = max_j x_j   (0 for a row with no allowed entry, NaN for a row with +inf)
    top = _row_max(xp, x, axis)
    m = safe_shift(xp, top)
    total = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    # log of an empty sum is -inf; take log(1) there and overwrite, so no divide-by-zero warning
    empty = total == 0.0
    lse = xp.where(empty, -xp.inf, m + xp.log(xp.where(empty, 1.0, total)))
    # log Σ exp of a row with +inf is +inf (m is NaN there); a NaN anywhere in the row keeps it NaN
    lse = as_dtype(xp, xp.where(top == xp.inf, xp.inf, lse), dtype)
    if not keepdims:
        lse = xp.squeeze(lse, axis=axis)
    return lse
