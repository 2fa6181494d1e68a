r"""Changing a channels-last map's resolution by an integer factor: nearest-neighbour up-sampling
and average pooling (down-sampling), each with its backward.

Both act on ``x (B, H, W, C)`` and treat every channel and sample alike.

**Nearest up-sampling** by ``f`` (diffusers' ``Upsample2D`` before its convolution,
``F.interpolate(mode="nearest")``): every pixel becomes an ``f×f`` block,

.. math:: y_{b,\,i,\,j,\,c} = x_{b,\,\lfloor i/f \rfloor,\,\lfloor j/f \rfloor,\,c}, \qquad y: (B, fH, fW, C).

Each ``x_{b,u,v,c}`` is copied into the ``f²`` outputs of its block, so its gradient
is the sum of theirs:

.. math:: \frac{\partial L}{\partial x_{b,u,v,c}} = \sum_{a<f}\sum_{e<f} dy_{b,\,fu+a,\,fv+e,\,c}.

**Average pooling** by ``f`` (diffusers' ``Downsample2D`` without a convolution,
``AvgPool2d(f)``): the mean of each non-overlapping ``f×f`` block,

.. math:: y_{b,u,v,c} = \frac{1}{f^2}\sum_{a<f}\sum_{e<f} x_{b,\,fu+a,\,fv+e,\,c}, \qquad y: (B, H/f, W/f, C),

needs ``H`` and ``W`` divisible by ``f``. Every input of a block enters its mean with
weight ``1/f²``, so

.. math:: \frac{\partial L}{\partial x_{b,i,j,c}}
          = \frac{1}{f^2}\, dy_{b,\,\lfloor i/f \rfloor,\,\lfloor j/f \rfloor,\,c}:

the backward of average pooling is ``1/f²`` times nearest up-sampling, and the
backward of nearest up-sampling is ``f²`` times average pooling. Both are written
with one reshape that exposes the blocks, ``(B, H, f, W, f, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import check_cache, check_positive_int, require_dout, require_floating_arrays
from ..backend import Array, namespace

__all__ = [
    "ResampleCache",
    "avg_pool_backward",
    "avg_pool_forward",
    "upsample_nearest_backward",
    "upsample_nearest_forward",
]


@dataclass(frozen=True)
class ResampleCache:
    backward_names: ClassVar[tuple[str, ...]] = ("avg_pool_backward", "upsample_nearest_backward")  # both take it

    factor: int  # f
    x_shape: tuple[int, int, int, int]  # (B, H, W, C) of the input
    dtype: Any = None  # the input's dtype (None: any floating dtype)


def _check(x: Array, factor: int, where: str) -> int:
    """``factor`` as an int, after checking ``x`` and ``factor``."""
    require_floating_arrays(where, x=x)
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be a channels-last map (B, H, W, C), got shape {tuple(x.shape)}")
    return check_positive_int("factor", factor, where)


def _blocks_sum(dy: Array, f: int) -> Array:
    """``Σ`` of ``dy (B, fH, fW, C)`` over each ``f×f`` block: ``(B, H, W, C)``."""
    xp = namespace(dy)
    B, Hf, Wf, C = dy.shape
    blocks = xp.reshape(dy, (B, Hf // f, f, Wf // f, f, C))  # (B, H, f, W, f, C)
    return xp.sum(blocks, axis=(2, 4))


def _blocks_copy(x: Array, f: int) -> Array:
    """Each pixel of ``x (B, H, W, C)`` repeated into an ``f×f`` block: ``(B, fH, fW, C)``."""
    xp = namespace(x)
    B, H, W, C = x.shape
    x6 = xp.reshape(x, (B, H, 1, W, 1, C))  # (B, H, 1, W, 1, C)
    return xp.reshape(xp.broadcast_to(x6, (B, H, f, W, f, C)), (B, H * f, W * f, C))


def upsample_nearest_forward(x: Array, factor: int = 2) -> tuple[Array, ResampleCache]:
    """Nearest-neighbour up-sampling of a channels-last map.

    Inputs:
        x: ``(B, H, W, C)``, real floating.
        factor: ``f``, a positive int.

    Returns:
        y: ``(B, f·H, f·W, C)`` with ``y[b, i, j] = x[b, i // f, j // f]``.
        cache: :class:`ResampleCache`.
    """
    factor = _check(x, factor, "upsample_nearest")
    # y[b, i, j, c] = x[b, ⌊i/f⌋, ⌊j/f⌋, c]   (B, fH, fW, C)
    return _blocks_copy(x, factor), ResampleCache(factor=factor, x_shape=tuple(x.shape), dtype=x.dtype)


def upsample_nearest_backward(dout: Array, cache: ResampleCache) -> dict[str, Array]:
    """``{"x": (B, H, W, C)}``: each input pixel's gradient is the sum over its ``f×f`` block of ``dout``."""
    check_cache(cache, ResampleCache, "upsample_nearest_backward")
    B, H, W, C = cache.x_shape
    f = cache.factor
    require_dout(dout, (B, f * H, f * W, C), cache.dtype, where="upsample_nearest")
    # dx[b, u, v] = Σ_{a, e < f} dy[b, f·u + a, f·v + e]
    return {"x": _blocks_sum(dout, f)}


def avg_pool_forward(x: Array, factor: int = 2) -> tuple[Array, ResampleCache]:
    """Average pooling over non-overlapping ``f×f`` blocks of a channels-last map.

    Inputs:
        x: ``(B, H, W, C)``, real floating; ``H`` and ``W`` divisible by ``factor``.
        factor: ``f``, a positive int.

    Returns:
        y: ``(B, H/f, W/f, C)``, the mean of each block.
        cache: :class:`ResampleCache`.
    """
    factor = _check(x, factor, "avg_pool")
    _, H, W, _ = x.shape
    if H % factor or W % factor:
        raise ValueError(f"avg_pool: a {H}×{W} map does not split into {factor}×{factor} blocks")
    # y[b, u, v] = (1/f²) Σ_{a, e < f} x[b, f·u + a, f·v + e]   (B, H/f, W/f, C)
    y = _blocks_sum(x, factor) / (factor * factor)
    return y, ResampleCache(factor=factor, x_shape=tuple(x.shape), dtype=x.dtype)


def avg_pool_backward(dout: Array, cache: ResampleCache) -> dict[str, Array]:
    """``{"x": (B, H, W, C)}``: ``dout / f²`` copied to every pixel of its block."""
    check_cache(cache, ResampleCache, "avg_pool_backward")
    B, H, W, C = cache.x_shape
    f = cache.factor
    require_dout(dout, (B, H // f, W // f, C), cache.dtype, where="avg_pool")
    # dx[b, i, j] = dy[b, ⌊i/f⌋, ⌊j/f⌋] / f²
    return {"x": _blocks_copy(dout, f) / (f * f)}
