r"""Softmax along any axis, its backward, and logsumexp — all max-subtracted and mask-aware.

Forward, along ``axis``, over the entries that ``mask`` allows:

.. math::
    m = \max_j x_j, \qquad e_j = \exp(x_j - m), \qquad p_j = \frac{e_j}{\sum_k e_k}

Subtracting the row maximum ``m`` changes nothing mathematically (it cancels
between numerator and denominator) but keeps every ``exp`` argument ≤ 0, so
logits in the thousands cannot overflow. A masked entry gets ``p_j = 0``. A row
with no allowed entry (or whose allowed entries are all ``-inf``) gets all
zeros — not NaN — and no warning is raised on the way.

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

from .._checks import require_bool, require_broadcastable_to, require_floating
from ..backend import Array, namespace

__all__ = ["SoftmaxCache", "logsumexp", "safe_shift", "softmax_backward", "softmax_forward"]


@dataclass(frozen=True)
class SoftmaxCache:
    """What :func:`softmax_backward` needs: the probabilities and the axis."""

    weights: Array  # p, same shape as x
    axis: int


def safe_shift(xp: ModuleType, m: Array) -> Array:
    """The row maxima ``m`` made safe to subtract: ``-inf`` (nothing allowed in the row) becomes 0.

    ``exp(x - m)`` of a row whose entries are all ``-inf`` would be ``exp(-inf + inf) = NaN``;
    shifted by 0 it is ``exp(-inf) = 0``. A NaN maximum stays NaN and spreads over its row.
    """
    return xp.where(m == -xp.inf, 0.0, m)


def _masked(xp: ModuleType, x: Array, mask: Array | None) -> Array:
    """``x`` with ``-inf`` where ``mask`` is False (so those entries get ``exp = 0``); ``x`` itself without a mask."""
    if mask is None:
        return x
    require_bool(xp, "mask", mask)
    require_broadcastable_to("mask", tuple(mask.shape), tuple(x.shape))
    return xp.where(mask, x, -xp.inf)


def softmax_forward(x: Array, *, axis: int = -1, mask: Array | None = None) -> tuple[Array, SoftmaxCache]:
    """Softmax of ``x`` along ``axis``, with optional boolean ``mask`` (True = keep).

    Inputs:
        x: any shape, real floating.
        axis: the axis to normalise over.
        mask: boolean, broadcastable to ``x.shape``; masked entries get weight 0.

    Returns:
        p: same shape as ``x``; each slice along ``axis`` sums to 1, or to 0 when
           the whole slice is masked.
        cache: :class:`SoftmaxCache` (``cache.weights`` is ``p``).
    """
    xp = namespace(x)
    require_floating(xp, "x", x)
    x = _masked(xp, x, mask)
    # m = max_j x_j over the allowed entries, kept as a size-1 axis   (0 for a row with none)
    m = safe_shift(xp, xp.max(x, axis=axis, keepdims=True))
    # e_j = exp(x_j - m)
    e = xp.exp(x - m)
    # Σ_k e_k, kept as a size-1 axis so it broadcasts back over the row
    total = xp.sum(e, axis=axis, keepdims=True)
    # p_j = e_j / Σ_k e_k   (a fully masked row has Σ = 0 and e = 0: divide by 1 instead)
    p = e / xp.where(total == 0.0, 1.0, total)
    return p, SoftmaxCache(weights=p, axis=axis)


def softmax_backward(dout: Array, cache: SoftmaxCache) -> dict[str, Array]:
    """Gradient of the softmax: ``{"x": dx}``, ``dx`` the shape of ``x``.

    dx_j = p_j (dp_j − Σ_i p_i dp_i)
    """
    xp = namespace(dout)
    p = cache.weights
    # Σ_i p_i dp_i, one dot product per row, kept as a size-1 axis
    inner = xp.expand_dims(xp.vecdot(p, dout, axis=cache.axis), axis=cache.axis)
    # dx_j = p_j (dp_j - Σ_i p_i dp_i)
    return {"x": p * (dout - inner)}


def logsumexp(x: Array, *, axis: int = -1, mask: Array | None = None, keepdims: bool = False) -> Array:
    """``log Σ_j exp(x_j)`` along ``axis`` over allowed entries, computed as ``m + log Σ_j exp(x_j − m)``.

    A row with no allowed entry gives ``-inf`` (the log of an empty sum), without
    a warning. Shape: ``x.shape`` without ``axis`` (or with it as 1 when ``keepdims``).
    """
    xp = namespace(x)
    require_floating(xp, "x", x)
    x = _masked(xp, x, mask)
    # m = max_j x_j   (0 for a row with no allowed entry)
    m = safe_shift(xp, xp.max(x, axis=axis, keepdims=True))
    total = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    # log of an empty sum is -inf; take log(1) there and overwrite, so no divide-by-zero warning
    positive = total > 0.0
    lse = xp.where(positive, m + xp.log(xp.where(positive, total, 1.0)), -xp.inf)
    if not keepdims:
        lse = xp.squeeze(lse, axis=axis)
    return lse
