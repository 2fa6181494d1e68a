r"""Sampling with DDIM and classifier-free guidance, recording every attention layer at every step.

:func:`sample` starts from Gaussian noise ``x_T`` and takes ``steps`` deterministic
DDIM steps (:mod:`~attention_ref.toys.diffusion.schedule`). At each step the U-Net
runs once on ``2B`` maps — the ``B`` prompts and ``B`` copies of the empty prompt —
and the guided noise ``ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅)`` makes the step.

From the conditional half of that pass the trace keeps, for every spatial
transformer of the U-Net, what its caches already hold:

* the **cross-attention** weights ``(heads, h·w, M)``: for each pixel of the layer's
  ``h×w`` grid, how much it reads each of the ``M`` prompt tokens;
* the **self-attention** rows of chosen query pixels ``(heads, Q, h·w)``: where each
  of those pixels looks in the layer's own map.

The trace is plain arrays (:class:`LayerTrace`, :class:`SampleResult`), laid out so
that a viewer can index them directly; :meth:`SampleResult.to_arrays` flattens it
into one dict of arrays for ``np.savez``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..._files import DEFAULT_MAX_BYTES, atomic_write, load_npz
from ..scenes import SIZE, VOCAB
from .data import EMPTY_PROMPT, encode_prompts, from_model
from .model import DiffusionModel, json_entry, load_pretrained
from .schedule import ddim_step, ddim_timesteps, guided_eps

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_QUERIES",
    "LayerTrace",
    "SampleResult",
    "load_trace",
    "sample",
    "upsample_map",
]

DEFAULT_GUIDANCE = 3.0
# The layer a sample's explorer page opens on (attention_ref.viz.sample_explorer): the mid block's
# cross-attention, where this U-Net reads the colour words from their objects (the prompt's first word is a
# colour). Over the first 8 held-out prompts (seed 1000, 25 steps) each layer's summed maps alone score IoU
# 0.61 (colour words) / 0.13 (shape words) here, against 0.24 / 0.63 for down.1 (which reads the shape words),
# 0.47 / 0.14 for up.1, 0.17 / 0.05 for up.0.
EXPLORER_START_LAYER = "mid.attn.blocks.0.attn2"
# a 4×4 grid of query pixels, one in each 4×4 block of the image (distinct cells on the 8×8 layers)
DEFAULT_QUERIES = tuple((r, c) for r in (2, 6, 10, 14) for c in (2, 6, 10, 14))


@dataclass(frozen=True)
class LayerTrace:
    """One attention layer's weights at every denoising step.

    name: the layer's parameter prefix in the U-Net, e.g. ``"up.0.attn.blocks.0.attn2"``.
    kind: ``"cross"`` (pixels → prompt tokens) or ``"self"`` (pixels → pixels).
    grid: ``(h, w)``, the layer's map (16×16 or 8×8 here).
    maps: cross: ``(B, steps, heads, h, w, M)`` — ``maps[b, s, k, i, j, m]`` is the weight that
        pixel ``(i, j)`` of image ``b`` gives token ``m`` in head ``k`` at step ``s``; over ``m``
        it sums to 1 (padding tokens get 0).
        self: ``(B, steps, heads, Q, h, w)`` — ``maps[b, s, k, q]`` is the map of weights that
        query ``q`` (at ``queries[q]``) gives every pixel; it sums to 1.
    queries: self only, ``(Q, 2)`` the query pixels ``(row, col)`` in this layer's grid
        (image pixel ``(r, c)`` falls in cell ``(r·h // H, c·w // W)``); ``None`` for cross.
    """

    name: str
    kind: str
    grid: tuple[int, int]
    maps: np.ndarray
    queries: np.ndarray | None = None

    @property
    def heads(self) -> int:
        return self.maps.shape[2]


@dataclass
class SampleResult:
    """What :func:`sample` returns. ``B`` prompts, ``S`` steps, ``M`` tokens, ``Q`` query pixels.

    prompts: the ``B`` prompts; tokens: each prompt's real tokens (``<sot>`` … ``<eot>``).
    words: ``(B, M)`` token ids into :data:`~attention_ref.toys.scenes.VOCAB` (padding included);
        context_mask: ``(B, M)`` True for real tokens.
    images: ``(B, 16, 16, 3)`` the samples in [0, 1].
    timesteps: ``(S,)`` the diffusion step ``t`` of each denoising step, from ``T − 1`` down to 0.
    x_t: ``(B, S + 1, 16, 16, 3)`` the map entering each step, then the result (model range [−1, 1]).
    x0_pred: ``(B, S, 16, 16, 3)`` the clean image each step predicts (``x̂₀``, in [−1, 1]).
    layers: one :class:`LayerTrace` per attention layer, in the order the U-Net runs them
        (each transformer's self-attention, then its cross-attention).
    queries: ``(Q, 2)`` the self-attention query pixels on the 16×16 image.
    guidance, seed: as given.
    """

    prompts: list[str]
    tokens: list[list[str]]
    words: np.ndarray
    context_mask: np.ndarray
    images: np.ndarray
    timesteps: np.ndarray
    x_t: np.ndarray
    x0_pred: np.ndarray
    layers: list[LayerTrace]
    queries: np.ndarray
    guidance: float
    seed: int

    def cross_layers(self) -> list[LayerTrace]:
        """The cross-attention layers."""
        return [layer for layer in self.layers if layer.kind == "cross"]

    def word_maps(
        self, *, steps: slice | Sequence[int] | None = None, layers: Sequence[str] | None = None
    ) -> np.ndarray:
        """Each token's heat map on the image: ``(B, 16, 16, M)``.

        The cross-attention weights, averaged over heads, brought to 16×16 (nearest),
        and summed over the chosen ``steps`` (indices into :attr:`timesteps`; default all) and
        cross-attention ``layers`` (names; default all) — DAAM's aggregation.
        """
        chosen = [layer for layer in self.cross_layers() if layers is None or layer.name in layers]
        if not chosen:
            raise ValueError(f"no cross-attention layer among {layers}; have {[c.name for c in self.cross_layers()]}")
        index = slice(None) if steps is None else steps
        total = None
        for layer in chosen:
            m = layer.maps[:, index].mean(axis=2).sum(axis=1)  # (B, h, w, M): mean over heads, sum over steps
            m = upsample_map(m, (SIZE, SIZE))
            total = m if total is None else total + m
        return total

    def step_word_maps(self, b: int) -> np.ndarray:
        """Image ``b``'s token maps at every step, ``(S, 16, 16, M)``: mean over cross-attention layers and heads.

        A pixel's weights over the tokens sum to 1 at every step (each layer's do).
        """
        layers = self.cross_layers()
        if not layers:
            raise ValueError("no cross-attention layer was recorded (sample(..., trace=False)?)")
        total = sum(upsample_map(layer.maps[b].mean(axis=1), (SIZE, SIZE)) for layer in layers)  # (S, 16, 16, M)
        return total / len(layers)

    def layer_head_maps(self, b: int, token: int) -> dict[str, np.ndarray]:
        """Image ``b``, token ``token``: transformer name (``"up.0.attn"``) → ``(S, heads, h, w)``, the map of its
        cross-attention in every head at every step."""
        return {
            layer.name.removesuffix(".blocks.0.attn2"): layer.maps[b, :, :, :, :, token]
            for layer in self.cross_layers()
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The whole trace as a flat dict of arrays (for ``np.savez``); ``"meta"`` is a JSON string.

        Keys: ``images``, ``x_t``, ``x0_pred``, ``timesteps``, ``words``, ``context_mask``, ``queries``,
        and for layer ``i``: ``layer{i}.maps`` (plus ``layer{i}.queries`` for self-attention). ``meta``
        holds the prompts, tokens, vocabulary, guidance, seed and each layer's name, kind, grid and
        axes.
        """
        arrays = {
            "images": self.images,
            "x_t": self.x_t,
            "x0_pred": self.x0_pred,
            "timesteps": self.timesteps,
            "words": self.words,
            "context_mask": self.context_mask,
            "queries": self.queries,
        }
        meta_layers = []
        for i, layer in enumerate(self.layers):
            arrays[f"layer{i}.maps"] = layer.maps
            axes = "(B, steps, heads, h, w, M)" if layer.kind == "cross" else "(B, steps, heads, Q, h, w)"
            meta_layers.append({"name": layer.name, "kind": layer.kind, "grid": list(layer.grid), "axes": axes})
            if layer.queries is not None:
                arrays[f"layer{i}.queries"] = layer.queries
        meta = {
            "prompts": self.prompts,
            "tokens": self.tokens,
            "vocab": list(VOCAB),
            "guidance": self.guidance,
            "seed": self.seed,
            "layers": meta_layers,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_arrays` to ``path`` (``.npz``, compressed, the suffix added when missing);
        :func:`load_trace` reads it back. Returns the path written.

        Written through a temporary file renamed over ``path`` (:func:`attention_ref._files.atomic_write`):
        a failure leaves an existing file as it was.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # as numpy.savez names it
        arrays = self.to_arrays()
        with atomic_write(path) as f:
            np.savez_compressed(f, **arrays)
        return path


def load_trace(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """The arrays :meth:`SampleResult.save` wrote, with ``"meta"`` parsed back into a dict.

    Read by :func:`attention_ref._files.load_npz`: refused before anything is unpacked when the arrays
    would take more than ``max_bytes`` (default 1 GiB), never unpickled. ``ValueError`` naming the file
    and the entry when ``"meta"`` is missing or is not a JSON object.
    """
    arrays: dict[str, Any] = load_npz(path, max_bytes=max_bytes)
    arrays["meta"] = json_entry(arrays.get("meta"), path, "meta", "a trace written by SampleResult.save")
    if not isinstance(arrays["meta"], dict):
        raise ValueError(f"{path}: 'meta' must be a JSON object, got {type(arrays['meta']).__name__}")
    return arrays


def upsample_map(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(B, h, w, M)`` → ``(B, H, W, M)`` by repeating each cell (``H`` a multiple of ``h``)."""
    _, h, w, _ = maps.shape
    fh, fw = size[0] // h, size[1] // w
    if fh * h != size[0] or fw * w != size[1]:
        raise ValueError(f"a {h}×{w} map does not scale to {size[0]}×{size[1]}")
    return np.repeat(np.repeat(maps, fh, axis=1), fw, axis=2)


def _cells(queries: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(Q, 2)``: the cell ``(r·h // 16, c·w // 16)`` of an ``h×w`` layer that each image pixel ``(r, c)`` is in."""
    return np.stack([queries[:, 0] * h // SIZE, queries[:, 1] * w // SIZE], axis=1)


def sample(
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    model: DiffusionModel | None = None,
    queries: Sequence[tuple[int, int]] = DEFAULT_QUERIES,
    trace: bool = True,
) -> SampleResult:
    """Generate one image per prompt and record the attention of every step.

    Inputs:
        prompts: e.g. ``["red square and blue circle", "green triangle"]``.
        seed: the starting noise ``x_T ~ N(0, I)``, ``(B, 16, 16, 3)``, is drawn from it.
        steps: DDIM steps (from ``t = T − 1`` to 0).
        guidance: the classifier-free guidance weight ``w`` (1: no guidance).
        model: default :func:`~attention_ref.toys.diffusion.model.load_pretrained` (float64).
        queries: image pixels ``(row, col)`` whose self-attention rows are kept.
        trace: keep the attention maps (``False``: only images, ``layers`` empty).

    Returns:
        :class:`SampleResult`.
    """
    if isinstance(prompts, str):
        raise TypeError('prompts must be a sequence of strings, e.g. ["red square"], not one string')
    model = model or load_pretrained()
    prompts = list(prompts)
    B = len(prompts)
    if B == 0:
        raise ValueError("sample needs at least one prompt")
    context, mask, words = encode_prompts([*prompts, *([EMPTY_PROMPT] * B)])
    queries = np.array(queries, dtype=int).reshape(-1, 2)
    if np.any(queries < 0) or np.any(queries >= SIZE):
        raise ValueError(f"query pixels must lie in the {SIZE}×{SIZE} image, got {queries.tolist()}")
    dtype = model.dtype
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, SIZE, SIZE, model.config.image_channels)).astype(dtype)
    timesteps = ddim_timesteps(steps, model.schedule.steps)
    xs, x0s = [x], []
    records: dict[tuple[str, str], list[np.ndarray]] = {}
    grids: dict[str, tuple[int, int]] = {}
    for s, t in enumerate(timesteps):
        x2 = np.concatenate([x, x], axis=0)  # (2B, 16, 16, 3): conditional, then unconditional
        eps2, cache = model.eps(x2, np.full(2 * B, float(t)), context, mask)
        eps = guided_eps(eps2[:B], eps2[B:], guidance)
        t_prev = int(timesteps[s + 1]) if s + 1 < steps else None
        x, x0 = ddim_step(model.schedule, x, eps, int(t), t_prev)
        xs.append(x)
        x0s.append(x0)
        if not trace:
            continue
        for name, st in cache.transformers.items():
            _, h, w, _ = st.x_shape
            grids[name] = (h, w)
            block = st.blocks[0]
            cross = np.asarray(block.attn2.weights)[:B]  # (B, heads, h·w, M), conditional half
            cross = cross.reshape(B, -1, h, w, cross.shape[-1])  # (B, heads, h, w, M)
            records.setdefault((name, "cross"), []).append(cross)
            cells = _cells(queries, h, w)  # (Q, 2) row, col on the layer's grid
            rows = np.asarray(block.attn1.weights)[:B][:, :, cells[:, 0] * w + cells[:, 1], :]  # (B, heads, Q, h·w)
            rows = rows.reshape(B, rows.shape[1], -1, h, w)  # (B, heads, Q, h, w)
            records.setdefault((name, "self"), []).append(rows)
    layers = []
    for name in grids:
        h, w = grids[name]
        layers.append(
            LayerTrace(
                f"{name}.blocks.0.attn1",
                "self",
                (h, w),
                np.stack(records[(name, "self")], axis=1),  # (B, S, heads, Q, h, w)
                _cells(queries, h, w),
            )
        )
        cross = np.stack(records[(name, "cross")], axis=1)  # (B, S, heads, h, w, M)
        layers.append(LayerTrace(f"{name}.blocks.0.attn2", "cross", (h, w), cross))
    lengths = mask[:B].sum(axis=1)
    return SampleResult(
        prompts=prompts,
        tokens=[[VOCAB[i] for i in words[b, : lengths[b]]] for b in range(B)],
        words=words[:B],
        context_mask=mask[:B],
        images=from_model(x),
        timesteps=timesteps,
        x_t=np.stack(xs, axis=1),
        x0_pred=np.stack(x0s, axis=1),
        layers=layers,
        queries=queries,
        guidance=float(guidance),
        seed=seed,
    )
