"""Cross-attention between pixels and tokens: one map per token, four normalisations, argmax segmentation.

Cross-attention weights ``P`` are ``(…, N, M)``: each pixel's row is a softmax
over the ``M`` tokens. Column ``t`` laid out as ``H×W`` is "where token t is
read from". Four ways to scale those maps for a picture:

* ``"raw"``: the weights as they are (a pixel's weights over tokens sum to 1);
  tokens that soak up attention everywhere (``<sot>`` in Stable Diffusion)
  dominate;
* ``"token_max"``: each map divided by its own maximum;
* ``"minmax"``: each map stretched to [0, 1] by its own minimum and maximum;
* ``"no_special"``: each pixel's weights renormalised over the non-special
  tokens only, ``P_it / Σ_{t' real} P_it'``; special tokens get no map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..backend import to_numpy
from ._common import BACKDROP_NOTE, grey, new_figure, note, plain_text, show_map
from .maps import as_weights

__all__ = [
    "NORMALIZATIONS",
    "plot_token_maps",
    "plot_token_normalizations",
    "plot_token_segmentation",
    "token_maps",
    "token_segmentation",
]

NORMALIZATIONS = {
    "raw": "raw softmax weights",
    "token_max": "÷ each token's max",
    "minmax": "each token's min–max",
    "no_special": "renormalised without special tokens",
}
SPECIAL_TOKENS = ("<sot>", "<eot>", "<pad>", "<|startoftext|>", "<|endoftext|>", "[CLS]", "[SEP]", "[PAD]")


def _is_special(tokens: Sequence[str]) -> np.ndarray:
    return np.array([t in SPECIAL_TOKENS for t in tokens], dtype=bool)


def token_maps(
    weights: Any,
    shape: tuple[int, int],
    *,
    batch: int = 0,
    head: int | None = None,
    normalization: str = "raw",
    special: Sequence[bool] | None = None,
) -> np.ndarray:
    """``(M, H, W)``: every token's map of weights over the pixels, scaled by ``normalization``.

    Inputs:
        weights: cross-attention weights ``(B, heads, H·W, M)`` (or without B / heads), any backend.
        shape: ``(H, W)``.
        head: which head; None averages the heads.
        normalization: one of :data:`NORMALIZATIONS` (module docstring).
        special: ``(M,)`` bool, the tokens ``"no_special"`` leaves out (their maps come back 0).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    w = as_weights(weights)
    H, W = shape
    if w.shape[2] != H * W:
        raise ValueError(f"weights of shape {w.shape} have {w.shape[2]} pixels, not {H}×{W}={H * W}")
    P = w[batch].mean(axis=0) if head is None else w[batch, head]  # (N, M)
    if normalization == "no_special":
        if special is None:
            raise ValueError("normalization='no_special' needs special=(M,) bools marking the special tokens")
        real = ~np.asarray(special, dtype=bool)
        if real.shape != (P.shape[1],):
            raise ValueError(f"special has shape {real.shape}, the weights have {P.shape[1]} tokens")
        # P_it / Σ_{t' real} P_it'  for real tokens, 0 for special ones
        total = P[:, real].sum(axis=1, keepdims=True)
        P = np.where(real, P / np.where(total > 0, total, 1.0), 0.0)
    maps = P.T.reshape(-1, H, W)  # (M, H, W)
    if normalization == "token_max":
        top = maps.max(axis=(1, 2), keepdims=True)
        maps = maps / np.where(top > 0, top, 1.0)
    elif normalization == "minmax":
        lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
        maps = (maps - lo) / np.where(hi > lo, hi - lo, 1.0)
    return maps


def _check_tokens(tokens: Sequence[str], weights: np.ndarray) -> None:
    """ValueError unless there is exactly one label per token of ``weights`` ``(B, heads, N, M)``."""
    if len(tokens) != weights.shape[-1]:
        raise ValueError(
            f"{len(tokens)} token labels for weights of shape {weights.shape} with {weights.shape[-1]} tokens: "
            "give one label per token (the last axis)"
        )


def _shown(tokens: Sequence[str], show: Sequence[int] | None, context_mask: Any | None) -> list[int]:
    """The token indices to draw: ``show``, else those ``context_mask`` marks real, else all."""
    if show is not None:
        idx = [int(t) for t in show]
        bad = [t for t in idx if not 0 <= t < len(tokens)]
        if bad:
            raise ValueError(f"show={list(show)} names tokens {bad} outside the {len(tokens)} tokens")
        return idx
    keep = np.ones(len(tokens), dtype=bool) if context_mask is None else np.asarray(context_mask, dtype=bool)
    if keep.shape != (len(tokens),):
        raise ValueError(f"context_mask has shape {keep.shape}, expected ({len(tokens)},): one flag per token")
    return [t for t in range(len(tokens)) if keep[t]]


def _grid_shape(count: int, max_columns: int = 6) -> tuple[int, int]:
    """``(rows, columns)`` for ``count`` panels: at most ``max_columns`` a row, the rows as even as they can be.

    E.g. 5 → (1, 5), 10 → (2, 5), 77 → (13, 6).
    """
    if count < 1 or max_columns < 1:
        raise ValueError(f"need at least one panel and one column, got {count} panels, {max_columns} columns")
    rows = -(-count // max_columns)  # ceil
    return rows, -(-count // rows)


def plot_token_maps(
    weights: Any,
    tokens: Sequence[str],
    shape: tuple[int, int],
    *,
    image: Any | None = None,
    batch: int = 0,
    head: int | None = None,
    normalization: str = "raw",
    show: Sequence[int] | None = None,
    context_mask: Any | None = None,
    max_columns: int = 6,
    scene: bool = False,
    backdrop_note: str | None = BACKDROP_NOTE,
    title: str | None = None,
) -> Figure:
    """One map per token, the token's text under it, one shared colour bar; long prompts wrap onto rows.

    Inputs:
        weights: ``(B, heads, H·W, M)`` (or without B / heads), any backend.
        tokens: the ``M`` token strings, one per token (ValueError otherwise).
        image: backdrop ``(H, W[, C])`` or None.
        scene: also draw ``image`` itself (an ``(H, W, 3)`` RGB image in [0, 1]) as the first panel,
            labelled "scene", to check each word's map against the objects.
        normalization: see :func:`token_maps`.
        show: token indices to draw (default: all, or those ``context_mask`` marks real).
        max_columns: panels per row at most; more tokens wrap onto further rows (:func:`_grid_shape`).
        backdrop_note: the line under the figure saying what the grey backdrop is (with an ``image``).
    """
    w = as_weights(weights)
    _check_tokens(tokens, w)
    maps = token_maps(w, shape, batch=batch, head=head, normalization=normalization, special=_is_special(tokens))
    idx = _shown(tokens, show, context_mask)
    backdrop = grey(image, shape)
    rgb = None
    if scene:
        rgb = None if image is None else np.asarray(to_numpy(image), dtype=np.float64)
        if rgb is None or rgb.shape != (*shape, 3):
            raise ValueError(f"scene=True needs image=(H, W, 3) RGB of the map's {shape}; got {np.shape(rgb)}")
    vmax = max(float(maps[idx].max()), 1e-12) if idx else 1.0
    first = int(scene)  # the scene's panel comes first
    rows, cols = _grid_shape(max(len(idx) + first, 1), max_columns)
    fig = new_figure(1.75 * cols + 1.0, 2.0 * rows + 0.5, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        if scene and k == 0:
            ax.imshow(np.clip(rgb, 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("scene (RGB)", fontsize=11, style="italic")
            continue
        if k - first >= len(idx):
            ax.set_axis_off()
            continue
        t = idx[k - first]
        im = show_map(ax, maps[t], backdrop=backdrop, vmin=0.0, vmax=vmax)
        ax.set_xlabel(plain_text(tokens[t]), fontsize=11)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=min(0.85, 0.4 + 0.25 * rows), label=NORMALIZATIONS[normalization])
    if image is not None:
        note(fig, backdrop_note)
    fig.suptitle(title or "where each token is read from", fontsize=12)
    return fig


BAR_LABELS = {
    "raw": "weight",
    "token_max": "÷ the token's max",
    "minmax": "(w − min) ÷ (max − min)",
    "no_special": "weight among the words",
}
ROW_LABELS = {
    "raw": "raw weights\n(one scale for all)",
    "token_max": "÷ each token's\nmax",
    "minmax": "each token's\nmin–max",
    "no_special": "renormalised\nwithout special\ntokens",
}


def plot_token_normalizations(
    weights: Any,
    tokens: Sequence[str],
    shape: tuple[int, int],
    *,
    normalizations: Sequence[str] | None = None,
    same_within: float = 0.02,
    image: Any | None = None,
    batch: int = 0,
    head: int | None = None,
    show: Sequence[int] | None = None,
    context_mask: Any | None = None,
    backdrop_note: str | None = BACKDROP_NOTE,
    title: str | None = None,
) -> Figure:
    """The normalisations of :func:`token_maps` one row each, labelled on the left, a colour bar per row.

    A row that looks the same as an earlier one is not drawn: when each shown map of a
    normalisation differs from the earlier one's by at most ``same_within`` (both on their colour
    scale, 0 to the row's maximum), the row is left out and a note under the figure says so and
    gives the largest difference. ÷ max and min–max coincide that way whenever every token's
    smallest weight is close to 0, as it is for most attention maps. ``same_within=0`` draws every row.

    Inputs:
        weights, tokens, shape: as for :func:`plot_token_maps`.
        normalizations: the rows, keys of :data:`NORMALIZATIONS` (default: all four, in that order).
        same_within: the largest difference at which a row counts as the same as an earlier one (above).
        image, batch, head, show, context_mask: as for :func:`plot_token_maps`.
        backdrop_note: the line under the figure saying what the grey backdrop is (with an ``image``).
    """
    w = as_weights(weights)
    _check_tokens(tokens, w)
    special = _is_special(tokens)
    idx = _shown(tokens, show, context_mask)
    norms = list(NORMALIZATIONS) if normalizations is None else list(normalizations)
    unknown = [n for n in norms if n not in NORMALIZATIONS]
    if unknown or not norms or not idx:
        raise ValueError(f"normalizations must be keys of {list(NORMALIZATIONS)} and tokens must be shown; got {norms}")
    backdrop = grey(image, shape)
    drawn: dict[str, np.ndarray] = {}  # normalisation → shown maps on their colour scale, in [0, 1]
    notes = []
    for norm in norms:
        maps = token_maps(w, shape, batch=batch, head=head, normalization=norm, special=special)[idx]
        scaled = maps / max(float(maps.max()), 1e-12)
        twin = next((n for n, other in drawn.items() if float(np.abs(other - scaled).max()) <= same_within), None)
        if twin is None:
            drawn[norm] = scaled
        else:
            gap = float(np.abs(drawn[twin] - scaled).max())
            why = " (every shown map's smallest weight is ≈ 0)" if {norm, twin} == {"token_max", "minmax"} else ""
            notes.append(
                f"{NORMALIZATIONS[norm]} is not drawn: it differs from {NORMALIZATIONS[twin]} by at most "
                f"{gap:.3f} here{why}"
            )
    fig = new_figure(1.6 * len(idx) + 2.4, 1.65 * len(drawn) + 0.9 + 0.2 * len(notes), layout="constrained")
    axes = fig.subplots(len(drawn), len(idx), squeeze=False)
    for i, norm in enumerate(drawn):
        maps = token_maps(w, shape, batch=batch, head=head, normalization=norm, special=special)
        vmax = max(float(maps[idx].max()), 1e-12)
        im = None
        for j, t in enumerate(idx):
            ax = axes[i, j]
            if norm == "no_special" and special[t]:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_facecolor("#f2f2f2")
                ax.text(0.5, 0.5, "left out", ha="center", va="center", fontsize=10, transform=ax.transAxes)
            else:
                im = show_map(ax, maps[t], backdrop=backdrop, vmin=0.0, vmax=vmax)
            if i == 0:
                ax.set_title(plain_text(tokens[t]), fontsize=11)
            if j == 0:
                ax.set_ylabel(ROW_LABELS[norm], fontsize=10)
        if im is not None:
            bar = fig.colorbar(im, ax=axes[i], shrink=0.9, ticks=np.linspace(0.0, vmax, 3), format="%.2g")
            bar.set_label(BAR_LABELS[norm], fontsize=8)
    if image is not None and backdrop_note:
        notes.append(backdrop_note)
    note(fig, "\n".join(notes))
    fig.suptitle(title or "the same weights under different normalisations", fontsize=12)
    return fig


def token_segmentation(
    weights: Any,
    shape: tuple[int, int],
    include: Sequence[int],
    *,
    batch: int = 0,
    head: int | None = None,
    background: float = 0.5,
) -> np.ndarray:
    """``(H, W)`` int: at each pixel, the token of ``include`` whose map is highest there, or −1.

    Each included token's map is divided by its maximum (``"token_max"``); a pixel
    where even the highest of them is below ``background`` is labelled −1.
    """
    maps = token_maps(weights, shape, batch=batch, head=head, normalization="token_max")[list(include)]
    best = maps.argmax(axis=0)
    labels = np.asarray(include)[best]
    return np.where(maps.max(axis=0) >= background, labels, -1)


def plot_token_segmentation(
    weights: Any,
    tokens: Sequence[str],
    shape: tuple[int, int],
    include: Sequence[int],
    *,
    image: Any | None = None,
    truth: np.ndarray | None = None,
    batch: int = 0,
    head: int | None = None,
    background: float = 0.5,
    title: str | None = None,
) -> Figure:
    """The argmax-token segmentation (:func:`token_segmentation`) next to the input and, if given, the truth.

    ``truth`` is an ``(H, W)`` int map in the same labels (token indices, −1 for background).
    """
    from matplotlib.colors import ListedColormap

    _check_tokens(tokens, as_weights(weights))
    seg = token_segmentation(weights, shape, include, batch=batch, head=head, background=background)
    palette = ["#1b1b1b", "#e6ab02", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#666666"]
    order = [-1, *include]
    colours = ListedColormap(palette[: len(order)])

    def to_index(labels: np.ndarray) -> np.ndarray:
        return np.vectorize(order.index)(labels)

    panels = [("input", None)] if image is not None else []
    panels += [("attention argmax", seg)] + ([("true objects", truth)] if truth is not None else [])
    fig = new_figure(2.3 * len(panels) + 1.4, 2.6, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, labels) in zip(axes, panels, strict=True):
        if labels is None:
            img = np.clip(np.asarray(image, dtype=float), 0, 1)
            ax.imshow(
                img if img.ndim == 3 and img.shape[-1] == 3 else grey(image, shape),
                cmap="gray",
                interpolation="nearest",
            )
        else:
            ax.imshow(to_index(labels), cmap=colours, vmin=-0.5, vmax=len(order) - 0.5, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=palette[i], label="none" if t < 0 else plain_text(tokens[t])) for i, t in enumerate(order)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title or "each pixel labelled by the token it attends to most", fontsize=11)
    return fig
