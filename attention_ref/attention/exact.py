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

Threads. On NumPy, a stack of problems (leading dims: batch, heads) large enough to
pay is cut into its matrices, and the matrices run on all cores
(:mod:`attention_ref.attention.per_matrix`, :func:`attention_ref.backend.parallel_map`):
each thread runs the very code above on one ``(N, M)`` problem with single-threaded
BLAS, so the passes over ``(N, M)`` (which NumPy runs on one core) run on all of them.
The results equal the one-call results up to the order of the products' sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .._checks import sum_to_shape
from ..backend import cpu_workers, device_of, namespace, parallel_map
from ..ops.softmax import softmax_overwriting
from .inputs import check_attention_inputs
from .per_matrix import broadcast_index, matrix_indices, take

# Threads pay from this many logits on (all problems together); below, their start-up costs more.
PARALLEL_MIN_LOGITS = 1 << 18

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
    if _in_threads(q, k):
        out, weights = _attend_per_matrix(xp, q, k, v, mask, bias, scale)
    else:
        out, weights = _attend(xp, q, k, v, mask, bias, scale)
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


def _attend(
    xp: ModuleType, q: Any, k: Any, v: Any, mask: Any | None, bias: Any | None, scale: float
) -> tuple[Any, Any]:
    """The forward's arithmetic: ``(O, P)``, shapes ``(..., N, dv)`` and ``(..., N, M)``."""
    # S = (scale · Q) Kᵀ   (..., N, M); scaling Q costs N·d multiplications, scaling S would cost N·M
    logits = xp.matmul(scale * q, xp.matrix_transpose(k))
    if bias is not None:
        # S = scale · Q Kᵀ + bias
        logits += bias
    # P = softmax(S) over the allowed keys of each row   (..., N, M), computed in the logits' memory
    weights = softmax_overwriting(logits, axis=-1, mask=mask)
    # O = P V   (..., N, dv)
    out = xp.matmul(weights, v)
    return out, weights


def _in_threads(q: Any, k: Any) -> bool:
    """Whether to cut the stack into its matrices and run them in threads (NumPy, big enough, > 1 matrix)."""
    problems = math.prod(q.shape[:-2])
    logits = problems * q.shape[-2] * k.shape[-2]
    return problems > 1 and logits >= PARALLEL_MIN_LOGITS and cpu_workers(q) > 1


def _attend_per_matrix(
    xp: ModuleType, q: Any, k: Any, v: Any, mask: Any | None, bias: Any | None, scale: float
) -> tuple[Any, Any]:
    """:func:`_attend` on each ``(N, M)`` problem of the stack, the problems spread over threads."""
    rank = q.ndim
    out = xp.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=device_of(q))  # (..., N, dv)
    weights = xp.empty((*q.shape[:-1], k.shape[-2]), dtype=q.dtype, device=device_of(q))  # (..., N, M)

    def one_problem(index: tuple[Any, ...]) -> None:
        # (1, .., 1, N, dv) and (1, .., 1, N, M): this problem's rows of the results
        o, p = _attend(xp, q[index], k[index], v[index], take(mask, index, rank), take(bias, index, rank), scale)
        out[index], weights[index] = o, p

    parallel_map(one_problem, matrix_indices(tuple(q.shape[:-2])), like=q)
    return out, weights


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
    if _in_threads(q, k):
        return _gradients_per_matrix(xp, dout, q, k, v, P, cache.scale, cache.bias_shape)
    return _gradients(xp, dout, q, k, v, P, cache.scale, cache.bias_shape)


def _gradients(
    xp: ModuleType, dout: Any, q: Any, k: Any, v: Any, P: Any, scale: float, bias_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """The backward's arithmetic (see the module's docstring for the derivation)."""
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
        "q": scale * xp.matmul(dS, k),
        # dK = scale · dSᵀ Q   (..., M, d)
        "k": scale * xp.matmul(xp.matrix_transpose(dS), q),
        "v": dv,
    }
    if bias_shape is not None:
        # d bias = dS, summed back over the broadcast axes
        grads["bias"] = sum_to_shape(xp, dS, bias_shape)
    return grads


def _gradients_per_matrix(
    xp: ModuleType, dout: Any, q: Any, k: Any, v: Any, P: Any, scale: float, bias_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """:func:`_gradients` on each ``(N, M)`` problem of the stack, the problems spread over threads.

    Each problem's ``d bias`` is summed to the bias's shape with its leading dims of
    size 1 (one problem covers one leading index), then added into the part of
    ``d bias`` that problem read: parts a broadcast bias shares add up.
    """
    rank = q.ndim
    grads = {name: xp.empty(a.shape, dtype=a.dtype, device=device_of(a)) for name, a in (("q", q), ("k", k), ("v", v))}
    # the bias's shape as one problem sees it: leading dims 1, the last two as they are
    one_bias_shape = None
    if bias_shape is not None:
        lead = len(bias_shape) - 2
        one_bias_shape = (1,) * max(lead, 0) + tuple(bias_shape[max(lead, 0) :])

    def one_problem(index: tuple[Any, ...]) -> Any | None:
        g = _gradients(xp, dout[index], q[index], k[index], v[index], P[index], scale, one_bias_shape)
        grads["q"][index], grads["k"][index], grads["v"][index] = g["q"], g["k"], g["v"]
        return g.get("bias")

    indices = matrix_indices(tuple(q.shape[:-2]))
    bias_parts = parallel_map(one_problem, indices, like=q)
    if bias_shape is not None:
        dbias = xp.zeros(bias_shape, dtype=q.dtype, device=device_of(q))
        for index, part in zip(indices, bias_parts, strict=True):
            where = broadcast_index(bias_shape, index, rank)
            dbias[where] = dbias[where] + part
        grads["bias"] = dbias
    return grads
