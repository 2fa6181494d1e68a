"""The oracle's commands: ``check`` (test an implementation) and ``vectors`` (write test vectors).

::

    python -m attention_ref check package.module:function [--dtype float16] [--torch] [--grad module:function]
    python -m attention_ref vectors --out DIR [--dtype float16]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["add_oracle_commands", "load_target", "run_oracle_command"]

ORACLE_COMMANDS = ("check", "vectors")
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def add_oracle_commands(sub: Any) -> None:
    """Register ``check`` and ``vectors`` on an argparse sub-parser collection."""
    check = sub.add_parser(
        "check",
        help="check an attention implementation against the float64 reference; exit 1 on failure",
        description=(
            "Run FUNCTION on every case of the battery and print the report. FUNCTION is "
            "fn(q, k, v, *, mask=None, bias=None, scale=None) -> out on NumPy arrays, or on torch tensors "
            "with --torch (gradients then come from autograd)."
        ),
    )
    check.add_argument("target", metavar="package.module:function")
    check.add_argument("--dtype", default="float32", choices=_DTYPES)
    check.add_argument("--torch", action="store_true", help="FUNCTION takes torch tensors; also check autograd grads")
    check.add_argument("--device", default=None, help="torch device for --torch (default: cpu)")
    check.add_argument("--grad", metavar="package.module:function", help="NumPy grad_fn -> (dq, dk, dv)")
    check.add_argument("--cases", help="comma-separated case names (default: the whole battery)")
    check.add_argument("--masked-rows", default="zero", choices=("zero", "nan-ok"))
    vectors = sub.add_parser(
        "vectors",
        help="write every case with its float64 reference and allowed error as .npz files + index.json",
    )
    vectors.add_argument("--out", required=True, metavar="DIR")
    vectors.add_argument("--dtype", default="float32", choices=_DTYPES)


def load_target(target: str) -> Any:
    """The object named by ``"package.module:attribute"`` (attributes may be dotted)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected package.module:function, got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def run_oracle_command(args: argparse.Namespace) -> int:
    """Run ``check`` or ``vectors``; the exit status (0 ok, 1 failed checks, 2 an unusable target)."""
    from .. import testing

    if args.command == "vectors":
        path = testing.write_vectors(args.out, args.dtype)
        print(f"wrote {len(testing.CASE_NAMES)} cases in {args.dtype} to {path.parent} (index: {path.name})")
        return 0
    try:
        fn = load_target(args.target)
        grad_fn = load_target(args.grad) if args.grad else None
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        print(f"python -m attention_ref check: error: {err}", file=sys.stderr)
        return 2
    if args.torch:
        fn, torch_grad_fn = testing.from_torch(fn, device=args.device)
        grad_fn = grad_fn or torch_grad_fn
    cases = None if not args.cases else [c.strip() for c in args.cases.split(",") if c.strip()]
    report = testing.check_attention(fn, grad_fn=grad_fn, dtype=args.dtype, cases=cases, masked_rows=args.masked_rows)
    print(report)
    return 0 if report.ok else 1
