"""Self-attention seen from one pixel: the H×W map of a query's weights, overlaid on the input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._common import BACKDROP_NOTE, as_numpy, grey, mark_query, new_figure, note, pixel_of, show_map, token_of

__all__ = ["as_weights", "plot_attention_grid", "plot_query_attention", "query_map"]


def as_weights(weights: Any) -> np.ndarray:
    """Attention weights as NumPy ``(B, heads, N, M)``; ``(heads, N, M)`` and ``(N, M)`` get the missing axes."""
    w = as_numpy(weights, "weights")
    if w.ndim == 2:
        w = w[None, None]
    elif w.ndim == 3:
        w = w[None]
    if w.ndim != 4:
        raise ValueError(f"weights must be (B, heads, N, M), (heads, N, M) or (N, M); got shape {w.shape}")
    return w


def _check_map(w: np.ndarray, shape: tuple[int, int], axis: int) -> None:
    H, W = shape
    if w.shape[axis] != H * W:
        raise ValueError(f"weights of shape {w.shape} have {w.shape[axis]} tokens on axis {axis}, not {H}×{W}={H * W}")


def query_map(
    weights: Any, query: int | tuple[int, int], shape: tuple[int, int], *, batch: int = 0, head: int | None = None
) -> np.ndarray:
    """``(H, W)``: the weights query pixel ``query`` puts on every pixel (mean over heads when ``head`` is None).

    Inputs:
        weights: self-attention weights ``(B, heads, H·W, H·W)`` (or without B / heads), any backend.
        query: ``(row, col)`` or the token index ``row·W + col``.
        shape: ``(H, W)``.
    """
    w = as_weights(weights)
    _check_map(w, shape, 2)
    _check_map(w, shape, 3)
    row = w[batch, :, token_of(query, shape)]  # (heads, H·W)
    row = row.mean(axis=0) if head is None else row[head]
    return row.reshape(shape)


def plot_query_attention(
    weights: Any,
    query: int | tuple[int, int],
    shape: tuple[int, int],
    *,
    image: Any | None = None,
    batch: int = 0,
    head: int | None = None,
    title: str | None = None,
    ax: Any | None = None,
) -> Figure:
    """One query pixel's attention over the map, on a grey copy of the input, the query marked ×.

    Inputs:
        weights: ``(B, heads, H·W, H·W)`` (or without B / heads), any backend.
        query: ``(row, col)`` or token index; shape: ``(H, W)``.
        image: the input map ``(H, W)``, ``(H, W, 3)`` or ``(H, W, C)`` for the backdrop, or None.
        head: which head (None: the mean over heads); title: the figure's finding.
        ax: draw into this Axes instead of a new figure.

    Returns:
        The figure (``ax.figure`` when an Axes was given).
    """
    values = query_map(weights, query, shape, batch=batch, head=head)
    if ax is None:
        fig = new_figure(3.6, 3.2)
        ax = fig.add_subplot()
    im = show_map(ax, values, backdrop=grey(image, shape), vmin=0.0, vmax=float(values.max()))
    mark_query(ax, pixel_of(query, shape))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    r, c = pixel_of(query, shape)
    ax.set_title(title or f"where the pixel at row {r}, col {c} looks", fontsize=10)
    return ax.figure


def plot_attention_grid(
    weights: Any,
    queries: Sequence[int | tuple[int, int]],
    shape: tuple[int, int],
    *,
    image: Any | None = None,
    batch: int = 0,
    heads: Sequence[int] | None = None,
    row_labels: Sequence[str] | None = None,
    transpose: bool = False,
    label: str = "attention weight",
    log: bool = False,
    backdrop_note: str | None = BACKDROP_NOTE,
    title: str | None = None,
) -> Figure:
    """A grid of query maps: one row per head, one column per query, one shared colour scale.

    Inputs as for :func:`plot_query_attention`; ``heads`` defaults to every head;
    ``row_labels`` replaces the "head h" labels (e.g. to compare weights stacked
    along the head axis: before and after training); ``transpose`` puts the
    queries in rows and the heads in columns; ``label`` names the colour bar.
    ``log``: a shared logarithmic scale from ``1/(10·M)`` to the largest weight, with the weight
    of uniform attention, ``1/M`` for ``M`` keys, marked on the colour bar by a white line (the query
    pixels are marked × in cyan); it keeps weights near uniform visible beside weights near 1, where a
    linear scale shows them black.
    ``backdrop_note``: the line under the figure saying what the grey backdrop is (drawn only
    with an ``image``; None for none).
    """
    w = as_weights(weights)
    heads = list(range(w.shape[1])) if heads is None else list(heads)
    names = [f"head {h}" for h in heads] if row_labels is None else list(row_labels)
    if len(names) != len(heads):
        raise ValueError(f"{len(names)} row labels for {len(heads)} heads")
    maps = [[query_map(w, q, shape, batch=batch, head=h) for q in queries] for h in heads]
    vmax = max(float(m.max()) for row in maps for m in row)
    keys = w.shape[-1]
    vmin = min(0.1 / keys, vmax / 10) if log else 0.0
    backdrop = grey(image, shape)
    rows, cols = (len(queries), len(heads)) if transpose else (len(heads), len(queries))
    aspect = shape[0] / shape[1]  # panels as tall as the map is, relative to its width
    fig = new_figure(1.9 * cols + 0.9, 1.75 * aspect * rows + 0.7 + 0.25 * (image is not None), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(len(heads)):
        for j, q in enumerate(queries):
            ax = axes[j, i] if transpose else axes[i, j]
            im = show_map(ax, maps[i][j], backdrop=backdrop, vmin=vmin, vmax=vmax, log=log)
            mark_query(ax, pixel_of(q, shape), size=50)
            r, c = pixel_of(q, shape)
            head_name, query_name = names[i], f"query: row {r}, col {c}"
            top, side = (head_name, query_name) if transpose else (query_name, head_name)
            if ax in axes[0]:
                ax.set_title(top, fontsize=10)
            if ax is (axes[j, 0] if transpose else axes[i, 0]):
                ax.set_ylabel(side, fontsize=10)
    if log:
        bar = fig.colorbar(im, ax=axes, shrink=0.8, label=f"{label} (log scale; white line: uniform, 1/{keys})")
        bar.ax.axhline(1.0 / keys, color="black", linewidth=4)
        bar.ax.axhline(1.0 / keys, color="white", linewidth=2)
    else:
        fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    if image is not None:
        note(fig, backdrop_note)
    fig.suptitle(title or "each head's weights, per query pixel", fontsize=11)
    return fig
