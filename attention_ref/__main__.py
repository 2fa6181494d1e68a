"""Command line: ``python -m attention_ref <command>``. Each command lives in its own module."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attention_ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a self-attention forward and backward on a 4×4×8 map, step by step")
    bench = sub.add_parser("bench", help="time and peak memory of the attention paths against torch and the GEMM bound")
    from .bench import add_arguments as bench_arguments

    bench_arguments(bench)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import main as demo

        demo()
    elif args.command == "bench":
        from .bench import main as bench_main

        return bench_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
