r"""Group normalisation over channels-last maps ``(B, ..., C)``, e.g. ``(B, H, W, C)``.

The ``C`` channels are cut into ``groups`` consecutive groups of ``C/groups``
channels (group ``g`` holds channels ``g·C/G … (g+1)·C/G − 1``, as in PyTorch's
``GroupNorm``). Each (sample, group) pair is normalised over all its spatial
positions and channels:

.. math:: y = \gamma_c \, \hat x + \beta_c, \qquad \hat x = (x - \mu_{b,g})\,(\sigma^2_{b,g} + \epsilon)^{-1/2}

Backward (see :mod:`attention_ref.ops.normalize` for ``∂L/∂x̂ → ∂L/∂x``):

.. math::
    d\gamma_c = \sum_{b,\text{pos}} dy\, \hat x, \qquad
    d\beta_c = \sum_{b,\text{pos}} dy, \qquad
    \frac{\partial L}{\partial \hat x} = dy\, \gamma .
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import (
    as_dtype,
    check_cache,
    check_eps,
    check_positive_int,
    in_working_dtype,
    require_divisible,
    require_dout,
    require_floating_arrays,
)
from ..backend import Array
from .normalize import normalize, normalize_backward

__all__ = ["GroupNormCache", "group_norm_backward", "group_norm_forward"]

# Reduction axes of the grouped view (B, S, G, C/G): positions and channels within a group.
_GROUP_AXES = (1, 3)


@dataclass(frozen=True)
class GroupNormCache:
    backward_names: ClassVar[tuple[str, ...]] = ("group_norm_backward",)  # the backward that takes it

    xhat: Array  # (B, S, G, C/G), normalised input (float32 for float16 input)
    rstd: Array  # (B, 1, G, 1)
    weight: Array | None  # (C,)
    has_bias: bool
    shape: tuple[int, ...]  # the input's shape (B, ..., C)
    dtype: Any = None  # the input's dtype (xhat is float32 for float16 input); None: xhat's


def group_norm_forward(
    x: Array, weight: Array | None = None, bias: Array | None = None, *, groups: int, eps: float = 1e-5
) -> tuple[Array, GroupNormCache]:
    """Group norm of a channels-last map.

    Inputs:
        x: ``(B, ..., C)`` — batch first, channels last, any number of spatial axes.
        weight: ``(C,)`` scale γ, or ``None`` (no affine scale).
        bias: ``(C,)`` shift β, or ``None``.
        groups: number of groups ``G``; ``C`` must be divisible by it.
        eps: added to the variance (PyTorch's default 1e-5; Stable Diffusion uses 1e-6).

    Returns:
        y: same shape as ``x``.
        cache: :class:`GroupNormCache`.
    """
    xp = require_floating_arrays("group norm", optional=("weight", "bias"), x=x, weight=weight, bias=bias)
    groups = check_positive_int("groups", groups, "group norm")
    eps = check_eps("eps", eps, "group norm")
    if x.ndim < 2:
        raise ValueError(f"group norm needs x of shape (B, ..., C), got {tuple(x.shape)}")
    shape = tuple(x.shape)
    B, C = shape[0], shape[-1]
    require_divisible(C, groups, "channels", "groups", where="group norm")
    if B > 0 and math.prod(shape[1:]) == 0:
        raise ValueError(f"group norm: x of shape {shape} leaves every group empty (no mean or variance to take)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"group norm: {name} of shape {tuple(p.shape)} does not match {C} channels")
    # float16 is computed in float32 and the result rounded back (as torch does; see normalize)
    x_w, weight_w, bias_w = in_working_dtype(xp, x, weight, bias)
    S = math.prod(shape[1:-1])  # pixels (or tokens) per sample
    xg = xp.reshape(x_w, (B, S, groups, C // groups))  # (B, S, G, C/G)
    xhat, rstd = normalize(xp, xg, _GROUP_AXES, eps)
    y = xp.reshape(xhat, shape)  # (B, ..., C)
    if weight_w is not None:
        # y = γ x̂
        y = y * weight_w
    if bias_w is not None:
        # y = γ x̂ + β
        y = y + bias_w
    cache = GroupNormCache(xhat=xhat, rstd=rstd, weight=weight, has_bias=bias is not None, shape=shape, dtype=x.dtype)
    return as_dtype(xp, y, x.dtype), cache


def group_norm_backward(dout: Array, cache: GroupNormCache) -> dict[str, Array]:
    """Gradients ``{"x": (B, ..., C), "weight": (C,), "bias": (C,)}`` (affine keys only when given)."""
    check_cache(cache, GroupNormCache, "group_norm_backward")
    xp = require_dout(dout, cache.shape, cache.xhat.dtype if cache.dtype is None else cache.dtype, where="group_norm")
    C = cache.shape[-1]
    dy, weight = in_working_dtype(xp, dout, cache.weight)  # float16 in float32, as the forward
    rows = math.prod(cache.shape[:-1])
    xhat_flat = xp.reshape(cache.xhat, (rows, C))  # (B·S, C)
    dy_flat = xp.reshape(dy, (rows, C))  # (B·S, C)
    grads: dict[str, Array] = {}
    g = dy
    if weight is not None:
        # dγ_c = Σ dy x̂
        grads["weight"] = xp.sum(dy_flat * xhat_flat, axis=0)
        # ∂L/∂x̂ = dy γ
        g = dy * weight
    if cache.has_bias:
        # dβ_c = Σ dy
        grads["bias"] = xp.sum(dy_flat, axis=0)
    gg = xp.reshape(g, tuple(cache.xhat.shape))  # (B, S, G, C/G)
    dx = normalize_backward(xp, gg, cache.xhat, cache.rstd, _GROUP_AXES)
    grads["x"] = xp.reshape(dx, cache.shape)
    return {name: as_dtype(xp, grad, dout.dtype) for name, grad in grads.items()}
