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
  ``dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik)``;
* ``S = scale · Q Kᵀ + bias``  ⇒  ``dQ = scale · dS K``, ``dK = scale · dSᵀ Q``,
  and ``d bias = dS`` summed over every axis the bias was broadcast along.

Masked entries and fully masked rows have ``P = 0``, so they get ``dS = 0`` and
contribute nothing to any gradient (a masked key or value holding NaN still does: ``0 · NaN``
is NaN). NaN, ``±inf``, float16 and empty inputs: see docs/numerics.md.

:func:`_attend` and :func:`_gradients` below are these lines, one array per line.
:mod:`.exact_fast` computes the same numbers in the memory of the logits and on all
cores; it runs while :data:`FAST` is True (set it to False to step through the lines here).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

from .._checks import Shape, as_dtype, check_cache, in_working_dtype, require_dout, sum_to_shape
from ..backend import Array
from ..ops.softmax import SoftmaxCache, softmax_backward, softmax_forward
from . import exact_fast
from .inputs import check_attention_inputs, hint_chunked_when_out_of_memory

__all__ = ["FAST", "AttentionCache", "attention_backward", "attention_forward"]

#: Run :mod:`.exact_fast` (the same formulas, in place and threaded) instead of the lines below.
FAST = True


@dataclass(frozen=True)
class AttentionCache:
    """What :func:`attention_backward` needs; ``weights`` is kept for plotting too."""

    backward_names: ClassVar[tuple[str, ...]] = ("attention_backward",)  # the backward that takes it

    q: Array  # (..., N, d)
    k: Array  # (..., M, d)
    v: Array  # (..., M, dv)
    weights: Array  # P, (..., N, M); rows sum to 1 (0 when fully masked)
    scale: float
    bias_shape: tuple[int, ...] | None  # None when no bias was given
    mask: Array | None  # as given (broadcastable), for inspection


def attention_forward(
    q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None, scale: float | None = None
) -> tuple[Array, AttentionCache]:
    """Exact scaled dot-product attention ``softmax(scale · q kᵀ + bias) v``.

    Inputs:
        q: ``(..., N, d)`` queries.
        k: ``(..., M, d)`` keys; leading dims equal to q's.
        v: ``(..., M, dv)`` values.
        mask: boolean, broadcastable to ``(..., N, M)``; True = may attend.
        bias: float (q's dtype), broadcastable to ``(..., N, M)``; added to the logits.
        scale: a real number (Python or NumPy) multiplying ``q kᵀ``; default ``1/sqrt(d)``.

    Returns:
        out: ``(..., N, dv)``.
        cache: :class:`AttentionCache`, with ``cache.weights`` ``(..., N, M)``.
    """
    xp, scale = check_attention_inputs(q, k, v, mask, bias, scale)
    attend = exact_fast.attend if FAST else _attend  # the same numbers; the fast one in place, threaded
    # float16 is computed in float32 (logits over 65,504 are common: q·k = 360,000 at q = k = 300, d = 4),
    # as torch's CPU attention and the tiled path do; out and the weights are rounded to float16
    q_w, k_w, v_w, bias_w = in_working_dtype(xp, q, k, v, bias)
    with hint_chunked_when_out_of_memory(q, k):
        out, weights = attend(xp, q_w, k_w, v_w, mask, bias_w, scale)
    out, weights = as_dtype(xp, out, q.dtype), as_dtype(xp, weights, q.dtype)
    bias_shape = None if bias is None else tuple(bias.shape)
    return out, AttentionCache(q=q, k=k, v=v, weights=weights, scale=scale, bias_shape=bias_shape, mask=mask)


def _attend(
    xp: ModuleType, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: float
) -> tuple[Array, Array]:
    """The forward's arithmetic: ``(O, P)``, shapes ``(..., N, dv)`` and ``(..., N, M)``."""
    # S = (scale · Q) Kᵀ   (..., N, M); scaling Q costs N·d multiplications, scaling S would cost N·M
    logits = (scale * q) @ xp.matrix_transpose(k)
    if bias is not None:
        # S = scale · Q Kᵀ + bias   (..., N, M)
        logits = logits + bias
    # P = softmax(S) over the allowed keys of each row   (..., N, M)
    weights, _ = softmax_forward(logits, axis=-1, mask=mask)
    # O = P V   (..., N, dv)
    out = weights @ v
    return out, weights


def attention_backward(dout: Array, cache: AttentionCache) -> dict[str, Array]:
    """Gradients of :func:`attention_forward`.

    Inputs:
        dout: ``(..., N, dv)``, the gradient of the loss with respect to ``out``.
        cache: from :func:`attention_forward`.

    Returns:
        ``{"q": (..., N, d), "k": (..., M, d), "v": (..., M, dv)}``, plus
        ``"bias"`` in the bias's own shape when a bias was given.
    """
    check_cache(cache, AttentionCache, "attention_backward")
    xp = require_dout(dout, (*cache.q.shape[:-1], cache.v.shape[-1]), cache.q.dtype, like=cache.q)
    # float16 in float32, as the forward (P is the forward's float16 weights, widened)
    q, k, v, P, dout_w = in_working_dtype(xp, cache.q, cache.k, cache.v, cache.weights, dout)
    gradients = exact_fast.gradients if FAST else _gradients  # the same numbers; the fast one in place, threaded
    with hint_chunked_when_out_of_memory(q, k):
        grads = gradients(xp, dout_w, q, k, v, P, cache.scale, cache.bias_shape)
    return {name: as_dtype(xp, g, dout.dtype) for name, g in grads.items()}


def _gradients(
    xp: ModuleType, dout: Array, q: Array, k: Array, v: Array, P: Array, scale: float, bias_shape: Shape | None
) -> dict[str, Array]:
    """The backward's arithmetic (see the module's docstring for the derivation)."""
    # dV = Pᵀ dO   (..., M, dv)
    dv = xp.matrix_transpose(P) @ dout
    # dP = dO Vᵀ   (..., N, M)
    dP = dout @ xp.matrix_transpose(v)
    # dS_ij = P_ij (dP_ij - Σ_k P_ik dP_ik), the softmax's backward   (..., N, M)
    dS = softmax_backward(dP, SoftmaxCache(weights=P, axis=-1))["x"]
    # dQ = scale · dS K   (..., N, d)
    dq = scale * (dS @ k)
    # dK = scale · dSᵀ Q   (..., M, d)
    dk = scale * (xp.matrix_transpose(dS) @ q)
    grads = {"q": dq, "k": dk, "v": dv}
    if bias_shape is not None:
        # d bias = dS, summed over the axes the bias was broadcast along   (bias's shape)
        grads["bias"] = sum_to_shape(xp, dS, bias_shape)
    return grads
