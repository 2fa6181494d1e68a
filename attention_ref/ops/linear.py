r"""Linear layer ``y = x W + b`` with ``W`` stored ``(in, out)``.

Forward:

.. math::  y_{...,o} = \sum_i x_{...,i} W_{i,o} + b_o

Backward, with all leading axes of ``x`` flattened into one batch axis of
length ``n`` (``X`` is ``(n, in)``, ``dY`` is ``(n, out)``):

.. math::
    dX = dY\,W^\top, \qquad dW = X^\top dY, \qquad db = \sum_n dY_n .

``dW`` sums the outer products ``x_n dy_nᵀ`` over every row, which is the
single matrix product ``Xᵀ dY``.

Note: PyTorch's ``nn.Linear`` stores its weight ``(out, in)``; ``attention_ref.interop``
transposes on the way in and out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._checks import array_namespace, check_cache, require_array, require_dout, require_floating, require_same_dtype
from ..backend import Array, blas_threads_for

__all__ = ["LinearCache", "linear_backward", "linear_forward"]


@dataclass(frozen=True)
class LinearCache:
    backward_names: ClassVar[tuple[str, ...]] = ("linear_backward",)  # the backward that takes it

    x: Array  # (..., in)
    W: Array  # (in, out)
    has_bias: bool


def linear_forward(x: Array, W: Array, b: Array | None = None) -> tuple[Array, LinearCache]:
    """``y = x @ W + b``.

    Inputs:
        x: ``(..., in)``.
        W: ``(in, out)``.
        b: ``(out,)`` or ``None`` for no bias.

    Returns:
        y: ``(..., out)``.
        cache: :class:`LinearCache`.
    """
    require_array("x", x)
    require_array("W", W)
    xp = array_namespace(x=x, W=W, b=b)
    for name, a in (("x", x), ("W", W), ("b", b)):
        if a is not None:
            require_floating(xp, name, a)
    require_same_dtype("linear", x=x, W=W, b=b)
    if W.ndim != 2 or x.ndim < 1 or x.shape[-1] != W.shape[0]:
        raise ValueError(
            f"linear: x of shape {tuple(x.shape)} does not match W of shape {tuple(W.shape)} (W is (in, out))"
        )
    if b is not None and tuple(b.shape) != (W.shape[1],):
        raise ValueError(f"linear: b of shape {tuple(b.shape)} does not match W of shape {tuple(W.shape)}")
    # y = x W   (..., out); a small product on one BLAS thread (see attention_ref.backend.blas_threads_for)
    with blas_threads_for(x, _size(x, W)):
        y = x @ W
    if b is not None:
        # y = x W + b
        y = y + b
    return y, LinearCache(x=x, W=W, has_bias=b is not None)


def linear_backward(dout: Array, cache: LinearCache) -> dict[str, Array]:
    """Gradients ``{"x": (..., in), "W": (in, out), "b": (out,)}`` (no ``"b"`` without a bias)."""
    check_cache(cache, LinearCache, "linear_backward")
    x, W = cache.x, cache.W
    n_in, n_out = W.shape
    xp = require_dout(dout, (*x.shape[:-1], n_out), x.dtype, where="linear")
    x2 = xp.reshape(x, (-1, n_in))  # (n, in)
    d2 = xp.reshape(dout, (-1, n_out))  # (n, out)
    with blas_threads_for(x, _size(x, W)):
        # dX = dY Wᵀ   (..., in)
        dx = dout @ xp.matrix_transpose(W)
        # dW = Xᵀ dY   (in, out)
        grads = {"x": dx, "W": xp.matrix_transpose(x2) @ d2}
    if cache.has_bias:
        # db = Σ_n dY_n   (out,)
        grads["b"] = xp.sum(d2, axis=0)
    return grads


def _size(x: Array, W: Array) -> int:
    """Multiply-adds of the layer's products: ``n · in · out`` over the ``n`` rows of ``x``."""
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    return rows * W.shape[0] * W.shape[1]
