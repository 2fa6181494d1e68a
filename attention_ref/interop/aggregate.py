"""Bringing cross-attention maps of several resolutions to one size, summing, normalising, merging words.

Used by :meth:`attention_ref.interop.trace.Trace.token_maps` and ``.word_maps``; the functions take
plain NumPy arrays, so they can be checked on hand-made maps.

**Resizing** is PyTorch's ``torch.nn.functional.interpolate`` (torch is imported when a map is
resized; a trace has torch anyway). With ``align_corners=False`` every value is the value at the
centre of its cell, so the modes read:

* ``"nearest"``: output pixel ``i`` of ``h`` takes input cell ``⌊i·H/h⌋``; for ``h = k·H`` every cell
  becomes a ``k×k`` block of its value, exactly;
* ``"bilinear"`` (default): linear in ``y`` and ``x`` between the nearest cell centres, clamped to the
  edge cells beyond the outermost centres. Each output is a convex combination of inputs, so maps whose
  tokens sum to 1 at every pixel still do;
* ``"bicubic"``: Keys' cubic convolution (``a = −0.75``, PyTorch's); it over- and undershoots near
  sharp edges, so negative values are set to 0 afterwards, as DAAM does;
* ``"area"``: the mean over each output cell's footprint (for shrinking).

**Normalisations** (of the maps summed over layers and calls, ``S[b, m]``; ``count`` maps were summed):

* ``"sum"``: ``S`` itself;
* ``"mean"``: ``S / count``, the average weight: with ``"nearest"``, ``"bilinear"`` or ``"area"`` each
  pixel's weights over the ``M`` tokens still sum to 1;
* ``"minmax"``: the mean, each ``(b, m)`` map stretched to [0, 1] by its own minimum and maximum
  (0 where the map is constant) — DAAM's picture normalisation;
* ``"daam"``: the mean, each pixel divided by its sum over the prompt's word tokens (not the start,
  end and padding tokens), so that the word tokens' maps sum to 1 at every pixel — DAAM's
  ``normalize=True`` (which adds 1e-6 to the sum; here a pixel whose sum is 0 gets 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "INTERPOLATIONS",
    "NORMALIZATIONS",
    "find_word_tokens",
    "normalize_maps",
    "prompt_token_ids",
    "resize_maps",
]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
NORMALIZATIONS = ("mean", "sum", "minmax", "daam")


def resize_maps(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``(..., H, W)`` maps resized to ``(..., h, w)`` with ``torch.nn.functional.interpolate``.

    Inputs:
        maps: ``(..., H, W)`` real NumPy array (any number of leading axes).
        size: ``(h, w)``.
        mode: one of :data:`INTERPOLATIONS` (see the module docstring); ``"bicubic"`` results are
            clamped at 0.

    Returns:
        ``(..., h, w)``, the input's dtype. A map already of that size is returned unchanged (a copy).
    """
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {mode!r}")
    a = np.asarray(maps)
    if a.ndim < 2:
        raise ValueError(f"maps must be (..., H, W), got shape {a.shape}")
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {(h, w)}")
    if a.shape[-2:] == (h, w):
        return a.copy()
    import torch
    import torch.nn.functional as F

    lead = a.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(a.reshape(1, -1, *a.shape[-2:])))  # (1, L, H, W)
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    r = F.interpolate(t, size=(h, w), mode=mode, **corners)  # (1, L, h, w)
    if mode == "bicubic":
        r = r.clamp(min=0)
    return r.numpy().reshape(*lead, h, w).astype(a.dtype, copy=False)


def normalize_maps(
    total: np.ndarray, count: int, normalize: str, word_tokens: Sequence[int] | None = None
) -> np.ndarray:
    """The normalisation ``normalize`` of ``(B, M, h, w)`` maps summed over ``count`` maps (module docstring).

    ``word_tokens``: the token indices ``"daam"`` renormalises over (required for it, ignored otherwise).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if normalize == "sum":
        return total
    if count < 1:
        raise ValueError("no maps were summed (count 0)")
    mean = total / count
    if normalize == "mean":
        return mean
    if normalize == "minmax":
        lo = mean.min(axis=(-2, -1), keepdims=True)
        hi = mean.max(axis=(-2, -1), keepdims=True)
        # (x − min) / (max − min) per (b, m) map, 0 for a constant map
        return np.where(hi > lo, (mean - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    if word_tokens is None:
        raise ValueError("normalize='daam' needs word_tokens: the indices of the prompt's word tokens")
    idx = np.asarray(list(word_tokens), dtype=np.int64)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= mean.shape[1]:
        raise ValueError(f"word_tokens {idx.tolist()} must be non-empty indices among the {mean.shape[1]} tokens")
    # Σ_{m ∈ words} maps[b, m] at every pixel   (B, 1, h, w)
    denominator = mean[:, idx].sum(axis=1, keepdims=True)
    return np.where(denominator > 0, mean / np.where(denominator > 0, denominator, 1.0), 0.0)


def prompt_token_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    """The token ids a Hugging Face tokenizer gives ``text`` (with its start/end tokens when ``special``)."""
    encoded = tokenizer(text, add_special_tokens=special)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded.input_ids
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):
        raise ValueError("the tokenizer returned a batch; give it one prompt (a str)")
    return [int(i) for i in ids]


def find_word_tokens(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """The positions of every occurrence of the id sequence ``word_ids`` inside ``prompt_ids``.

    Returns the token indices of all occurrences together (``[]`` when the word does not occur).
    """
    n = len(word_ids)
    if n == 0:
        return []
    found: list[int] = []
    for start in range(len(prompt_ids) - n + 1):
        if list(prompt_ids[start : start + n]) == list(word_ids):
            found.extend(range(start, start + n))
    return found
