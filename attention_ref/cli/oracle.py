"""The oracle's commands: ``check`` (test an implementation) and ``vectors`` (write test vectors).

::

    python -m attention_ref check package.module:function [--dtype float16] [--policy fused|eager] [--torch]
                                  [--device cuda] [--grad module:function] [--cases "a,b"] [--layout bhnd|bnhd]
                                  [--masked-rows zero|nan-ok|finite-ok] [--unsupported "d != dv"]
                                  [--missing-ok "masks"] [-v]
    python -m attention_ref vectors --out DIR [--dtype float16] [--policy fused|eager] [--cases "a,b"]

Exit status: 0 when every check passed, 1 when a check failed, 2 for a usage error (an unknown case,
feature or function, an empty case list, a function whose signature the harness cannot call — e.g.
``attn_mask=`` instead of ``mask=`` —, a torch function without ``--torch`` or a NumPy function with it,
``--device`` without ``--torch`` or naming a device torch does not have): one line on stderr that names
what is valid, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["add_oracle_commands", "load_target", "run_oracle_command"]

ORACLE_COMMANDS = ("check", "vectors")
_DTYPES = ("float16", "bfloat16", "float32", "float64")


class UsageError(Exception):
    """A mistake in the command line: exit status 2, one line on stderr."""


def add_oracle_commands(sub: Any) -> None:
    """Register ``check`` and ``vectors`` on an argparse sub-parser collection."""
    check = sub.add_parser(
        "check",
        help="check an attention implementation against the float64 reference; exit 1 on failure",
        description=(
            "Run FUNCTION on every case of the battery and print a summary and the failing rows (-v: every row). "
            "FUNCTION is fn(q, k, v, *, mask=None, bias=None, scale=None) -> out on NumPy arrays, or on torch "
            "tensors with --torch (gradients then come from autograd). Exit status 0 passed, 1 failed, 2 usage error."
        ),
    )
    check.add_argument("target", metavar="package.module:function", help="the attention function to check")
    check.add_argument("--dtype", default="float32", choices=_DTYPES, help="the dtype of its inputs (default float32)")
    check.add_argument(
        "--policy",
        default="fused",
        choices=("fused", "eager"),
        help="fused (default): logits and softmax kept in float32, as FlashAttention and PyTorch's SDPA; eager: "
        "logits and softmax rounded to the dtype op by op, as eager half-precision code",
    )
    check.add_argument("--torch", action="store_true", help="FUNCTION takes torch tensors; also check autograd grads")
    check.add_argument("--device", default=None, help="torch device for --torch (default: cpu)")
    check.add_argument(
        "--layout",
        choices=("bhnd", "bnhd"),
        default=None,
        help="pass every case 4-D: (B, H, N, d) or FlashAttention's (B, N, H, d) (default: each case's own shape)",
    )
    check.add_argument("--grad", metavar="package.module:function", help="NumPy grad_fn -> (dq, dk, dv)")
    check.add_argument("--cases", help="comma-separated case names (default: the whole battery)")
    check.add_argument(
        "--masked-rows",
        default="zero",
        choices=("zero", "nan-ok", "finite-ok"),
        help="what a query row with no allowed key must give: 0 (default), 0 or NaN, any finite value",
    )
    check.add_argument(
        "--unsupported",
        metavar="FEATURES",
        help="comma-separated case features FUNCTION does not take, e.g. 'd != dv,custom scale' (default: its "
        "own `unsupported` attribute); those cases are reported as not supported",
    )
    check.add_argument(
        "--missing-ok",
        metavar="GROUPS",
        help="comma-separated core groups (long sequence, large logits, masks) FUNCTION may leave unrun and still pass",
    )
    check.add_argument("-v", "--verbose", action="store_true", help="print every row, not only the failing ones")
    vectors = sub.add_parser(
        "vectors",
        help="write every case with its float64 reference and allowed error as .npz files + index.json",
        description=(
            "Write the battery's cases as test vectors for implementations in other languages: one .npz per case "
            "(the inputs in --dtype, the float64 reference output and gradients, the allowed errors) and an "
            "index.json that lists them. Exit status 0 written, 2 usage error."
        ),
    )
    vectors.add_argument("--out", required=True, metavar="DIR", help="the directory to write into")
    vectors.add_argument("--dtype", default="float32", choices=_DTYPES, help="the inputs' dtype (default float32)")
    vectors.add_argument("--policy", default="fused", choices=("fused", "eager"), help="the allowance's policy")
    vectors.add_argument("--cases", help="comma-separated case names (default: the whole battery)")


def load_target(target: str) -> Any:
    """The object named by ``"package.module:attribute"`` (attributes may be dotted).

    ``ValueError`` (naming what is there) for a malformed target, a module that does not import, or a
    missing or non-callable attribute.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected package.module:function, got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = getattr(obj, "__all__", [n for n in dir(obj) if not n.startswith("_")])
            names = sorted(n for n in public if callable(getattr(obj, n, None)))
            raise ValueError(f"{module_name} has no {attr!r}; its callables: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target} is not callable")
    return obj


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list; ``None`` when the option was not given."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _torch_device(device: str) -> None:
    """``UsageError`` unless torch can put a tensor on ``device``."""
    try:
        import torch
    except ImportError as err:
        raise UsageError(f"--device {device} needs torch, which is not installed") from err
    try:
        torch.empty(0, device=device)
    except Exception as err:  # no CUDA build, no such device, a malformed name
        cuda = " (torch sees no CUDA device)" if device.startswith("cuda") and not torch.cuda.is_available() else ""
        raise UsageError(f"--device {device}: torch {torch.__version__} cannot use it{cuda}: {err}") from err


def _check(args: argparse.Namespace) -> int:
    from .. import testing

    if args.device is not None and not args.torch:
        raise UsageError("--device says where a torch function runs: it needs --torch")
    try:
        fn = load_target(args.target)
        grad_fn = load_target(args.grad) if args.grad else None
    except ValueError as err:
        raise UsageError(err) from err
    if args.device is not None:
        _torch_device(args.device)
    try:
        if args.torch:
            fn, torch_grad_fn = testing.from_torch(fn, device=args.device)
            grad_fn = grad_fn or torch_grad_fn
        report = testing.check_attention(
            fn,
            grad_fn,
            dtype=args.dtype,
            cases=_names(args.cases),
            masked_rows=args.masked_rows,
            policy=args.policy,
            unsupported=_names(args.unsupported),
            layout=args.layout,
            missing_ok=_names(args.missing_ok) or (),
        )
    except (ValueError, TypeError) as err:  # bad names, an empty list, a signature or kind of function it cannot call
        raise UsageError(err) from err
    print(report.format(verbose=args.verbose))
    return 0 if report.ok else 1


def run_oracle_command(args: argparse.Namespace) -> int:
    """Run ``check`` or ``vectors``; the exit status (0 ok, 1 failed checks, 2 a usage error)."""
    from .. import testing

    try:
        if args.command == "check":
            return _check(args)
        try:
            path = testing.write_vectors(args.out, args.dtype, cases=_names(args.cases), policy=args.policy)
        except ValueError as err:
            raise UsageError(err) from err
        count = len(_names(args.cases) or testing.CASE_NAMES)
        print(f"wrote {count} cases in {args.dtype} ({args.policy} policy) to {path.parent} (index: {path.name})")
        return 0
    except UsageError as err:
        message = " ".join(str(err).split())  # one line
        print(f"python -m attention_ref {args.command}: error: {message}", file=sys.stderr)
        return 2
