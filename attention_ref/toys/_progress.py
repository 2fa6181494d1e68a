"""A tqdm progress bar when someone is watching (a terminal or a Jupyter kernel), silence otherwise."""

from __future__ import annotations

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
