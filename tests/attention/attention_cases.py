"""One attention problem, as the attention tests (exact, tiled, linear) describe and draw it; and exact attention
run through each of its paths (the readable lines, the fast path, tiles)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attention_ref import attention_backward, attention_forward, chunked_attention_backward, chunked_attention_forward
from attention_ref.attention import exact


@dataclass(frozen=True)
class Case:
    """q (*lead, N, d), k (*lead, M, d), v (*lead, M, dv); optional mask and bias (their shapes), scale and tiles."""

    lead: tuple[int, ...]
    N: int
    M: int
    d: int
    dv: int
    mask: tuple[int, ...] | None = None  # the mask's shape; random, some keys always allowed
    bias: tuple[int, ...] | None = None  # the bias's shape
    scale: float | None = None
    fully_masked_row: bool = False  # (exact attention's cases) query 1 of every matrix may attend nowhere
    block_size: int | tuple[int, int] | None = None  # (the tiled path's cases) its tiles


#: (N, M, d, dv) with one of them 0: no queries, no keys, no features, no value features
EMPTY = [(0, 5, 3, 2), (4, 0, 3, 2), (4, 5, 0, 2), (4, 5, 3, 0)]
EMPTY_IDS = ["N=0", "M=0", "d=0", "dv=0"]


def draw_qkv(case: Case, rng: np.random.Generator, spread: float = 1.0) -> tuple[np.ndarray, ...]:
    """Standard normal ``q, k, v`` of the case's shapes, drawn in that order; ``q`` and ``k`` times ``spread``."""
    q = spread * rng.standard_normal((*case.lead, case.N, case.d))
    k = spread * rng.standard_normal((*case.lead, case.M, case.d))
    v = rng.standard_normal((*case.lead, case.M, case.dv))
    return q, k, v


#: the paths of exact attention: exact.py's readable lines, exact_fast.py, and the tiled path
TOKEN_PATHS = ["exact, readable", "exact, fast", "tiled"]


def run_path(path, monkeypatch, q, k, v, **kwargs):
    """``(out, cache, backward)`` of exact attention through ``path`` (tiles of 3 queries × 3 keys for "tiled")."""
    if path == "tiled":
        out, cache = chunked_attention_forward(q, k, v, block_size=3, **kwargs)
        return out, cache, chunked_attention_backward
    monkeypatch.setattr(exact, "FAST", path == "exact, fast")
    out, cache = attention_forward(q, k, v, **kwargs)
    return out, cache, attention_backward
