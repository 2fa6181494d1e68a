"""The layouts a 4-D-only kernel asks for: every case's arrays as ``(B, H, N, d)`` or ``(B, N, H, d)`` and back."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .compare import numpy_of

__all__ = ["LAYOUTS", "from_layout", "to_layout"]

LAYOUTS = ("bhnd", "bnhd")


def _lead4(lead: tuple[int, ...]) -> tuple[int, int]:
    """The case's leading dims as ``(B, H)``: none → (1, 1), (B,) → (B, 1), (B, H), more folded into B."""
    if len(lead) <= 2:
        return (*lead, 1, 1)[:2] if lead else (1, 1)
    return math.prod(lead[:-1]), lead[-1]


def to_layout(a: Any, lead: tuple[int, ...], layout: str | None, logits: bool = False) -> Any:
    """A case's array in ``layout``: ``(B, H, rows, cols)`` ("bhnd") or ``(B, rows, H, cols)`` ("bnhd"); a mask or
    bias (``logits``) keeps the logits' ``(B, H, N, M)`` order in both, size-1 axes kept for broadcasting."""
    if layout is None or a is None:
        return a
    if logits:
        a = a.reshape((1,) * (len(lead) + 2 - a.ndim) + a.shape)  # one axis per leading dim of the case
        if len(lead) > 2:  # fold the leading dims like the arrays': every axis at its full size
            a = np.broadcast_to(a, (*lead, *a.shape[-2:])).reshape(*_lead4(lead), *a.shape[-2:])
        elif len(lead) < 2:  # (B|1,) → (B|1, 1); none → (1, 1)
            a = a.reshape(*a.shape[: len(lead)], *(1,) * (2 - len(lead)), *a.shape[-2:])
        return np.ascontiguousarray(a)  # (B|1, H|1, N|1, M|1)
    a4 = a.reshape(*_lead4(lead), *a.shape[-2:])  # (B, H, rows, cols)
    return np.ascontiguousarray(a4 if layout == "bhnd" else np.swapaxes(a4, 1, 2))


def from_layout(got: Any, lead: tuple[int, ...], rows: int, cols: int, layout: str | None) -> Any:
    """An output returned in ``layout`` back in the case's own shape ``(*lead, rows, cols)``; anything of another
    shape is left as it is (the comparison then reports the shape)."""
    if layout is None or isinstance(got, BaseException):
        return got
    B, H = _lead4(lead)
    want = (B, H, rows, cols) if layout == "bhnd" else (B, rows, H, cols)
    if tuple(getattr(got, "shape", ())) != want:
        return got
    arr = got if isinstance(got, np.ndarray) else numpy_of(got)
    if layout == "bnhd":
        arr = np.swapaxes(arr, 1, 2)
    return arr.reshape(*lead, rows, cols)
