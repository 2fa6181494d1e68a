"""How a toy trains: a tqdm progress bar when someone is watching (a terminal or a Jupyter kernel),
silence otherwise; and on how many threads."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any


def interactive() -> bool:
    """True in a terminal (stderr is a TTY) or inside a Jupyter/IPython kernel."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool | None) -> Iterator[Any]:
    """``iterable`` wrapped in a text tqdm bar when ``enabled`` (``None``: when :func:`interactive`)."""
    if enabled is None:
        enabled = interactive()
    if not enabled:
        yield from iterable
        return
    from tqdm import tqdm  # text bar on stderr: reads the same in a terminal and in a saved notebook

    # a notebook keeps every redraw in its saved output: redraw seldom there
    every = 5.0 if "ipykernel" in sys.modules else 0.5
    yield from tqdm(iterable, total=total, desc=desc, mininterval=every, file=sys.stderr, leave=True)


def toy_threads(threads: int | None = None) -> int:
    """The threads a toy trains on: ``threads``; else ``ATTENTION_REF_NUM_THREADS`` when set; else 1.

    One by default: a toy's matrices are small (at most a few hundred tokens of a few dozen channels),
    so a second thread costs more in handing work over than it gives, and on a busy machine it waits
    for a core (measured: the long-range toy 1.1 s on one thread, 1.8 s on two; the grounding toy
    1.7 s and 3.7 s, 60 steps each, 2-core AMD EPYC shared with other jobs).
    """
    if threads is not None:
        return threads
    if os.environ.get("ATTENTION_REF_NUM_THREADS", "").strip():
        from ..backend import thread_count  # validates the variable

        return thread_count()
    return 1
