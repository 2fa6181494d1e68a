r"""How far a pixel looks: the mean attention distance, per query and per head.

For query pixel ``i`` at position ``p_i`` (row, column), with weights ``P_ij`` over
the pixels of the same map,

.. math:: d_i = \sum_j P_{ij}\, \lVert p_i - p_j \rVert_2 \quad \text{(in pixels)},

the distance of the weights' centre of mass of "how far": 0 when a pixel looks
only at itself, about half the map's side for uniform weights. The mean of
``d_i`` over query pixels (and images) gives one number per head.

One number hides a lot: uniform weights on a 10×10 map already average about 5
pixels, so "far" may mean "everywhere" as easily as "one far place". The plot
therefore draws the whole profile, :func:`weight_within`: the share of a query's
weight within distance ``r``, against ``r``; :func:`field_distance` and the
plot's ``fields`` put a convolution stack's receptive field on the same scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..backend import to_numpy
from ._common import as_numpy, new_figure, pixel_of, token_of
from .maps import as_weights

__all__ = [
    "attention_distance",
    "field_distance",
    "mean_attention_distance",
    "plot_attention_distance",
    "uniform_distance",
    "weight_within",
]


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


def field_distance(field: Any, pixel: tuple[int, int]) -> float:
    """``Σ_j R_j ‖p_q − p_j‖ / Σ_j R_j``: the mean distance of an influence map ``R`` ``(H, W)`` from ``pixel``.

    The same statistic as :func:`attention_distance`, with the map (e.g. a receptive field from
    :func:`attention_ref.viz.conv_stack_receptive_field`) in place of a query's weights, so that a
    convolution stack and an attention head can be compared in pixels.
    """
    R = as_numpy(field, "field")
    if R.ndim != 2 or np.any(R < 0) or not R.sum() > 0:
        raise ValueError(f"field must be an (H, W) map of non-negative values, not all 0; got shape {R.shape}")
    r, c = pixel_of(pixel, R.shape)
    rows, cols = np.indices(R.shape)
    # Σ_j R_j ‖p_q − p_j‖ / Σ_j R_j
    return float(np.sum(R * np.hypot(rows - r, cols - c)) / R.sum())


def _per_query(a: Any, B: int, N: int, name: str) -> np.ndarray:
    """``a`` as ``(B, N)``: accepts ``(B, N)`` or ``(B, H, W)`` with ``H·W = N``."""
    a = np.asarray(to_numpy(a))
    if a.ndim not in (2, 3) or a.shape[0] != B or int(np.prod(a.shape[1:])) != N:
        raise ValueError(f"{name} must be (B, N) or (B, H, W) for {B} maps of {N} pixels, got shape {a.shape}")
    return a.reshape(B, N)


def weight_within(weights: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """How a query's weight accumulates with distance: ``F_i(r) = Σ_{j : ‖p_i − p_j‖ ≤ r} P_ij``.

    Inputs:
        weights: self-attention weights ``(B, heads, H·W, H·W)`` (or without B / heads), any backend.
        shape: ``(H, W)``.

    Returns:
        radii: ``(R,)``, every distance between two pixels of the map, ascending (``F`` steps there).
        within: ``(B, heads, N, R)``, ``F_i(r)`` at each radius; 1 at the largest for rows summing to 1.
    """
    w = as_weights(weights)
    H, W = shape
    if w.shape[2:] != (H * W, H * W):
        raise ValueError(f"self-attention weights of shape {w.shape} do not fit a {H}×{W} map")
    D = _pixel_distances(shape)  # (N, N)
    radii = np.unique(np.round(D, 9))
    order = np.argsort(D, axis=1, kind="stable")  # each query's keys, nearest first
    # the last key of row i at distance ≤ r, for every r   (N, R)
    last = np.stack([np.searchsorted(D[i, order[i]], radii + 1e-9, side="right") - 1 for i in range(H * W)])
    # Σ of the weights of the nearest keys, nearest first   (B, heads, N, N)
    cumulative = np.cumsum(np.take_along_axis(w, np.broadcast_to(order, w.shape), axis=-1), axis=-1)
    within = np.take_along_axis(cumulative, np.broadcast_to(last, (*w.shape[:-1], radii.size)), axis=-1)
    return radii, within


LINE_COLOURS = ["#7570b3", "#d95f02", "#1b9e77", "#e7298a", "#66a61e", "#e6ab02"]


def plot_attention_distance(
    weights: Any | Mapping[str, Any],
    shape: tuple[int, int],
    *,
    queries: Any | None = None,
    target: Any | None = None,
    target_label: str = "all weight at the distance the task needs",
    fields: Mapping[str, tuple[Any, tuple[int, int]]] | None = None,
    title: str | None = None,
) -> Figure:
    """How far attention reaches: the share of a query's weight within distance ``r``, against ``r``.

    Left panel, the attention weights: one curve per weights array and head (the mean of
    :func:`weight_within` over the chosen query pixels), a grey dashed curve for uniform weights and a
    thin black one for ``target``. Right panel (only with ``fields``), influence maps such as receptive
    fields ``|∂y_q/∂x|``: the share of each map's total within ``r`` of its pixel. The two are different
    quantities — a weight sums to 1 by construction, an influence map is a gradient — so each has its
    own axis. Each legend entry gives the mean distance of its curve (:func:`attention_distance`,
    :func:`field_distance`), the usual one-number summary per head.

    Inputs:
        weights: one weights array ``(B, heads, N, N)`` or a dict ``name → weights`` to compare
            (e.g. ``{"at initialisation": w0, "trained": w1}``), any backend.
        shape: ``(H, W)``.
        queries: bool ``(B, N)`` or ``(B, H, W)``: the query pixels to average over (default: all).
        target: ``(B, N)`` or ``(B, H, W)``: the distance each query should look at, in pixels (e.g.
            to a far-away twin); its curve is what weights entirely at that distance would give.
        target_label: the target curve's legend entry.
        fields: name → ``(map (H, W), pixel)``: influence maps (e.g. a conv stack's receptive field,
            :func:`attention_ref.viz.conv_stack_receptive_field`, or a block's :func:`input_gradient`),
            in the right panel: the share of the map's total within ``r`` of ``pixel``.
    """
    named = {name: as_weights(w) for name, w in (weights.items() if isinstance(weights, Mapping) else [("", weights)])}
    H, W = shape
    N = H * W
    B = next(iter(named.values())).shape[0]
    keep = np.ones((B, N), dtype=bool) if queries is None else _per_query(queries, B, N, "queries").astype(bool)
    radii, uniform = weight_within(np.full((1, 1, N, N), 1.0 / N), shape)
    fig = new_figure(10.6 if fields else 6.2, 5.0, layout="constrained")
    axes = fig.subplots(1, 2 if fields else 1, squeeze=False, sharex=True)[0]
    ax = axes[0]
    several_heads = any(w.shape[1] > 1 for w in named.values())
    k = 0
    for name, w in named.items():
        if w.shape[0] != B:
            raise ValueError(f"every weights array must hold {B} maps; {name!r} has shape {w.shape}")
        _, within = weight_within(w, shape)  # (B, heads, N, R)
        dist = attention_distance(w, shape)  # (B, heads, N)
        for h in range(w.shape[1]):
            label = ", ".join(p for p in (name, f"head {h}" if several_heads else "") if p) or "attention"
            ax.step(
                radii,
                within[:, h][keep].mean(axis=0),
                where="post",
                linewidth=2.0,
                color=LINE_COLOURS[k % len(LINE_COLOURS)],
                label=f"{label}: mean distance {dist[:, h][keep].mean():.1f} px",
            )
            k += 1
    if target is not None:
        goal = _per_query(target, B, N, "target").astype(np.float64)[keep]
        # the share of queries whose target lies within r: weights all at the target distance
        ax.step(
            radii,
            (goal[:, None] <= radii + 1e-9).mean(axis=0),
            where="post",
            color="black",
            linewidth=0.9,
            label=f"{target_label}: mean distance {goal.mean():.1f} px",
        )
    ax.step(
        radii,
        uniform[0, 0].mean(axis=0),
        where="post",
        color="grey",
        linestyle="--",
        linewidth=1.2,
        label=f"uniform weights: mean distance {uniform_distance(shape):.1f} px",
    )
    ax.set_title("attention weights", fontsize=10)
    ax.set_ylabel("share of the query's attention weight within r")
    distances = _pixel_distances(shape)
    if fields:
        right = axes[1]
        for k, (name, (field, pixel)) in enumerate(fields.items()):
            R = as_numpy(field, name)
            if R.shape != tuple(shape):
                raise ValueError(f"field {name!r} has shape {R.shape}, the map is {tuple(shape)}")
            mean = field_distance(R, pixel)  # also checks R
            # Σ_{j : ‖p_q − p_j‖ ≤ r} R_j / Σ_j R_j
            share = (distances[token_of(pixel, shape)][None, :] <= radii[:, None] + 1e-9) @ R.ravel() / R.sum()
            right.step(
                radii,
                share,
                where="post",
                linestyle=[":", "-.", "-", "--"][k % 4],
                linewidth=1.8,
                color=["#1b1b1b", "#666666", "#d95f02", "#a6761d"][k % 4],
                label=f"{name}: mean distance {mean:.1f} px",
            )
        right.set_title("influence |∂y_q/∂x| (receptive fields, from the backward pass)", fontsize=10)
        right.set_ylabel("share of Σ|∂y_q/∂x| within r")
    for a in axes:  # each legend under its own panel: it hides no curve and leaves no empty canvas beside it
        a.set_xlabel("distance r from the query pixel (pixels)")
        a.set_xlim(0.0, float(radii[-1]))
        a.set_ylim(0.0, 1.02)
        a.grid(True, alpha=0.3)
        a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8.5, frameon=False)
    fig.suptitle(title or "how far each head looks", fontsize=11)
    return fig
