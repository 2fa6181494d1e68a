r"""Window attention (Swin): exact attention inside non-overlapping windows, optionally shifted.

The ``H × W`` map is cut into ``window × window`` tiles and every pixel attends only to the pixels of
its own tile — ``(H·W)·window²`` logits instead of ``(H·W)²``. With ``shift = s > 0`` the tile grid is
offset by ``s`` pixels (Swin's shifted windows, which let information cross the previous layer's
window borders). This equals exact attention under :func:`attention_ref.attention.window_mask`.

How (Swin's trick, vectorised over all windows at once):

1. roll the map by ``−s`` along both axes, so the offset grid becomes the regular grid:
   ``rolled[i] = x[(i + s) mod H]``;
2. partition into windows, ``(..., H, W, d) → (..., H/w, W/w, w², d)``, token ``t = row·w + col``
   inside a window;
3. exact attention in every window, :func:`attention_ref.attention_forward`. The windows along the
   bottom and right edge of the rolled map hold pixels from both ends of the original map (the roll
   wrapped them around); a *region mask* ``(H/w, W/w, w², w²)`` lets two tokens attend only when they
   come from the same band ``⌊(i − s)/w⌋`` of the original map, so nothing wraps around;
4. merge the windows and roll back by ``+s``.

Backward: every step is linear bookkeeping except step 3, so the gradient runs the same steps in
reverse: roll ``dout`` by ``−s``, partition, :func:`attention_ref.attention_backward` per window,
merge, roll back by ``+s``. (A roll's adjoint is the opposite roll; a partition's is the merge.)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from .._checks import check_cache, require_dout
from ..backend import Array, device_of, namespace
from .dense_rows import check_row_range, spread_rows
from .exact import AttentionCache, attention_backward, attention_forward
from .maps import check_map_qkv
from .masks import check_window

__all__ = ["WindowAttentionCache", "window_attention_backward", "window_attention_forward"]


@dataclass(frozen=True)
class WindowAttentionCache:
    """The per-window exact attention cache, plus the geometry to undo the windowing."""

    backward_names: ClassVar[tuple[str, ...]] = ("window_attention_backward",)  # the backward that takes it

    attention: AttentionCache  # on (..., H/w, W/w, w², d) windows of the rolled map
    window: tuple[int, int]
    shift: tuple[int, int]
    height: int
    width: int

    @property
    def weights(self) -> Array:
        """``(..., H/w, W/w, w², w²)``: weights inside each window of the map rolled by ``−shift``.

        Window ``(a, b)``, token ``t = r·w + c`` is pixel ``((a·w + r + s) mod H, (b·w + c + s) mod W)``.
        """
        return self.attention.weights

    def weight_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the dense weights ``(..., stop − start, H·W)`` over the flattened map.

        Query token ``t = i·W + j`` (pixel ``(i, j)``); the row holds the weights of its window and 0
        elsewhere — the weights of exact attention under ``window_mask(H, W, window, shift)``.
        Builds only the rows asked for: ``weight_rows(0, H·W)`` is the whole ``(H·W)²`` matrix.
        """
        local = self.attention.weights  # (..., H/wh, W/ww, L, L), L = wh·ww
        xp, dev = namespace(local), device_of(local)
        height, width = self.height, self.width
        (wh, ww), (sh, sw) = self.window, self.shift
        *lead, n_rows, n_cols, L, _ = local.shape
        start, stop = check_row_range(start, stop, height * width)
        tokens = xp.arange(start, stop, device=dev)  # (R,)
        # pixel (i, j) sits at ((i − sh) mod H, (j − sw) mod W) of the rolled map …
        ri = xp.remainder(tokens // width - sh, height)
        rj = xp.remainder(tokens % width - sw, width)
        # … in window (ri // wh, rj // ww), as its token (ri mod wh)·ww + (rj mod ww)
        row = ((ri // wh) * n_cols + rj // ww) * L + (ri % wh) * ww + rj % ww
        local_rows = xp.take(xp.reshape(local, (*lead, n_rows * n_cols * L, L)), row, axis=-2)  # (..., R, L)
        # slot (r, c) of that window is rolled pixel (top + r, left + c),
        # original pixel ((top + r + sh) mod H, (left + c + sw) mod W)
        slot = xp.arange(L, device=dev)
        top = xp.expand_dims((ri // wh) * wh, axis=-1)  # (R, 1)
        left = xp.expand_dims((rj // ww) * ww, axis=-1)
        key_row = xp.remainder(top + slot // ww + sh, height)  # (R, L)
        key_col = xp.remainder(left + slot % ww + sw, width)
        return spread_rows(xp, local_rows, key_row * width + key_col, height * width)


def _roll(xp: ModuleType, x: Array, shift: tuple[int, int], sign: int) -> Array:
    """``x`` rolled by ``sign · shift`` along the H and W axes ``(-3, -2)``."""
    if shift == (0, 0):
        return x
    return xp.roll(x, shift=(sign * shift[0], sign * shift[1]), axis=(-3, -2))


def _partition(xp: ModuleType, x: Array, window: tuple[int, int]) -> Array:
    """``(..., H, W, c) → (..., H/wh, W/ww, wh·ww, c)``, token ``r·ww + col`` inside each window."""
    *lead, height, width, c = x.shape
    wh, ww = window
    x = xp.reshape(x, (*lead, height // wh, wh, width // ww, ww, c))  # (..., H/wh, wh, W/ww, ww, c)
    n = len(lead)
    x = xp.permute_dims(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))  # (..., H/wh, W/ww, wh, ww, c)
    return xp.reshape(x, (*lead, height // wh, width // ww, wh * ww, c))


def _merge(xp: ModuleType, x: Array, window: tuple[int, int]) -> Array:
    """The inverse of :func:`_partition`: ``(..., H/wh, W/ww, wh·ww, c) → (..., H, W, c)``."""
    *lead, n_rows, n_cols, _, c = x.shape
    wh, ww = window
    x = xp.reshape(x, (*lead, n_rows, n_cols, wh, ww, c))  # (..., H/wh, W/ww, wh, ww, c)
    n = len(lead)
    x = xp.permute_dims(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))  # (..., H/wh, wh, W/ww, ww, c)
    return xp.reshape(x, (*lead, n_rows * wh, n_cols * ww, c))


def _region_mask(
    xp: ModuleType, height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: Any
) -> Array:
    """``(H/wh, W/ww, wh·ww, wh·ww)``: inside each window of the rolled map, True iff both tokens come
    from the same band of the original map along both axes."""

    def bands_of_rolled(length: int, w: int, s: int) -> Array:
        # rolled pixel r is original pixel (r + s) mod L, whose band is ⌊((r + s) mod L − s) / w⌋
        original = xp.remainder(xp.arange(length, device=device) + s, length)
        return xp.floor_divide(original - s, w)

    rows = bands_of_rolled(height, window[0], shift[0])  # (H,)
    cols = bands_of_rolled(width, window[1], shift[1])  # (W,)

    def same_band(bands: Array) -> Array:
        # (H, W) band per pixel → (H/wh, W/ww, wh·ww) per window token → (H/wh, W/ww, wh·ww, wh·ww) equal?
        tokens = _partition(xp, xp.expand_dims(bands, axis=-1), window)[..., 0]
        return xp.expand_dims(tokens, axis=-1) == xp.expand_dims(tokens, axis=-2)

    row_bands = xp.broadcast_to(xp.expand_dims(rows, axis=1), (height, width))
    col_bands = xp.broadcast_to(xp.expand_dims(cols, axis=0), (height, width))
    return same_band(row_bands) & same_band(col_bands)


def window_attention_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
    scale: float | None = None,
) -> tuple[Array, WindowAttentionCache]:
    """Swin window attention on maps: each pixel attends to the pixels of its (shifted) window.

    Inputs:
        q: ``(..., H, W, d)`` queries, one per pixel, with at least one leading axis (batch or heads).
        k: ``(..., H, W, d)`` keys.
        v: ``(..., H, W, dv)`` values.
        window: window size, int or ``(rows, cols)``; must divide ``H`` and ``W`` (else ``ValueError``).
        shift: offset of the window grid, int or pair, ``0 ≤ shift < window`` (Swin uses ``window // 2``).
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``.

    Returns:
        out: ``(..., H, W, dv)``, equal to ``attention_forward`` on the flattened map under
            ``window_mask(H, W, window, shift)``.
        cache: :class:`WindowAttentionCache`; ``cache.weights`` is ``(..., H/w, W/w, w², w²)``.
    """
    xp, height, width = check_map_qkv(q, k, v)
    window, shift = check_window(height, width, window, shift)
    mask = None
    if shift != (0, 0):
        mask = _region_mask(xp, height, width, window, shift, device_of(q))
    # roll by -shift, then cut into windows   (..., H/wh, W/ww, wh·ww, channels)
    q_w, k_w, v_w = (_partition(xp, _roll(xp, t, shift, -1), window) for t in (q, k, v))
    out_w, attention = attention_forward(q_w, k_w, v_w, mask=mask, scale=scale)
    # merge the windows, roll back by +shift   (..., H, W, dv)
    out = _roll(xp, _merge(xp, out_w, window), shift, +1)
    return out, WindowAttentionCache(attention=attention, window=window, shift=shift, height=height, width=width)


def window_attention_backward(dout: Array, cache: WindowAttentionCache) -> dict[str, Array]:
    """Gradients of :func:`window_attention_forward`.

    Inputs:
        dout: ``(..., H, W, dv)``, the gradient of the loss with respect to ``out``.
        cache: from :func:`window_attention_forward`.

    Returns:
        ``{"q": (..., H, W, d), "k": (..., H, W, d), "v": (..., H, W, dv)}``.
    """
    check_cache(cache, WindowAttentionCache, "window_attention_backward")
    a = cache.attention
    xp = require_dout(dout, (*a.q.shape[:-4], cache.height, cache.width, a.v.shape[-1]), a.q.dtype, like=a.q)
    # the forward's steps in reverse: roll by -shift, partition, attention backward, merge, roll by +shift
    grads_w = attention_backward(_partition(xp, _roll(xp, dout, cache.shift, -1), cache.window), a)
    return {name: _roll(xp, _merge(xp, grads_w[name], cache.window), cache.shift, +1) for name in ("q", "k", "v")}
