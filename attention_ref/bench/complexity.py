"""Time and memory of the attention variants against map size: the sweep of ``python -m attention_ref complexity``.

For square maps of side ``S`` (``N = S²`` pixels, one image, one head, ``d = dv = dim`` channels, float64
NumPy) it runs forward and backward of exact attention and of each variant the attention layer can run
instead (:data:`attention_ref.blocks.attend.ATTENTION_VARIANTS`, called as the layer calls them):

* ``exact``        — :func:`attention_ref.attention_forward` (only up to ``exact_max_tokens`` pixels:
  its ``N × N`` weights, and the few temporaries of their size, are what the others avoid);
* ``chunked``      — :func:`attention_ref.chunked_attention_forward` (tiled exact, ``block_size``);
* ``linear``       — :func:`attention_ref.attention.linear_attention_forward`, ``kind="elu"``;
* ``window``       — :func:`attention_ref.attention.window_attention_forward` on the ``S × S`` map, ``window``,
  ``shift``;
* ``neighborhood`` — :func:`attention_ref.attention.neighborhood_attention_forward` on the map, ``kernel``;

and records, for each pass, the best CPU time and the best wall time of its runs, the peak memory of
one forward + backward, and the theoretical FLOPs and memory next to them. The runs are made in
``repeats`` rounds: each round runs every (variant, size) once, and again while that round's runs
of it took less than ``min_time`` ÷ rounds seconds (at most 50 runs in all).

**Robust to a busy machine.** Everything runs on one thread (:func:`.measure.one_thread`: BLAS limited
to one thread with ``threadpoolctl`` where it is installed, ``ATTENTION_REF_NUM_THREADS=1`` for the
library's own threads), and the plotted time is the *CPU time* of this process (``time.process_time``),
the best of its runs.
Other processes that take the core away stretch the wall time but not the CPU time; what they still
change — a busy hyperthread sibling, shared caches and memory bandwidth — slows some runs and not
others, and spreading each cell's runs over the rounds makes it likely that one of them was quiet.
A row whose process got less than 80 % of a core while it was timed (CPU time ÷ wall time, summed
over its runs) is flagged ``"disturbed": true``; the plot draws it hollow and leaves it out of the
fitted slopes when two other sizes remain.

JSON schema (``"schema": "attention_ref.complexity/2"``)::

    {
      "schema": "attention_ref.complexity/2",
      "config": {"sizes": [16, 32, 64, 128], "dim": 64, "dtype": "float64", "batch": 1, "heads": 1,
                 "repeats": 3, "min_time": 0.5, "threads": 1, "blas_limited": true,
                 "window": 8, "shift": 4, "kernel": 7, "block_size": 512,
                 "exact_max_tokens": 4096, "quick": false},
      "machine": {"cpu": str, "platform": str, "python": str, "numpy": str, "cpu_count": int,
                  "load_before": float | null, "load_after": float | null},   # 1-minute load averages
      "results": [
        {"variant": "exact" | "chunked" | "linear" | "window" | "neighborhood",
         "side": S, "tokens": N,                 # the map is S × S, N = S² pixels
         "forward_s": float | null,              # best wall time of the forward pass, seconds
         "backward_s": float | null,             # best wall time of the backward pass alone, seconds
         "forward_cpu_s": float | null,          # best CPU time of the forward pass, seconds
         "backward_cpu_s": float | null,         # best CPU time of the backward pass alone, seconds
         "runs": int | null,                     # timed runs of forward + backward
         "cpu_share": float | null,              # CPU time ÷ wall time over those runs (1: a core to itself)
         "disturbed": bool | null,               # cpu_share < 0.8
         "peak_bytes": int | null,               # tracemalloc peak of forward + backward, counted from
                                                 #   after the inputs exist (outputs and gradients count)
         "flops_forward": int, "flops_backward": int,   # theory, see below
         "theory_bytes": int,                    # theory, see below
         "skipped": null | str}                  # why it was not run (then the measured fields are null)
      ]
    }

Theory (``d`` = ``dv`` = dim, 8-byte floats; FLOPs count 2 per multiply-add of the matrix products and
leave out the elementwise work — ``exp``, scaling, masking — which is O(size of the logits)):

=============  ============================  ================================  ====================================
variant        flops_forward                 flops_backward                    theory_bytes / 8
=============  ============================  ================================  ====================================
exact          2·N²·(d + dv)                 4·N²·(d + dv)                     N² (the weights) + G
chunked        2·N²·(d + dv)                 2·N²·d + 4·N²·(d + dv) (recompute) block_q·block_k + N (lse) + G
linear         2·2N·d·dv                     4·2N·d·dv                         2·N·d (features) + d·dv + d + G
window         2·N·w²·(d + dv)               4·N·w²·(d + dv)                   N·w² (the weights) + G
neighborhood   2·N·k²·(d + dv)               4·N·k²·(d + dv)                   N·k² (the weights) + G
=============  ============================  ================================  ====================================

where ``G = N·dv + 2·N·d + N·dv`` is the output and the three gradients every variant returns. Measured
peaks sit above these models by the temporaries of each step (a few copies of the largest array).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..attention import attention_backward, attention_forward
from ..backend import cpu_model
from ..blocks.attend import ATTENTION_VARIANTS, variant_backward, variant_forward
from .measure import MAX_RUNS, Timings, load_average, one_thread, peak_memory_bytes, summarise, time_passes

__all__ = ["FULL_SIZES", "QUICK_SIZES", "SCHEMA", "VARIANTS", "measure", "run_complexity", "theory"]

SCHEMA = "attention_ref.complexity/2"
VARIANTS = ("exact", *ATTENTION_VARIANTS)  # exact, chunked, linear, window, neighborhood
FULL_SIZES = (16, 32, 64, 128)
QUICK_SIZES = (8, 16)


def theory(variant: str, tokens: int, dim: int, config: dict[str, Any]) -> dict[str, int]:
    """Theoretical ``flops_forward``, ``flops_backward`` and ``theory_bytes`` (see the module docstring)."""
    n, d, dv = tokens, dim, dim
    grads_and_out = n * dv + 2 * n * d + n * dv  # G
    if variant in ("exact", "chunked"):
        fwd, bwd = 2 * n * n * (d + dv), 4 * n * n * (d + dv)
        if variant == "exact":
            state = n * n
        else:
            bwd += 2 * n * n * d  # the backward recomputes the logits
            block_q, block_k = config["block_size"], config["block_size"]
            state = min(block_q, n) * min(block_k, n) + n
    elif variant == "linear":
        fwd, bwd = 2 * 2 * n * d * dv, 4 * 2 * n * d * dv
        state = 2 * n * d + d * dv + d
    elif variant in ("window", "neighborhood"):
        per_query = config["window"] ** 2 if variant == "window" else config["kernel"] ** 2
        fwd, bwd = 2 * n * per_query * (d + dv), 4 * n * per_query * (d + dv)
        state = n * per_query
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return {"flops_forward": fwd, "flops_backward": bwd, "theory_bytes": 8 * (state + grads_and_out)}


def _passes(variant: str, side: int, config: dict[str, Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(forward(q, k, v) -> (out, cache), backward(dout, cache))`` of ``variant`` on the ``(1, S·S, d)`` tokens of
    an ``S × S`` map: exact attention, or the variant as the attention layer runs it, its options from ``config``."""
    if variant == "exact":
        return attention_forward, attention_backward
    chosen = ATTENTION_VARIANTS[variant]
    options = {name: config[name] for name in chosen.options if name in config}  # block_size; window, shift; kernel
    grid = (side, side) if chosen.on_grid else None

    def forward(q: Any, k: Any, v: Any) -> Any:
        return variant_forward(q, k, v, attention=variant, options=options, grid=grid, mask=None, scale=None)

    return forward, variant_backward


MEASURED = (
    "forward_s",
    "backward_s",
    "forward_cpu_s",
    "backward_cpu_s",
    "runs",
    "cpu_share",
    "disturbed",
    "peak_bytes",
)


def _cell(variant: str, side: int, config: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...] | None]:
    """The row of ``variant`` on a ``side × side`` map before measuring, and what to run:
    ``(forward, backward, (q, k, v), dout)``, or None when it is skipped (the row says why)."""
    tokens, dim = side * side, config["dim"]
    row: dict[str, Any] = {"variant": variant, "side": side, "tokens": tokens}
    row.update({key: None for key in MEASURED}, **theory(variant, tokens, dim, config))
    row["skipped"] = None
    if variant == "exact" and tokens > config["exact_max_tokens"]:
        row["skipped"] = f"exact attention is run up to {config['exact_max_tokens']} tokens (--exact-max-tokens)"
    elif variant == "window" and side % config["window"]:
        row["skipped"] = f"a {side}×{side} map cannot be cut into {config['window']}×{config['window']} windows"
    elif variant == "neighborhood" and config["kernel"] > side:
        row["skipped"] = f"a {config['kernel']}×{config['kernel']} neighborhood does not fit a {side}×{side} map"
    if row["skipped"]:
        return row, None
    forward, backward = _passes(variant, side, config)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, tokens, dim)) for _ in range(4))  # (1, N, d): pixel row·S + col
    return row, (forward, backward, (q, k, v), dout)


def _peak_bytes(forward: Callable[..., Any], backward: Callable[..., Any], inputs: tuple[Any, ...], dout: Any) -> int:
    """tracemalloc's peak over one forward + backward, counted from after the inputs exist."""

    def run() -> Any:
        out, cache = forward(*inputs)
        return out, backward(dout, cache)

    return peak_memory_bytes(run, "tracemalloc")


def measure(variant: str, side: int, config: dict[str, Any]) -> dict[str, Any]:
    """One result row: times, peak memory and theory of ``variant`` on an ``side × side`` map, its runs
    back to back (:func:`run_complexity` spreads them over rounds instead).

    ``config`` holds the keys of the report's ``"config"`` (see the module docstring). Call it inside
    :func:`.measure.one_thread` for the times to mean what the report says.
    """
    row, runner = _cell(variant, side, config)
    if runner is not None:
        row.update(summarise(time_passes(*runner, config["repeats"], config["min_time"])))
        row["peak_bytes"] = _peak_bytes(*runner)
    return row


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_complexity(
    config: dict[str, Any], variants: Sequence[str] = VARIANTS, *, log: Callable[[str], None] = _stderr
) -> dict[str, Any]:
    """Measure every variant of ``variants`` at every side of ``config["sizes"]``; return the report.

    ``config`` holds the keys of the report's ``"config"`` but ``blas_limited`` (see the module docstring;
    ``python -m attention_ref complexity`` fills it from its options); ``blas_limited`` is added to it here.
    ``log`` gets a line after each round and one per row (default: stderr).
    """
    machine = {
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "load_before": load_average(),
    }
    rounds = config["repeats"]
    cells = [_cell(variant, side, config) for side in config["sizes"] for variant in variants]
    timings: list[Timings] = [{} for _ in cells]
    start = time.perf_counter()
    with one_thread() as blas_limited:
        config["blas_limited"] = blas_limited
        for row, runner in cells:
            if runner is not None:
                row["peak_bytes"] = _peak_bytes(*runner)
        # every cell once a round, the rounds one after the other: a busy spell on the machine then
        # hits one run of many cells rather than every run of one, and the best of each cell's runs
        # is likely to be a quiet one
        for r in range(rounds):
            for (_, runner), runs in zip(cells, timings, strict=True):
                if runner is not None:
                    time_passes(*runner, 1, config["min_time"] / rounds, runs, max_runs=max(1, MAX_RUNS // rounds))
            if rounds > 1:
                log(f"round {r + 1}/{rounds} timed ({time.perf_counter() - start:.0f} s)")
    results = []
    for (row, runner), runs in zip(cells, timings, strict=True):
        if runner is not None:
            row.update(summarise(runs))
        results.append(row)
        log(_row_line(row))
    machine["load_after"] = load_average()
    return {"schema": SCHEMA, "config": config, "machine": machine, "results": results}


def _row_line(row: dict[str, Any]) -> str:
    """A result row in one line: its CPU times and peak memory, or why it was skipped."""
    variant, side = row["variant"], row["side"]
    if row["skipped"]:
        return f"{variant:>13} {side:>4}×{side:<4} skipped: {row['skipped']}"
    return (
        f"{variant:>13} {side:>4}×{side:<4} forward {row['forward_cpu_s']:9.4f} s  backward "
        f"{row['backward_cpu_s']:9.4f} s (CPU, best of {row['runs']})  peak "
        f"{row['peak_bytes'] / 2**20:9.2f} MiB"
        + (f"  disturbed: {row['cpu_share']:.0%} of a core" if row["disturbed"] else "")
    )
