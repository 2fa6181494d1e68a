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

from ..backend import to_numpy
from ._common import MAP_CMAP, as_numpy, grey, new_figure, plain_text, show_map

__all__ = ["draw_outline", "plot_denoising_steps", "plot_maps_by_layer_and_head"]


def _even_columns(count: int, shown: int) -> list[int]:
    return sorted({round(float(v)) for v in np.linspace(0, count - 1, min(shown, count))})


OUTLINE_COLOUR = "#00e5ff"  # cyan: visible on magma's black, purple, orange and pale yellow
OUTLINE_STYLES = ("-", "--", ":", "-.")


def draw_outline(ax: Any, mask: np.ndarray, *, linestyle: str = "-", colour: str = OUTLINE_COLOUR) -> Any:
    """The outline of a bool ``(H, W)`` mask on an ``imshow`` of an ``H×W`` map: the pixel edges between the
    mask and the rest, drawn as line segments (pixel-exact, no smoothing). Returns the LineCollection."""
    from matplotlib.collections import LineCollection

    m = np.pad(np.asarray(mask, dtype=bool), 1)  # (H + 2, W + 2): a border of False
    segments = []
    # vertical edges: between columns c − 1 and c of the padded map, i.e. at x = c − 1.5 on the image
    rows, cols = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])
    segments += [((c - 0.5, r - 0.5), (c - 0.5, r + 0.5)) for r, c in zip(rows, cols, strict=True)]
    rows, cols = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # horizontal edges
    segments += [((c - 0.5, r - 0.5), (c + 0.5, r - 0.5)) for r, c in zip(rows, cols, strict=True)]
    lines = LineCollection(segments, colors=colour, linewidths=1.4, linestyles=linestyle, capstyle="projecting")
    ax.add_collection(lines)
    return lines


def mark_uniform(bar: Any, uniform: float, vmax: float, label: str) -> None:
    """A tick labelled ``label`` at ``uniform`` on a linear colour bar from 0 to ``vmax`` (ticks too close to
    it are dropped), when it lies on the scale."""
    if not 0.0 <= uniform <= vmax:
        return
    ticks = [float(t) for t in bar.get_ticks() if 0.0 <= t <= vmax and abs(t - uniform) > 0.06 * vmax]
    labels = [f"{t:.2g}" for t in ticks]
    order = np.argsort([*ticks, uniform])
    bar.set_ticks([[*ticks, uniform][i] for i in order], labels=[[*labels, label][i] for i in order])


def plot_denoising_steps(
    images: Any,
    word_maps: Any,
    tokens: Sequence[str],
    *,
    timesteps: Sequence[int] | None = None,
    columns: Sequence[int] | None = None,
    outlines: Mapping[str, Any] | None = None,
    mean_column: bool = False,
    image_label: str = "x̂₀",
    map_label: str = "cross-attention weight",
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
        outlines: name → bool ``(H, W)`` mask, e.g. the objects of the final image: drawn as outlines
            (cyan, one line style each, named in a legend) on every map, so that a map can be read
            against the objects without blending the image into its colours.
        mean_column: add a column with the maps averaged over all ``S`` steps (its top panel holds no
            image: no one image goes with a mean over steps).
        image_label: the name of the top row; map_label: the colour bar's.
        title: the figure's title.

    The maps are drawn on their own (no image under them), so each colour is the colour bar's; they
    share one linear scale from 0 to the largest shown weight, and a tick of the colour bar marks the
    weight of uniform attention, ``1/M``.
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
    masks = {name: np.asarray(to_numpy(m), dtype=bool) for name, m in (outlines or {}).items()}
    for name, m in masks.items():
        if m.shape != (H, W):
            raise ValueError(f"outline {name!r} has shape {m.shape}, the maps are {(H, W)}")
    shown = [maps[c] for c in cols]
    pictures: list[np.ndarray | None] = [imgs[c] for c in cols]
    labels = [f"step {c + 1}/{S}" + ("" if timesteps is None else f"\nt = {int(timesteps[c])}") for c in cols]
    if mean_column:
        shown.append(maps.mean(axis=0))
        pictures.append(None)
        labels.append(f"mean of the maps\nover all {S} steps")
    vmax = max(float(max(m.max() for m in shown)), 1e-12)
    ncol = len(shown)
    fig = new_figure(1.25 * ncol + 1.6, 1.25 * (M + 1) + 0.9 + 0.2 * bool(masks), layout="constrained")
    axes = fig.subplots(M + 1, ncol, squeeze=False)
    im = None
    for j in range(ncol):
        ax = axes[0, j]
        if pictures[j] is None:
            ax.set_axis_off()
        else:
            ax.imshow(np.clip(pictures[j], 0.0, 1.0), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(labels[j], fontsize=9)
        for m in range(M):
            im = show_map(axes[m + 1, j], shown[j][:, :, m], backdrop=None, vmin=0.0, vmax=vmax)
            for k, mask in enumerate(masks.values()):
                draw_outline(axes[m + 1, j], mask, linestyle=OUTLINE_STYLES[k % len(OUTLINE_STYLES)])
    axes[0, 0].set_ylabel(image_label, fontsize=10)
    for m in range(M):
        axes[m + 1, 0].set_ylabel(plain_text(tokens[m]), fontsize=10)
    bar = fig.colorbar(im, ax=axes[1:, :], shrink=0.8)
    bar.set_label(map_label, fontsize=10)
    mark_uniform(bar, 1.0 / M, vmax, f"1/{M}: uniform")
    if masks:
        from matplotlib.lines import Line2D

        styles = [OUTLINE_STYLES[k % len(OUTLINE_STYLES)] for k in range(len(masks))]
        handles = [
            Line2D([], [], color=OUTLINE_COLOUR, linestyle=style, linewidth=1.4, label=plain_text(name))
            for style, name in zip(styles, masks, strict=True)
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False,
                   title="outlined on every map", title_fontsize=9)  # fmt: skip
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
        axes[r, 0].set_ylabel(f"{plain_text(name)}\n{a.shape[2]}×{a.shape[3]}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="cross-attention weight")
    fig.suptitle(title or "one word's map in every layer and head", fontsize=11)
    return fig
