"""Reading a trace: the records by name, glob or kind, token and word maps, the explorer page, a summary.

:class:`TraceReading` is the half of :class:`attention_ref.interop.trace.Trace` that looks at what was
recorded; the hooks that record it are in :mod:`.hooks`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..aggregate import find_word_tokens, normalize_maps, prompt_token_ids, resize_maps
from .records import KINDS, LayerRecord, token_kinds

__all__ = ["TraceReading", "TraceWarning"]


class TraceWarning(UserWarning):
    """A trace that recorded nothing, or maps that are not what an edited layer computed."""


class TraceReading:
    """The records of a trace and what can be read from them (mixed into :class:`Trace`)."""

    layers: list[LayerRecord]
    timesteps: list[Any]
    keep: str
    root: Any
    skipped: dict[str, str]
    _records: dict[str, LayerRecord]

    # ----- looking at what was recorded ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's recorded maps."""
        return sum(r.nbytes for r in self.layers)

    def layer(self, name: str) -> LayerRecord:
        """The record at ``name``: the module's path, or ``path[part]`` for a part (``"…attn2[ip0]"``)."""
        if name not in self._records:
            raise KeyError(f"no traced layer {name!r}; the traced layers are {list(self._records)}")
        return self._records[name]

    @property
    def grids(self) -> list[tuple[int, int]]:
        """The distinct grids of the traced layers, largest first."""
        return sorted({r.grid for r in self.layers}, key=lambda g: (-g[0] * g[1], g))

    def select(
        self, layers: Any = None, *, kind: str | None = None, grid: tuple[int, int] | None = None
    ) -> list[LayerRecord]:
        """The records chosen by ``layers``, ``kind`` and ``grid``, in the order of the trace.

        ``layers``: ``None`` (all), a predicate on a :class:`LayerRecord`, or a name or list of: a record, a
        record's label (``tr.layer``'s key), a kind (:data:`~attention_ref.interop.trace.records.KINDS`), or a
        glob on the labels (``"up_blocks.*.attn2"``). A string that matches nothing is a ``KeyError``.
        """
        if layers is None:
            chosen = list(self.layers)
        elif callable(layers) and not isinstance(layers, LayerRecord):
            chosen = [r for r in self.layers if layers(r)]
        else:
            if isinstance(layers, (str, LayerRecord)):
                layers = [layers]
            picked: dict[int, LayerRecord] = {}
            for item in layers:
                if isinstance(item, LayerRecord):
                    found = [item]
                elif item in self._records:
                    found = [self._records[item]]
                elif item in KINDS:
                    found = [r for r in self.layers if r.kind == item]
                else:
                    found = [r for r in self.layers if fnmatch.fnmatchcase(r.label, item)]
                    if not found:
                        raise KeyError(f"no traced layer {item!r}; the traced layers are {list(self._records)}")
                picked.update((id(r), r) for r in found)
            order = {id(r): i for i, r in enumerate(self.layers)}
            chosen = sorted(picked.values(), key=lambda r: order.get(id(r), len(order)))
        if kind is not None:
            chosen = [r for r in chosen if r.kind == kind]
        if grid is not None:
            chosen = [r for r in chosen if r.grid == tuple(grid)]
        return chosen

    def _steps(self, timesteps: Any) -> list[int] | None:
        if timesteps is None:
            return None
        if self.keep != "all":
            raise ValueError("picking timesteps needs the trace made with keep='all' (keep='sum' keeps only the sum)")
        n = len(self.timesteps)
        picked = [int(t) + n if int(t) < 0 else int(t) for t in np.atleast_1d(np.asarray(timesteps))]
        bad = [t for t in picked if not 0 <= t < n]
        if bad:
            raise ValueError(f"timesteps {bad} are outside the {n} traced model calls (0 … {n - 1})")
        return picked

    def token_maps(
        self,
        size: int | tuple[int, int] | None = None,
        *,
        layers: Any = None,
        grid: tuple[int, int] | None = None,
        timesteps: Any = None,
        normalize: str = "mean",
        interpolation: str = "bilinear",
        word_tokens: Sequence[int] | None = None,
    ) -> np.ndarray:
        """``(B, M, h, w)``: every token's cross-attention map, over layers and calls, at one size.

        Each chosen cross-attention or joint layer's maps (a joint layer's: the image tokens' weights on the
        text tokens, from its one softmax over image and text keys), averaged over its heads and summed over
        its calls, are resized to ``size`` (:func:`attention_ref.interop.aggregate.resize_maps`), summed over the
        layers, and normalised (:mod:`attention_ref.interop.aggregate` describes each choice).

        Inputs:
            size: ``(h, w)`` or ``s`` for ``(s, s)``; default the largest grid among the chosen layers
                (give the image's size to lay the maps over the image).
            layers: as in :meth:`select`; default every cross and joint layer's main map (the text tokens;
                an IP-Adapter's image part, ``"…[ip0]"``, only when chosen).
            grid: keep only the layers at this ``(H, W)`` (one resolution).
            timesteps: indices of the traced model's calls (denoising steps, 0 = first; negative from
                the end) to include; needs ``keep="all"``. Default all.
            normalize: ``"mean"`` (default: the average weight; tokens sum to 1 at every pixel),
                ``"sum"``, ``"minmax"`` (each map to [0, 1]), ``"daam"`` (each pixel renormalised over
                ``word_tokens``, DAAM's ``normalize=True``).
            interpolation: ``"bilinear"`` (default), ``"nearest"``, ``"bicubic"`` (clamped at 0, DAAM's),
                ``"area"``.
            word_tokens: token indices for ``"daam"`` (:meth:`word_maps` finds them from the prompt).

        Returns:
            float64 ``(B, M, h, w)``.
        """
        chosen = [r for r in self.select(layers, grid=grid) if r.kind in token_kinds()]
        if layers is None:
            chosen = [r for r in chosen if r.part is None]
        if not chosen:
            raise ValueError(
                "no cross-attention or joint layer was traced (or chosen); is the model conditioned on a context?"
            )
        warn_edited(chosen)
        shapes = {(r.batch, r.keys) for r in chosen}
        if len(shapes) != 1:
            raise ValueError(f"the chosen layers differ in batch size or number of tokens: {sorted(shapes)}")
        B, M = shapes.pop()
        if size is None:
            size = max((r.grid for r in chosen), key=lambda g: g[0] * g[1])
        elif isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        h, w = (int(v) for v in size)
        steps = self._steps(timesteps)
        total = np.zeros((B, M, h, w), np.float64)
        count = 0
        for r in chosen:
            summed, n = r.summed(steps)  # (B, H, W, M) over n calls
            if n == 0:
                continue
            total += resize_maps(np.moveaxis(summed, -1, 1).astype(np.float64), (h, w), interpolation)
            count += n
        if count == 0:
            raise ValueError(f"no call of the chosen layers happened at timesteps {steps}")
        return normalize_maps(total, count, normalize, word_tokens)

    def word_maps(
        self,
        prompt: str,
        words: str | Sequence[str],
        tokenizer: Any,
        *,
        merge: str = "sum",
        normalize: str = "mean",
        **token_maps_options: Any,
    ) -> np.ndarray:
        """``(B, len(words), h, w)``: each word's map, its sub-word tokens merged.

        Inputs:
            prompt: the prompt the context was encoded from (token 0 of the context is the tokenizer's
                first token of ``prompt``).
            words: a word or a list of words; each is tokenized alone (without start/end tokens) and
                every occurrence of its token sequence in the prompt's tokens is merged.
            tokenizer: a Hugging Face tokenizer (``pipe.tokenizer``), or anything with its call
                ``tokenizer(text, add_special_tokens=...)["input_ids"]`` and ``all_special_ids``.
            merge: ``"sum"`` (default: the weight a pixel gives the word) or ``"mean"`` (DAAM's) of the
                word's token maps.
            normalize: as in :meth:`token_maps`; ``"daam"`` renormalises over the prompt's tokens that
                are not special; ``"minmax"`` is applied to the merged word maps.
            token_maps_options: ``size``, ``layers``, ``grid``, ``timesteps``, ``interpolation`` of
                :meth:`token_maps`.

        Raises:
            ValueError naming the word's tokens and the prompt's when a word is not in the prompt, or
            when the prompt has more tokens than the traced context.
        """
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        words = [words] if isinstance(words, str) else list(words)
        ids = prompt_token_ids(tokenizer, prompt, special=True)
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        word_tokens = [i for i, t in enumerate(ids) if t not in special]
        positions = []
        for word in words:
            word_ids = prompt_token_ids(tokenizer, word, special=False)
            found = find_word_tokens(ids, word_ids)
            if not found:
                raise ValueError(
                    f"{word!r} (token ids {word_ids}) is not in the prompt's tokens {ids}"
                    + (
                        f" = {tokenizer.convert_ids_to_tokens(ids)}"
                        if hasattr(tokenizer, "convert_ids_to_tokens")
                        else ""
                    )
                )
            positions.append(found)
        maps = self.token_maps(normalize="mean" if normalize == "minmax" else normalize,
                               word_tokens=word_tokens, **token_maps_options)  # fmt: skip
        if len(ids) > maps.shape[1]:
            raise ValueError(f"the prompt has {len(ids)} tokens, the traced context {maps.shape[1]}")
        merged = np.stack([maps[:, p].sum(axis=1) if merge == "sum" else maps[:, p].mean(axis=1) for p in positions],
                          axis=1)  # fmt: skip
        return normalize_maps(merged, 1, "minmax") if normalize == "minmax" else merged

    def explorer(
        self,
        batch: int = 0,
        *,
        layers: Any = None,
        image: Any = None,
        tokens: Sequence[str] | None = None,
        prompt: str | None = None,
        tokenizer: Any = None,
        title: str = "Traced attention",
        notes: str = "",
    ) -> Any:
        """The explorer page (:class:`attention_ref.viz.Explorer`) of the traced layers, for sample ``batch``.

        ``tokens``: the context's ``M`` token strings; or give ``prompt`` and ``tokenizer`` (the prompt padded
        to ``M`` tokens as a pipeline does); default ``#0, #1, …``. With ``keep="all"`` the page has one step
        per call, labelled with ``tr.timesteps``. ``image``: any ``(h, w)`` or ``(h, w, 3)`` image in [0, 1]
        or uint8 (e.g. the generated image). Imports :mod:`attention_ref.viz` (matplotlib): :mod:`.pages`.
        """
        from .pages import explorer_page  # viz, hence matplotlib (an optional extra): imported when a page is made

        chosen = self.select(layers)
        if layers is None:
            # temporal layers have no map of pixels; an IP-Adapter's image part has other tokens than the text
            chosen = [r for r in chosen if r.kind != "temporal" and not (r.kind in token_kinds() and r.part)]
        if not chosen:
            raise ValueError("no layer was traced (or chosen)")
        warn_edited(chosen)
        cross = [r for r in chosen if r.kind in token_kinds()]
        if tokens is None and prompt is not None and cross:
            if tokenizer is None:
                raise ValueError("prompt= needs tokenizer=")
            M = cross[0].keys
            ids = tokenizer(prompt, padding="max_length", max_length=M, truncation=True)["input_ids"]
            tokens = tokenizer.convert_ids_to_tokens(list(ids))
        if tokens is None and cross:
            tokens = [f"#{t}" for t in range(cross[0].keys)]
        step_labels = None
        if self.keep == "all":
            counts = {r.calls for r in chosen}
            if len(counts) != 1:
                raise ValueError(
                    f"the chosen layers were called different numbers of times ({sorted(counts)}); choose layers="
                )
            steps = chosen[0].steps
            if len(steps) > 1:
                step_labels = [_step_label(i, self.timesteps[i] if i < len(self.timesteps) else None) for i in steps]
        return explorer_page(chosen, batch, image=image, tokens=tokens, steps=step_labels, title=title, notes=notes)

    def summary(self) -> str:
        """One line per traced layer (name, kind, grid, heads, calls), then the modules not traced and why."""
        lines = [f"{len(self.layers)} layers, {len(self.timesteps)} model calls, {self.nbytes / 2**20:.2f} MiB kept"]
        width = max((len(r.label) for r in self.layers), default=4)
        for r in self.layers:
            H, W = r.grid
            if r.kind == "self":
                extra = f", {r.queries} query rows"
            elif r.kind == "temporal":
                extra = f", {r.queries} query pixels × {r.frames} frames, {r.keys} keys"
            else:
                extra = f", {r.keys} tokens"
            note = f"  — {r.note}" if r.note else ""
            lines.append(f"  {r.label:<{width}}  {r.kind:<8} {H}×{W}, {r.heads} heads{extra}, {r.calls} calls{note}")
        if self.skipped:
            lines.append(f"not traced ({len(self.skipped)} modules):")
            lines += [f"  {name or type(self.root).__name__}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Trace of {type(self.root).__name__}: {len(self.layers)} layers, {len(self.timesteps)} calls>"


def _step_label(index: int, t: Any) -> str:
    """A page's label of one traced call: its timestep, else its index."""
    if isinstance(t, float):
        return f"t={t:g}"
    return f"call {index}"


def warn_edited(chosen: Sequence[LayerRecord], stacklevel: int = 3) -> None:
    """A :class:`TraceWarning` naming the chosen records that ``verify=True`` marked edited; ``stacklevel``: as
    :func:`warnings.warn`'s, counted from here (3: the caller of the method that calls this)."""
    edited = [r.label for r in chosen if r.edited]
    if edited:
        warnings.warn(
            f"{len(edited)} chosen layers were marked edited by verify=True (their processor does not compute the "
            f"standard weights these maps hold): {edited}",
            TraceWarning,
            stacklevel=stacklevel,
        )
