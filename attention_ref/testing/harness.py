"""``check_attention``: run an implementation on every case and compare it with the reference.

The implementation under test is one or two plain functions on NumPy arrays:

* ``fn(q, k, v, *, mask=None, bias=None, scale=None) -> out``
* ``grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None) -> (dq, dk, dv)``

Arrays come in the dtype under test (``mask`` is boolean, True = may attend;
logits are ``scale·q kᵀ + bias``; ``scale=None`` means ``1/sqrt(d)``) and must come
back in that dtype. Wrap a torch function with :func:`~attention_ref.testing.from_torch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backend import to_numpy
from .cases import Case, select_cases
from .dtypes import numpy_dtype
from .report import OutputCheck, Report
from .tolerance import DEFAULT_POLICY, OUTPUTS, Policy, reference

__all__ = ["MASKED_ROWS", "assert_attention_close", "check_attention", "compare_output"]

MASKED_ROWS = ("zero", "nan-ok")

# Rows of out and dq belong to query rows; dk and dv to key rows.
_QUERY_ROW_OUTPUTS = ("out", "dq")


def compare_output(
    case: str,
    output: str,
    got: Any,
    x64: np.ndarray,
    kernel_error: float,
    magnitude: float,
    dtype: str,
    *,
    policy: Policy = DEFAULT_POLICY,
    kind: str | None = None,
    nan_ok_rows: np.ndarray | None = None,
) -> OutputCheck:
    """Compare one output with its float64 reference ``x64`` (see :mod:`.tolerance` for the rule).

    ``kernel_error`` is the kernel-like reference's error for this output and ``magnitude`` the
    magnitude of its terms (:class:`~attention_ref.testing.tolerance.Reference`).

    ``kind``: which of the policy's outputs (``"out"``, ``"dq"``, ...) sets the constants; default ``output``.
    ``nan_ok_rows``: boolean ``(..., rows)`` — rows on which NaN is accepted (``masked_rows="nan-ok"``).
    """
    allowed, floor = policy.allowed(kind or output, magnitude, kernel_error, dtype)

    def fail(note: str, where: tuple[int, ...] | None = None, got_value: float = np.nan) -> OutputCheck:
        expected = float(x64[where]) if where is not None else np.nan
        return OutputCheck(case, output, np.inf, where, allowed, np.inf, kernel_error, floor, got_value, expected, note)

    try:  # NumPy is expected; a CuPy array or a (float32/16/64) torch tensor is brought over too
        arr = got if isinstance(got, np.ndarray) else to_numpy(got)
    except Exception as err:  # an object NumPy cannot read
        return fail(f"returned {type(got).__name__}, not an array ({err})")
    if arr.shape != x64.shape:
        return fail(f"shape {arr.shape}, expected {x64.shape}")
    if arr.dtype != numpy_dtype(dtype):
        return fail(f"dtype {arr.dtype}, expected {dtype}")
    g = arr.astype(np.float64)
    excused = np.zeros(g.shape, dtype=bool)
    if nan_ok_rows is not None:
        excused = np.isnan(g) & np.broadcast_to(nan_ok_rows[..., None], g.shape)
    bad = ~np.isfinite(g) & ~excused & np.isfinite(x64)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return fail(f"{g[where]} where the reference is finite", where, float(g[where]))
    diff = np.where(excused, 0.0, np.abs(np.where(excused, 0.0, g) - x64))
    if diff.size == 0:
        return OutputCheck(case, output, 0.0, None, allowed, 0.0, kernel_error, floor)
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    error = float(diff[where])
    if allowed > 0:
        ratio = error / allowed
    else:
        ratio = 0.0 if error == 0 else np.inf
    got_value, expected = float(g[where]), float(x64[where])
    return OutputCheck(case, output, error, where, allowed, ratio, kernel_error, floor, got_value, expected)


def _exception_check(case: str, output: str, err: Exception) -> OutputCheck:
    message = f"raised {type(err).__name__}: {err}".replace("\n", " ")
    return OutputCheck(case, output, np.inf, None, np.nan, np.inf, note=message[:160])


def _fresh(inputs: dict[str, Any]) -> dict[str, Any]:
    """Copies of the inputs, so an implementation that writes into them cannot spoil later calls."""
    return {n: a.copy() if isinstance(a, np.ndarray) else a for n, a in inputs.items()}


def check_attention(
    fn: Callable[..., Any] | None,
    *,
    grad_fn: Callable[..., Any] | None = None,
    dtype: str = "float32",
    cases: Sequence[Case | str] | Case | str | None = None,
    masked_rows: str = "zero",
    policy: Policy = DEFAULT_POLICY,
) -> Report:
    """Check an attention implementation (and optionally its gradients) on the battery.

    Inputs:
        fn: ``fn(q, k, v, *, mask, bias, scale) -> out`` on NumPy arrays of ``dtype``; ``None`` to check only
            ``grad_fn``.
        grad_fn: ``grad_fn(q, k, v, dout, *, mask, bias, scale) -> (dq, dk, dv)``, or ``None``.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        cases: ``None`` for the whole battery, or names from it and/or your own :class:`Case` objects.
        masked_rows: ``"zero"`` (default): query rows with no allowed key must give 0 in ``out`` and ``dq``;
            ``"nan-ok"``: NaN is accepted on those rows (``dk``, ``dv`` are still checked everywhere).
        policy: the tolerance constants (:class:`~attention_ref.testing.tolerance.Policy`).

    Returns:
        :class:`Report`, one :class:`OutputCheck` per case and output; ``report.ok``; ``print(report)``.
        An exception raised by ``fn`` or ``grad_fn`` is recorded as a failure of that case, not re-raised.
    """
    if fn is None and grad_fn is None:
        raise ValueError("check_attention needs fn, grad_fn, or both")
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows must be one of {MASKED_ROWS}, got {masked_rows!r}")
    numpy_dtype(dtype)  # validates the name early
    checks: list[OutputCheck] = []
    for case in select_cases(cases):
        ref = reference(case, dtype)
        dead = case.dead_rows if masked_rows == "nan-ok" else None
        results: dict[str, Any] = {}
        kw = ("mask", "bias", "scale")
        if fn is not None:
            x = _fresh(ref.inputs)
            try:
                results["out"] = fn(x["q"], x["k"], x["v"], **{n: x[n] for n in kw})
            except Exception as err:
                results["out"] = err
        if grad_fn is not None:
            x = _fresh(ref.inputs)
            try:
                grads = grad_fn(x["q"], x["k"], x["v"], x["dout"], **{n: x[n] for n in kw})
                if len(grads) != 3:
                    raise ValueError(f"grad_fn must return (dq, dk, dv), got {len(grads)} values")
                results.update(zip(("dq", "dk", "dv"), grads, strict=True))
            except Exception as err:
                results.update(dq=err, dk=err, dv=err)
        for output in OUTPUTS:
            if isinstance(results.get(output), Exception):
                checks.append(_exception_check(case.name, output, results[output]))
            elif output in results:
                checks.append(
                    compare_output(
                        case.name,
                        output,
                        results[output],
                        ref.exact[output],
                        ref.kernel_error[output],
                        ref.magnitude[output],
                        dtype,
                        policy=policy,
                        nan_ok_rows=dead if output in _QUERY_ROW_OUTPUTS else None,
                    )
                )
    return Report(dtype=dtype, checks=tuple(checks), masked_rows=masked_rows)


def assert_attention_close(fn: Callable[..., Any] | None, **kwargs: Any) -> Report:
    """:func:`check_attention`, raising ``AssertionError`` with the printed report when any check fails.

    Returns the report when everything passed (so its ratios can be inspected or printed).
    """
    report = check_attention(fn, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
