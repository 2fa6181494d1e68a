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

from ..backend import Array, namespace

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
    """``(..., N, heads·d)`` → ``(..., heads, N, d)``, channel ``c = head·d + j``."""
    xp = namespace(x)
    if x.ndim < 2:
        raise ValueError(f"split_heads needs x of shape (..., N, C), got {tuple(x.shape)}")
    *lead, N, C = x.shape
    if heads < 1 or C % heads != 0:
        raise ValueError(f"{C} channels are not divisible into {heads} heads")
    x = xp.reshape(x, (*lead, N, heads, C // heads))  # (..., N, heads, d)
    n = len(lead)
    return xp.permute_dims(x, (*range(n), n + 1, n, n + 2))  # (..., heads, N, d)


def merge_heads(x: Array) -> Array:
    """``(..., heads, N, d)`` → ``(..., N, heads·d)``; the inverse of :func:`split_heads`."""
    xp = namespace(x)
    if x.ndim < 3:
        raise ValueError(f"merge_heads needs x of shape (..., heads, N, d), got {tuple(x.shape)}")
    *lead, heads, N, d = x.shape
    n = len(lead)
    x = xp.permute_dims(x, (*range(n), n + 1, n, n + 2))  # (..., N, heads, d)
    return xp.reshape(x, (*lead, N, heads * d))  # (..., N, heads·d)


@dataclass(frozen=True)
class HeadsCache:
    heads: int


def split_heads_forward(x: Array, heads: int) -> tuple[Array, HeadsCache]:
    """Layer form of :func:`split_heads`: ``(out, cache)``."""
    return split_heads(x, heads), HeadsCache(heads=heads)


def split_heads_backward(dout: Array, cache: HeadsCache) -> dict[str, Array]:
    """``{"x": merge_heads(dout)}``: splitting only moves entries, so its backward moves them back."""
    return {"x": merge_heads(dout)}


def merge_heads_forward(x: Array) -> tuple[Array, HeadsCache]:
    """Layer form of :func:`merge_heads`: ``(out, cache)``."""
    return merge_heads(x), HeadsCache(heads=x.shape[-3])


def merge_heads_backward(dout: Array, cache: HeadsCache) -> dict[str, Array]:
    """``{"x": split_heads(dout, heads)}``."""
    return {"x": split_heads(dout, cache.heads)}
