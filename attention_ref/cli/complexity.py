"""``python -m attention_ref complexity --out FILE.json``: time and memory of the attention variants vs map size.

For square maps of side ``S`` (``N = S²`` pixels, one image, one head, ``d = dv = --dim`` channels, float64
NumPy) it runs forward and backward of

* ``exact``        — :func:`attention_ref.attention_forward` (only up to ``--exact-max-tokens`` pixels:
  its ``N × N`` weights, and the few temporaries of their size, are what the others avoid);
* ``chunked``      — :func:`attention_ref.chunked_attention_forward` (tiled exact, ``--block-size``);
* ``linear``       — :func:`attention_ref.linear_attention_forward`, ``kind="elu"``;
* ``window``       — :func:`attention_ref.window_attention_forward`, ``--window``, ``--shift``;
* ``neighborhood`` — :func:`attention_ref.neighborhood_attention_forward`, ``--kernel``;

and records, for each pass, the best CPU time and the best wall time of its runs, the peak memory of
one forward + backward, and the theoretical FLOPs and memory next to them. The runs are made in
``--repeats`` rounds: each round runs every (variant, size) once, and again while that round's runs
of it took less than ``--min-time`` ÷ rounds seconds (at most 50 runs in all).

**Robust to a busy machine.** Everything runs on one thread (BLAS limited to one thread with
``threadpoolctl`` where it is installed, ``ATTENTION_REF_NUM_THREADS=1`` for the library's own threads),
and the plotted time is the *CPU time* of this process (``time.process_time``), the best of its runs.
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

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..attention import (
    DEFAULT_BLOCK_SIZE,
    attention_backward,
    attention_forward,
    chunked_attention_backward,
    chunked_attention_forward,
    linear_attention_backward,
    linear_attention_forward,
    neighborhood_attention_backward,
    neighborhood_attention_forward,
    window_attention_backward,
    window_attention_forward,
)
from ..backend import limited_threads

__all__ = ["SCHEMA", "VARIANTS", "add_arguments", "main", "measure", "one_thread", "summarise", "theory", "time_passes"]

SCHEMA = "attention_ref.complexity/2"
VARIANTS = ("exact", "chunked", "linear", "window", "neighborhood")
FULL_SIZES = (16, 32, 64, 128)
QUICK_SIZES = (8, 16)
MAX_RUNS = 50
DISTURBED_SHARE = 0.8  # a process with less than this share of a core while timed was disturbed


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


def _passes(variant: str, config: dict[str, Any]) -> tuple[Callable[..., Any], Callable[..., Any], bool]:
    """``(forward(q, k, v) -> (out, cache), backward, on_maps)``; ``on_maps`` = takes ``(1, S, S, d)`` arrays."""
    if variant == "exact":
        return attention_forward, attention_backward, False
    if variant == "chunked":

        def chunked(q: Any, k: Any, v: Any) -> Any:
            return chunked_attention_forward(q, k, v, block_size=config["block_size"])

        return chunked, chunked_attention_backward, False
    if variant == "linear":
        return linear_attention_forward, linear_attention_backward, False
    if variant == "window":

        def window(q: Any, k: Any, v: Any) -> Any:
            return window_attention_forward(q, k, v, window=config["window"], shift=config["shift"])

        return window, window_attention_backward, True

    def neighborhood(q: Any, k: Any, v: Any) -> Any:
        return neighborhood_attention_forward(q, k, v, kernel=config["kernel"])

    return neighborhood, neighborhood_attention_backward, True


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


Timings = dict[str, list[float]]  # "forward_wall", "backward_wall", "forward_cpu", "backward_cpu": one entry a run


def time_passes(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: tuple[Any, ...],
    dout: Any,
    repeats: int,
    min_time: float,
    timings: Timings | None = None,
    *,
    max_runs: int = MAX_RUNS,
) -> Timings:
    """Time ``forward(*inputs)`` and ``backward(dout, cache)`` in CPU and wall seconds, run after run.

    Runs the pair at least ``repeats`` times, and again while these runs took less than ``min_time``
    seconds in all (at most ``max_runs``). Appends to ``timings`` when given (so that runs made
    at different moments add up) and returns it; :func:`summarise` turns it into the report's fields.
    """
    timings = timings if timings is not None else {}
    for key in ("forward_wall", "backward_wall", "forward_cpu", "backward_cpu"):
        timings.setdefault(key, [])
    runs, spent = 0, 0.0
    while runs < repeats or (spent < min_time and runs < max_runs):
        t0, c0 = time.perf_counter(), time.process_time()
        _, cache = forward(*inputs)
        t1, c1 = time.perf_counter(), time.process_time()
        backward(dout, cache)
        t2, c2 = time.perf_counter(), time.process_time()
        del cache
        timings["forward_wall"].append(t1 - t0)
        timings["backward_wall"].append(t2 - t1)
        timings["forward_cpu"].append(c1 - c0)
        timings["backward_cpu"].append(c2 - c1)
        runs, spent = runs + 1, spent + (t2 - t0)
    return timings


def summarise(timings: Timings) -> dict[str, Any]:
    """The report's time fields from :func:`time_passes`' runs: the best of each, and how disturbed they were.

    The minimum is the run least disturbed by everything else on the machine; CPU time
    (``time.process_time``) leaves out the time other processes held the core.
    ``cpu_share`` = total CPU time ÷ total wall time of the runs; ``disturbed`` when it is under
    :data:`DISTURBED_SHARE`.
    """
    wall = sum(timings["forward_wall"]) + sum(timings["backward_wall"])
    cpu = sum(timings["forward_cpu"]) + sum(timings["backward_cpu"])
    share = cpu / wall if wall > 0 else 1.0
    return {
        "forward_s": min(timings["forward_wall"]),
        "backward_s": min(timings["backward_wall"]),
        "forward_cpu_s": min(timings["forward_cpu"]),
        "backward_cpu_s": min(timings["backward_cpu"]),
        "runs": len(timings["forward_wall"]),
        "cpu_share": share,
        "disturbed": share < DISTURBED_SHARE,
    }


@contextlib.contextmanager
def one_thread() -> Iterator[bool]:
    """Everything on one thread inside: the library's and BLAS's (:func:`attention_ref.backend.limited_threads`).

    Yields whether BLAS could be limited (it can where ``threadpoolctl`` is installed).
    """
    with limited_threads(1):
        yield importlib.util.find_spec("threadpoolctl") is not None


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
    forward, backward, on_maps = _passes(variant, config)
    rng = np.random.default_rng(0)
    shape = (1, side, side, dim) if on_maps else (1, tokens, dim)
    q, k, v, dout = (rng.standard_normal(shape) for _ in range(4))
    return row, (forward, backward, (q, k, v), dout)


def _peak_bytes(forward: Callable[..., Any], backward: Callable[..., Any], inputs: tuple[Any, ...], dout: Any) -> int:
    """tracemalloc's peak over one forward + backward, counted from after the inputs exist."""
    tracemalloc.start()
    try:
        _, cache = forward(*inputs)
        backward(dout, cache)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(variant: str, side: int, config: dict[str, Any]) -> dict[str, Any]:
    """One result row: times, peak memory and theory of ``variant`` on an ``side × side`` map, its runs
    back to back (``main`` spreads them over rounds instead).

    ``config`` holds the keys of the report's ``"config"`` (see the module docstring). Call it inside
    :func:`one_thread` for the times to mean what the report says.
    """
    row, runner = _cell(variant, side, config)
    if runner is not None:
        row.update(summarise(time_passes(*runner, config["repeats"], config["min_time"])))
        row["peak_bytes"] = _peak_bytes(*runner)
    return row


DESCRIPTION = """\
Time and peak memory of exact, tiled (chunked), linear, window and
neighborhood attention, forward and backward, on square maps of S × S pixels
(one image, one head, float64), with the operation counts and memory the
formulas give next to them; written to a JSON file that the gallery's
complexity figure is drawn from. Timed on one thread as CPU time, the best of
several runs, so that other programs on the machine disturb it little; a size
that got less than 80 % of a core is marked "disturbed"."""

EPILOG = """\
examples:
  python -m attention_ref complexity --out complexity.json
      sides 16, 32, 64 and 128 (a minute or two)
  python -m attention_ref complexity --quick --out smoke.json
  python -m attention_ref complexity --sizes 32 64 --variants exact --out c.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options, for ``python -m attention_ref complexity``."""
    from .common import positive_int

    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("--out", required=True, metavar="FILE.json", help="where to write the results (JSON)")
    parser.add_argument("--quick", action="store_true", help=f"sides {QUICK_SIZES}, one run each: a smoke test")
    parser.add_argument(
        "--sizes", type=positive_int, nargs="+", metavar="S", help=f"map sides S (S × S pixels); default {FULL_SIZES}"
    )
    parser.add_argument(
        "--dim", type=positive_int, default=64, metavar="D", help="channels per head, d = dv (default 64)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        metavar="N",
        help="timed runs per pass at least, the best is kept (default 3; quick: 1)",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        metavar="SECONDS",
        help="run each pass again until its runs took this many seconds (at most 50 runs; default 0.5; quick: 0)",
    )
    parser.add_argument(
        "--window", type=positive_int, default=8, metavar="W", help="window attention: window side (default 8)"
    )
    parser.add_argument(
        "--shift", type=int, metavar="N", help="window attention: shift (default window // 2, as Swin's)"
    )
    parser.add_argument(
        "--kernel", type=positive_int, default=7, metavar="K", help="neighborhood attention: kernel side (default 7)"
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="N",
        help=f"chunked attention: tile side (default {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--exact-max-tokens",
        type=positive_int,
        default=4096,
        metavar="N",
        help="run exact attention only up to this many pixels (default 4096: its N × N weights)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        metavar="NAME",
        help=f"which to run, of {', '.join(VARIANTS)} (default: all)",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements described by ``args``, write the JSON to ``args.out``, and return it."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    if min(sizes) < 1 or args.dim < 1 or (args.repeats is not None and args.repeats < 1):
        raise ValueError(f"sizes, --dim and --repeats must be positive; got {sizes}, {args.dim}, {args.repeats}")
    if args.min_time is not None and not args.min_time >= 0:
        raise ValueError(f"--min-time must be 0 or more seconds; got {args.min_time}")
    shift = args.window // 2 if args.shift is None else args.shift
    if not 0 <= shift < args.window:
        raise ValueError(f"--shift must satisfy 0 ≤ shift < window = {args.window}; got {shift}")
    config = {
        "sizes": list(sizes),
        "dim": args.dim,
        "dtype": "float64",
        "batch": 1,
        "heads": 1,
        "repeats": args.repeats or (1 if args.quick else 3),
        "min_time": args.min_time if args.min_time is not None else (0.0 if args.quick else 0.5),
        "threads": 1,
        "window": args.window,
        "shift": shift,
        "kernel": args.kernel,
        "block_size": args.block_size,
        "exact_max_tokens": args.exact_max_tokens,
        "quick": bool(args.quick),
    }
    from ..backend import cpu_model
    from ..bench.measure import load_average

    machine = {
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "load_before": load_average(),
    }
    rounds = config["repeats"]
    cells = [_cell(variant, side, config) for side in sizes for variant in args.variants]
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
                print(
                    f"round {r + 1}/{rounds} timed ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True
                )
    results = []
    for (row, runner), runs in zip(cells, timings, strict=True):
        if runner is not None:
            row.update(summarise(runs))
        results.append(row)
        variant, side = row["variant"], row["side"]
        if row["skipped"]:
            line = f"{variant:>13} {side:>4}×{side:<4} skipped: {row['skipped']}"
        else:
            line = (
                f"{variant:>13} {side:>4}×{side:<4} forward {row['forward_cpu_s']:9.4f} s  backward "
                f"{row['backward_cpu_s']:9.4f} s (CPU, best of {row['runs']})  peak "
                f"{row['peak_bytes'] / 2**20:9.2f} MiB"
                + (f"  disturbed: {row['cpu_share']:.0%} of a core" if row["disturbed"] else "")
            )
        print(line, file=sys.stderr, flush=True)
    machine["load_after"] = load_average()
    report = {"schema": SCHEMA, "config": config, "machine": machine, "results": results}
    from .common import write_all

    write_all([("--out", Path(args.out), lambda path: path.write_text(json.dumps(report, indent=1), encoding="utf-8"))])
    return report
