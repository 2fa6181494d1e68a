"""Cross-attention during denoising: each word's map under the image, step by step; per layer and head.

Both plots take plain arrays (a diffusion sampler's trace, e.g.
:class:`attention_ref.toys.diffusion.SampleResult`), so they work for any model
whose per-step maps are at hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._common import MAP_CMAP, as_numpy, grey, new_figure, show_map

__all__ = ["plot_denoising_steps", "plot_maps_by_layer_and_head"]


def _even_columns(count: int, shown: int) -> list[int]:
    return sorted({round(float(v)) for v in np.linspace(0, count - 1, min(shown, count))})


def plot_denoising_steps(
    images: Any,
    word_maps: Any,
    tokens: Sequence[str],
    *,
    timesteps: Sequence[int] | None = None,
    columns: Sequence[int] | None = None,
    mean_column: bool = True,
    image_label: str = "x̂₀",
    title: str | None = None,
) -> Figure:
    """A prompt denoised: the image at chosen steps, each word's map under it.

    Inputs:
        images: ``(S, H, W, 3)`` in [0, 1], the image shown for each of the ``S`` steps (e.g. the
            clean image each step predicts).
        word_maps: ``(S, H, W, M)``: at each step, each token's weights over the pixels (e.g. the
            cross-attention averaged over layers and heads, so a pixel's weights sum to 1 over tokens).
        tokens: the ``M`` token strings; one row per token.
        timesteps: ``(S,)`` the diffusion step ``t`` of each step, for the column titles.
        columns: which steps to show (default: 6 evenly spaced, first and last included).
        mean_column: add a column with the maps averaged over all ``S`` steps.
        image_label: the name of the top row.
        title: the figure's title.

    Maps share one colour scale from 0 to the largest shown value, with one colour bar; each
    is drawn over the grey final image.
    """
    imgs = as_numpy(images, "images")
    maps = as_numpy(word_maps, "word_maps")
    if imgs.ndim != 4 or maps.ndim != 4 or imgs.shape[:3] != maps.shape[:3]:
        raise ValueError(f"images {imgs.shape} and word_maps {maps.shape} should be (S, H, W, 3) and (S, H, W, M)")
    S, H, W, M = maps.shape
    if len(tokens) != M:
        raise ValueError(f"{len(tokens)} token labels for {M} maps")
    cols = _even_columns(S, 6) if columns is None else [int(c) for c in columns]
    if any(not 0 <= c < S for c in cols):
        raise ValueError(f"columns {cols} outside the {S} steps")
    shown = [maps[c] for c in cols]
    pictures = [imgs[c] for c in cols]
    labels = [f"step {c + 1}/{S}" + ("" if timesteps is None else f"\nt = {int(timesteps[c])}") for c in cols]
    if mean_column:
        shown.append(maps.mean(axis=0))
        pictures.append(imgs[-1])
        labels.append(f"mean of all {S} steps\n(final image)")
    backdrop = grey(imgs[-1], (H, W))
    vmax = max(float(max(m.max() for m in shown)), 1e-12)
    ncol = len(shown)
    fig = new_figure(1.25 * ncol + 1.3, 1.25 * (M + 1) + 0.7, layout="constrained")
    axes = fig.subplots(M + 1, ncol, squeeze=False)
    im = None
    for j in range(ncol):
        ax = axes[0, j]
        ax.imshow(np.clip(pictures[j], 0.0, 1.0), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(labels[j], fontsize=9)
        for m in range(M):
            im = show_map(axes[m + 1, j], shown[j][:, :, m], backdrop=backdrop, vmin=0.0, vmax=vmax)
    axes[0, 0].set_ylabel(image_label, fontsize=10)
    for m in range(M):
        axes[m + 1, 0].set_ylabel(tokens[m], fontsize=10)
    fig.colorbar(im, ax=axes[1:, :], shrink=0.8, label="cross-attention weight")
    fig.suptitle(title or "each word's cross-attention map under the image, step by step", fontsize=11)
    return fig


def plot_maps_by_layer_and_head(
    maps: Mapping[str, Any],
    steps: Sequence[int],
    *,
    step_labels: Sequence[str] | None = None,
    image: Any | None = None,
    title: str | None = None,
) -> Figure:
    """One word's map in every layer and head, at a few steps side by side.

    Inputs:
        maps: layer name → ``(S, heads, h, w)``: the word's weights over that layer's grid at every step
            (layers may differ in grid and heads).
        steps: the step indices to compare (e.g. an early and a late one).
        step_labels: a label per step (default ``"step i"``).
        image: ``(H, W[, 3])`` drawn grey under the maps when a layer's grid is the image's.
        title: the figure's title.

    One row per layer; for each step, one column per head. Colour scale shared by all panels.
    """
    arrays = {name: as_numpy(a, name) for name, a in maps.items()}
    if not arrays:
        raise ValueError("no layers to plot")
    for name, a in arrays.items():
        if a.ndim != 4:
            raise ValueError(f"maps[{name!r}] has shape {a.shape}; expected (steps, heads, h, w)")
    heads = max(a.shape[1] for a in arrays.values())
    labels = list(step_labels) if step_labels is not None else [f"step {s + 1}" for s in steps]
    vmax = max(float(a[list(steps)].max()) for a in arrays.values())
    ncol = heads * len(steps)
    fig = new_figure(1.2 * ncol + 2.0, 1.3 * len(arrays) + 0.9, layout="constrained")
    axes = fig.subplots(len(arrays), ncol, squeeze=False)
    im = None
    for r, (name, a) in enumerate(arrays.items()):
        backdrop = grey(image, a.shape[2:]) if image is not None and tuple(a.shape[2:]) == np.shape(image)[:2] else None
        for si, s in enumerate(steps):
            for k in range(heads):
                ax = axes[r, si * heads + k]
                if k >= a.shape[1]:
                    ax.axis("off")
                    continue
                im = show_map(ax, a[s, k], backdrop=backdrop, vmin=0.0, vmax=vmax, cmap=MAP_CMAP)
                if r == 0:
                    ax.set_title(f"{labels[si]}\nhead {k}", fontsize=9)
        axes[r, 0].set_ylabel(f"{name}\n{a.shape[2]}×{a.shape[3]}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="cross-attention weight")
    fig.suptitle(title or "one word's map in every layer and head", fontsize=11)
    return fig
