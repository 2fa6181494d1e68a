"""Block diagrams drawn from code: every shape printed on a box comes from running the block.

* :func:`draw_self_attention_block` — a U-Net stage: a residual conv block, then
  the self-attention block (GroupNorm → Q, K, V → softmax(QKᵀ/√d) V → out → + x).
* :func:`draw_cross_attention` — cross-attention: Q from the pixels, K and V from
  the text tokens, weights ``(B, heads, H·W, M)``.

The functions run :func:`attention_ref.self_attention_forward` /
:func:`attention_ref.cross_attention_forward` on zeros of the requested size and
read the shapes off the caches, so the picture cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from ..blocks import cross_attention_forward, init_cross_attention, init_self_attention, self_attention_forward
from ._common import new_figure

__all__ = ["draw_cross_attention", "draw_self_attention_block", "self_attention_shapes", "cross_attention_shapes"]

PALETTE = {
    "input": "#e8e8e8",
    "norm": "#cfe3f3",
    "linear": "#fde0c5",
    "attention": "#f4c7d8",
    "conv": "#d7ecd0",
    "add": "#ffffff",
}


def _shape(t: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in t) + ")"


def self_attention_shapes(H: int, W: int, C: int, heads: int, groups: int) -> dict[str, tuple[int, ...]]:
    """Run the self-attention block on a zero ``(1, H, W, C)`` map; return the shape of each stage."""
    params = init_self_attention(C, heads=heads, groups=groups, rng=0)
    x = np.zeros((1, H, W, C))
    y, cache = self_attention_forward(x, params, heads=heads, groups=groups)
    q_tokens = cache.layer.q.x.shape  # (B, N, C): the normalised map as tokens
    inner = cache.layer.q.W.shape[1]
    return {
        "x": x.shape,
        "tokens": tuple(q_tokens),
        "qkv": (*q_tokens[:-1], inner),
        "heads": (q_tokens[0], heads, q_tokens[1], inner // heads),
        "weights": tuple(cache.weights.shape),
        "y": tuple(y.shape),
    }


def cross_attention_shapes(
    H: int, W: int, C: int, M: int, D: int, heads: int, groups: int
) -> dict[str, tuple[int, ...]]:
    """Run the cross-attention block on zeros; return the shape of each stage."""
    params = init_cross_attention(C, D, heads=heads, groups=groups, rng=0)
    x, context = np.zeros((1, H, W, C)), np.zeros((1, M, D))
    y, cache = cross_attention_forward(x, context, params, heads=heads, groups=groups)
    inner = cache.layer.q.W.shape[1]
    return {
        "x": x.shape,
        "context": context.shape,
        "q": (*cache.layer.q.x.shape[:-1], inner),
        "kv": (*cache.layer.k.x.shape[:-1], inner),
        "weights": tuple(cache.weights.shape),
        "y": tuple(y.shape),
    }


def _box(ax: Any, x: float, y: float, text: str, kind: str, *, width: float = 3.2, height: float = 0.62) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.05",
            facecolor=PALETTE[kind],
            edgecolor="#444444",
            linewidth=0.8,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], *, rad: float = 0.0) -> None:
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=9,
            linewidth=0.9,
            color="#444444",
            connectionstyle=f"arc3,rad={rad}",
        )
    )


def _column(ax: Any, x: float, top: float, steps: list[tuple[str, str]], gap: float = 0.95) -> list[float]:
    """Boxes from ``top`` down, joined by arrows; returns their y positions."""
    ys = [top - i * gap for i in range(len(steps))]
    for i, (text, kind) in enumerate(steps):
        _box(ax, x, ys[i], text, kind)
        if i:
            _arrow(ax, (x, ys[i - 1] - 0.33), (x, ys[i] + 0.33))
    return ys


def _skip(ax: Any, x: float, y_from: float, y_to: float, label: str) -> None:
    """A residual connection down the right side of a column."""
    side = x + 2.0
    ax.plot([x + 1.6, side, side], [y_from, y_from, y_to], color="#888888", linewidth=0.9)
    _arrow(ax, (side, y_to), (x + 1.66, y_to))
    ax.text(side + 0.1, (y_from + y_to) / 2, label, fontsize=7, color="#666666", rotation=90, va="center")


def draw_self_attention_block(
    H: int = 16, W: int = 16, C: int = 64, *, heads: int = 4, groups: int = 32, title: str | None = None
) -> Figure:
    """A U-Net stage: residual conv block, then the self-attention block, shapes from a real forward pass."""
    s = self_attention_shapes(H, W, C, heads, groups)
    N = s["tokens"][1]
    steps = [
        (f"x  {_shape(s['x'])}", "input"),
        ("GroupNorm → SiLU → conv 3×3", "conv"),
        ("GroupNorm → SiLU → conv 3×3", "conv"),
        ("+  (residual conv block)", "add"),
        (f"GroupNorm({groups})  {_shape(s['x'])}", "norm"),
        (f"flatten pixels: token = row·W+col  {_shape(s['tokens'])}", "input"),
        (f"Q, K, V = h W_q, h W_k, h W_v  {_shape(s['qkv'])} each", "linear"),
        (f"split {heads} heads  {_shape(s['heads'])}", "linear"),
        (f"P = softmax(QKᵀ/√{s['heads'][-1]})  {_shape(s['weights'])}", "attention"),
        (f"O = P V, merge heads  {_shape(s['qkv'])}", "attention"),
        (f"O W_o + b_o, back to the map  {_shape(s['y'])}", "linear"),
        (f"y = x + …  {_shape(s['y'])}", "add"),
    ]
    fig = new_figure(5.4, 8.6)
    ax = fig.add_subplot()
    ys = _column(ax, 0.0, 0.0, steps)
    _skip(ax, 0.0, ys[0], ys[3], "skip")
    _skip(ax, 0.0, ys[3] - 0.2, ys[-1], "skip")
    ax.text(-2.35, (ys[1] + ys[2]) / 2, "ResBlock", rotation=90, va="center", fontsize=8, color="#2b7a2b")
    ax.text(-2.35, (ys[4] + ys[-1]) / 2, "AttentionBlock", rotation=90, va="center", fontsize=8, color="#a0305a")
    ax.text(
        0.0,
        ys[-1] - 0.75,
        f"the weights are N×N = {N}×{N} per head: cost grows as (H·W)²",
        ha="center",
        fontsize=7.5,
        color="#a0305a",
    )
    ax.set_xlim(-2.6, 2.9)
    ax.set_ylim(ys[-1] - 1.0, 0.6)
    ax.set_axis_off()
    ax.set_title(title or f"every pixel of a {H}×{W} map attends to every other one", fontsize=10)
    return fig


def draw_cross_attention(
    H: int = 16,
    W: int = 16,
    C: int = 64,
    M: int = 77,
    D: int = 768,
    *,
    heads: int = 8,
    groups: int = 32,
    title: str | None = None,
) -> Figure:
    """Cross-attention: queries from the pixels, keys and values from the tokens; shapes from a forward pass."""
    s = cross_attention_shapes(H, W, C, M, D, heads, groups)
    fig = new_figure(8.2, 5.2)
    ax = fig.add_subplot()
    half = 0.31  # half a box's height
    # the pixel path on the left
    _column(
        ax,
        -2.6,
        0.0,
        [
            (f"pixels x  {_shape(s['x'])}", "input"),
            (f"GroupNorm, flatten  {_shape((*s['q'][:-1], C))}", "norm"),
            (f"Q = h W_q  {_shape(s['q'])}", "linear"),
        ],
    )
    # the token path on the right: K and V side by side
    _box(ax, 2.5, 0.0, f"tokens c (text encoder)  {_shape(s['context'])}", "input")
    _box(ax, 1.2, -2.0, f"K = c W_k  {_shape(s['kv'])}", "linear", width=2.3)
    _box(ax, 3.7, -2.0, f"V = c W_v  {_shape(s['kv'])}", "linear", width=2.3)
    _arrow(ax, (2.2, -half), (1.3, -2.0 + half))
    _arrow(ax, (2.8, -half), (3.6, -2.0 + half))
    # attention, output, residual
    _box(ax, -0.8, -3.0, f"P = softmax(QKᵀ/√d) over tokens  {_shape(s['weights'])}", "attention", width=4.6)
    _arrow(ax, (-2.6, -2.0 - half), (-1.6, -3.0 + half))
    _arrow(ax, (1.2, -2.0 - half), (0.4, -3.0 + half))
    _box(ax, 0.8, -4.0, f"O = P V,  O W_o + b_o  {_shape(s['y'])}", "linear", width=6.0)
    _arrow(ax, (-0.8, -3.0 - half), (-0.8, -4.0 + half))
    _arrow(ax, (3.7, -2.0 - half), (3.7, -4.0 + half))
    _box(ax, 0.8, -5.0, f"y = x + …  {_shape(s['y'])}", "add", width=6.0)
    _arrow(ax, (0.8, -4.0 - half), (0.8, -5.0 + half))
    ax.plot([-4.2, -4.45, -4.45], [0.0, 0.0, -5.0], color="#888888", linewidth=0.9)
    _arrow(ax, (-4.45, -5.0), (-2.25, -5.0))
    ax.text(
        0.8,
        -5.75,
        f"row i of P: how pixel i splits its attention over the {M} tokens",
        ha="center",
        fontsize=7.5,
        color="#a0305a",
    )
    ax.set_xlim(-4.7, 5.0)
    ax.set_ylim(-6.1, 0.6)
    ax.set_axis_off()
    ax.set_title(title or "cross-attention: pixels ask (Q), tokens answer (K, V)", fontsize=10)
    return fig
