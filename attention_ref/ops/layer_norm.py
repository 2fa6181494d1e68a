r"""Layer normalisation over the last axis.

.. math:: y = \gamma \, \hat x + \beta, \qquad \hat x = (x - \mu)\,(\sigma^2 + \epsilon)^{-1/2}

with ``μ`` and ``σ²`` taken over the last axis of each row. Backward as in
:mod:`attention_ref.ops.normalize`, with ``dγ = Σ dy x̂`` and ``dβ = Σ dy`` over
all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import as_dtype, check_cache, check_eps, in_working_dtype, require_dout, require_floating_arrays
from ..backend import Array
from .normalize import normalize, normalize_backward

__all__ = ["LayerNormCache", "layer_norm_backward", "layer_norm_forward"]


@dataclass(frozen=True)
class LayerNormCache:
    backward_names: ClassVar[tuple[str, ...]] = ("layer_norm_backward",)  # the backward that takes it

    xhat: Array  # (..., C) (float32 for float16 input)
    rstd: Array  # (..., 1)
    weight: Array | None  # (C,)
    has_bias: bool
    dtype: Any = None  # the input's dtype (xhat is float32 for float16 input); None: xhat's


def layer_norm_forward(
    x: Array, weight: Array | None = None, bias: Array | None = None, *, eps: float = 1e-5
) -> tuple[Array, LayerNormCache]:
    """Layer norm over the last axis.

    Inputs:
        x: ``(..., C)``.
        weight: ``(C,)`` or ``None``; bias: ``(C,)`` or ``None``.
        eps: added to the variance (PyTorch's default 1e-5).

    Returns:
        y: ``(..., C)``; cache: :class:`LayerNormCache`.
    """
    xp = require_floating_arrays("layer norm", optional=("weight", "bias"), x=x, weight=weight, bias=bias)
    if x.ndim < 1:
        raise ValueError(f"layer norm needs x of shape (..., C), got {tuple(x.shape)}")
    eps = check_eps("eps", eps, "layer norm")
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"layer norm: {name} of shape {tuple(p.shape)} does not match x of shape {tuple(x.shape)}")
    # float16 is computed in float32 and the result rounded back (as torch does; see normalize)
    x_w, weight_w, bias_w = in_working_dtype(xp, x, weight, bias)
    xhat, rstd = normalize(xp, x_w, (-1,), eps)
    y = xhat
    if weight_w is not None:
        # y = γ x̂
        y = y * weight_w
    if bias_w is not None:
        # y = γ x̂ + β
        y = y + bias_w
    cache = LayerNormCache(xhat=xhat, rstd=rstd, weight=weight, has_bias=bias is not None, dtype=x.dtype)
    return as_dtype(xp, y, x.dtype), cache


def layer_norm_backward(dout: Array, cache: LayerNormCache) -> dict[str, Array]:
    """Gradients ``{"x": (..., C), "weight": (C,), "bias": (C,)}`` (affine keys only when given)."""
    check_cache(cache, LayerNormCache, "layer_norm_backward")
    dtype = cache.xhat.dtype if cache.dtype is None else cache.dtype
    xp = require_dout(dout, cache.xhat.shape, dtype, where="layer_norm")
    C = dout.shape[-1]
    dy, weight = in_working_dtype(xp, dout, cache.weight)  # float16 in float32, as the forward
    grads: dict[str, Array] = {}
    g = dy
    if weight is not None:
        # dγ = Σ_rows dy x̂
        grads["weight"] = xp.sum(xp.reshape(dy * cache.xhat, (-1, C)), axis=0)
        # ∂L/∂x̂ = dy γ
        g = dy * weight
    if cache.has_bias:
        # dβ = Σ_rows dy
        grads["bias"] = xp.sum(xp.reshape(dy, (-1, C)), axis=0)
    grads["x"] = normalize_backward(xp, g, cache.xhat, cache.rstd, (-1,))
    return {name: as_dtype(xp, grad, dout.dtype) for name, grad in grads.items()}
