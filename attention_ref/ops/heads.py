"""Splitting channels into attention heads and merging them back, head-major.

With ``heads`` heads of width ``d``, channel ``c = head·d + j`` of a
``(..., N, heads·d)`` array becomes entry ``j`` of head ``head``:

    split:  (..., N, heads·d) → (..., N, heads, d) → (..., heads, N, d)
    merge:  the inverse.

This is the order diffusers (``head_to_batch_dim``), CompVis and PyTorch's
``MultiheadAttention`` use. Both maps only move entries, so each one's backward
is the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import (
    array_namespace,
    check_cache,
    check_positive_int,
    require_array,
    require_divisible,
    require_dout,
    require_floating_arrays,
)
from ..backend import Array

__all__ = [
    "HeadsCache",
    "merge_heads",
    "merge_heads_backward",
    "merge_heads_forward",
    "split_heads",
    "split_heads_backward",
    "split_heads_forward",
]


def split_heads(x: Array, heads: int) -> Array:
    """``(..., N, heads·d)`` → ``(..., heads, N, d)``, channel ``c = head·d + j``.

    Any dtype (entries are only moved). ``TypeError`` for a non-array or ``heads`` that is not an int,
    ``ValueError`` for fewer than 2 axes or channels that do not divide into ``heads``.
    """
    require_array("x", x)
    xp = array_namespace(x=x)
    heads = check_positive_int("heads", heads, "split_heads")
    if x.ndim < 2:
        raise ValueError(f"split_heads needs x of shape (..., N, C), got {tuple(x.shape)}")
    *lead, N, C = x.shape
    require_divisible(C, heads, "channels", "heads")
    x = xp.reshape(x, (*lead, N, heads, C // heads))  # (..., N, heads, d)
    n = len(lead)
    return xp.permute_dims(x, (*range(n), n + 1, n, n + 2))  # (..., heads, N, d)


def merge_heads(x: Array) -> Array:
    """``(..., heads, N, d)`` → ``(..., N, heads·d)``; the inverse of :func:`split_heads` (any dtype)."""
    require_array("x", x)
    xp = array_namespace(x=x)
    if x.ndim < 3:
        raise ValueError(f"merge_heads needs x of shape (..., heads, N, d), got {tuple(x.shape)}")
    *lead, heads, N, d = x.shape
    n = len(lead)
    x = xp.permute_dims(x, (*range(n), n + 1, n, n + 2))  # (..., N, heads, d)
    return xp.reshape(x, (*lead, N, heads * d))  # (..., N, heads·d)


@dataclass(frozen=True)
class HeadsCache:
    backward_names: ClassVar[tuple[str, ...]] = ("merge_heads_backward", "split_heads_backward")  # both take it

    heads: int
    out_shape: tuple[int, ...] | None = None  # the forward's output shape (None: not checked)
    dtype: Any = None  # the forward's dtype (None: any floating dtype)


def _floating(x: Array) -> Array:
    """``x``, after checking that it is a floating array (the layer forms carry gradients)."""
    require_floating_arrays("heads", x=x)
    return x


def split_heads_forward(x: Array, heads: int) -> tuple[Array, HeadsCache]:
    """Layer form of :func:`split_heads`: ``(out, cache)``; ``x`` real floating."""
    out = split_heads(_floating(x), heads)
    return out, HeadsCache(heads=int(heads), out_shape=tuple(out.shape), dtype=x.dtype)


def split_heads_backward(dout: Array, cache: HeadsCache) -> dict[str, Array]:
    """``{"x": merge_heads(dout)}``: splitting only moves entries, so its backward moves them back."""
    _check_dout(dout, cache, "split_heads_backward")
    return {"x": merge_heads(dout)}


def merge_heads_forward(x: Array) -> tuple[Array, HeadsCache]:
    """Layer form of :func:`merge_heads`: ``(out, cache)``; ``x`` real floating, with at least one head (the
    backward splits ``dout`` into them again)."""
    _floating(x)
    if x.ndim >= 3 and x.shape[-3] == 0:
        raise ValueError(f"merge_heads needs at least one head, got x of shape {tuple(x.shape)} (..., heads, N, d)")
    out = merge_heads(x)
    return out, HeadsCache(heads=x.shape[-3], out_shape=tuple(out.shape), dtype=x.dtype)


def merge_heads_backward(dout: Array, cache: HeadsCache) -> dict[str, Array]:
    """``{"x": split_heads(dout, heads)}``."""
    _check_dout(dout, cache, "merge_heads_backward")
    return {"x": split_heads(dout, cache.heads)}


def _check_dout(dout: Array, cache: HeadsCache, backward: str) -> None:
    check_cache(cache, HeadsCache, backward)
    shape = cache.out_shape if cache.out_shape is not None else tuple(getattr(dout, "shape", ()))
    require_dout(dout, shape, cache.dtype, where=backward.removesuffix("_backward"))
