"""How a toy trains: step after step (:func:`train_steps`), under a tqdm progress bar when someone is watching (a
terminal, or a Jupyter kernel where the bar is one output redrawn in place), silence otherwise; and on how many
threads (:func:`toy_threads`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..backend import thread_count


def in_kernel() -> bool:
    """True inside a Jupyter/IPython kernel, where output goes to a notebook rather than a terminal."""
    if "ipykernel" not in sys.modules:
        return False
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


def interactive() -> bool:
    """True in a terminal (stderr is a TTY) or inside a Jupyter kernel."""
    if in_kernel():
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class NotebookLine:
    """A file for tqdm inside a Jupyter kernel: the bar is one output, redrawn in place.

    A text bar on stderr is saved in the notebook as one red stderr block per redraw; this one is a single
    ``text/plain`` display that each redraw replaces (IPython's ``display_id``), so the notebook shows the
    bar moving while the cell runs and keeps its last state (``100%|██████████| 600/600 [00:13<00:00, …]``)
    as plain output.
    """

    encoding = "utf-8"  # tqdm draws its Unicode blocks only for a file that says it takes them

    def __init__(self) -> None:
        self._handle: Any = None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip("\n")  # tqdm writes "\r" + the bar, and "\n" when it closes
        if not line.strip():
            return
        from IPython.display import display

        if self._handle is None:
            self._handle = display({"text/plain": line}, raw=True, display_id=True)
        else:
            self._handle.update({"text/plain": line}, raw=True)

    def flush(self) -> None:
        """Nothing to flush: every write is sent at once."""


def progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool | None) -> Iterator[Any]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (``None``: when :func:`interactive`).

    In a terminal the bar is text on stderr; in a Jupyter kernel it is one output redrawn in place
    (:class:`NotebookLine`), so a saved notebook keeps the finished bar as plain output.
    """
    if enabled is None:
        enabled = interactive()
    if not enabled:
        yield from iterable
        return
    from tqdm import tqdm

    out: Any = NotebookLine() if in_kernel() else sys.stderr
    yield from tqdm(iterable, total=total, desc=desc, mininterval=0.5, file=out, leave=True)


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
        return thread_count()  # validates the variable
    return 1


def train_steps(
    step: Callable[[int], float], steps: int, *, desc: str, progress_bar: bool | None
) -> tuple[list[float], float]:
    """Run ``step(i)`` for ``i`` in ``range(steps)`` under a progress bar (:func:`progress`, labelled ``desc``).

    Returns the losses ``step`` returned, one per step, and the seconds the steps took.
    """
    losses = []
    start = time.perf_counter()
    for i in progress(range(steps), total=steps, desc=desc, enabled=progress_bar):
        losses.append(step(i))
    return losses, time.perf_counter() - start
