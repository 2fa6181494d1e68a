r"""The fast path of exact attention: the formulas of :mod:`.exact`, computed in place and on all cores.

:mod:`.exact` writes each formula out of place, one new array per line. This module computes the very
same numbers with less memory traffic; :func:`attention_ref.attention_forward` and
:func:`attention_ref.attention_backward` call it while :data:`attention_ref.attention.exact.FAST` is
True (the default), and the tests hold it equal to the readable path.

In place. The matrix products cost ``4·N·M·d`` flops forward and ``8·N·M·d`` backward; what else costs
time is every pass over an ``(N, M)`` matrix, and every fresh ``(N, M)`` array (NumPy gets large arrays
from the operating system, page by page). So the scale multiplies ``Q`` (``N·d`` numbers) rather than
``Q Kᵀ``; the bias is added into the logits; the softmax runs in the memory of the logits (in-place
``-=`` and ``/=``, and an in-place ``exp`` where the backend has one,
:func:`attention_ref.backend.exp_inplace`); and the backward takes ``Σ_k P_ik dP_ik`` as one row-by-row
dot product (``vecdot``, no ``(N, M)`` temporary) and forms ``dS`` in the memory of ``dP``. Forward,
five passes over ``(N, M)`` follow the first product (max, subtract, exp, sum, divide); backward, three
(the dot product, subtract, multiply).

The backward does not take ``Σ_k P_ik dP_ik`` as the cheaper ``dO_i · O_i``: the two agree only up to
rounding, and where a row of ``P`` is one-hot (a query with a single allowed key) ``Σ_k P_ik dP_ik`` is
exactly ``dP_ij``, so ``dS`` is exactly 0 there, as the mathematics says.

Threads. On NumPy, a stack of problems (leading dims: batch, heads) large enough to pay
(:data:`PARALLEL_MIN_LOGITS`) is cut into one slab of whole problems per worker
(:func:`attention_ref.attention.per_matrix.slab_indices`), and the slabs run on all cores
(:func:`attention_ref.backend.parallel_map`): each thread runs the in-place code on its slab with
single-threaded BLAS, so the passes over ``(N, M)`` (which NumPy runs on one core) run on all of them,
and a stack of many small problems costs one hand-over per thread, not one per problem. Matrices small
enough that a second BLAS thread costs more than it gives (:func:`attention_ref.backend.blas_threads_for`)
run on one BLAS thread. The results equal the one-call results up to the order of the products' sums.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from .._checks import Shape, as_dtype, sum_to_shape, working_dtype
from ..backend import (
    Array,
    blas_threads_for,
    cpu_workers,
    device_of,
    exp_inplace,
    matmul_into,
    namespace_name,
    parallel_map,
)
from ..ops.softmax import SoftmaxCache, softmax_backward, stable_shift
from .per_matrix import Index, broadcast_index, slab_indices, take

__all__ = ["PARALLEL_MIN_LOGITS", "SLAB_BYTES", "attend", "gradients", "softmax_overwriting"]

# Threads pay from this many logits on (all problems together); below, their start-up costs more.
PARALLEL_MIN_LOGITS = 1 << 18
# On NumPy a stack is cut into slabs of at most this many bytes of logits, so that each slab's softmax and
# dS are formed while its logits are still in the core's cache (L2: 1-2 MiB per core on current CPUs).
SLAB_BYTES = 1 << 20


def attend(
    xp: ModuleType, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: float
) -> tuple[Array, Array]:
    """``(O, P)`` of :func:`attention_ref.attention.exact._attend`, in place, on all cores where that pays."""
    with blas_threads_for(q, _product_size(q, k, v)):
        slabs = _slabs(xp, q, k)
        if len(slabs) > 1:
            return _attend_per_slab(xp, q, k, v, mask, bias, scale, slabs)
        return _attend_in_place(xp, q, k, v, mask, bias, scale)


def gradients(
    xp: ModuleType, dout: Array, q: Array, k: Array, v: Array, P: Array, scale: float, bias_shape: Shape | None
) -> dict[str, Array]:
    """The gradients of :func:`attention_ref.attention.exact._gradients`, in place, on all cores where that pays."""
    with blas_threads_for(q, _product_size(q, k, v)):
        slabs = _slabs(xp, q, k)
        if len(slabs) > 1:
            return _gradients_per_slab(xp, dout, q, k, v, P, scale, bias_shape, slabs)
        return _gradients_in_place(xp, dout, q, k, v, P, scale, bias_shape)


def _product_size(q: Array, k: Array, v: Array) -> int:
    """Multiply-adds of the largest matrix product of one problem: ``N · M · max(d, dv)``."""
    return q.shape[-2] * k.shape[-2] * max(q.shape[-1], v.shape[-1])


def softmax_overwriting(xp: ModuleType, x: Array, *, axis: int = -1, mask: Array | None = None) -> Array:
    """The ``p`` of :func:`attention_ref.softmax_forward`, computed in ``x``'s own memory: ``x`` is destroyed.

    For an ``x`` the caller owns (the logits it just computed). Use the return value: backends without
    an in-place ``exp`` return a new array and leave ``x`` holding ``x - max``. float16 is computed in a
    float32 copy, as :func:`attention_ref.softmax_forward` does, and rounded back.
    """
    dtype = x.dtype
    x = as_dtype(xp, x, working_dtype(xp, dtype))
    if mask is not None:
        x = xp.where(mask, x, -xp.inf)  # a new array, ours to overwrite
    x -= stable_shift(xp, x, axis)
    e = exp_inplace(xp, x)
    total = xp.sum(e, axis=axis, keepdims=True)
    e /= xp.where(total == 0.0, 1.0, total)
    return as_dtype(xp, e, dtype)


def _attend_in_place(
    xp: ModuleType, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: float,
    logits_out: Array | None = None,
) -> tuple[Array, Array]:
    """``(O, P)``, with ``P`` formed in ``logits_out``'s memory where the backend allows it (else new)."""
    logits = matmul_into(xp, scale * q, xp.matrix_transpose(k), logits_out)  # S = (scale · Q) Kᵀ   (..., N, M)
    if bias is not None:
        logits += bias
    weights = softmax_overwriting(xp, logits, axis=-1, mask=mask)  # P, in the logits' memory
    return weights @ v, weights


def _gradients_in_place(
    xp: ModuleType, dout: Array, q: Array, k: Array, v: Array, P: Array, scale: float, bias_shape: Shape | None
) -> dict[str, Array]:
    dv = xp.matrix_transpose(P) @ dout  # dV = Pᵀ dO   (..., M, dv)
    dP = dout @ xp.matrix_transpose(v)  # dP = dO Vᵀ   (..., N, M)
    if working_dtype(xp, dP.dtype) != dP.dtype:  # float16: the softmax's own backward, in float32
        dS = softmax_backward(dP, SoftmaxCache(weights=P, axis=-1))["x"]
    else:
        row_dot = xp.expand_dims(xp.vecdot(P, dP, axis=-1), axis=-1)  # Σ_k P_ik dP_ik   (..., N, 1)
        # dS_ij = P_ij (dP_ij - Σ_k P_ik dP_ik), formed in dP's memory
        dP -= row_dot
        dP *= P
        dS = dP
    grads = {"q": scale * (dS @ k), "k": scale * (xp.matrix_transpose(dS) @ q), "v": dv}
    if bias_shape is not None:
        grads["bias"] = sum_to_shape(xp, dS, bias_shape)
    return grads


# ---------------------------------------------------------------- slabs of the stack


def _in_threads(q: Array, k: Array) -> bool:
    """Whether to spread the stack's slabs over threads (NumPy, big enough, > 1 matrix)."""
    problems = math.prod(q.shape[:-2])
    logits = problems * q.shape[-2] * k.shape[-2]
    return problems > 1 and logits >= PARALLEL_MIN_LOGITS and cpu_workers(q) > 1


def _slabs(xp: ModuleType, q: Array, k: Array) -> list[Index]:
    """How the stack is cut (:func:`attention_ref.attention.per_matrix.slab_indices`): at least one slab per
    worker where threads pay (:func:`_in_threads`), and on NumPy slabs of at most ``SLAB_BYTES`` of logits;
    ``[(...,)]`` (the whole stack in one call) when neither applies."""
    lead = tuple(q.shape[:-2])
    parts = max(cpu_workers(q), 2) if _in_threads(q, k) else 1
    if namespace_name(xp) == "numpy":
        logit_bytes = math.prod(lead) * q.shape[-2] * k.shape[-2] * q.dtype.itemsize
        parts = max(parts, -(-logit_bytes // SLAB_BYTES))
    return slab_indices(lead, parts) if parts > 1 else [(...,)]


def _run_slabs(fn: Any, slabs: list[Index], q: Array, k: Array) -> list[Any]:
    """``[fn(slab) for slab in slabs]``, over threads where they pay, else one after another."""
    if _in_threads(q, k):
        return parallel_map(fn, slabs, like=q)
    return [fn(index) for index in slabs]


def _attend_per_slab(
    xp: ModuleType, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None, scale: float,
    slabs: list[Index],
) -> tuple[Array, Array]:
    """:func:`_attend_in_place` on each slab of the stack, each slab's weights formed in their place in ``P``."""
    rank = q.ndim
    out = xp.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=device_of(q))  # (..., N, dv)
    weights = xp.empty((*q.shape[:-1], k.shape[-2]), dtype=q.dtype, device=device_of(q))  # (..., N, M)

    def one_slab(index: Index) -> None:
        # this slab's rows of the results: (slab, N, dv) and (slab, N, M)
        place = weights[index]
        o, p = _attend_in_place(
            xp, q[index], k[index], v[index], take(mask, index, rank), take(bias, index, rank), scale, place
        )
        out[index] = o
        if p is not place:  # formed elsewhere (a mask, float16, a backend without out=)
            weights[index] = p

    _run_slabs(one_slab, slabs, q, k)
    return out, weights


def _gradients_per_slab(
    xp: ModuleType,
    dout: Array,
    q: Array,
    k: Array,
    v: Array,
    P: Array,
    scale: float,
    bias_shape: Shape | None,
    slabs: list[Index],
) -> dict[str, Array]:
    """:func:`_gradients_in_place` on each slab of the stack.

    Each slab's ``d bias`` is summed to the part of the bias that slab read (a leading dim of size 1 is
    read whole by every slab), then added into that part of ``d bias``: parts a broadcast bias shares add up.
    """
    rank = q.ndim
    grads = {name: xp.empty(a.shape, dtype=a.dtype, device=device_of(a)) for name, a in (("q", q), ("k", k), ("v", v))}

    def bias_part(index: Index) -> tuple[Index, Shape] | None:
        """Where this slab's part of the bias is, and its shape."""
        if bias_shape is None:
            return None
        where = broadcast_index(tuple(bias_shape), index, rank)
        return where, tuple(len(range(*s.indices(n))) for s, n in zip(where, bias_shape, strict=True))

    def one_slab(index: Index) -> Array | None:
        part = bias_part(index)
        g = _gradients_in_place(
            xp, dout[index], q[index], k[index], v[index], P[index], scale, None if part is None else part[1]
        )
        grads["q"][index], grads["k"][index], grads["v"][index] = g["q"], g["k"], g["v"]
        return g.get("bias")

    bias_parts = _run_slabs(one_slab, slabs, q, k)
    if bias_shape is not None:
        dbias = xp.zeros(bias_shape, dtype=q.dtype, device=device_of(q))
        for index, g in zip(slabs, bias_parts, strict=True):
            where = bias_part(index)[0]
            dbias[where] = dbias[where] + g
        grads["bias"] = dbias
    return grads
