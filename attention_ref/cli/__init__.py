"""Command line: ``python -m attention_ref <command>``. Each command lives in its own module."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attention_ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a self-attention forward and backward on a 4×4×8 map, step by step")
    from .complexity import add_arguments as complexity_arguments

    complexity_arguments(
        sub.add_parser("complexity", help="time and peak memory of the attention variants vs map size")
    )
    from .oracle import ORACLE_COMMANDS, add_oracle_commands, run_oracle_command

    add_oracle_commands(sub)  # check, vectors
    from ..bench import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="time and peak memory of attention against torch and the GEMMs"))
    from .figures import add_arguments as figures_arguments

    figures_arguments(sub.add_parser("figures", help="train the toys and regenerate the gallery of figures"))
    from .explore import add_arguments as explore_arguments

    explore_arguments(sub.add_parser("explore", help="write the attention explorer: one self-contained web page"))
    args = parser.parse_args(argv)
    if args.command in ORACLE_COMMANDS:
        return run_oracle_command(args)

    if args.command == "demo":
        from .demo import main as demo

        demo()
    elif args.command == "complexity":
        from .complexity import main as complexity

        complexity(args)
    elif args.command == "bench":
        from ..bench import main as bench_main

        return bench_main(args)
    elif args.command == "figures":
        from .figures import main as figures

        figures(args)
    elif args.command == "explore":
        from .explore import main as explore

        return explore(args)
    return 0
