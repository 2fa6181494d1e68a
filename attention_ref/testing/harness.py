"""``check_attention``: run an implementation on every case and compare it with the reference.

The implementation under test is one or two plain functions on NumPy arrays:

* ``fn(q, k, v, *, mask=None, bias=None, scale=None) -> out``
* ``grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None) -> (dq, dk, dv)``

Arrays come in the dtype under test (``mask`` is boolean, True = may attend;
logits are ``scale·q kᵀ + bias``; ``scale=None`` means ``1/sqrt(d)``) and must come
back in that dtype. Wrap a torch function with :func:`~attention_ref.testing.from_torch`:
``check_attention(*from_torch(torch_fn))``.

An implementation that cannot take some cases says so, either up front — an
``unsupported`` collection of :data:`~attention_ref.testing.cases.FEATURES`
(``"d != dv"``, ``"custom scale"``, ...), given to :func:`check_attention` or set as
``fn.unsupported`` — or by raising :class:`NotSupported` from ``fn``. Those cases are
reported as "not supported", not failed; a core group of cases
(:data:`~attention_ref.testing.cases.CORE_CASES`) that never ran makes the report not ok
unless the caller accepts it by name. A 4-D-only kernel asks for ``layout="bhnd"`` or
``"bnhd"``. Every verdict is judged under a named policy (``"fused"`` by default,
``"eager"``: :mod:`.tolerance`) and says which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from .cases import CORE_CASES, FEATURES, Case, select_cases
from .compare import compare_output, exception_check, unsupported_check
from .dtypes import dtype_name
from .layouts import LAYOUTS, from_layout, to_layout
from .policy import DEFAULT_POLICY, OUTPUTS, Policy, check_policy
from .report import OutputCheck, Report
from .tolerance import reference
from .usage import UsageError, check_signature, grads_tuple, numpy_function_hint, torch_hint

__all__ = [
    "LAYOUTS",
    "MASKED_ROWS",
    "NotSupported",
    "UsageError",
    "assert_attention_close",
    "check_attention",
    "compare_output",
    "exception_check",
]


MASKED_ROWS = ("zero", "nan-ok", "finite-ok")

# Rows of out and dq belong to query rows; dk and dv to key rows.
_QUERY_ROW_OUTPUTS = ("out", "dq")


class NotSupported(Exception):
    """Raise it from ``fn`` or ``grad_fn`` for inputs the implementation does not take (the message says why):
    the case is reported as not supported instead of failed."""


def _fresh(inputs: dict[str, Any]) -> dict[str, Any]:
    """Copies of the inputs, so an implementation that writes into them cannot spoil later calls."""
    return {n: a.copy() if isinstance(a, np.ndarray) else a for n, a in inputs.items()}


def _declared(fn: Any, grad_fn: Any, unsupported: Collection[str] | None) -> frozenset[str]:
    """The features declared unsupported: the argument, else ``fn.unsupported`` / ``grad_fn.unsupported``."""
    if unsupported is None:
        unsupported = [*getattr(fn, "unsupported", ()), *getattr(grad_fn, "unsupported", ())]
    if isinstance(unsupported, str):
        unsupported = [unsupported]
    declared = frozenset(unsupported)
    unknown = declared - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)} in unsupported; the features are: {', '.join(FEATURES)}")
    return declared


def _core_report(chosen: Sequence[Case], ran: set[str], missing_ok: frozenset[str]) -> tuple[tuple[str, ...], str]:
    """The core groups (:data:`~.cases.CORE_CASES`) that were selected but never ran, and a headline about them."""
    never = []
    for group, names in CORE_CASES.items():
        selected = [c.name for c in chosen if c.name in names]
        if selected and not any(n in ran for n in selected):
            never.append(group)
    missing = tuple(g for g in never if g not in missing_ok)
    accepted = tuple(g for g in never if g in missing_ok)
    lines = []
    if missing:
        named = "; ".join(f"{g} ({', '.join(n for n in CORE_CASES[g] if n in {c.name for c in chosen})})"
                          for g in missing)  # fmt: skip
        lines.append(
            f"CORE CASES NEVER RAN: {named} — not ok: these are where kernels break; support them, or accept their "
            f"absence by name with missing_ok={missing!r}"
        )
    if accepted:
        lines.append(f"core cases not run (accepted by missing_ok): {', '.join(accepted)}")
    return missing, "\n".join(lines)


def check_attention(
    fn: Callable[..., Any] | None,
    grad_fn: Callable[..., Any] | None = None,
    *,
    dtype: Any = "float32",
    cases: Sequence[Case | str] | Case | str | None = None,
    masked_rows: str = "zero",
    policy: Policy | str = DEFAULT_POLICY,
    unsupported: Collection[str] | None = None,
    layout: str | None = None,
    missing_ok: Collection[str] = (),
) -> Report:
    """Check an attention implementation (and optionally its gradients) on the battery.

    Inputs:
        fn: ``fn(q, k, v, *, mask, bias, scale) -> out`` on NumPy arrays of ``dtype``; ``None`` to check only
            ``grad_fn``.
        grad_fn: ``grad_fn(q, k, v, dout, *, mask, bias, scale) -> (dq, dk, dv)``, or ``None``. Positional, so
            that ``check_attention(*from_torch(torch_fn))`` works.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``, or the NumPy or torch dtype itself
            (``np.float16``, ``np.dtype("float32")``, ``torch.bfloat16``).
        cases: ``None`` for the whole battery, or a non-empty list of names from it and/or your own :class:`Case`
            objects.
        masked_rows: what a query row with no allowed key must give in ``out`` and ``dq``:
            ``"zero"`` (default): 0, as the reference does;
            ``"nan-ok"``: 0 or NaN (``dk``, ``dv`` are still checked everywhere: a NaN row must not leak into them);
            ``"finite-ok"``: any finite value (e.g. the mean of ``v``, from masking with a large negative number
            instead of ``-inf``); ``grad_fn`` then gets ``dout`` with those rows set to 0, so that ``dk`` and
            ``dv`` (which get nothing from such a row in the reference) stay comparable.
        policy: what the implementation may do and the tolerance constants: ``"fused"`` (the default: logits,
            softmax statistics and every sum in float32 — FlashAttention, PyTorch's fused SDPA backends),
            ``"eager"`` (logits and softmax stored in the dtype op by op — eager half-precision code), or a
            :class:`~attention_ref.testing.tolerance.Policy`. A kernel that fails ``"fused"`` in float16 or
            bfloat16 but would pass ``"eager"`` is told so in one line of the report.
        unsupported: features of :data:`~attention_ref.testing.cases.FEATURES` the implementation does not take
            (e.g. ``{"d != dv", "custom scale"}``); cases that have one are reported as not supported. Default:
            ``fn.unsupported`` (and ``grad_fn.unsupported``) when set. ``fn`` may also raise :class:`NotSupported`.
        layout: ``None`` (default): the arrays keep each case's own shape ``(..., N, d)``, from ``(N, d)`` to
            ``(B, H, N, d)``; ``"bhnd"``: always 4-D ``(B, H, N, d)`` (PyTorch's SDPA); ``"bnhd"``: always 4-D
            ``(B, N, H, d)`` (FlashAttention's ``flash_attn_func``). The case's leading dims become ``(B, H)``
            (``H = 1``, ``B = 1`` where it has none); ``mask`` and ``bias`` are 4-D in the logits' order
            ``(B, H, N, M)`` in both layouts, with size-1 axes to broadcast; outputs come back in the layout.
        missing_ok: core groups of :data:`~attention_ref.testing.cases.CORE_CASES` (``"long sequence"``,
            ``"large logits"``, ``"masks"``) the caller accepts as never run. A selected core group none of whose
            cases ran (declared unsupported) makes the report not ok, with a headline naming it.

    Returns:
        :class:`Report`, one :class:`OutputCheck` per case and output; ``report.ok``; ``print(report)``.
        An exception raised by ``fn`` or ``grad_fn`` is recorded as a failure of that case, not re-raised.

    Raises:
        ValueError for bad arguments (an empty ``cases``, an unknown case name, dtype, ``masked_rows``, layout,
        feature or core group); :class:`UsageError` (a ``TypeError``) when the implementation cannot be called
        as the harness calls it: a signature without ``mask``/``bias``/``scale``, a torch function given NumPy
        arrays (the message says to wrap it with :func:`~attention_ref.testing.from_torch`) or a NumPy function
        given tensors by it, a ``grad_fn`` returning a dict.
    """
    if fn is None and grad_fn is None:
        raise ValueError("check_attention needs fn, grad_fn, or both")
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows must be one of {', '.join(MASKED_ROWS)}; got {masked_rows!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be None, 'bhnd' or 'bnhd'; got {layout!r}")
    missing_ok = frozenset([missing_ok] if isinstance(missing_ok, str) else missing_ok)
    if missing_ok - set(CORE_CASES):
        raise ValueError(
            f"unknown core groups {sorted(missing_ok - set(CORE_CASES))} in missing_ok; the groups: "
            f"{', '.join(CORE_CASES)}"
        )
    dtype = dtype_name(dtype)
    policy = check_policy(policy)
    declared = _declared(fn, grad_fn, unsupported)
    for f, role, n in ((fn, "fn", 3), (grad_fn, "grad_fn", 4)):
        if f is not None:
            check_signature(f, role, n)
    chosen = select_cases(cases)
    wanted = [o for o in OUTPUTS if (o == "out" and fn is not None) or (o != "out" and grad_fn is not None)]
    checks: list[OutputCheck] = []
    kept: dict[str, tuple[Case, dict[str, Any]]] = {}  # each case's results, for the other policy's verdict
    for case in chosen:
        missing = sorted(case.features & declared)
        if missing:
            checks.extend(unsupported_check(case.name, o, ", ".join(missing)) for o in wanted)
            continue
        ref = reference(case, dtype, policy)
        results = _run(fn, grad_fn, case, ref, masked_rows, layout)
        kept[case.name] = (case, results)
        checks.extend(_judge(case, ref, results, wanted, dtype, policy, masked_rows))
    ran = {c.case for c in checks if c.supported}
    missing_core, headline = _core_report(chosen, ran, missing_ok)
    notes = [headline] if headline else []
    if any(c.failed for c in checks) and policy.arithmetic == "fused" and dtype in ("float16", "bfloat16"):
        notes.extend(_eager_verdict(checks, kept, wanted, dtype, policy, masked_rows))
    return Report(dtype=dtype, checks=tuple(checks), masked_rows=masked_rows, policy=policy.name,
                  notes=tuple(notes), missing_core=missing_core)  # fmt: skip


def _run(fn: Any, grad_fn: Any, case: Case, ref: Any, masked_rows: str, layout: str | None) -> dict[str, Any]:
    """Call ``fn`` and ``grad_fn`` on one case; per output, the array returned (in the case's own shape) or the
    exception raised. Usage errors are raised."""
    lead, N, M = case.q.shape[:-2], case.q.shape[-2], case.k.shape[-2]
    d, dv = case.q.shape[-1], case.v.shape[-1]
    results: dict[str, Any] = {}

    def inputs() -> dict[str, Any]:
        x = _fresh(ref.inputs)
        if masked_rows == "finite-ok" and case.dead_rows.any():
            x["dout"] = np.where(case.dead_rows[..., None], 0, x["dout"]).astype(x["dout"].dtype)
        for n in ("q", "k", "v", "dout"):
            x[n] = to_layout(x[n], lead, layout)
        for n in ("mask", "bias"):
            x[n] = to_layout(x[n], lead, layout, logits=True)
        return x

    kw = ("mask", "bias", "scale")
    if fn is not None:
        x = inputs()
        try:
            results["out"] = from_layout(fn(x["q"], x["k"], x["v"], **{n: x[n] for n in kw}), lead, N, dv, layout)
        except UsageError:
            raise
        except Exception as err:
            results["out"] = err
    if grad_fn is not None:
        x = inputs()
        try:
            grads = grads_tuple(grad_fn(x["q"], x["k"], x["v"], x["dout"], **{n: x[n] for n in kw}))
            shapes = ((N, d), (M, d), (M, dv))
            for o, g, (rows, cols) in zip(("dq", "dk", "dv"), grads, shapes, strict=True):
                results[o] = from_layout(g, lead, rows, cols, layout)
        except UsageError:
            raise
        except Exception as err:
            results.update(dq=err, dk=err, dv=err)
    for result in results.values():
        if isinstance(result, Exception) and not isinstance(result, NotSupported):
            if hint := torch_hint(result):  # a torch function given NumPy arrays: a usage error, said once
                raise UsageError(hint) from result
            if hint := numpy_function_hint(result):  # a NumPy function given tensors (by from_torch)
                raise UsageError(hint) from result
    return results


def _judge(case: Case, ref: Any, results: dict[str, Any], wanted: list[str], dtype: str, policy: Policy,
           masked_rows: str) -> list[OutputCheck]:  # fmt: skip
    """One row per output: the comparison, an exception's failed row, or a not-supported row."""
    dead = case.dead_rows if masked_rows != "zero" else None
    rows = []
    for output in wanted:
        result = results[output]
        if isinstance(result, NotSupported):
            rows.append(unsupported_check(case.name, output, str(result) or type(result).__name__))
        elif isinstance(result, Exception):
            rows.append(exception_check(case.name, output, result))
        else:
            rows.append(
                compare_output(
                    case.name,
                    output,
                    result,
                    ref.exact[output],
                    ref.kernel_error[output],
                    ref.magnitude[output],
                    dtype,
                    policy=policy,
                    excused_rows=dead if output in _QUERY_ROW_OUTPUTS else None,
                    excuse="finite" if masked_rows == "finite-ok" else "nan",
                    groups=ref.groups[output],
                    last_rounding=True,
                )
            )
    return rows


def _eager_verdict(checks: list[OutputCheck], kept: dict[str, tuple[Case, dict[str, Any]]], wanted: list[str],
                   dtype: str, policy: Policy, masked_rows: str) -> list[str]:  # fmt: skip
    """One line when every failure under ``fused`` is a number that ``eager`` would accept."""
    failed = [c for c in checks if c.failed]
    if any(not np.isfinite(c.error) for c in failed):  # NaN, an exception, a wrong shape: no policy excuses it
        return []
    eager = dataclasses.replace(policy, arithmetic="eager")
    worst = 0.0
    for name in dict.fromkeys(c.case for c in failed):
        case, results = kept[name]
        again = _judge(case, reference(case, dtype, eager), results, wanted, dtype, eager, masked_rows)
        if any(c.failed for c in again):
            return []
        worst = max([worst, *(c.ratio for c in again)])
    return [
        f"fails the fused policy but passes eager (worst ratio {worst:.3g} there): it rounds the logits or the "
        f"softmax to {dtype}, as eager code does, where FlashAttention-class kernels keep them in float32 — "
        "if that is what it is meant to do, check it with policy='eager'"
    ]


def assert_attention_close(
    fn: Callable[..., Any] | None, grad_fn: Callable[..., Any] | None = None, **kwargs: Any
) -> Report:
    """:func:`check_attention`, raising ``AssertionError`` with the printed report when any check fails.

    Returns the report when everything passed (so its ratios can be inspected or printed).
    """
    report = check_attention(fn, grad_fn, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
