"""What the trace keeps of one layer: :class:`LayerRecord`, the query pixels, and the ``layers=`` filter.

A record holds one map kind of one module (``kind``):

* ``"cross"``: ``(B, heads, H, W, M)`` — pixel ``(row, col)``'s weights over the ``M`` context tokens;
* ``"joint"``: the same shape — an image token's weights on the ``M`` text tokens, taken from the one softmax
  of a joint (MMDiT) layer over the image and text keys together: a row sums to the share of its attention
  that reads the text, not to 1;
* ``"self"``: ``(B, heads, Q, H, W)`` — query pixel ``q``'s weights over the key pixels, laid out as a map
  (from a joint layer's softmax, or a video transformer's over every frame: a row sums to the share read
  from these keys);
* ``"temporal"``: ``(B, heads, Q, F, K)`` — at query pixel ``q``, each of the ``F`` frames' weights over the
  ``K`` keys of a frame attention (``K = F`` frames, or the context tokens of a temporal cross-attention).

With the head mean (``heads="mean"``) the head axis is dropped. A module may give several records: a joint
layer's text part and its self rows, an IP-Adapter layer's text part and each image part. The record of a
part has ``part`` set and the label ``name[part]`` (e.g. ``"…attn2[ip0]"``, ``"…attn[self]"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...backend import Array, to_numpy

__all__ = ["KINDS", "LayerFilter", "LayerRecord", "check_positions", "query_pixels"]

KINDS = ("self", "cross", "joint", "temporal")


def query_pixels(positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(Q, 2)`` int ``(row, col)`` of fractional positions ``(y, x)`` on an ``H×W`` grid.

    ``row = min(⌊y·H⌋, H − 1)``, ``col = min(⌊x·W⌋, W − 1)``: the pixel whose square holds the position
    (the rule of :func:`attention_ref.viz.pixels_of_positions`).
    """
    H, W = grid
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"positions must be (Q, 2) fractional (y, x) in [0, 1]; got {p.tolist()}")
    rows = np.minimum(np.floor(p[:, 0] * H), H - 1)
    cols = np.minimum(np.floor(p[:, 1] * W), W - 1)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def check_positions(self_queries: Any) -> np.ndarray | str | None:
    """``None`` (no self-attention), ``"all"``, or ``(Q, 2)`` float64 positions in [0, 1]."""
    if isinstance(self_queries, str):
        if self_queries != "all":
            raise ValueError(f"self_queries must be fractional (y, x) positions or 'all', got {self_queries!r}")
        return "all"
    p = np.asarray(self_queries, dtype=np.float64)
    if p.size == 0:
        return None
    if p.ndim == 1 and p.shape == (2,):
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"self_queries must be (Q, 2) fractional (y, x) positions; got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"self_queries must lie in [0, 1]; got values from {p.min()} to {p.max()}")
    return p


class LayerFilter:
    """``layers=``: which modules a trace or ``check_model`` takes, by name, glob or kind.

    ``spec`` is ``None`` (every layer), a string or a list of strings, or a predicate. A string that is a
    kind (:data:`KINDS`) takes the layers of that kind; any other string is a glob (``fnmatch``: ``*``, ``?``,
    ``[…]``) on the module's path, which an exact path matches too (``"up_blocks.*.attn2"``,
    ``"transformer_blocks.3.attn"``). A predicate gets ``(name, kind)`` and returns a bool.
    """

    def __init__(self, spec: Any = None) -> None:
        self.spec = spec
        self.kinds: set[str] = set()
        self.globs: list[str] = []
        self.predicate: Callable[[str, str], bool] | None = None
        if spec is None:
            return
        if callable(spec):
            self.predicate = spec
            return
        items = [spec] if isinstance(spec, str) else list(spec)
        if not items or not all(isinstance(s, str) and s for s in items):
            raise TypeError(f"layers must be a name, a glob, a kind {list(KINDS)}, a list of them or a predicate; "
                            f"got {spec!r}")  # fmt: skip
        for s in items:
            (self.kinds.add if s in KINDS else self.globs.append)(s)

    @property
    def everything(self) -> bool:
        return self.spec is None

    def name_matches(self, name: str) -> bool:
        """The name matches one of the globs (kinds aside)."""
        return any(fnmatch.fnmatchcase(name, g) for g in self.globs)

    def __call__(self, name: str, kind: str) -> bool:
        """Whether the layer at path ``name``, of ``kind``, is taken."""
        if self.spec is None:
            return True
        if self.predicate is not None:
            return bool(self.predicate(name, kind))
        return kind in self.kinds or self.name_matches(name)

    def unmatched_globs(self, names: Iterable[str]) -> list[str]:
        """The globs that match none of ``names``."""
        names = list(names)
        return [g for g in self.globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]

    def __repr__(self) -> str:
        return f"layers={self.spec!r}"


@dataclass(eq=False)
class LayerRecord:
    """What the trace kept of one map kind of one attention module (see the module docstring for the shapes).

    Attributes:
        name: the module's path in the traced model, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
        kind: one of :data:`KINDS`.
        grid: ``(H, W)`` of its query map (a transformer's patch grid).
        heads: the module's number of heads.
        keys: ``M`` (context or text tokens) for cross and joint maps, ``H·W`` for self rows, ``K`` for
            temporal rows.
        batch: ``B`` of its calls (``B·F`` for the spatial layers of a video U-Net, whose frames are in the batch).
        head_mean: the maps are the mean over the heads (``heads="mean"``).
        keep: ``"sum"`` or ``"all"``.
        query_pixels: ``(Q, 2)`` int ``(row, col)`` of the self or temporal rows; ``None`` for cross and joint
            maps and for every row (``self_queries="all"``).
        part: ``None`` for the module's main map; ``"self"`` for a joint layer's self rows, ``"ip0"``, ``"ip1"``,
            … for an IP-Adapter layer's image parts, ``"image"`` for Wan's image context.
        frames: ``F`` of a temporal record (its query frames); ``None`` otherwise.
        calls: how many calls were recorded.
        steps: for each call, the index of the traced model's call it happened in (a denoising step).
        note: what the trace has to say about the layer (a part it did not trace, the verdict of ``verify``).
        verified: with ``verify=True``, the worst ratio of its calls (error of the recomputed output over
            the allowed error; ≤ 1 passes); ``None`` without.
        edited: with ``verify=True``, True when a call's output is not the standard formula's: the processor
            edits the weights (prompt-to-prompt, PAG, …) and these maps are not what it computed.
    """

    name: str
    kind: str
    grid: tuple[int, int]
    heads: int
    keys: int
    batch: int
    head_mean: bool
    keep: str
    query_pixels: np.ndarray | None = None
    part: str | None = None
    frames: int | None = None
    calls: int = 0
    steps: list[int] = field(default_factory=list)
    note: str = ""
    verified: float | None = None
    edited: bool = False
    _total: Array | None = field(default=None, repr=False)  # keep="sum": the running sum (the model's backend)
    _each: list[Array] = field(default_factory=list, repr=False)  # keep="all": each call's maps

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {list(KINDS)}, got {self.kind!r}")

    @property
    def label(self) -> str:
        """``name``, or ``name[part]`` for a part: the key of :meth:`Trace.layer`."""
        return self.name if self.part is None else f"{self.name}[{self.part}]"

    @property
    def queries(self) -> int:
        """``Q``: the number of query rows of a self or temporal record (``H·W`` for every row)."""
        return self.grid[0] * self.grid[1] if self.query_pixels is None else len(self.query_pixels)

    @property
    def map_shape(self) -> tuple[int, ...]:
        """The shape of one call's maps (see :attr:`maps`)."""
        H, W = self.grid
        head = () if self.head_mean else (self.heads,)
        if self.kind in ("cross", "joint"):
            return (self.batch, *head, H, W, self.keys)
        if self.kind == "temporal":
            return (self.batch, *head, self.queries, self.frames, self.keys)
        return (self.batch, *head, self.queries, H, W)

    @property
    def maps(self) -> np.ndarray:
        """The recorded maps (read-only).

        ``keep="sum"``: their sum over the calls, one call's shape; ``keep="all"``: ``(calls, ...)``.
        One call's shape: cross and joint ``(B, heads, H, W, M)`` (``(B, H, W, M)`` with the head mean);
        self ``(B, heads, Q, H, W)`` (``(B, Q, H, W)``): query row ``q``'s weights over the key pixels, laid
        out as a map; temporal ``(B, heads, Q, F, K)`` (``(B, Q, F, K)``).
        """
        if self.keep == "sum":
            out = to_numpy(self._total).copy() if self._total is not None else np.zeros(self.map_shape, np.float32)
        else:
            out = np.stack([to_numpy(a) for a in self._each]) if self._each else np.zeros((0, *self.map_shape))
        out.flags.writeable = False
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded maps."""
        held = [self._total] if self._total is not None else self._each
        return int(sum(a.nbytes for a in held))

    def _add(self, maps: Array, step: int) -> None:
        if tuple(maps.shape) != self.map_shape:
            raise ValueError(
                f"{self.label}: a call gave maps of shape {tuple(maps.shape)}, earlier calls {self.map_shape} "
                "(another batch size, resolution or prompt length: use one trace per run)"
            )
        if self.keep == "sum":
            if self._total is None:
                self._total = maps
            else:
                self._total = self._total + maps
        else:
            self._each.append(maps)
        self.calls += 1
        self.steps.append(step)

    def _mark(self, ratio: float, edited: bool, note: str) -> None:
        """Keep ``verify``'s verdict on one call: the worst ratio, edited once any call was."""
        self.verified = ratio if self.verified is None or not ratio <= self.verified else self.verified
        if edited and not self.edited:
            self.edited = True
            self.note = f"{self.note}; {note}" if self.note else note

    def summed(self, steps: Iterable[int] | None = None) -> tuple[np.ndarray, int]:
        """``(sum of the head-mean maps over the calls, number of calls)``; ``steps`` picks calls (``keep="all"``).

        The sum has shape ``(B, H, W, M)`` for cross and joint maps, ``(B, Q, H, W)`` for self rows,
        ``(B, Q, F, K)`` for temporal rows.
        """
        if steps is None:
            if self.calls == 0:
                return np.zeros(self._mean_shape(), np.float32), 0
            total = to_numpy(self._total) if self.keep == "sum" else np.sum([to_numpy(a) for a in self._each], axis=0)
            count = self.calls
        else:
            if self.keep != "all":
                raise ValueError(f"{self.label}: picking steps needs the trace made with keep='all'")
            wanted = set(steps)
            chosen = [to_numpy(a) for a, s in zip(self._each, self.steps, strict=True) if s in wanted]
            if not chosen:
                return np.zeros(self._mean_shape(), np.float32), 0
            total, count = np.sum(chosen, axis=0), len(chosen)
        return (total if self.head_mean else total.mean(axis=1)), count

    def _mean_shape(self) -> tuple[int, ...]:
        shape = self.map_shape
        return shape if self.head_mean else (shape[0], *shape[2:])

    def step_maps(self) -> list[np.ndarray]:
        """The maps as the explorer steps through them, NumPy: one averaged over the calls (``keep="sum"``) or one
        per call (``keep="all"``), each of the record's shape."""
        if self.keep == "sum":
            return [to_numpy(self._total) / self.calls]
        return [to_numpy(a) for a in self._each]

    def explorer_layer(self, batch: int = 0, *, name: str | None = None) -> Any:
        """This layer as an :class:`attention_ref.viz.ExplorerLayer` for sample ``batch``.

        ``keep="sum"``: one step, the maps averaged over the calls; ``keep="all"``: one step per call.
        A joint record is shown as a cross layer (its keys are the text tokens; its rows sum to the share
        read from the text). Temporal records have no explorer view (``ValueError``).
        (Imports :mod:`attention_ref.viz`, hence matplotlib: :mod:`.pages`.)
        """
        from .pages import record_explorer_layer  # viz, hence matplotlib (an optional extra): imported when asked

        return record_explorer_layer(self, batch, name)


def token_kinds() -> Sequence[str]:
    """The kinds whose keys are tokens of the context (the text): what ``token_maps`` sums."""
    return ("cross", "joint")
