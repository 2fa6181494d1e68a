r"""Scaled dot-product attention, exact, with its analytic backward pass.

Forward, for each leading index (batch, head):

.. math::
    S = \text{scale}\cdot Q K^\top + \text{bias}, \qquad
    P = \operatorname{softmax}_{\text{rows}}(S \text{ over allowed keys}), \qquad
    O = P V

with ``Q (N, d)``, ``K (M, d)``, ``V (M, dv)``, ``S, P (N, M)``, ``O (N, dv)``.
``mask[i, j] = False`` removes key ``j`` from query ``i``'s softmax (``P_ij = 0``).
A query with no allowed key gets ``P_i = 0`` and ``O_i = 0``.

Backward. Given ``dO = ∂L/∂O``:

* ``O = P V``  ⇒  ``dV = Pᵀ dO`` and ``dP = dO Vᵀ``;
* softmax rows (see :mod:`attention_ref.ops.softmax`)  ⇒
  ``dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik)``; note ``Σ_k P_ik dP_ik = dO_i · O_i``;
* ``S = scale · Q Kᵀ + bias``  ⇒  ``dQ = scale · dS K``, ``dK = scale · dSᵀ Q``,
  and ``d bias = dS`` summed over every axis the bias was broadcast along.

Masked entries and fully masked rows have ``P = 0``, so they get ``dS = 0`` and
contribute nothing to any gradient.

Speed. The matrix products cost ``4·N·M·d`` flops forward and ``8·N·M·d``
backward; what else costs time is every pass over an ``(N, M)`` matrix. So the
scale multiplies ``Q`` (``N·d`` numbers) rather than ``Q Kᵀ``, the softmax runs in
the memory of the logits (in-place ``-=`` and ``/=``, and an in-place ``exp`` where the
backend has one), and the backward takes ``Σ_k P_ik dP_ik`` as one row-by-row dot
product (``vecdot``, no ``(N, M)`` temporary) and forms ``dS`` in the memory of ``dP``.
Forward, five passes over ``(N, M)`` follow the first product (max, subtract, exp,
sum, divide); backward, three (the dot product, subtract, multiply).
The backward does not take ``Σ_k P_ik dP_ik`` as the cheaper ``dO_i · O_i``: the two
agree only up to rounding, and where a row of ``P`` is one-hot (a query with a
single allowed key) ``Σ_k P_ik dP_ik`` is exactly ``dP_ij``, so ``dS`` is exactly 0
there, as the mathematics says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._checks import sum_to_shape
from ..backend import namespace
from ..ops.softmax import softmax_overwriting
from .inputs import check_attention_inputs

__all__ = ["AttentionCache", "attention_backward", "attention_forward"]


@dataclass(frozen=True)
class AttentionCache:
    """What :func:`attention_backward` needs; ``weights`` is kept for plotting too."""

    q: Any  # (..., N, d)
    k: Any  # (..., M, d)
    v: Any  # (..., M, dv)
    weights: Any  # P, (..., N, M); rows sum to 1 (0 when fully masked)
    scale: float
    bias_shape: tuple[int, ...] | None  # None when no bias was given
    mask: Any | None  # as given (broadcastable), for inspection


def attention_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any | None = None,
    bias: Any | None = None,
    scale: float | None = None,
) -> tuple[Any, AttentionCache]:
    """Exact scaled dot-product attention ``softmax(scale · q kᵀ + bias) v``.

    Inputs:
        q: ``(..., N, d)`` queries.
        k: ``(..., M, d)`` keys; leading dims equal to q's.
        v: ``(..., M, dv)`` values.
        mask: boolean, broadcastable to ``(..., N, M)``; True = may attend.
        bias: float (q's dtype), broadcastable to ``(..., N, M)``; added to the logits.
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``.

    Returns:
        out: ``(..., N, dv)``.
        cache: :class:`AttentionCache`, with ``cache.weights`` ``(..., N, M)``.
    """
    xp, scale = check_attention_inputs(q, k, v, mask, bias, scale)
    # S = (scale · Q) Kᵀ   (..., N, M); scaling Q costs N·d multiplications, scaling S would cost N·M
    logits = xp.matmul(scale * q, xp.matrix_transpose(k))
    if bias is not None:
        # S = scale · Q Kᵀ + bias
        logits += bias
    # P = softmax(S) over the allowed keys of each row   (..., N, M), computed in the logits' memory
    weights = softmax_overwriting(logits, axis=-1, mask=mask)
    # O = P V   (..., N, dv)
    out = xp.matmul(weights, v)
    cache = AttentionCache(
        q=q,
        k=k,
        v=v,
        weights=weights,
        scale=scale,
        bias_shape=None if bias is None else tuple(bias.shape),
        mask=mask,
    )
    return out, cache


def attention_backward(dout: Any, cache: AttentionCache) -> dict[str, Any]:
    """Gradients of :func:`attention_forward`.

    Inputs:
        dout: ``(..., N, dv)``, the gradient of the loss with respect to ``out``.
        cache: from :func:`attention_forward`.

    Returns:
        ``{"q": (..., N, d), "k": (..., M, d), "v": (..., M, dv)}``, plus
        ``"bias"`` in the bias's own shape when a bias was given.
    """
    xp = namespace(dout)
    q, k, v, P = cache.q, cache.k, cache.v, cache.weights
    expected = (*q.shape[:-1], v.shape[-1])
    if tuple(dout.shape) != expected:
        raise ValueError(f"dout of shape {tuple(dout.shape)} does not match the output shape {expected}")
    # dV = Pᵀ dO   (..., M, dv)
    dv = xp.matmul(xp.matrix_transpose(P), dout)
    # dP = dO Vᵀ   (..., N, M)
    dP = xp.matmul(dout, xp.matrix_transpose(v))
    # Σ_k P_ik dP_ik, one dot product per row   (..., N, 1)
    row_dot = xp.expand_dims(xp.vecdot(P, dP, axis=-1), axis=-1)
    # dS_ij = P_ij (dP_ij - Σ_k P_ik dP_ik), formed in dP's memory   (..., N, M)
    dP -= row_dot
    dP *= P
    dS = dP
    grads = {
        # dQ = scale · dS K   (..., N, d)
        "q": cache.scale * xp.matmul(dS, k),
        # dK = scale · dSᵀ Q   (..., M, d)
        "k": cache.scale * xp.matmul(xp.matrix_transpose(dS), q),
        "v": dv,
    }
    if cache.bias_shape is not None:
        # d bias = dS, summed back over the broadcast axes
        grads["bias"] = sum_to_shape(xp, dS, cache.bias_shape)
    return grads
