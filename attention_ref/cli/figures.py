"""``python -m attention_ref figures --out figures``: regenerate the README's gallery.

With the default ``--out figures`` it rewrites the figures committed with the project.

Threads: ``ATTENTION_REF_NUM_THREADS`` sets the toys' threads (attention_ref's and BLAS's); unset, the toys
train on one thread (their matrices are small). The complexity curves are measured on one thread, in CPU time.

The figures themselves are drawn by :mod:`attention_ref.cli.gallery` (imported only when the command runs,
so the other commands do not load matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["add_arguments", "main"]


DESCRIPTION = """\
Train the two toy models and redraw every figure of the gallery into --out. With
the default --out figures this REWRITES the figures committed with the project
(the PNGs and complexity.json): review them with git diff --stat figures, and
look at them, before committing. A line per stage, with the time elapsed, goes
to stderr; a caption per figure and the numbers behind them to stdout. A few
minutes on 2 cores."""

EPILOG = """\
examples:
  python -m attention_ref figures --out /tmp/gallery
      the whole gallery, into a folder of its own
  python -m attention_ref figures --quick --out /tmp/smoke --dpi 40
      short training and small maps: a smoke test
  python -m attention_ref figures --complexity figures/complexity.json --out figs
      plot a complexity report measured before, instead of measuring"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options, for ``python -m attention_ref figures``."""
    from .common import positive_int

    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument(
        "--out",
        default="figures",
        metavar="DIR",
        help="directory for the PNGs (default: figures, the committed gallery: rewritten)",
    )
    parser.add_argument("--quick", action="store_true", help="short training, small maps: a smoke test")
    parser.add_argument(
        "--complexity",
        metavar="FILE.json",
        help="plot this report of the complexity command instead of measuring one",
    )
    parser.add_argument("--dpi", type=positive_int, default=80, metavar="N", help="resolution of the PNGs (default 80)")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train the diffusion toy again (hours on 2 cores) and overwrite its shipped weights "
        "instead of loading them",
    )


def main(args: argparse.Namespace) -> int:
    """Run :func:`make_figures` with the command's options and print what each figure shows."""
    from .common import reading
    from .gallery import make_figures

    if args.complexity is not None:  # read it now, not after minutes of training
        from ..viz.cost_curves import load_complexity

        with reading(args.complexity):
            load_complexity(args.complexity)
    start = time.perf_counter()

    def stage(line: str) -> None:
        # flushed at once: the command runs for minutes, and stderr may be a pipe or a log file
        print(f"[{time.perf_counter() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    figures, numbers = make_figures(
        args.out, quick=args.quick, complexity=args.complexity, dpi=args.dpi, log=stage, retrain=args.retrain
    )
    for path, caption in figures:
        print(f"{path}: {caption}")
    print(json.dumps(numbers, indent=1))
    print(f"{len(figures)} figures in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
