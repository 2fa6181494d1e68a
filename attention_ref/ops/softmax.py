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
from typing import Any

from .._checks import require_bool, require_broadcastable_to, require_floating
from ..backend import exp_inplace, namespace

__all__ = ["SoftmaxCache", "logsumexp", "softmax_backward", "softmax_forward", "softmax_overwriting"]


@dataclass(frozen=True)
class SoftmaxCache:
    """What :func:`softmax_backward` needs: the probabilities and the axis."""

    weights: Any  # p, same shape as x
    axis: int


def _shifted_exp(xp: ModuleType, x: Any, axis: int, mask: Any | None, *, overwrite: bool) -> tuple[Any, Any]:
    """``(exp(x - m), m)`` with ``m`` the max over allowed entries along ``axis``.

    Masked entries are set to ``-inf`` before the max so they give ``exp = 0``.
    A row whose max is ``-inf`` (nothing allowed) is shifted by 0 instead, so
    ``exp(-inf - 0) = 0`` rather than ``exp(-inf + inf) = NaN``.

    With ``overwrite`` the result is computed in ``x``'s memory (``x`` must be an
    array the caller owns); otherwise ``x`` is left untouched. Either way only one
    array of ``x``'s size is allocated at most.
    """
    if mask is not None:
        require_bool(xp, "mask", mask)
        require_broadcastable_to("mask", tuple(mask.shape), tuple(x.shape))
        x = xp.where(mask, x, -xp.inf)  # a new array: ours to overwrite
        overwrite = True
    m = xp.max(x, axis=axis, keepdims=True)
    # rows with nothing allowed: m = -inf → use 0 (a NaN max stays NaN and propagates)
    m = xp.where(m == -xp.inf, 0.0, m)
    # x_j - m, in place when x is ours
    if overwrite:
        x -= m
    else:
        x = x - m
    # e_j = exp(x_j - m), written over x_j - m where the backend allows
    return exp_inplace(xp, x), m


def _softmax(xp: ModuleType, x: Any, axis: int, mask: Any | None, *, overwrite: bool) -> Any:
    """The probabilities ``p`` of :func:`softmax_forward` (in ``x``'s memory when ``overwrite``)."""
    e, _ = _shifted_exp(xp, x, axis, mask, overwrite=overwrite)
    # Σ_k e_k, kept as a size-1 axis so it broadcasts back over the row
    total = xp.sum(e, axis=axis, keepdims=True)
    # p_j = e_j / Σ_k e_k   (a fully masked row has Σ = 0 and e = 0: divide by 1 instead)
    e /= xp.where(total == 0.0, 1.0, total)
    return e


def softmax_forward(x: Any, *, axis: int = -1, mask: Any | None = None) -> tuple[Any, SoftmaxCache]:
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
    p = _softmax(xp, x, axis, mask, overwrite=False)
    return p, SoftmaxCache(weights=p, axis=axis)


def softmax_overwriting(x: Any, *, axis: int = -1, mask: Any | None = None) -> Any:
    """The ``p`` of :func:`softmax_forward`, computed in ``x``'s own memory: ``x`` is destroyed.

    For callers that own ``x`` (a temporary they just computed, such as the logits
    of attention) and want no second array of its size. Use the return value:
    backends without in-place ``exp`` (see :func:`attention_ref.backend.exp_inplace`)
    return a new array and leave ``x`` holding ``x - max``.
    """
    xp = namespace(x)
    require_floating(xp, "x", x)
    return _softmax(xp, x, axis, mask, overwrite=True)


def softmax_backward(dout: Any, cache: SoftmaxCache) -> dict[str, Any]:
    """Gradient of the softmax: ``{"x": dx}``, ``dx`` the shape of ``x``.

    dx_j = p_j (dp_j − Σ_i p_i dp_i)
    """
    xp = namespace(dout)
    p = cache.weights
    # Σ_i p_i dp_i, one dot product per row, kept as a size-1 axis
    inner = xp.expand_dims(xp.vecdot(p, dout, axis=cache.axis), axis=cache.axis)
    # dx_j = p_j (dp_j - Σ_i p_i dp_i)
    dx = dout - inner
    dx *= p
    return {"x": dx}


def logsumexp(x: Any, *, axis: int = -1, mask: Any | None = None, keepdims: bool = False) -> Any:
    """``log Σ_j exp(x_j)`` along ``axis`` over allowed entries, computed as ``m + log Σ_j exp(x_j − m)``.

    A row with no allowed entry gives ``-inf`` (the log of an empty sum), without
    a warning. Shape: ``x.shape`` without ``axis`` (or with it as 1 when ``keepdims``).
    """
    xp = namespace(x)
    require_floating(xp, "x", x)
    e, m = _shifted_exp(xp, x, axis, mask, overwrite=False)
    total = xp.sum(e, axis=axis, keepdims=True)
    # log of an empty sum is -inf; take log(1) there and overwrite, so no divide-by-zero warning
    positive = total > 0.0
    lse = xp.where(positive, m + xp.log(xp.where(positive, total, 1.0)), -xp.inf)
    if not keepdims:
        lse = xp.squeeze(lse, axis=axis)
    return lse
