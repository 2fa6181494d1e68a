"""The attention explorer: one self-contained HTML page to click through attention weights in any browser.

Hover or click a pixel of the image to see that query pixel's self-attention
over the image; click a word of the prompt to see its cross-attention map;
pick the layer, the head (or their mean) and the denoising step. The page
holds its data and its script inline and fetches nothing; it is drawn with
plain JavaScript on HTML canvases (``explorer.html`` beside this module, and its
script in two parts: ``explorer_maps.js``, the numbers on show, and ``explorer.js``,
the drawing and the controls).

The data model, which every producer of attention maps writes:

* :class:`ExplorerLayer` — one attention layer: ``name``, ``kind`` (``"self"``
  or ``"cross"``), the query ``grid`` ``(H, W)`` and the ``weights``
  ``(steps, heads, queries, keys)``. The queries are every pixel of the grid
  (``queries = H·W``, token ``row·W + col``), or, for self-attention, only the
  rows of the pixels listed in ``query_pixels``. Keys are the ``H·W`` pixels
  (self) or the ``M`` tokens (cross). ``head_mean`` marks a head axis that
  holds one entry, the mean over the heads.
* :class:`Explorer` — the page: the layers (each at its own grid), an optional
  image of any size under the maps, the tokens of the prompt, the labels of the
  step axis, a title and notes. ``.html()`` is the page, ``.save(path)`` writes
  it, ``.save_npz(path)`` / :func:`load_explorer` keep the data in a ``.npz``
  file (schema in :meth:`Explorer.save_npz`), and Jupyter shows an Explorer
  inline (:meth:`Explorer._repr_html_`).

:func:`explore` builds an Explorer from a block cache, a spatial transformer's
cache, a weights array, or a mapping of names to any of those.
"""

from __future__ import annotations

import base64
import html
import json
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_write, load_npz
from ..backend import Array, to_numpy
from ..blocks import AttentionBlockCache, AttentionLayerCache, SpatialTransformerCache, TransformerBlockCache
from ._common import MAP_CMAP
from .tokens import SPECIAL_TOKENS

__all__ = [
    "COLOUR_MAP",
    "FORMAT",
    "SCALES",
    "Explorer",
    "ExplorerLayer",
    "colour_table",
    "explore",
    "load_explorer",
    "pixels_of_positions",
]

FORMAT = "attention_ref.explorer/1"  # the .npz schema's name and version
SCRIPTS = ("explorer_maps.js", "explorer.js")  # the page's script, in this order (explorer.js calls explorerMaps)
COLOUR_MAP = MAP_CMAP  # the matplotlib colour map the page uses, as the figures do
KINDS = ("self", "cross")
# How the page maps a map's values to colours: the values shown are always the weights;
# only the ends of the colour scale change. The first is the default: a map near uniform (every
# weight close to 1/M) stays dark beside the sharp maps of the same word or query, where
# "0 to this map's max" would stretch its small differences over the whole colour bar.
SCALES = {
    "shared": "0 to the word's (or query's) max over all steps and layers",
    "max": "0 to this map's max (stretches a flat map)",
    "unit": "0 to 1",
    "minmax": "this map's min to max",
    "words": "0 to the max over all words",
}
MAX_PAGE_BYTES = 64 * 2**20  # the weights a page holds; beyond this a browser struggles


def colour_table() -> np.ndarray:
    """``(256, 3)`` uint8: the colour map's RGB at ``i / 255``.

    The page colours a value ``t`` in [0, 1] (of its colour scale) with entry ``min(⌊256 t⌋, 255)``.
    """
    from matplotlib import colormaps

    rgba = colormaps[COLOUR_MAP].resampled(256)(np.arange(256))  # (256, 4) floats in [0, 1]
    return np.round(rgba[:, :3] * 255).astype(np.uint8)


def pixels_of_positions(positions: Any, grid: tuple[int, int]) -> np.ndarray:
    """``(Q, 2)`` int: the pixel ``(row, col)`` of each fractional position ``(y, x)`` in [0, 1]² on an ``H×W`` grid.

    ``row = min(⌊y·H⌋, H − 1)``, ``col = min(⌊x·W⌋, W − 1)``: the pixel whose square
    holds the position, the same pixel at every grid for a position at a pixel's centre.
    """
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"positions must be (Q, 2) fractional (y, x); got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"positions must lie in [0, 1]; got values from {p.min()} to {p.max()}")
    H, W = grid
    return np.stack(
        [np.minimum(np.floor(p[:, 0] * H), H - 1), np.minimum(np.floor(p[:, 1] * W), W - 1)], axis=1
    ).astype(np.int64)


def _grid(grid: Any, where: str) -> tuple[int, int]:
    try:
        H, W = (int(v) for v in grid)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: grid must be (H, W), got {grid!r}") from err
    if H < 1 or W < 1:
        raise ValueError(f"{where}: grid must be positive, got {(H, W)}")
    return H, W


@dataclass(frozen=True, eq=False)
class ExplorerLayer:
    """One attention layer's weights, as the explorer shows them.

    name: shown in the layer menu (unique within a page).
    kind: ``"self"`` (keys are the grid's pixels) or ``"cross"`` (keys are the prompt's tokens).
    grid: ``(H, W)``, the query map (and, for self-attention, the key map).
    weights: ``(steps, heads, Q, K)`` softmax weights in [0, 1], kept as float32:
        ``steps`` is 1 without a step axis; ``Q = H·W`` (every pixel, token ``row·W + col``)
        unless ``query_pixels`` is given; ``K = H·W`` (self) or ``M`` tokens (cross).
    query_pixels: ``(Q, 2)`` int ``(row, col)``, the query pixels whose rows ``weights``
        holds (self-attention only); None for every pixel.
        :func:`pixels_of_positions` turns fractional positions into these.
    head_mean: the head axis holds one entry, the mean over the layer's heads.
    """

    name: str
    kind: str
    grid: tuple[int, int]
    weights: np.ndarray
    query_pixels: np.ndarray | None = None
    head_mean: bool = False

    def __post_init__(self) -> None:
        where = f"layer {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a layer's name must be a non-empty str, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        H, W = _grid(self.grid, where)
        w = np.asarray(to_numpy(self.weights), dtype=np.float32)
        if w.ndim != 4:
            raise ValueError(f"{where}: weights must be (steps, heads, queries, keys); got shape {w.shape}")
        _, heads, Q, K = w.shape
        if min(w.shape) < 1:
            raise ValueError(f"{where}: weights have an empty axis: {w.shape}")
        if self.head_mean and heads != 1:
            raise ValueError(f"{where}: head_mean=True needs one entry on the head axis, got {heads}")
        if self.kind == "self" and K != H * W:
            raise ValueError(f"{where}: self-attention keys are the {H}×{W}={H * W} pixels; weights have {K}")
        pixels = None
        if self.query_pixels is None:
            if Q != H * W:
                raise ValueError(
                    f"{where}: weights have {Q} queries, not the {H}×{W}={H * W} pixels; give query_pixels"
                )
        else:
            if self.kind != "self":
                raise ValueError(f"{where}: query_pixels are for self-attention rows; cross layers hold every pixel")
            pixels = np.asarray(self.query_pixels)
            if pixels.shape != (Q, 2) or not np.issubdtype(pixels.dtype, np.integer):
                raise ValueError(
                    f"{where}: query_pixels must be ({Q}, 2) integers (row, col), one per query; "
                    f"got {pixels.dtype} {pixels.shape}"
                )
            inside = (pixels >= 0) & (pixels < np.array([H, W]))
            if not inside.all():
                raise ValueError(f"{where}: query_pixels {pixels[~inside.all(axis=1)].tolist()} lie outside {H}×{W}")
            pixels = pixels.astype(np.int64)
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{where}: weights hold NaN or inf")
        if w.min() < 0 or w.max() > 1 + 1e-6:
            raise ValueError(
                f"{where}: weights must be softmax weights in [0, 1] (not logits); got {w.min():.3g} to {w.max():.3g}"
            )
        object.__setattr__(self, "grid", (H, W))
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "query_pixels", pixels)
        object.__setattr__(self, "head_mean", bool(self.head_mean))

    def __repr__(self) -> str:
        S, heads, Q, K = self.weights.shape
        shape = f"{self.grid[0]}×{self.grid[1]}, {S} steps, {heads} heads, {Q} queries, {K} keys"
        return f"<ExplorerLayer {self.name!r}: {self.kind}, {shape}>"

    @property
    def steps(self) -> int:
        return self.weights.shape[0]

    @property
    def keys(self) -> int:
        return self.weights.shape[3]


def _rgb_image(image: Any) -> np.ndarray:
    """``(h, w, 3)`` uint8 from a grey ``(h, w)`` or RGB ``(h, w, 3)`` image, float in [0, 1] or uint8."""
    a = to_numpy(image)
    if a.ndim == 2:
        a = a[:, :, None].repeat(3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise ValueError(f"image must be (h, w) grey or (h, w, 3) RGB; got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"image must be float in [0, 1] or uint8, got {a.dtype}")
    if not (np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 1):
        raise ValueError(
            f"a float image must lie in [0, 1] (got {a.min():.3g} to {a.max():.3g}); scale it first, "
            "e.g. (x + 1) / 2 for [-1, 1]"
        )
    return np.round(a * 255).astype(np.uint8)


def _rgb_images(images: Any, steps: int) -> np.ndarray:
    """``(S, h, w, 3)`` uint8 from ``S`` grey ``(h, w)`` or RGB ``(h, w, 3)`` images, float in [0, 1] or uint8."""
    a = to_numpy(images)
    if a.ndim not in (3, 4) or a.shape[0] != steps:
        raise ValueError(
            f"step_images must be (S, h, w) grey or (S, h, w, 3) RGB with S = {steps} steps; got shape {a.shape}"
        )
    return np.stack([_rgb_image(one) for one in a])


def _check_page_bytes(total: int) -> None:
    """ValueError when a page would carry more than :data:`MAX_PAGE_BYTES` of weights."""
    if total > MAX_PAGE_BYTES:
        raise ValueError(
            f"the layers hold {total / 2**20:.0f} MiB of weights, more than a page can carry "
            f"({MAX_PAGE_BYTES / 2**20:.0f} MiB): keep only some query rows of self-attention "
            "(query_positions=), the mean of the heads, or fewer steps"
        )


def _text_tuple(values: Any, what: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise TypeError(f"{what} must be a sequence of strings, not one string")
    return tuple(str(v) for v in values)


@dataclass(frozen=True, eq=False)
class Explorer:
    """One explorer page: its layers, the image under the maps, the prompt and the step labels.

    layers: the :class:`ExplorerLayer` s, in the order of the layer menu; every layer has the
        same number of steps.
    image: ``(h, w, 3)`` uint8 (given as ``(h, w)`` grey or ``(h, w, 3)`` RGB, float in [0, 1]
        or uint8), any size: each map is stretched over it; None for a plain backdrop.
    tokens: the prompt's ``M`` tokens, one per key of every cross layer (required when there is
        one; ``explore`` numbers them when none are given).
    steps: one label per step (e.g. ``"t = 999"``, the diffusion timestep); None when the layers have one step.
    title, notes: the page's heading and a paragraph under it.
    start_query: the fractional position ``(y, x)`` of the query pixel shown first (default the centre).
    step_images: ``(S, h, w, 3)`` uint8 (given as ``(S, h, w)`` grey or ``(S, h, w, 3)`` RGB, float in
        [0, 1] or uint8): an image per step (e.g. the clean image ``x̂₀`` each denoising step predicts),
        shown on the left, and in grey under the map, at the step on show; None to show ``image`` at every step.
    step_images_label: what the step images are, shown under them.
    start_layer: the name of the layer shown first (default: the first cross-attention layer, else the first).
    start_step: the index of the step shown first (default: the last, e.g. the finished image).

    The first view (:meth:`start_view`) is ``start_layer`` at ``start_step``, with the first word of
    the prompt that is not a special token, on the ``"shared"`` colour scale (:data:`SCALES`).
    """

    layers: tuple[ExplorerLayer, ...]
    image: np.ndarray | None = None
    tokens: tuple[str, ...] | None = None
    steps: tuple[str, ...] | None = None
    title: str = "Attention explorer"
    notes: str = ""
    start_query: tuple[float, float] = (0.5, 0.5)
    step_images: np.ndarray | None = None
    step_images_label: str = "the image at this step"
    start_layer: str | None = None
    start_step: int | None = None

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or not all(isinstance(L, ExplorerLayer) for L in layers):
            raise TypeError("layers must be a non-empty sequence of ExplorerLayer")
        names = [L.name for L in layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        counts = {L.steps for L in layers}
        if len(counts) != 1:
            raise ValueError(f"every layer needs the same number of steps; got {[(L.name, L.steps) for L in layers]}")
        (S,) = counts
        steps = _text_tuple(self.steps, "steps")
        if steps is not None and len(steps) != S:
            raise ValueError(f"{len(steps)} step labels for weights with {S} steps")
        if steps is None and S > 1:
            steps = tuple(str(s) for s in range(S))
        tokens = _text_tuple(self.tokens, "tokens")
        for L in layers:
            if L.kind == "cross" and (tokens is None or len(tokens) != L.keys):
                got = "no tokens" if tokens is None else f"{len(tokens)} tokens"
                raise ValueError(f"cross layer {L.name!r} has {L.keys} keys, and the page has {got}")
        y, x = (float(v) for v in self.start_query)
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise ValueError(f"start_query is a fractional (y, x) in [0, 1]², got {(y, x)}")
        _check_page_bytes(sum(L.weights.nbytes for L in layers))
        step_images = None if self.step_images is None else _rgb_images(self.step_images, S)
        if self.start_layer is not None and self.start_layer not in names:
            raise ValueError(f"start_layer {self.start_layer!r} is not one of the layers {names}")
        start_step = None if self.start_step is None else operator.index(self.start_step)
        if start_step is not None and not 0 <= start_step < S:
            raise ValueError(f"start_step {start_step} is outside the {S} steps (0 to {S - 1})")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "step_images", step_images)
        object.__setattr__(self, "step_images_label", str(self.step_images_label))
        object.__setattr__(self, "start_step", start_step)
        object.__setattr__(self, "image", None if self.image is None else _rgb_image(self.image))
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "start_query", (y, x))

    # ----- the page -----------------------------------------------------------------------------
    def start_view(self) -> dict[str, Any]:
        """What the page shows first: ``{"layer": index, "step": index, "word": index, "scale": key of SCALES}``.

        The layer is ``start_layer`` (default: the first cross-attention layer, whose maps answer
        "where is this word read?", else the first layer); the step ``start_step`` (default the last:
        the finished image); the word the first token that is not a special token (``<sot>``, …);
        the scale ``"shared"``, on which a near-uniform map stays dark.
        """
        names = [L.name for L in self.layers]
        if self.start_layer is not None:
            layer = names.index(self.start_layer)
        else:
            layer = next((i for i, L in enumerate(self.layers) if L.kind == "cross"), 0)
        special = [t in SPECIAL_TOKENS for t in self.tokens] if self.tokens else []
        word = special.index(False) if False in special else 0
        step = self.layers[0].steps - 1 if self.start_step is None else self.start_step
        return {"layer": layer, "step": step, "word": word, "scale": next(iter(SCALES))}

    def page_data(self) -> dict[str, Any]:
        """The JSON object the page's script reads: arrays as base64 of little-endian bytes."""

        def b64(a: np.ndarray) -> str:
            return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")

        special = [t in SPECIAL_TOKENS for t in self.tokens] if self.tokens else []
        data: dict[str, Any] = {
            "format": FORMAT,
            "title": self.title,
            "tokens": list(self.tokens) if self.tokens else [],
            "special": special,
            "steps": list(self.steps) if self.steps else [],
            "startQuery": list(self.start_query),
            "scales": SCALES,
            "start": self.start_view(),
            "colours": b64(colour_table()),
            "colourMap": COLOUR_MAP,
            "image": None,
            "stepImages": None,
            "layers": [],
        }
        if self.image is not None:
            h, w, _ = self.image.shape
            data["image"] = {"height": h, "width": w, "rgb": b64(self.image)}
        if self.step_images is not None:
            S, h, w, _ = self.step_images.shape
            data["stepImages"] = {"steps": S, "height": h, "width": w, "rgb": b64(self.step_images),
                                  "label": self.step_images_label}  # fmt: skip
        for L in self.layers:
            S, heads, Q, K = L.weights.shape
            data["layers"].append(
                {
                    "name": L.name,
                    "kind": L.kind,
                    "grid": list(L.grid),
                    "steps": S,
                    "heads": heads,
                    "headMean": L.head_mean,
                    "queries": Q,
                    "keys": K,
                    "queryPixels": None if L.query_pixels is None else L.query_pixels.tolist(),
                    "weights": b64(L.weights.astype("<f4")),
                }
            )
        return data

    def html(self) -> str:
        """The page: one HTML document with its style, script and data inline."""
        folder = resources.files(__package__)
        template = (folder / "explorer.html").read_text(encoding="utf-8")
        # Inside <script type="application/json"> only "</script" could end the element early:
        # writing every "<" as \u003c rules it out, and JSON.parse reads it back as "<".
        parts = {
            "TITLE": html.escape(self.title),
            "NOTES": html.escape(self.notes),
            "SCRIPT": "\n".join((folder / name).read_text(encoding="utf-8") for name in SCRIPTS),
            "DATA": json.dumps(self.page_data(), ensure_ascii=False).replace("<", "\\u003c"),
        }
        # one pass, so that no inserted text (a token, the title) is searched for markers again
        return re.sub(r"__(TITLE|NOTES|SCRIPT|DATA)__", lambda m: parts[m.group(1)], template)

    def save(self, path: str | Path) -> Path:
        """Write the page (:meth:`html`) to ``path``; returns the path.

        The page is encoded first and written through a temporary file renamed over ``path``
        (:func:`attention_ref._files.atomic_write`), so a failure leaves an existing file as it was.
        ``ValueError`` naming the field, before anything is written, for text that is not valid Unicode
        (a lone surrogate such as ``"\\ud800"`` in a token, which UTF-8 cannot encode).
        """
        path = Path(path)
        self._require_encodable(path)
        data = self.html().encode("utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(data)
        return path

    def _require_encodable(self, path: Path) -> None:
        """``ValueError`` naming the first text field that UTF-8 cannot encode (a lone surrogate)."""
        fields = [("title", [self.title]), ("notes", [self.notes]), ("tokens", self.tokens or ())]
        fields += [("steps", self.steps or ()), ("layer names", [L.name for L in self.layers])]
        for field_name, texts in fields:
            for i, text in enumerate(texts):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    where = field_name if field_name in ("title", "notes") else f"{field_name}[{i}] {text!r}"
                    bad = text[err.start : err.end]
                    raise ValueError(
                        f"{path}: {where} holds {bad!a}, a lone surrogate that is not text (UTF-8 cannot encode it): "
                        "nothing written; decode the token's bytes with errors='replace'"
                    ) from None

    def __repr__(self) -> str:
        steps = f", {len(self.steps)} steps" if self.steps else ""
        tokens = f", {len(self.tokens)} tokens" if self.tokens else ""
        image = f", image {self.image.shape[0]}×{self.image.shape[1]}" if self.image is not None else ""
        return f"<Explorer {self.title!r}: {len(self.layers)} layers{steps}{tokens}{image}>"

    def _repr_html_(self) -> str:
        """Jupyter's inline view: the page in an iframe (``srcdoc``), so its script and style stay its own."""
        return (
            f'<iframe srcdoc="{html.escape(self.html(), quote=True)}" '
            'style="width: 100%; height: 760px; border: 0;" title="attention explorer"></iframe>'
        )

    # ----- the .npz file ------------------------------------------------------------------------
    def save_npz(self, path: str | Path) -> Path:
        """Write the data to a compressed ``.npz`` file that :func:`load_explorer` (and ``--source``) reads.

        Schema (``FORMAT = "attention_ref.explorer/1"``); strings are 0-d or 1-d unicode arrays:

        * ``format``: the string ``FORMAT``; ``title``, ``notes``: strings;
        * ``start_query``: ``(2,)`` float, fractional ``(y, x)``;
        * ``image`` (optional): ``(h, w, 3)`` uint8;
        * ``tokens`` (optional): ``(M,)`` strings; ``steps`` (optional): ``(S,)`` strings;
        * ``step_images`` (optional): ``(S, h, w, 3)`` uint8, with ``step_images_label``, a string;
        * ``start_layer`` (optional): a layer's name; ``start_step`` (optional): 0-d int;
        * ``layers``: ``(L,)`` strings, the layer names in menu order; for layer ``i``:
          ``layer{i}.kind`` (``"self"``/``"cross"``), ``layer{i}.grid`` ``(2,)`` int,
          ``layer{i}.weights`` ``(S, heads, Q, K)`` float32, ``layer{i}.head_mean`` bool,
          and, when the layer holds only some query rows, ``layer{i}.query_pixels`` ``(Q, 2)`` int.
        """
        arrays: dict[str, np.ndarray] = {
            "format": np.array(FORMAT),
            "title": np.array(self.title),
            "notes": np.array(self.notes),
            "start_query": np.array(self.start_query, dtype=np.float64),
            "layers": np.array([L.name for L in self.layers]),
        }
        if self.image is not None:
            arrays["image"] = self.image
        if self.tokens is not None:
            arrays["tokens"] = np.array(self.tokens, dtype=str)
        if self.steps is not None:
            arrays["steps"] = np.array(self.steps, dtype=str)
        if self.step_images is not None:
            arrays["step_images"] = self.step_images
            arrays["step_images_label"] = np.array(self.step_images_label)
        if self.start_layer is not None:
            arrays["start_layer"] = np.array(self.start_layer)
        if self.start_step is not None:
            arrays["start_step"] = np.array(self.start_step, dtype=np.int64)
        for i, L in enumerate(self.layers):
            arrays[f"layer{i}.kind"] = np.array(L.kind)
            arrays[f"layer{i}.grid"] = np.array(L.grid, dtype=np.int64)
            arrays[f"layer{i}.weights"] = L.weights
            arrays[f"layer{i}.head_mean"] = np.array(L.head_mean)
            if L.query_pixels is not None:
                arrays[f"layer{i}.query_pixels"] = L.query_pixels
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a file object (numpy would add ".npz" to a name without it), renamed over path once written whole
        with atomic_write(path) as f:
            np.savez_compressed(f, **arrays)
        return path


def _field_str(arrays: Mapping[str, np.ndarray], key: str, path: Path, default: str | None = None) -> str | None:
    """The 0-d string entry ``key`` (``default`` when absent); ``ValueError`` naming it otherwise."""
    if key not in arrays:
        return default
    a = arrays[key]
    if a.dtype.kind != "U" or a.ndim != 0:
        raise ValueError(f"{path}: '{key}' must be a string (a 0-d unicode array), got {a.dtype} of shape {a.shape}")
    return str(a)


def _field_strings(arrays: Mapping[str, np.ndarray], key: str, path: Path) -> list[str] | None:
    """The 1-d string entry ``key`` as a list (None when absent); ``ValueError`` naming it otherwise."""
    if key not in arrays:
        return None
    a = arrays[key]
    if a.dtype.kind != "U" or a.ndim != 1:
        raise ValueError(f"{path}: '{key}' must be a 1-d array of strings, got {a.dtype} of shape {a.shape}")
    return [str(v) for v in a]


def _field_array(a: np.ndarray, key: str, path: Path, kinds: str, shape: tuple[int | None, ...], what: str) -> None:
    """``ValueError`` naming ``key`` unless ``a`` has a dtype of ``kinds`` and ``shape`` (None: any length)."""
    fits = a.ndim == len(shape) and all(want is None or n == want for n, want in zip(a.shape, shape, strict=True))
    if a.dtype.kind not in kinds or not fits:
        raise ValueError(f"{path}: '{key}' must be {what}, got {a.dtype} of shape {a.shape}")


# The optional entries of the page's first view and its per-step images (schema in Explorer.save_npz).
VIEW_ENTRIES = ("step_images", "step_images_label", "start_layer", "start_step")


def _view_fields(arrays: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """The :data:`VIEW_ENTRIES` an explorer file holds, checked, as :class:`Explorer` keyword arguments."""
    fields: dict[str, Any] = {}
    if "step_images" in arrays:
        _field_array(arrays["step_images"], "step_images", path, "u", (None, None, None, 3), "(S, h, w, 3) uint8")
        fields["step_images"] = arrays["step_images"]
    for key in ("step_images_label", "start_layer"):
        if key in arrays:
            fields[key] = _field_str(arrays, key, path)
    if "start_step" in arrays:
        _field_array(arrays["start_step"], "start_step", path, "iu", (), "a 0-d integer")
        fields["start_step"] = int(arrays["start_step"])
    return fields


def load_explorer(path: str | Path, *, max_bytes: int = 4 * MAX_PAGE_BYTES) -> Explorer:
    """The :class:`Explorer` saved by :meth:`Explorer.save_npz` (schema there).

    The file is read by :func:`attention_ref._files.load_npz`: refused before anything is unpacked when its
    arrays would take more than ``max_bytes`` (default 256 MiB, four times what a page may hold), and
    never unpickled. ``ValueError`` naming the file and the entry for anything that is not that schema:
    a missing or unknown entry, a wrong dtype or shape (a grid of floats, a 0-d list of layers).
    """
    path = Path(path)
    arrays = load_npz(path, max_bytes=max_bytes)
    found = _field_str(arrays, "format", path, default="no 'format' entry")
    if found != FORMAT:
        raise ValueError(f"{path} is not an explorer file of format {FORMAT!r} ({found})")
    if "layers" not in arrays:
        raise ValueError(f"{path}: lacks 'layers' (the layer names)")
    names = _field_strings(arrays, "layers", path)
    known = {"format", "title", "notes", "start_query", "image", "tokens", "steps", "layers", *VIEW_ENTRIES}
    layers = []
    for i, name in enumerate(names):
        keys = [f"layer{i}.{k}" for k in ("kind", "grid", "weights", "head_mean")]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ValueError(f"{path}: layer {i} ({name!r}) lacks {missing}")
        kind_key, grid_key, weights_key, mean_key = keys
        kind = _field_str(arrays, kind_key, path)
        _field_array(arrays[grid_key], grid_key, path, "iu", (2,), "(2,) integers (H, W)")
        _field_array(arrays[weights_key], weights_key, path, "f", (None,) * 4, "(steps, heads, queries, keys) floats")
        _field_array(arrays[mean_key], mean_key, path, "b", (), "a 0-d bool")
        rows = arrays.get(f"layer{i}.query_pixels")
        if rows is not None:
            _field_array(rows, f"layer{i}.query_pixels", path, "iu", (None, 2), "(Q, 2) integers (row, col)")
        try:
            layer = ExplorerLayer(
                name=name,
                kind=kind,
                grid=tuple(int(v) for v in arrays[grid_key]),
                weights=arrays[weights_key],
                head_mean=bool(arrays[mean_key]),
                query_pixels=rows,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: layer {i}: {err}") from None
        layers.append(layer)
        known.update([*keys, f"layer{i}.query_pixels"])
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise ValueError(f"{path}: unknown entries {unknown} (schema {FORMAT!r}: see Explorer.save_npz)")
    image = arrays.get("image")
    if image is not None:
        _field_array(image, "image", path, "u", (None, None, 3), "(h, w, 3) uint8")
    start = arrays.get("start_query", np.array([0.5, 0.5]))
    _field_array(start, "start_query", path, "f", (2,), "(2,) floats (y, x)")
    try:
        return Explorer(
            layers=tuple(layers),
            image=image,
            tokens=_field_strings(arrays, "tokens", path),
            steps=_field_strings(arrays, "steps", path),
            title=_field_str(arrays, "title", path, default="Attention explorer"),
            notes=_field_str(arrays, "notes", path, default=""),
            start_query=(float(start[0]), float(start[1])),
            **_view_fields(arrays, path),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


# ----- explore(): from the library's caches and arrays ------------------------------------------
def _select(w: np.ndarray, batch: int, where: str) -> np.ndarray:
    """``(1, heads, N, M)``: sample ``batch`` of ``(B, heads, N, M)`` weights, with a step axis of one."""
    if w.ndim != 4:
        raise ValueError(f"{where}: weights must be (B, heads, N, M); got shape {w.shape}")
    if not -w.shape[0] <= batch < w.shape[0]:
        raise ValueError(f"{where}: batch {batch} is outside the {w.shape[0]} samples")
    return w[batch][None]


def _square_grid(N: int, where: str) -> tuple[int, int]:
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"{where}: {N} query pixels are not a square map; give grid=(H, W)")
    return side, side


ROWS_AT_ONCE = 256  # dense rows recomputed per call for attention that stores no weights


def _cache_layer(
    name: str,
    cache: AttentionLayerCache,
    grid: tuple[int, int],
    batch: int,
    positions: np.ndarray | None,
    used: int = 0,
) -> ExplorerLayer:
    """One attention layer's cache on a ``grid`` of pixels: its stored weights, or dense rows recomputed.

    ``used``: the bytes of weights the page's other layers hold. The size this layer would add
    (float32, one sample) is checked against :data:`MAX_PAGE_BYTES` before any row is computed,
    and rows are recomputed a band at a time, keeping only sample ``batch``.
    """
    B, N = cache.h_shape[:2]
    if grid[0] * grid[1] != N:
        raise ValueError(f"{name}: grid {grid} has {grid[0] * grid[1]} pixels but the layer has {N} query tokens")
    if not -B <= batch < B:
        raise ValueError(f"{name}: batch {batch} is outside the {B} samples")
    kind = "self" if cache.context_shape is None else "cross"
    keys = N if kind == "self" else cache.context_shape[1]
    pixels = pixels_of_positions(positions, grid) if positions is not None and kind == "self" else None
    rows = N if pixels is None else len(pixels)
    _check_page_bytes(used + 4 * cache.heads * rows * keys)  # float32 (1, heads, rows, keys)
    if pixels is not None:
        tokens = [int(r * grid[1] + c) for r, c in pixels]
        w = np.concatenate([to_numpy(cache.weight_rows(t, t + 1))[batch] for t in tokens], axis=1)  # (heads, Q, N)
        return ExplorerLayer(name, kind, grid, w[None], query_pixels=pixels)
    if cache.weights is not None:
        return ExplorerLayer(name, kind, grid, _select(np.asarray(to_numpy(cache.weights)), batch, name))
    bands = [
        np.asarray(to_numpy(cache.weight_rows(start, min(start + ROWS_AT_ONCE, N)))[batch], dtype=np.float32)
        for start in range(0, N, ROWS_AT_ONCE)
    ]  # (heads, rows, keys) each
    return ExplorerLayer(name, kind, grid, np.concatenate(bands, axis=1)[None])


def _array_layer(
    name: str,
    weights: Any,
    grid: tuple[int, int] | None,
    kind: str | None,
    tokens: Sequence[str] | None,
    batch: int,
    positions: np.ndarray | None,
) -> ExplorerLayer:
    w = np.asarray(to_numpy(weights))
    if w.ndim != 4:
        raise ValueError(f"{name}: weights must be (B, heads, N, M) (a batch axis, a head axis); got shape {w.shape}")
    N, M = w.shape[2], w.shape[3]
    if grid is None:
        grid = _square_grid(N, name)
    if kind is None:
        if M == N and tokens is None:
            kind = "self"
        elif M != N:
            kind = "cross"
        else:
            raise ValueError(f"{name}: weights are (…, {N}, {N}) and tokens were given: say kind='self' or 'cross'")
    w = _select(w, batch, name)
    if positions is not None and kind == "self":
        pixels = pixels_of_positions(positions, _grid(grid, name))
        w = w[:, :, pixels[:, 0] * int(grid[1]) + pixels[:, 1]]  # (1, heads, Q, N)
        return ExplorerLayer(name, kind, grid, w, query_pixels=pixels)
    return ExplorerLayer(name, kind, grid, w)


def _named_sources(source: Any, grid: tuple[int, int] | None) -> list[tuple[str, Any, tuple[int, int] | None]]:
    """``[(name, layer cache or array or layer, grid), …]``: block caches opened into their attention layers,
    each with the grid of the map it ran on (``grid`` where the cache does not know it)."""
    if isinstance(source, Mapping):
        items = [(str(k), v) for k, v in source.items()]
    elif isinstance(source, (list, tuple)) and all(isinstance(s, ExplorerLayer) for s in source):
        items = [(s.name, s) for s in source]
    else:
        items = [("attention", source)]
    named: list[tuple[str, Any, tuple[int, int] | None]] = []
    for name, s in items:
        if isinstance(s, SpatialTransformerCache):
            g = (s.x_shape[1], s.x_shape[2])
            for i, block in enumerate(s.blocks):
                named += [(f"{name}.blocks.{i}.attn1", block.attn1, g), (f"{name}.blocks.{i}.attn2", block.attn2, g)]
        elif isinstance(s, AttentionBlockCache):
            named.append((name, s.layer, (s.x_shape[1], s.x_shape[2])))
        elif isinstance(s, TransformerBlockCache):
            named += [(f"{name}.attn1", s.attn1, grid), (f"{name}.attn2", s.attn2, grid)]
        else:
            named.append((name, s, grid))
    return named


def explore(
    source: Any,
    *,
    image: Array | None = None,
    tokens: Sequence[str] | None = None,
    grid: tuple[int, int] | None = None,
    kind: str | None = None,
    batch: int = 0,
    query_positions: Any | None = None,
    title: str = "Attention explorer",
    notes: str = "",
    start_query: tuple[float, float] = (0.5, 0.5),
    out: str | Path | None = None,
) -> Explorer:
    """The explorer page of ``source``; a Jupyter cell whose value it is shows the page inline.

    Inputs:
        source: any of
            * an :class:`~attention_ref.blocks.AttentionBlockCache` (self- or cross-attention,
              batched ``x`` ``(B, H, W, C)``); its stored weights, or dense rows recomputed
              for attention variants that store none (not linear attention);
            * a :class:`~attention_ref.blocks.SpatialTransformerCache` or
              :class:`~attention_ref.blocks.TransformerBlockCache`: every ``attn1`` (self) and
              ``attn2`` (cross) inside;
            * an :class:`~attention_ref.blocks.AttentionLayerCache` of the token layer (``grid`` says
              which map its tokens are; default a square);
            * a weights array ``(B, heads, N, M)`` of any backend (``N = H·W``);
            * a mapping ``{name: any of the above}``, or a sequence of :class:`ExplorerLayer`;
            * an :class:`Explorer` (returned as it is; the other inputs must be left out).
        image: ``(h, w)`` or ``(h, w, 3)``, float in [0, 1] or uint8, any size; the maps are drawn over it.
        tokens: the ``M`` tokens of cross-attention (default ``"#0"``, ``"#1"``, …).
        grid: ``(H, W)`` for weights arrays and token-layer caches (default: a square of ``N`` pixels).
        kind: ``"self"`` or ``"cross"`` for weights arrays (default: self when ``M = N`` and no
            tokens are given, cross when ``M ≠ N``).
        batch: which sample of the batch to show.
        query_positions: ``(Q, 2)`` fractional ``(y, x)``: keep only these query rows of
            self-attention (a large map's ``N × N`` weights would not fit a page).
        title, notes: the heading and a paragraph under it; start_query: fractional ``(y, x)``
            of the query pixel shown first.
        out: also write the page there.

    Returns:
        The :class:`Explorer`; ``.save(path)`` writes the page, ``.save_npz(path)`` its data.
    """
    if isinstance(source, Explorer):
        given = {"image": image, "tokens": tokens, "grid": grid, "kind": kind, "query_positions": query_positions}
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"explore(Explorer) takes the page as it is; {extra} cannot be applied to it")
        page = source
    else:
        positions = None if query_positions is None else np.asarray(query_positions, dtype=np.float64)
        if positions is not None:
            pixels_of_positions(positions, (1, 1))  # checks the shape and range
        layers: list[ExplorerLayer] = []
        for name, s, g in _named_sources(source, grid):
            if isinstance(s, ExplorerLayer):
                layers.append(s)
            elif isinstance(s, AttentionLayerCache):
                used = sum(L.weights.nbytes for L in layers)
                layers.append(_cache_layer(name, s, g or _square_grid(s.h_shape[1], name), batch, positions, used))
            else:
                layers.append(_array_layer(name, s, g, kind, tokens, batch, positions))
        if tokens is None:
            widths = {L.keys for L in layers if L.kind == "cross"}
            if len(widths) == 1:
                tokens = [f"#{t}" for t in range(widths.pop())]
        page = Explorer(
            layers=tuple(layers), image=image, tokens=tokens, title=title, notes=notes, start_query=start_query
        )
    if out is not None:
        page.save(out)
    return page
