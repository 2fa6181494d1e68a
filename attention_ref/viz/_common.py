"""Helpers every plot shares: arrays to NumPy, the grey backdrop and its note, query markers, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..backend import to_numpy

__all__ = [
    "BACKDROP_NOTE",
    "as_numpy",
    "grey",
    "mark_query",
    "new_figure",
    "note",
    "pixel_of",
    "plain_text",
    "save_figure",
    "show_map",
    "token_of",
]

MAP_CMAP = "magma"  # attention weights
SEQ_CMAP = "viridis"  # other magnitudes
OVERLAY_ALPHA = 0.75


def as_numpy(x: Any, name: str = "array") -> np.ndarray:
    """Any backend's array (or a nested list) as a float64 NumPy array."""
    try:
        return np.asarray(to_numpy(x), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from err


def plain_text(text: Any) -> str:
    """``text`` as matplotlib draws it literally: every ``$`` escaped, so that a token such as ``"$x^$"`` is not
    parsed as mathtext (a ValueError when the figure is saved) and ``"costs $5 and $6"`` is not set as math.

    Every string that comes from data — a token, a word, a layer's name — goes through it before it
    reaches a title, a label or a legend; text the caller writes as a caption may use mathtext.
    """
    return str(text).replace("$", r"\$")


def grey(image: Any | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A grey ``(H, W)`` backdrop in [0, 1] from an ``(H, W)`` or ``(H, W, C)`` input map.

    RGB images (3 channels) are turned into luminance; any other channel count
    into the per-pixel norm of the channel vector. ``None`` gives ``None``.
    """
    if image is None:
        return None
    a = as_numpy(image, "image")
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a @ np.array([0.299, 0.587, 0.114])
    elif a.ndim == 3:
        a = np.linalg.norm(a, axis=-1)
    if a.shape != tuple(shape):
        raise ValueError(f"the image's map is {a.shape[:2]}, the attention's is {tuple(shape)}")
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def pixel_of(query: int | tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """``(row, col)`` of a query given as a pixel or as a token index ``row·W + col``."""
    H, W = shape
    if isinstance(query, (int, np.integer)):
        if not 0 <= query < H * W:
            raise ValueError(f"query token {query} is outside a {H}×{W} map")
        return int(query) // W, int(query) % W
    r, c = (int(v) for v in query)
    if not (0 <= r < H and 0 <= c < W):
        raise ValueError(f"query pixel {(r, c)} is outside a {H}×{W} map")
    return r, c


def token_of(query: int | tuple[int, int], shape: tuple[int, int]) -> int:
    """The token index ``row·W + col`` of a query pixel."""
    r, c = pixel_of(query, shape)
    return r * shape[1] + c


def show_map(
    ax: Any,
    values: np.ndarray,
    *,
    backdrop: np.ndarray | None,
    vmin: float,
    vmax: float,
    cmap: str = MAP_CMAP,
    log: bool = False,
):
    """``values`` (H, W) at true resolution; over a grey backdrop with alpha when one is given.

    ``log``: a logarithmic colour scale from ``vmin`` (> 0; smaller values get its colour) to ``vmax``.
    """
    from matplotlib.colors import LogNorm, Normalize

    norm = LogNorm(vmin=vmin, vmax=vmax, clip=True) if log else Normalize(vmin=vmin, vmax=vmax)
    if backdrop is not None:
        ax.imshow(backdrop, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        im = ax.imshow(values, cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest")
    else:
        im = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return im


BACKDROP_NOTE = (
    "grey underneath the colours: the input map (luminance, or the length of each pixel's channel vector, "
    "scaled to 0–1)"
)


def note(fig: Figure, text: str | None) -> None:
    """A line of small text under the figure (e.g. what the grey backdrop is)."""
    if text:
        fig.supxlabel(text, fontsize=9, color="#444444")


def mark_query(ax: Any, pixel: tuple[int, int], *, color: str = "cyan", size: float = 80) -> None:
    """A cross on the query pixel."""
    ax.scatter([pixel[1]], [pixel[0]], marker="x", s=size, c=color, linewidths=2)


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    """A figure outside pyplot's global list: nothing leaks between plots, no GUI backend is needed.

    Jupyter shows it when it is a cell's value (with ``%matplotlib inline``, IPython's default).
    """
    return Figure(figsize=(width, height), **kwargs)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 80) -> Path:
    """Write ``fig`` as PNG with no "Software" tag, so a rerun does not change bytes needlessly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None}, bbox_inches="tight")
    return path
