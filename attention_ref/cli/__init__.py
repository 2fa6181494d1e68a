"""The command line, ``python -m attention_ref COMMAND``: :func:`main` parses, runs the command, and turns
its failures into one line on stderr and an exit status (:mod:`attention_ref.cli.common`).

Each command lives in its own module with an ``add_arguments(parser)`` and a ``main(args)``; the oracle's
two commands (``check``, ``vectors``) in :mod:`attention_ref.cli.oracle`. A command's module reads its
options and calls the library (the measuring of ``bench`` and ``complexity`` is :mod:`attention_ref.bench`'s).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STATUSES,
    EXIT_USAGE,
    CommandError,
    Parser,
    check_output_dir,
    check_output_file,
    one_line,
)

__all__ = ["main"]

PROG = "python -m attention_ref"

DESCRIPTION = """\
attention_ref: a readable, exact NumPy reference for the attention layers of
diffusion models, forward and backward. These commands show it at work, draw
its figures, and test other attention code against it."""


def exit_statuses() -> str:
    """The exit statuses and what they mean, one wrapped paragraph each (for --help)."""
    return "\n".join(
        textwrap.fill(meaning, 78, initial_indent=f"  {status:<5}", subsequent_indent=" " * 7)
        for status, meaning in EXIT_STATUSES.items()
    )


EPILOG = f"""\
examples:
  python -m attention_ref demo
      one self-attention block forward and backward, step by step
  python -m attention_ref explore --out explorer.html
      a web page to click through attention maps
  python -m attention_ref check attention_ref.testing.examples:torch_sdpa \\
      --torch --dtype bfloat16
      an attention function against the float64 reference
  python -m attention_ref figures --out figs
      train the toy models and draw the gallery (minutes)
  python -m attention_ref COMMAND --help
      a command's options, with examples

exit status:
{exit_statuses()}

A failure is one line on stderr, "python -m attention_ref COMMAND: error: ...".
ATTENTION_REF_TRACEBACK=1 shows the Python traceback behind it instead."""

DEMO = """\
Run one self-attention block (a 4×4 map of 8 channels, 2 heads, float64)
forward and backward with the library's own functions: each step with the
shape it produces, one query pixel's weights laid out on the map, then the
backward pass checked against finite differences. Needs only NumPy; takes a
second."""


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="one self-attention block forward and backward, step by step, in the terminal",
        description=DEMO,
        epilog="example:\n  python -m attention_ref demo",
    )
    from .explore import add_arguments as explore_arguments

    explore_arguments(sub.add_parser("explore", help="write the attention explorer: a web page of attention maps"))
    from .oracle import add_oracle_commands

    add_oracle_commands(sub)  # check, vectors
    from .figures import add_arguments as figures_arguments

    figures_arguments(sub.add_parser("figures", help="train the toy models and redraw the gallery of figures"))
    from .complexity import add_arguments as complexity_arguments

    complexity_arguments(
        sub.add_parser("complexity", help="time and memory of exact, tiled, linear, window and neighborhood attention")
    )
    from .bench import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="speed and memory of attention against the machine's limit and torch"))
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that cannot be written (status 4, nothing created)."""
    if args.command in ("explore", "complexity"):
        check_output_file("--out", args.out)
    elif args.command == "bench" and args.json is not None:
        check_output_file("--json", args.json)
    elif args.command in ("figures", "vectors"):
        check_output_dir("--out", args.out)


def _run(args: argparse.Namespace) -> int:
    from .oracle import ORACLE_COMMANDS, run_oracle_command

    _check_outputs(args)
    if args.command in ORACLE_COMMANDS:
        return run_oracle_command(args)
    if args.command == "demo":
        from .demo import main as demo

        demo()
        return 0
    if args.command == "complexity":
        from .complexity import main as complexity

        complexity(args)
        return 0
    if args.command == "bench":
        from .bench import main as bench

        return bench(args)
    if args.command == "figures":
        from .figures import main as figures

        return figures(args)
    if args.command == "explore":
        from .explore import main as explore

        return explore(args)
    raise AssertionError(args.command)  # argparse lets only the commands above through


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m attention_ref`` with ``argv`` (default: the process's); returns the exit status.

    A command line that does not parse exits with status 2 through argparse (one line on stderr). The
    errors a command can meet — :class:`~attention_ref.cli.common.CommandError`, a ``ValueError`` or
    ``TypeError`` about the values given, an ``OSError`` or ``MemoryError``, Ctrl-C — are one line on
    stderr and the exit status that ``--help`` lists; ``ATTENTION_REF_TRACEBACK=1`` lets them through.
    """
    where = PROG
    try:
        args = _parser().parse_args(argv)
        where = f"{PROG} {args.command}"
        return _run(args)
    except KeyboardInterrupt:
        if _traceback_wanted():
            raise
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, ValueError, TypeError, OSError, MemoryError) as err:
        if _traceback_wanted():
            raise
        if isinstance(err, CommandError):
            status, message = err.status, str(err)
        elif isinstance(err, MemoryError):
            status, message = EXIT_FAILED, f"out of memory{': ' + str(err) if str(err) else ''}"
        elif isinstance(err, OSError):
            status, message = EXIT_FAILED, f"{err.strerror or err}{': ' + repr(err.filename) if err.filename else ''}"
        else:
            status, message = EXIT_USAGE, str(err)
        print(f"{where}: error: {one_line(message)}", file=sys.stderr)
        return status


def _traceback_wanted() -> bool:
    return os.environ.get("ATTENTION_REF_TRACEBACK", "").strip() not in ("", "0")
