"""``python -m attention_ref bench``: time and peak memory of our attention paths against the machine's limit
(the case's matrix-product flops at the peak GEMM rate plus its exponentials at the ``exp`` rate, both measured
in the same run on the same threads: :mod:`attention_ref.bench.limits`), side by side with torch's
``scaled_dot_product_attention`` (plus autograd) and with the bare matrix products of the same shapes.

For each N (default 1,024, 4,096 and 16,384 tokens; 4 heads of 64; float64 and float32) and each part — the
plain path, the tiled path and the self-attention block — and once for the small self- and cross-attention
blocks (32 maps of 8 × 8 × 64), it runs ours, torch and the GEMM bound one after another, several times, and
reports the medians of the forward, backward and forward+backward times, the peak memory, and each one's
time over the limit, ours over torch's and over the GEMM bound's. Parts that hold N×N matrices stop at
N = 4,096. The JSON file holds every run. ``--breakdown`` instead times the tiled path's parts on one core
(:mod:`attention_ref.bench.breakdown`). See docs/performance.md.

This module reads the command line and writes the results; the benchmark itself is
:func:`attention_ref.bench.run_bench` (:mod:`attention_ref.bench`).

    python -m attention_ref bench                 # the full table (several minutes on 2 cores)
    python -m attention_ref bench --quick         # N = 1,024 and 4,096, 3 runs each
    python -m attention_ref bench --sizes 4096 --parts plain --dtypes float32
    python -m attention_ref bench --breakdown --sizes 4096   # the tiled path's time, part by part
"""

from __future__ import annotations

import argparse

from ..bench.cases import PARTS
from ..bench.measure import keep_freed_memory
from ..bench.report import LEGEND, write_json
from ..bench.run import DEFAULT_SIZES, DTYPES, PAUSE_S, run_bench

__all__ = ["DESCRIPTION", "EPILOG", "add_arguments", "main"]

QUICK_SIZES = (1024, 4096)
QUICK_REPEATS = 3

DESCRIPTION = """\
Time and peak memory of the library's attention (the plain path, the tiled
path, the self-attention block, small self- and cross-attention blocks),
forward and backward, for N tokens of 4 heads of 64, against the machine's own
limit (its peak matrix-product rate plus its exp rate, measured in the same
run), torch's scaled_dot_product_attention with autograd, and the bare matrix
products. Prints a table and writes every run to --json. Several minutes on 2
cores; the torch column needs torch (or give --no-torch)."""

EPILOG = """\
examples:
  python -m attention_ref bench --quick
      N = 1,024 and 4,096, 3 runs each
  python -m attention_ref bench --sizes 4096 --parts plain --dtypes float32
  python -m attention_ref bench --breakdown --sizes 4096
      where the tiled path's time goes, part by part
  python -m attention_ref bench --threads 1
      on a busy machine"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options, for ``python -m attention_ref bench``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("--sizes", type=int, nargs="+", help=f"numbers of tokens N (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZES}, {QUICK_REPEATS} runs each")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to time (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="default: both")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dim", type=int, default=64, help="features per head d")
    parser.add_argument("--repeats", type=int, help="timed runs per implementation (default 5; halved above 4,096)")
    parser.add_argument(
        "--threads", type=int, help="threads of every implementation: torch's, ours, BLAS (default: the usable CPUs)"
    )
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="where ours runs")
    parser.add_argument("--block-size", type=int, help="block_size of the tiled path (default: its own)")
    parser.add_argument("--pause", type=float, default=PAUSE_S, help="seconds of rest before each timed run")
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a case disturbed by other processes")
    parser.add_argument("--no-torch", action="store_true", help="leave torch out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", default="bench-results.json", help="where to write every run (default %(default)s)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead: where the tiled path's time goes, part by part, on one core (bench/breakdown.py)",
    )
    parser.add_argument(
        "--return-memory",
        action="store_true",
        help="let freed memory go back to the OS between runs (default: keep it; see measure.keep_freed_memory)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (or ``--breakdown``), print its table and write ``--json``."""
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else 5)
    if args.breakdown:
        from ..bench.breakdown import breakdown, print_breakdown

        results = []
        for n in sizes:
            for dtype in args.dtypes:
                results.append(breakdown(n, args.dim, dtype, args.block_size, repeats=min(repeats, 3)))
                print_breakdown(results[-1])
        if args.json:
            write_json({"breakdown": results}, args.json)
            print(f"wrote {args.json}")
        return 0
    kept = False if args.return_memory else keep_freed_memory()
    print(f"# freed memory {'kept in the process' if kept else 'returned to the OS'} between runs")
    result = run_bench(
        sizes=sizes,
        dtypes=tuple(args.dtypes),
        parts=tuple(args.parts),
        heads=args.heads,
        d=args.dim,
        repeats=repeats,
        threads=args.threads,
        backend=args.backend,
        with_torch=not args.no_torch,
        memory=not args.no_memory,
        tiled_options={"block_size": args.block_size} if args.block_size else None,
        pause=args.pause,
        retries=args.retries,
    )
    result["config"]["freed_memory_kept"] = kept
    print(LEGEND)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0
