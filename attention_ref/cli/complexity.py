"""``python -m attention_ref complexity --out FILE.json``: time and memory of the attention variants vs map size.

For square maps of side ``S`` (``N = S²`` pixels, one image, one head, ``d = dv = --dim`` channels, float64
NumPy) it runs forward and backward of

* ``exact``        — :func:`attention_ref.attention_forward` (only up to ``--exact-max-tokens`` pixels:
  its ``N × N`` weights, and the few temporaries of their size, are what the others avoid);
* ``chunked``      — :func:`attention_ref.chunked_attention_forward` (tiled exact, ``--block-size``);
* ``linear``       — :func:`attention_ref.linear_attention_forward`, ``kind="elu"``;
* ``window``       — :func:`attention_ref.window_attention_forward`, ``--window``, ``--shift``;
* ``neighborhood`` — :func:`attention_ref.neighborhood_attention_forward`, ``--kernel``;

and records the best wall time of ``--repeats`` runs of each pass, the peak memory of one forward +
backward, and the theoretical FLOPs and memory next to them.

JSON schema (``"schema": "attention_ref.complexity/1"``)::

    {
      "schema": "attention_ref.complexity/1",
      "config": {"sizes": [16, 32, 64, 128], "dim": 64, "dtype": "float64", "batch": 1, "heads": 1,
                 "repeats": 2, "window": 8, "shift": 4, "kernel": 7, "block_size": 512,
                 "exact_max_tokens": 4096, "quick": false},
      "machine": {"platform": str, "python": str, "numpy": str, "cpu_count": int},
      "results": [
        {"variant": "exact" | "chunked" | "linear" | "window" | "neighborhood",
         "side": S, "tokens": N,                 # the map is S × S, N = S² pixels
         "forward_s": float | null,              # best wall time of the forward pass, seconds
         "backward_s": float | null,             # best wall time of the backward pass alone, seconds
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
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
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

__all__ = ["SCHEMA", "VARIANTS", "add_arguments", "main", "measure", "theory"]

SCHEMA = "attention_ref.complexity/1"
VARIANTS = ("exact", "chunked", "linear", "window", "neighborhood")
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


def measure(variant: str, side: int, config: dict[str, Any]) -> dict[str, Any]:
    """One result row: times, peak memory and theory of ``variant`` on an ``side × side`` map."""
    tokens, dim = side * side, config["dim"]
    row: dict[str, Any] = {"variant": variant, "side": side, "tokens": tokens}
    row.update(forward_s=None, backward_s=None, peak_bytes=None, **theory(variant, tokens, dim, config))
    row["skipped"] = None
    if variant == "exact" and tokens > config["exact_max_tokens"]:
        row["skipped"] = f"exact attention is run up to {config['exact_max_tokens']} tokens (--exact-max-tokens)"
        return row
    if variant == "window" and side % config["window"]:
        row["skipped"] = f"a {side}×{side} map cannot be cut into {config['window']}×{config['window']} windows"
        return row
    if variant == "neighborhood" and config["kernel"] > side:
        row["skipped"] = f"a {config['kernel']}×{config['kernel']} neighborhood does not fit a {side}×{side} map"
        return row

    forward, backward, on_maps = _passes(variant, config)
    rng = np.random.default_rng(0)
    shape = (1, side, side, dim) if on_maps else (1, tokens, dim)
    q, k, v, dout = (rng.standard_normal(shape) for _ in range(4))

    forward_times, backward_times = [], []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        _, cache = forward(q, k, v)
        middle = time.perf_counter()
        backward(dout, cache)
        end = time.perf_counter()
        forward_times.append(middle - start)
        backward_times.append(end - middle)
        del cache
    row["forward_s"], row["backward_s"] = min(forward_times), min(backward_times)

    tracemalloc.start()
    try:
        _, cache = forward(q, k, v)
        backward(dout, cache)
        row["peak_bytes"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options, for ``python -m attention_ref complexity``."""
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help=f"sides {QUICK_SIZES}, one repeat: a smoke test")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"map sides S (S × S pixels); default {FULL_SIZES}")
    parser.add_argument("--dim", type=int, default=64, help="channels per head, d = dv (default 64)")
    parser.add_argument("--repeats", type=int, help="timed runs per pass, the best is kept (default 2; quick: 1)")
    parser.add_argument("--window", type=int, default=8, help="window attention: window side (default 8)")
    parser.add_argument("--shift", type=int, help="window attention: shift (default window // 2, Swin's)")
    parser.add_argument("--kernel", type=int, default=7, help="neighborhood attention: kernel side (default 7)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="chunked attention tile side")
    parser.add_argument(
        "--exact-max-tokens", type=int, default=4096, help="run exact attention only up to this many pixels"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which to run")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements described by ``args``, write the JSON to ``args.out``, and return it."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    if min(sizes) < 1 or args.dim < 1 or (args.repeats is not None and args.repeats < 1):
        raise ValueError(f"sizes, --dim and --repeats must be positive; got {sizes}, {args.dim}, {args.repeats}")
    shift = args.window // 2 if args.shift is None else args.shift
    if not 0 <= shift < args.window:
        raise ValueError(f"--shift must satisfy 0 ≤ shift < window = {args.window}; got {shift}")
    config = {
        "sizes": list(sizes),
        "dim": args.dim,
        "dtype": "float64",
        "batch": 1,
        "heads": 1,
        "repeats": args.repeats or (1 if args.quick else 2),
        "window": args.window,
        "shift": shift,
        "kernel": args.kernel,
        "block_size": args.block_size,
        "exact_max_tokens": args.exact_max_tokens,
        "quick": bool(args.quick),
    }
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }
    results = []
    for side in sizes:
        for variant in args.variants:
            row = measure(variant, side, config)
            results.append(row)
            if row["skipped"]:
                print(f"{variant:>13} {side:>4}×{side:<4} skipped: {row['skipped']}", file=sys.stderr)
            else:
                print(
                    f"{variant:>13} {side:>4}×{side:<4} forward {row['forward_s']:9.4f} s  backward "
                    f"{row['backward_s']:9.4f} s  peak {row['peak_bytes'] / 2**20:9.2f} MiB",
                    file=sys.stderr,
                )
    report = {"schema": SCHEMA, "config": config, "machine": machine, "results": results}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report
