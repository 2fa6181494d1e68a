"""``python -m attention_ref complexity --out FILE.json``: time and memory of the attention variants vs map size.

This module reads the command line, checks it and writes the report; the measuring, the report's JSON
schema and the theory next to the measurements are :mod:`attention_ref.bench.complexity`'s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..attention import DEFAULT_BLOCK_SIZE
from ..bench.complexity import FULL_SIZES, QUICK_SIZES, VARIANTS, run_complexity
from .common import positive_int, write_all

__all__ = ["add_arguments", "main"]

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
    report = run_complexity(config, args.variants)
    write_all([("--out", Path(args.out), lambda path: path.write_text(json.dumps(report, indent=1), encoding="utf-8"))])
    return report
