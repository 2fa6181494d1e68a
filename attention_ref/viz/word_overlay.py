"""Word maps laid over the generated image: where in the picture each word of the prompt was read.

The maps come from :meth:`attention_ref.interop.trace.Trace.word_maps` (any size: a map smaller than
the image is stretched over it, each of its cells a sharp rectangle; ask ``word_maps(size=image
size)`` for maps resized by the trace's documented interpolation instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..backend import Array
from ._common import MAP_CMAP, OVERLAY_ALPHA, as_numpy, new_figure, plain_text

__all__ = ["plot_word_maps"]


def _rgb01(image: Any) -> np.ndarray:
    """An ``(h, w)`` or ``(h, w, 3|4)`` image (uint8, or floats in [0, 1]; a PIL image) as ``(h, w, 3)`` in [0, 1]."""
    raw = np.asarray(image)
    a = as_numpy(raw, "image")
    if raw.dtype == np.uint8:
        a = a / 255.0
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (h, w) or (h, w, 3), got shape {a.shape}")
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"image values must lie in [0, 1] (or be uint8); got {a.min():.3g} to {a.max():.3g}")
    return a[..., :3]


def plot_word_maps(
    image: Array | Any,  # or a PIL image
    maps: Array,
    words: Sequence[str],
    *,
    title: str | None = None,
    vmax: float | None = None,
    alpha: float = OVERLAY_ALPHA,
    label: str = "attention weight",
) -> Figure:
    """The image, then each word's map over a grey copy of it; the word under its map; one shared colour bar.

    Inputs:
        image: the generated image, ``(h, w, 3)`` or ``(h, w)``, uint8 or floats in [0, 1] (a PIL image works).
        maps: ``(len(words), H, W)`` word maps of one sample (``word_maps(...)[b]``), any backend, any size.
        words: the words, in the order of ``maps``.
        title: the figure's title (say what it shows); default "where each word is read from".
        vmax: the top of the colour scale (default the largest value over all maps, so that words compare).
        alpha: the maps' opacity over the grey image.
        label: what the colours are, under the colour bar: say so when the maps are not weights (e.g.
            ``word_maps(..., normalize="minmax")`` stretches each map to [0, 1]).
    """
    rgb = _rgb01(image)
    m = as_numpy(maps, "maps")
    if m.ndim != 3 or m.shape[0] != len(words):
        raise ValueError(f"maps must be (len(words), H, W) = ({len(words)}, H, W), got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"no map to draw: maps of shape {m.shape} (give at least one word and a non-empty map)")
    h, w = rgb.shape[:2]
    backdrop = rgb @ np.array([0.299, 0.587, 0.114])  # luminance   (h, w)
    top = float(m.max()) if vmax is None else float(vmax)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # every map stretched over the image's pixels
    fig = new_figure(2.0 * (len(words) + 1) + 0.8, 2.6, layout="constrained")
    axes = fig.subplots(1, len(words) + 1, squeeze=False)[0]
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_xlabel("image", fontsize=10)
    im = None
    for ax, word, values in zip(axes[1:], words, m, strict=True):
        ax.imshow(backdrop, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        im = ax.imshow(values, cmap=MAP_CMAP, vmin=0.0, vmax=max(top, 1e-12), alpha=alpha, extent=extent,
                       interpolation="nearest")  # fmt: skip
        ax.set_xlabel(plain_text(word), fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes[1:]), shrink=0.85, label=label)
    fig.suptitle(title or "where each word is read from", fontsize=11)
    return fig
