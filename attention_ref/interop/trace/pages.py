"""The explorer pages of a trace: the trace's one use of :mod:`attention_ref.viz`.

Which imports which: interop and viz share the floor around the core (``STYLE.md``'s layer 5); viz imports nothing
of interop, and interop imports viz here only, at the top of this module. Importing it imports viz and with it
matplotlib, an optional extra (``attention_ref[viz]``): the two methods that make pages,
:meth:`.records.LayerRecord.explorer_layer` and :meth:`.reading.TraceReading.explorer`, import this module when
they are called, and nothing else of the trace needs viz.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...viz.explorer import Explorer, ExplorerLayer
from .reading import warn_edited
from .records import LayerRecord, token_kinds

__all__ = ["record_explorer_layer", "trace_explorer"]


def record_explorer_layer(record: LayerRecord, batch: int = 0, name: str | None = None) -> ExplorerLayer:
    """:meth:`.records.LayerRecord.explorer_layer`: one record as an :class:`~attention_ref.viz.ExplorerLayer`."""
    if record.kind == "temporal":
        raise ValueError(f"{record.label}: a temporal (frame) layer has no map of pixels; the explorer shows "
                         "spatial layers (choose layers=)")  # fmt: skip
    if record.calls == 0:
        raise ValueError(f"{record.label}: no call was recorded")
    if not -record.batch <= batch < record.batch:
        raise ValueError(f"{record.label}: batch {batch} is outside the {record.batch} samples")
    H, W = record.grid
    steps = []
    for m in record.step_maps():
        w = m[batch] if not record.head_mean else m[batch][None]  # (heads, H, W, M) or (heads, Q, H, W)
        if record.kind in ("cross", "joint"):
            steps.append(w.reshape(w.shape[0], H * W, record.keys))  # (heads, H·W, M)
        else:
            steps.append(w.reshape(w.shape[0], w.shape[1], H * W))  # (heads, Q, H·W)
    weights = np.clip(np.stack(steps), 0.0, 1.0)  # (S, heads, Q, K); averaging can round a hair past 1
    shown = "cross" if record.kind == "joint" else record.kind
    label = name or (record.label if record.kind != "joint" else f"{record.label} (joint: text part)")
    return ExplorerLayer(label, shown, record.grid, weights, query_pixels=record.query_pixels,
                         head_mean=record.head_mean)  # fmt: skip


def trace_explorer(
    trace: Any,
    batch: int = 0,
    *,
    layers: Any = None,
    image: Any = None,
    tokens: Sequence[str] | None = None,
    prompt: str | None = None,
    tokenizer: Any = None,
    title: str = "Traced attention",
    notes: str = "",
) -> Explorer:
    """:meth:`.reading.TraceReading.explorer`: the explorer page of a trace's layers for sample ``batch``."""
    chosen = trace.select(layers)
    if layers is None:
        # temporal layers have no map of pixels; an IP-Adapter's image part has other tokens than the text
        chosen = [r for r in chosen if r.kind != "temporal" and not (r.kind in token_kinds() and r.part)]
    if not chosen:
        raise ValueError("no layer was traced (or chosen)")
    warn_edited(chosen, stacklevel=4)  # the caller of tr.explorer()
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
    if trace.keep == "all":
        counts = {r.calls for r in chosen}
        if len(counts) != 1:
            raise ValueError(
                f"the chosen layers were called different numbers of times ({sorted(counts)}); choose layers="
            )
        steps = chosen[0].steps
        if len(steps) > 1:
            step_labels = [_step_label(i, trace.timesteps[i] if i < len(trace.timesteps) else None) for i in steps]
    return Explorer(layers=tuple(r.explorer_layer(batch) for r in chosen), image=image,
                    tokens=None if tokens is None else tuple(tokens), steps=step_labels, title=title,
                    notes=notes)  # fmt: skip


def _step_label(index: int, t: Any) -> str:
    if isinstance(t, float):
        return f"t={t:g}"
    return f"call {index}"
