r"""Who may attend to whom: the causal mask of a sequence, and on an H × W map the dense masks that window and
neighborhood attention equal.

* :func:`causal_mask` (``N`` queries, ``M`` keys): query ``i`` sees keys up to a diagonal. When ``N ≠ M`` the
  diagonal must be placed, and libraries differ: ``alignment="top_left"`` (PyTorch's ``is_causal``, the
  default) lets query ``i`` see keys ``j ≤ i``; ``alignment="bottom_right"`` (FlashAttention ≥ 2.1, and a
  decoder that appends ``N`` new queries to ``M − N`` cached keys) lets it see ``j ≤ i + M − N``. They agree
  when ``N == M``. Bottom-right with ``N > M`` leaves the first ``N − M`` queries without a key (their output
  is 0, as for every fully masked row).

The map masks:

Pixels are tokens in row-major order, token ``t = row·W + col`` (as everywhere in attention_ref). Each
function returns a boolean ``(H·W, H·W)`` mask, True = query ``t`` may attend to key ``t'``, to be given
to :func:`attention_ref.attention_forward`; the efficient variants compute the same thing without it.
Both patterns are separable: ``mask[(i, j), (y, x)] = rows_ok[i, y] and cols_ok[j, x]``.

* :func:`window_mask` (Swin): the map is cut into ``window × window`` tiles of a grid offset by
  ``shift``; two pixels attend iff they lie in the same tile. Along one axis of length ``L`` with window
  ``w`` and shift ``s``, pixel ``i`` lies in band ``⌊(i − s) / w⌋``: bands start at ``s, s + w, …``, and the
  pixels before ``s`` form a band of their own. There is no wrap-around (pixel 0 and pixel ``L − 1`` are
  never together), which is what Swin's cyclic roll plus region mask produces.
* :func:`neighborhood_mask` (NATTEN): pixel ``i`` attends to the ``kernel`` rows starting at
  ``start(i) = clip(i − ⌊kernel/2⌋, 0, L − kernel)``: centred on ``i`` in the interior, and shifted (not
  shrunk) at the borders, so every query sees exactly ``kernel²`` keys.

``window``, ``shift`` and ``kernel`` are an int (both axes) or a pair ``(rows, cols)``.
"""

from __future__ import annotations

import operator
from types import ModuleType
from typing import Any

import array_api_compat.numpy as default_xp

from ..backend import Array, device_of, namespace

__all__ = [
    "CAUSAL_ALIGNMENTS",
    "causal_mask",
    "neighborhood_mask",
    "neighborhood_starts",
    "window_bands",
    "window_mask",
]

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def as_pair(name: str, value: Any) -> tuple[int, int]:
    """An integer or a pair of integers (Python or NumPy ints, not bools) as ``(rows, cols)``, else ``TypeError``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(_is_integer(n) for n in pair):
        raise TypeError(f"{name} must be an int or a pair of ints (rows, cols), got {value!r}")
    return operator.index(pair[0]), operator.index(pair[1])


def _is_integer(n: Any) -> bool:
    if isinstance(n, bool):
        return False
    try:
        operator.index(n)
    except TypeError:
        return False
    return True


def check_window(height: int, width: int, window: Any, shift: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(window, shift)`` as pairs; ``ValueError`` unless each window divides its axis and ``0 ≤ shift < window``."""
    window, shift = as_pair("window", window), as_pair("shift", shift)
    if min(window) < 1:
        raise ValueError(f"window must be positive, got {window}")
    if height % window[0] or width % window[1]:
        raise ValueError(f"a {height}×{width} map cannot be cut into {window[0]}×{window[1]} windows")
    if not all(0 <= s < w for s, w in zip(shift, window, strict=True)):
        raise ValueError(f"shift must satisfy 0 ≤ shift < window, got shift {shift} for window {window}")
    return window, shift


def check_kernel(height: int, width: int, kernel: Any) -> tuple[int, int]:
    """``kernel`` as a pair; ``ValueError`` unless each is odd and fits its axis."""
    kernel = as_pair("kernel", kernel)
    if min(kernel) < 1 or kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ValueError(f"kernel must be odd and positive, got {kernel}")
    if kernel[0] > height or kernel[1] > width:
        raise ValueError(f"a {kernel[0]}×{kernel[1]} neighborhood does not fit a {height}×{width} map")
    return kernel


def window_bands(xp: ModuleType, length: int, window: int, shift: int, device: Any = None) -> Array:
    """The band of each pixel along one axis, ``⌊(i − shift) / window⌋``: ``(length,)`` integers."""
    return xp.floor_divide(xp.arange(length, device=device) - shift, window)


def neighborhood_starts(xp: ModuleType, length: int, kernel: int, device: Any = None) -> Array:
    """First key of each pixel's neighborhood along one axis, ``clip(i − ⌊kernel/2⌋, 0, length − kernel)``."""
    centred = xp.arange(length, device=device) - kernel // 2
    return xp.minimum(xp.maximum(centred, 0), length - kernel)


def _separable(xp: ModuleType, rows_ok: Array, cols_ok: Array) -> Array:
    """``mask[(i, j), (y, x)] = rows_ok[i, y] and cols_ok[j, x]`` as ``(H·W, H·W)``."""
    height, width = rows_ok.shape[0], cols_ok.shape[0]
    # (H, 1, H, 1) & (1, W, 1, W) → (H, W, H, W): query (i, j), key (y, x)
    mask = xp.reshape(rows_ok, (height, 1, height, 1)) & xp.reshape(cols_ok, (1, width, 1, width))
    return xp.reshape(mask, (height * width, height * width))


def _namespace(like: Array | None) -> tuple[ModuleType, Any]:
    if like is None:
        return default_xp, None
    return namespace(like), device_of(like)


def window_mask(
    height: int,
    width: int,
    window: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
    *,
    like: Array | None = None,
) -> Array:
    """Swin (shifted) window attention as a dense mask ``(H·W, H·W)``, True = may attend.

    Inputs:
        height, width: the map size; each must be a multiple of the window.
        window: window size, int or ``(rows, cols)``.
        shift: offset of the window grid, ``0 ≤ shift < window`` (Swin uses ``window // 2``).
        like: an array whose backend and device the mask should have; NumPy when ``None``.
    """
    (wh, ww), (sh, sw) = check_window(height, width, window, shift)
    xp, device = _namespace(like)
    rows, cols = window_bands(xp, height, wh, sh, device), window_bands(xp, width, ww, sw, device)
    # same band along both axes ⇔ same window
    rows_ok = xp.expand_dims(rows, axis=1) == xp.expand_dims(rows, axis=0)  # (H, H)
    cols_ok = xp.expand_dims(cols, axis=1) == xp.expand_dims(cols, axis=0)  # (W, W)
    return _separable(xp, rows_ok, cols_ok)


def neighborhood_mask(height: int, width: int, kernel: int | tuple[int, int], *, like: Array | None = None) -> Array:
    """NATTEN neighborhood attention as a dense mask ``(H·W, H·W)``, True = may attend.

    Inputs:
        height, width: the map size.
        kernel: neighborhood size, odd, int or ``(rows, cols)``; at most the map size.
        like: an array whose backend and device the mask should have; NumPy when ``None``.

    Every row of the mask has exactly ``kernel_rows · kernel_cols`` True entries.
    """
    kh, kw = check_kernel(height, width, kernel)
    xp, device = _namespace(like)

    def axis_ok(length: int, k: int) -> Array:
        start = xp.expand_dims(neighborhood_starts(xp, length, k, device), axis=1)  # (L, 1)
        keys = xp.expand_dims(xp.arange(length, device=device), axis=0)  # (1, L)
        # start(i) ≤ y < start(i) + kernel
        return (keys >= start) & (keys < start + k)

    return _separable(xp, axis_ok(height, kh), axis_ok(width, kw))


def causal_mask(queries: int, keys: int, alignment: str = "top_left", *, like: Array | None = None) -> Array:
    """The causal mask ``(N, M)`` of ``N = queries`` queries over ``M = keys`` keys, True = may attend.

    Inputs:
        queries, keys: ``N`` and ``M``, non-negative integers.
        alignment: where the diagonal sits when ``N ≠ M`` (the same mask when ``N == M``):
            ``"top_left"`` — query ``i`` sees keys ``j ≤ i``: PyTorch's ``scaled_dot_product_attention(...,
            is_causal=True)`` and ``torch.tril(torch.ones(N, M))``;
            ``"bottom_right"`` — query ``i`` sees keys ``j ≤ i + M − N``: FlashAttention ≥ 2.1's ``causal=True``
            (before 2.1 it was top-left), the last query sees every key, as when ``N`` new tokens attend to a
            cache of ``M − N`` earlier ones and to themselves.
        like: an array whose backend and device the mask should have; NumPy when ``None``.

    With ``"bottom_right"`` and ``N > M`` the first ``N − M`` rows hold no True (fully masked rows: output 0).
    """
    if alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"alignment must be one of {', '.join(CAUSAL_ALIGNMENTS)}; got {alignment!r}")
    if not (_is_integer(queries) and _is_integer(keys)) or queries < 0 or keys < 0:
        raise TypeError(f"queries and keys must be non-negative ints, got {queries!r} and {keys!r}")
    xp, device = _namespace(like)
    offset = 0 if alignment == "top_left" else keys - queries
    i = xp.expand_dims(xp.arange(queries, device=device), axis=1)  # (N, 1)
    j = xp.expand_dims(xp.arange(keys, device=device), axis=0)  # (1, M)
    # j ≤ i + offset
    return j <= i + offset
