"""``python -m attention_ref bench --breakdown``: where the tiled path's time goes, on one core.

The tiled path (:mod:`attention_ref.attention.chunked`) spends its time in seven matrix products per tile,
two exponentials per weight, one elementwise product (``dS = P ∘ (dP − D)``), a few small additions into its
accumulators, and Python. This module runs the same operations on the same tile shapes, one kind at a
time, each timed with the process's CPU clock (so that other processes on a shared machine do not count),
and sets them against one run of the path itself on one thread:

* each product's time and its rate as a share of the machine's peak GEMM rate (a square product of the same
  dtype, measured here too): the shortfall of these thin products — one side is only ``d + 1`` wide — is
  what the BLAS gives for these shapes;
* the exponentials (they are the ``exp`` rate the limit takes);
* the rest of the path's time — the forward's first tile of each row (a pass for the maximum, its
  subtraction), the accumulators, Python's own work per tile, the caches warming after each tile — as
  "other", the path's time minus the sum of the parts.

It is a model of the loop, not a trace of it: it repeats the loop's operations, so it tells where the time
can go and how far each part is from its own limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..attention.chunked import DEFAULT_BLOCK_SIZE, chunked_attention_backward, chunked_attention_forward
from ..backend import limited_threads
from .limits import GEMM_SIDE
from .measure import best_seconds


def breakdown(n: int = 4096, d: int = 64, dtype: str = "float64", block: int | None = None, repeats: int = 3) -> dict:
    """Time the tiled path's parts on one ``(n, d)`` problem, one thread; see the module docstring.

    Returns ``{"config", "peak_gflops", "exp_ns", "path_s", "parts": {name: {"s", "limit_s"}}, "other_s"}``.
    """
    block = block or DEFAULT_BLOCK_SIZE
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((n, d)).astype(dtype) for _ in range(4))
    tiles = (n // block) ** 2
    with limited_threads(1):
        a = rng.standard_normal((GEMM_SIDE, GEMM_SIDE)).astype(dtype)  # the peak GEMM rate, as bench/limits.py
        peak = 2.0 * GEMM_SIDE**3 / best_seconds(lambda: a @ a, repeats, clock=time.process_time)

        def path() -> None:
            _, cache = chunked_attention_forward(q, k, v, block_size=block)
            chunked_attention_backward(dout, cache)

        path_s = best_seconds(path, repeats, clock=time.process_time)

        # one tile's operands, as the path builds them: [scale·Q_i | -m], [K_j | 1], [V_j | 1], [dO_i | -D_i]
        ones = np.ones((block, 1))
        q_shift = np.concatenate([q[:block] / np.sqrt(d), -3.0 * ones], axis=1).astype(dtype)
        k_ones = np.concatenate([k[:block], ones], axis=1).astype(dtype)
        v_ones = np.concatenate([v[:block], ones], axis=1).astype(dtype)
        dout_shift = np.concatenate([dout[:block], 0.1 * ones], axis=1).astype(dtype)
        weights = np.exp(q_shift @ k_ones.T)
        scratch = np.empty_like(weights)
        shifted = (-10.0 * rng.random(weights.shape)).astype(dtype)
        assert weights.dtype == shifted.dtype == np.dtype(dtype)
        wide, narrow = 2.0 * block * block * (d + 1), 2.0 * block * block * d  # flops of one product
        # name: (one call, calls per tile, flops per call (None: not a product))
        per_tile = {
            "product S - m = [scale·Q | -m][K | 1]ᵀ (fwd and bwd)": (lambda: q_shift @ k_ones.T, 2, wide),
            "product P̃ [V | 1] (fwd)": (lambda: weights @ v_ones, 1, wide),
            "product dO_iᵀ P (dVᵀ)": (lambda: dout[:block].T @ weights, 1, narrow),
            "product dP - D = [dO | -D][V | 1]ᵀ": (lambda: dout_shift @ v_ones.T, 1, wide),
            "product dS K_j (dQ)": (lambda: weights @ k[:block], 1, narrow),
            "product Q_iᵀ dS (dKᵀ)": (lambda: q[:block].T @ weights, 1, narrow),
            "exp (fwd and bwd)": (lambda: np.exp(shifted, out=scratch), 2, None),
            "dS = P ∘ (dP - D)": (lambda: np.multiply(weights, weights, out=scratch), 1, None),
        }
        parts: dict[str, dict[str, float]] = {}
        for name, (run, per, flops) in per_tile.items():
            seconds = tiles * per * best_seconds(run, max(repeats, 5), clock=time.process_time)
            parts[name] = {"s": seconds}
            if flops is not None:
                parts[name]["limit_s"] = tiles * per * flops / peak
        exp_s = parts["exp (fwd and bwd)"]["s"] / (2 * tiles * block * block)  # per exponential
    other = path_s - sum(p["s"] for p in parts.values())
    return {
        "config": {"n": n, "d": d, "dtype": dtype, "block": block, "tiles": tiles},
        "peak_gflops": peak / 1e9,
        "exp_ns": exp_s * 1e9,
        "path_s": path_s,
        "limit_s": 14.0 * n * n * d / peak + 2.0 * n * n * exp_s,
        "parts": parts,
        "other_s": other,
    }


def print_breakdown(result: dict, log: Callable[[str], None] = print) -> None:
    c = result["config"]
    log(
        f"# the tiled path's parts, one thread, N = {c['n']}, d = {c['d']}, {c['dtype']}, tiles of {c['block']}² "
        f"({c['tiles']} tiles); peak GEMM {result['peak_gflops']:.1f} GFLOP/s, exp {result['exp_ns']:.2f} ns"
    )
    path, limit = result["path_s"], result["limit_s"]
    log(f"{'part':<52} {'ms':>9} {'share':>6} {'×own limit':>11}")
    for name, p in result["parts"].items():
        own = f"{p['s'] / p['limit_s']:11.2f}" if "limit_s" in p else f"{'–':>11}"
        log(f"{name:<52} {p['s'] * 1e3:9.1f} {p['s'] / path:6.0%} {own}")
    log(
        f"{'other (first tiles, accumulators, Python, caches)':<52} {result['other_s'] * 1e3:9.1f} "
        f"{result['other_s'] / path:6.0%} {'–':>11}"
    )
    log(f"{'the path, forward + backward':<52} {path * 1e3:9.1f} {1:6.0%} {path / limit:11.2f}")
