"""Block diagrams drawn from code: every shape printed on a box comes from running the block.

* :func:`draw_self_attention_block` — a U-Net stage: a residual conv block (which adds
  the timestep embedding between its two convolutions), then the self-attention block
  (GroupNorm → Q, K, V → split into heads → softmax(QKᵀ/√d) V per head → merge → out →
  + its input), one column per head.
* :func:`draw_cross_attention` — cross-attention: Q from the pixels, K and V from
  the text tokens, weights ``(B, heads, H·W, M)``.

The functions run :func:`attention_ref.self_attention_forward` /
:func:`attention_ref.cross_attention_forward` on zeros of the requested size and
read the shapes off the caches (the ResBlock's from the library's group norm, SiLU,
linear and convolution), so the picture cannot drift from the code. The Q, K, V boxes
say ``+ b`` exactly when the block's parameters hold that bias (``bias=`` of
:func:`attention_ref.init_self_attention` / :func:`attention_ref.init_cross_attention`:
True by default, as in OpenAI's and CompVis's convolutions; diffusers' ``Attention`` has
none).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from ..blocks import cross_attention_forward, init_cross_attention, init_self_attention, self_attention_forward
from ..ops import conv2d_forward, group_norm_forward, linear_forward, silu_forward
from ._common import new_figure

__all__ = [
    "draw_cross_attention",
    "draw_self_attention_block",
    "self_attention_shapes",
    "cross_attention_shapes",
    "resblock_shapes",
]

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


def self_attention_shapes(
    H: int, W: int, C: int, heads: int, groups: int, *, bias: bool = True
) -> dict[str, tuple[int, ...]]:
    """Run the self-attention block on a zero ``(1, H, W, C)`` map; return the shape of each stage."""
    params = init_self_attention(C, heads=heads, groups=groups, bias=bias, rng=0)
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
    H: int, W: int, C: int, M: int, D: int, heads: int, groups: int, *, bias: bool = True
) -> dict[str, tuple[int, ...]]:
    """Run the cross-attention block on zeros; return the shape of each stage."""
    params = init_cross_attention(C, D, heads=heads, groups=groups, bias=bias, rng=0)
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


def resblock_shapes(H: int, W: int, C: int, groups: int, time_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of a diffusion ResBlock (diffusers' ``ResnetBlock2D``), run on a zero ``(1, H, W, C)`` map.

    GroupNorm → SiLU → 3×3 conv ("conv1"); plus a linear map of SiLU(the timestep embedding
    ``(1, time_dim)``, default ``4·C`` as in Stable Diffusion) to ``C`` channels, added at every pixel
    ("time" the ``(1, C)`` vector, "plus_time" the map); GroupNorm → SiLU → 3×3 conv ("conv2"); plus
    the block's input ("sum"). The library's group norm, SiLU, linear map and convolution give the shapes.
    """
    time_dim = 4 * C if time_dim is None else time_dim
    x = np.zeros((1, H, W, C))
    kernel = np.zeros((3, 3, C, C))
    shapes = {}
    h, _ = silu_forward(group_norm_forward(x, groups=groups)[0])
    h, _ = conv2d_forward(h, kernel, padding="same")
    shapes["conv1"] = tuple(h.shape)
    emb, _ = linear_forward(silu_forward(np.zeros((1, time_dim)))[0], np.zeros((time_dim, C)), np.zeros(C))
    shapes["time_embedding"] = (1, time_dim)
    shapes["time"] = tuple(emb.shape)
    h = h + emb[:, None, None, :]  # (1, C) → every pixel
    shapes["plus_time"] = tuple(h.shape)
    h, _ = silu_forward(group_norm_forward(h, groups=groups)[0])
    h, _ = conv2d_forward(h, kernel, padding="same")
    shapes["conv2"] = tuple(h.shape)
    shapes["sum"] = tuple((x + h).shape)
    return shapes


FONT = 10  # points, in every box


def _box(
    ax: Any, x: float, y: float, text: str, kind: str, *, width: float, height: float = 0.7, size: float = FONT
) -> None:
    """A rounded box centred on ``(x, y)`` with ``text`` in it (the caller sizes it to the text)."""
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.04",
            facecolor=PALETTE[kind],
            edgecolor="#444444",
            linewidth=0.9,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=size, linespacing=1.3)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=11, linewidth=1.0, color="#444444", shrinkA=0, shrinkB=0
        )
    )


def _skip(ax: Any, x_out: float, y_from: float, y_to: float, label: str) -> None:
    """A residual connection: out of the box at ``y_from`` to the right, down, into the box at ``y_to``."""
    ax.plot([x_out - 0.6, x_out, x_out], [y_from, y_from, y_to], color="#888888", linewidth=1.0)
    _arrow(ax, (x_out, y_to), (x_out - 0.6, y_to))
    ax.text(x_out + 0.15, (y_from + y_to) / 2, label, fontsize=9, color="#666666", rotation=90, va="center")


SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _sub(h: int) -> str:
    """``h`` in subscript digits: Q₀, P₁₂."""
    return str(h).translate(SUBSCRIPTS)


def _shown_heads(heads: int) -> list[int | None]:
    """The heads drawn as columns: all of up to 3, else the first, an ellipsis (None) and the last."""
    return list(range(heads)) if heads <= 3 else [0, None, heads - 1]


def _head_columns(
    ax: Any,
    top: float,
    left: float,
    right: float,
    heads: int,
    rows: list[tuple[str, str, float]],
    gap: float,
) -> tuple[list[float], float]:
    """One column of boxes per shown head, between ``left`` and ``right``, from ``top`` down.

    ``rows`` holds ``(text, kind, box height)``, the text with ``{n}`` for the head's number and
    ``{h}`` for it as a subscript; the ellipsis column says how many heads it stands for.
    Returns the columns' x centres and the y of the last row.
    """
    shown = _shown_heads(heads)
    narrow = 0.9  # the ellipsis column
    wide = ((right - left) - narrow * shown.count(None) - 0.3 * (len(shown) - 1)) / (len(shown) - shown.count(None))
    xs, x = [], left
    for h in shown:
        w = narrow if h is None else wide
        xs.append(x + w / 2)
        x += w + 0.3
    y = top
    for i, (text, kind, height) in enumerate(rows):
        for h, cx in zip(shown, xs, strict=True):
            if h is None:
                ax.text(cx, y, "⋯", ha="center", va="center", fontsize=14, color="#444444")
                if i == 0:
                    ax.text(cx, y - 0.55, f"{heads - 2} more", ha="center", va="top", fontsize=8, color="#666666")
                continue
            _box(ax, cx, y, text.format(h=_sub(h), n=h), kind, width=wide, height=height)
            if i:
                _arrow(ax, (cx, y + gap - rows[i - 1][2] / 2), (cx, y + height / 2))
        if i < len(rows) - 1:
            y -= gap
    return [cx for h, cx in zip(shown, xs, strict=True) if h is not None], y


def _split_note(ax: Any, y: float, split: str, d: int) -> None:
    """The line, centred at height ``y``, that says how the projected channels split into heads: ``split``,
    then the rule (head-major: channel c = head·d + j)."""
    ax.text(0.0, y, f"{split}: channel c = head·{d} + j", ha="center", va="center", fontsize=FONT, color="#7a3b00")


def _tail(
    ax: Any, rows: list[tuple[str, str]], xs: list[float], y_last: float, width: float, gap: float
) -> list[float]:
    """The boxes under the head columns, ``(text, kind)`` each, centred one below the other, with an arrow
    from the foot of every column (``xs``, last row at ``y_last``) into the first. Returns their y centres."""
    y_tail = [y_last - 1.35 - i * gap for i in range(len(rows))]
    for i, (text, kind) in enumerate(rows):
        _box(ax, 0.0, y_tail[i], text, kind, width=width)
        if i:
            _arrow(ax, (0.0, y_tail[i - 1] - 0.35), (0.0, y_tail[i] + 0.35))
    for cx in xs:
        _arrow(ax, (cx, y_last - 0.475), (cx, y_tail[0] + 0.35))
    return y_tail


def _finish(ax: Any, bottom: float, finding: str, bias_note: str | None, xlim: tuple[float, float], title: str) -> None:
    """Under the last box (at ``bottom``): what the weights are, and where the biases come from when the
    projections have them; then the axes' extent and the title."""
    ax.text(0.0, bottom - 0.85, finding, ha="center", fontsize=FONT, color="#a0305a")
    if bias_note is not None:
        ax.text(0.0, bottom - 1.35, bias_note, ha="center", fontsize=8, color="#555555")
    ax.set_xlim(*xlim)
    ax.set_ylim(bottom - 1.7, 0.6)
    ax.set_axis_off()
    ax.set_title(title, fontsize=12)


def _bias(params_bias: bool, name: str) -> str:
    """`` + b_q`` when the projection has a bias, else nothing."""
    return f" + b_{name}" if params_bias else ""


def draw_self_attention_block(
    H: int = 16,
    W: int = 16,
    C: int = 64,
    *,
    heads: int = 4,
    groups: int = 32,
    bias: bool = True,
    title: str | None = None,
) -> Figure:
    """A U-Net stage: residual conv block, then the self-attention block, shapes from a real forward pass.

    The stage's input is ``x``; the ResBlock adds the timestep embedding between its two convolutions
    and returns ``r``; the attention block normalises ``r`` into ``h``, projects ``h`` to Q, K, V (with
    biases when ``bias``, as :func:`attention_ref.init_self_attention` makes them), and returns
    ``y = r + …``. Every head is a column of its own (up to three drawn; more are summarised by an
    ellipsis), so that the split of the channels into heads and their merge are visible.
    """
    s = self_attention_shapes(H, W, C, heads, groups, bias=bias)
    r = resblock_shapes(H, W, C, groups)
    N, d = s["tokens"][1], s["heads"][-1]
    B = s["x"][0]
    wide = 11.0
    fig = new_figure(8.6, 12.6)
    ax = fig.add_subplot()
    steps = [
        (f"x, the stage's input  {_shape(s['x'])}", "input", 0.7),
        (f"GroupNorm({groups}) → SiLU → conv 3×3   {_shape(r['conv1'])}", "conv", 0.7),
        (
            f"+ SiLU(t_emb) W_t + b_t: the timestep embedding {_shape(r['time_embedding'])} → {_shape(r['time'])},\n"
            f"added at every pixel   {_shape(r['plus_time'])}",
            "conv",
            0.95,
        ),
        (f"GroupNorm({groups}) → SiLU → conv 3×3   {_shape(r['conv2'])}", "conv", 0.7),
        (f"r = x + …, the ResBlock's output   {_shape(r['sum'])}", "add", 0.7),
        (f"h = GroupNorm(r): {groups} groups of {C // groups} channels   {_shape(s['x'])}", "norm", 0.7),
        (f"flatten h: pixel (row, col) → token row·{W} + col   {_shape(s['tokens'])}", "input", 0.7),
    ]
    ys, y = [], 0.0
    for i, (_, _, height) in enumerate(steps):
        if i:
            y -= steps[i - 1][2] / 2 + 0.35 + height / 2
        ys.append(y)
    for i, (text, kind, height) in enumerate(steps):
        _box(ax, 0.0, ys[i], text, kind, width=wide, height=height)
        if i:
            _arrow(ax, (0.0, ys[i - 1] - steps[i - 1][2] / 2), (0.0, ys[i] + height / 2))
    # Q, K, V: three projections of the same tokens h
    y_qkv = ys[-1] - 1.3
    y_split = y_qkv - 1.05
    third = (wide - 0.6) / 3
    for j, name in enumerate("QKV"):
        cx = -wide / 2 + third / 2 + j * (third + 0.3)
        ax.plot([cx, cx], [y_qkv - 0.475, y_split + 0.25], color="#444444", linewidth=1.0)
        _box(
            ax,
            cx,
            y_qkv,
            f"{name} = h W_{name.lower()}{_bias(bias, name.lower())}\n{_shape(s['qkv'])}",
            "linear",
            width=third,
            height=0.95,
        )
        _arrow(ax, (0.0, ys[-1] - 0.35), (cx, y_qkv + 0.475))
    # the split into heads: channel c = head·d + j
    inner = s["qkv"][-1]
    _split_note(ax, y_split, f"split the {inner} channels into {heads} heads of d = {inner} / {heads} = {d}", d)
    xs, y_last = _head_columns(
        ax,
        y_split - 1.0,
        -wide / 2,
        wide / 2,
        heads,
        [
            ("head {n}: Q{h}, K{h}, V{h}\n" + f"{_shape((B, N, d))} each", "linear", 0.95),
            ("P{h} = softmax(Q{h} K{h}ᵀ / √" + f"{d})\n{_shape((B, N, N))}", "attention", 0.95),
            ("O{h} = P{h} V{h}\n" + f"{_shape((B, N, d))}", "attention", 0.95),
        ],
        1.35,
    )
    for cx in xs:
        _arrow(ax, (cx, y_split - 0.3 + 0.25), (cx, y_split - 1.0 + 0.475))
    gap = 1.05
    tail = [
        (f"merge heads: O = [O₀ … O{_sub(heads - 1)}]   {_shape(s['qkv'])}", "attention"),
        (f"O W_o + b_o, back to the map   {_shape(s['y'])}", "linear"),
        (f"y = r + …, the stage's output   {_shape(s['y'])}", "add"),
    ]
    y_tail = _tail(ax, tail, xs, y_last, wide, gap)
    edge = wide / 2 + 0.9
    _skip(ax, edge, ys[0], ys[4], "skip: + x")
    _skip(ax, edge, ys[4] - 0.2, y_tail[-1], "skip: + r")
    ax.text(-edge, (ys[1] + ys[3]) / 2, "ResBlock", rotation=90, va="center", ha="center", fontsize=11, color="#2b7a2b")
    ax.text(
        -edge,
        (ys[5] + y_tail[-1]) / 2,
        "AttentionBlock",
        rotation=90,
        va="center",
        ha="center",
        fontsize=11,
        color="#a0305a",
    )
    _finish(
        ax,
        y_tail[-1],
        f"each head's weights Pₕ are N×N = {N}×{N}: memory and time grow as (H·W)²",
        "b_q, b_k, b_v: the library's default (bias=True, as in OpenAI's U-Net); diffusers' Attention has none"
        if bias
        else None,
        (-edge - 0.5, edge + 0.6),
        title or f"every pixel of a {H}×{W} map attends to every other one",
    )
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
    bias: bool = True,
    title: str | None = None,
) -> Figure:
    """Cross-attention: queries from the pixels, keys and values from the tokens; shapes from a forward pass.

    As in :func:`draw_self_attention_block`, every head is a column (up to three drawn), and the
    projections carry ``+ b`` when ``bias`` (as :func:`attention_ref.init_cross_attention` makes them).
    """
    s = cross_attention_shapes(H, W, C, M, D, heads, groups, bias=bias)
    B, N, inner = s["q"]
    d = inner // heads
    gap = 1.05
    fig = new_figure(8.6, 9.6)
    ax = fig.add_subplot()
    left, right = -2.9, 3.0  # the pixel path and the token path
    half = 2.6  # half a column box's width
    _box(ax, left, 0.0, f"pixels x  {_shape(s['x'])}", "input", width=2 * half)
    norm_text = f"h = GroupNorm({groups})(x), flattened\n{_shape((B, N, C))}"
    _box(ax, left, -gap, norm_text, "norm", width=2 * half, height=0.95)
    _arrow(ax, (left, -0.35), (left, -gap + 0.475))
    _box(ax, right, 0.0, f"text tokens c  {_shape(s['context'])}", "input", width=2 * half)
    y_proj = -2.4
    _box(ax, left, y_proj, f"Q = h W_q{_bias(bias, 'q')}\n{_shape(s['q'])}", "linear", width=2 * half, height=0.95)
    _arrow(ax, (left, -gap - 0.475), (left, y_proj + 0.475))
    for dx, name in ((-1.35, "K"), (1.35, "V")):
        _box(
            ax,
            right + dx,
            y_proj,
            f"{name} = c W_{name.lower()}{_bias(bias, name.lower())}\n{_shape(s['kv'])}",
            "linear",
            width=2.5,
            height=0.95,
        )
        _arrow(ax, (right + dx / 3, -0.35), (right + dx, y_proj + 0.475))
    y_split = y_proj - 1.1
    _split_note(ax, y_split, f"split {inner} channels into {heads} heads of d = {inner} / {heads} = {d}", d)
    for x in (left, right - 1.35, right + 1.35):
        ax.plot([x, x], [y_proj - 0.475, y_split + 0.25], color="#444444", linewidth=1.0)
    xs, y_last = _head_columns(
        ax,
        y_split - 1.0,
        left - half,
        right + half,
        heads,
        [
            ("head {n}: Q{h} " + f"{_shape((B, N, d))}\n" + "K{h}, V{h} " + f"{_shape((B, M, d))}", "linear", 0.95),
            ("P{h} = softmax(Q{h} K{h}ᵀ / √" + f"{d})\nover the {M} tokens  {_shape((B, N, M))}", "attention", 0.95),
            ("O{h} = P{h} V{h}\n" + f"{_shape((B, N, d))}", "attention", 0.95),
        ],
        1.35,
    )
    for cx in xs:
        _arrow(ax, (cx, y_split - 0.25), (cx, y_split - 1.0 + 0.475))
    tail = [
        (f"merge heads, O W_o + b_o, back to the map   {_shape(s['y'])}", "linear"),
        (f"y = x + …   {_shape(s['y'])}", "add"),
    ]
    y_tail = _tail(ax, tail, xs, y_last, right - left + 2 * half, gap)
    edge = left - half - 0.5
    ax.plot([left - half, edge, edge], [0.0, 0.0, y_tail[-1]], color="#888888", linewidth=1.0)
    _arrow(ax, (edge, y_tail[-1]), (left - half, y_tail[-1]))
    ax.text(edge - 0.15, y_tail[-1] / 2, "skip", fontsize=9, color="#666666", rotation=90, va="center", ha="right")
    _finish(
        ax,
        y_tail[-1],
        f"row i of Pₕ: how pixel i splits its attention over the {M} tokens",
        "b_q, b_k, b_v: the library's default (bias=True); diffusers' Attention has none (bias=False)"
        if bias
        else None,
        (edge - 0.6, right + half + 0.3),
        title or "cross-attention: pixels ask (Q), tokens answer (K, V)",
    )
    return fig
