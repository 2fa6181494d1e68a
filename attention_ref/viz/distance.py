r"""How far a pixel looks: the mean attention distance, per query and per head.

For query pixel ``i`` at position ``p_i`` (row, column), with weights ``P_ij`` over
the pixels of the same map,

.. math:: d_i = \sum_j P_{ij}\, \lVert p_i - p_j \rVert_2 \quad \text{(in pixels)},

the distance of the weights' centre of mass of "how far": 0 when a pixel looks
only at itself, about half the map's side for uniform weights. The mean of
``d_i`` over query pixels (and images) gives one number per head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._common import new_figure
from .maps import as_weights

__all__ = ["attention_distance", "mean_attention_distance", "plot_attention_distance", "uniform_distance"]


def _pixel_distances(shape: tuple[int, int]) -> np.ndarray:
    """``(N, N)``: Euclidean distance between pixels ``i = row·W + col`` and ``j``."""
    H, W = shape
    rows, cols = np.divmod(np.arange(H * W), W)
    return np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])


def attention_distance(weights: Any, shape: tuple[int, int]) -> np.ndarray:
    """``(B, heads, N)``: ``d_i = Σ_j P_ij ‖p_i − p_j‖`` for every query pixel (module docstring).

    Inputs:
        weights: self-attention weights ``(B, heads, H·W, H·W)`` (or without B / heads), any backend.
        shape: ``(H, W)``.
    """
    w = as_weights(weights)
    H, W = shape
    if w.shape[2:] != (H * W, H * W):
        raise ValueError(f"self-attention weights of shape {w.shape} do not fit a {H}×{W} map")
    # d_i = Σ_j P_ij · dist(i, j)
    return np.sum(w * _pixel_distances(shape), axis=-1)


def mean_attention_distance(weights: Any, shape: tuple[int, int]) -> np.ndarray:
    """``(heads,)``: :func:`attention_distance` averaged over images and query pixels."""
    return attention_distance(weights, shape).mean(axis=(0, 2))


def uniform_distance(shape: tuple[int, int]) -> float:
    """The mean attention distance of uniform weights on an ``H×W`` map (a reference line)."""
    return float(_pixel_distances(shape).mean())


def plot_attention_distance(
    weights: Any | Mapping[str, Any],
    shape: tuple[int, int],
    *,
    title: str | None = None,
) -> Figure:
    """Mean attention distance per head (bars) and its distribution over query pixels (histograms).

    Inputs:
        weights: one weights array ``(B, heads, N, N)`` or a dict ``name → weights`` to compare
            (e.g. ``{"at initialisation": w0, "trained": w1}``).
        shape: ``(H, W)``.
    """
    named = dict(weights) if isinstance(weights, Mapping) else {"": weights}
    dists = {name: attention_distance(w, shape) for name, w in named.items()}
    reference = uniform_distance(shape)
    fig = new_figure(8.0, 3.0, layout="constrained")
    bars, hist = fig.subplots(1, 2)
    width = 0.8 / len(dists)
    colours = ["#7570b3", "#d95f02", "#1b9e77", "#e7298a"]
    top = float(np.hypot(*np.subtract(shape, 1)))
    bins = np.linspace(0.0, top, 30)
    for k, (name, d) in enumerate(dists.items()):
        per_head = d.mean(axis=(0, 2))
        heads = np.arange(per_head.size)
        bars.bar(heads + k * width, per_head, width=width, color=colours[k % 4], label=name or None)
        for h in heads:
            label = f"{name} head {h}".strip() if per_head.size > 1 else (name or "all queries")
            hist.hist(
                d[:, h].ravel(),
                bins=bins,
                histtype="step",
                linewidth=1.5,
                color=colours[k % 4],
                linestyle=["-", "--", ":", "-."][h % 4],
                label=label,
            )
    bars.axhline(reference, color="grey", linestyle="--", linewidth=1, label="uniform weights")
    hist.axvline(reference, color="grey", linestyle="--", linewidth=1)
    bars.set_xticks(np.arange(max(d.shape[1] for d in dists.values())) + 0.4 - width / 2)
    bars.set_xticklabels([f"head {h}" for h in range(max(d.shape[1] for d in dists.values()))])
    bars.set_ylabel("mean attention distance (pixels)")
    bars.legend(fontsize=8, frameon=True, loc="lower right")
    hist.set_xlabel("attention distance of a query pixel (pixels)")
    hist.set_ylabel("query pixels")
    hist.legend(fontsize=8, frameon=False)
    fig.suptitle(title or "how far each head looks", fontsize=11)
    return fig
