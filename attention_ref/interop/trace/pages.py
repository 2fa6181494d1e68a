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
from .records import LayerRecord

__all__ = ["explorer_page", "record_explorer_layer"]


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


def explorer_page(
    chosen: Sequence[LayerRecord],
    batch: int,
    *,
    image: Any,
    tokens: Sequence[str] | None,
    steps: Sequence[str] | None,
    title: str,
    notes: str,
) -> Explorer:
    """The :class:`~attention_ref.viz.Explorer` of the records :meth:`.reading.TraceReading.explorer` chose, for
    sample ``batch``, with the tokens and step labels it read off the trace."""
    return Explorer(layers=tuple(r.explorer_layer(batch) for r in chosen), image=image,
                    tokens=None if tokens is None else tuple(tokens), steps=steps, title=title,
                    notes=notes)  # fmt: skip
