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

from ._common import grey, new_figure, show_map
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


def _shown(tokens: Sequence[str], show: Sequence[int] | None, context_mask: Any | None) -> list[int]:
    if show is not None:
        return list(show)
    keep = np.ones(len(tokens), dtype=bool) if context_mask is None else np.asarray(context_mask, dtype=bool)
    return [t for t in range(len(tokens)) if keep[t]]


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
    title: str | None = None,
) -> Figure:
    """One map per token, the token's text under it, one shared colour bar.

    Inputs:
        weights: ``(B, heads, H·W, M)`` (or without B / heads), any backend.
        tokens: the ``M`` token strings.
        image: backdrop ``(H, W[, C])`` or None.
        normalization: see :func:`token_maps`.
        show: token indices to draw (default: all, or those ``context_mask`` marks real).
    """
    maps = token_maps(weights, shape, batch=batch, head=head, normalization=normalization, special=_is_special(tokens))
    idx = _shown(tokens, show, context_mask)
    backdrop = grey(image, shape)
    vmax = max(float(maps[idx].max()), 1e-12)
    fig = new_figure(1.6 * len(idx) + 0.9, 2.3, layout="constrained")
    axes = fig.subplots(1, len(idx), squeeze=False)[0]
    for ax, t in zip(axes, idx, strict=True):
        im = show_map(ax, maps[t], backdrop=backdrop, vmin=0.0, vmax=vmax)
        ax.set_xlabel(tokens[t], fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.85, label=NORMALIZATIONS[normalization])
    fig.suptitle(title or "where each token is read from", fontsize=11)
    return fig


def plot_token_normalizations(
    weights: Any,
    tokens: Sequence[str],
    shape: tuple[int, int],
    *,
    image: Any | None = None,
    batch: int = 0,
    head: int | None = None,
    show: Sequence[int] | None = None,
    context_mask: Any | None = None,
    title: str | None = None,
) -> Figure:
    """The four normalisations of :func:`token_maps` side by side: one row each, a colour bar per row."""
    special = _is_special(tokens)
    idx = _shown(tokens, show, context_mask)
    backdrop = grey(image, shape)
    fig = new_figure(1.45 * len(idx) + 1.6, 1.55 * len(NORMALIZATIONS) + 0.6, layout="constrained")
    axes = fig.subplots(len(NORMALIZATIONS), len(idx), squeeze=False)
    for i, norm in enumerate(NORMALIZATIONS):
        maps = token_maps(weights, shape, batch=batch, head=head, normalization=norm, special=special)
        vmax = max(float(maps[idx].max()), 1e-12)
        for j, t in enumerate(idx):
            ax = axes[i, j]
            if norm == "no_special" and special[t]:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "left out", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                im = show_map(ax, maps[t], backdrop=backdrop, vmin=0.0, vmax=vmax)
            if i == len(NORMALIZATIONS) - 1 or (norm == "no_special" and special[t]):
                ax.set_xlabel(tokens[t], fontsize=9)
            if i == len(NORMALIZATIONS) - 1 and special[t]:
                ax.text(0.5, -0.12, tokens[t], ha="center", va="top", fontsize=9, transform=ax.transAxes)
        fig.colorbar(im, ax=axes[i], shrink=0.9).set_label(NORMALIZATIONS[norm], fontsize=8)
    fig.suptitle(title or "the same weights under four normalisations", fontsize=11)
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
    handles = [Patch(color=palette[i], label="none" if t < 0 else tokens[t]) for i, t in enumerate(order)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title or "each pixel labelled by the token it attends to most", fontsize=11)
    return fig
