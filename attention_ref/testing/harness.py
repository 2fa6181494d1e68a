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
reported as "not supported", not failed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from ..backend import to_numpy
from .cases import FEATURES, Case, select_cases
from .dtypes import half_spacing, numpy_dtype
from .report import OutputCheck, Report
from .tolerance import DEFAULT_POLICY, OUTPUTS, Group, Policy, check_policy, reference

__all__ = [
    "MASKED_ROWS",
    "NotSupported",
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


def compare_output(
    case: str,
    output: str,
    got: Any,
    x64: np.ndarray,
    kernel_error: float,
    magnitude: float,
    dtype: str,
    *,
    policy: Policy | str = DEFAULT_POLICY,
    kind: str | None = None,
    excused_rows: np.ndarray | None = None,
    excuse: str = "nan",
    groups: Sequence[Group] | None = None,
    last_rounding: bool = False,
) -> OutputCheck:
    """Compare one output with its float64 reference ``x64`` (see :mod:`.tolerance` for the rule).

    ``kernel_error`` is the yardstick for this output and ``magnitude`` the magnitude of its terms
    (:class:`~attention_ref.testing.tolerance.Reference`); ``groups`` (:class:`~.tolerance.Group`) replaces them
    by several groups of entries, each judged by its own (the ratio is the largest).

    ``kind``: which of the policy's outputs (``"out"``, ``"dq"``, ...) sets the constants; default ``output``.
    ``excused_rows``: boolean ``(..., rows)`` — rows on which ``excuse`` is accepted: ``"nan"`` (NaN there is
    not an error: ``masked_rows="nan-ok"``) or ``"finite"`` (any finite value: ``masked_rows="finite-ok"``).
    ``last_rounding``: deduct from each entry's error the output's own last rounding to the dtype — half the
    dtype's spacing at the value returned, the most rounding to nearest can have moved it (the yardstick then
    leaves that rounding out too).
    """
    policy = check_policy(policy)
    if groups is None:
        groups = (Group(None, kernel_error, magnitude),)

    def fail(note: str, where: tuple[int, ...] | None = None, got_value: float = np.nan) -> OutputCheck:
        expected = float(x64[where]) if where is not None else np.nan
        allowed, floor = policy.allowed(kind or output, groups[0].magnitude, groups[0].kernel_error, dtype)
        return OutputCheck(case=case, output=output, error=np.inf, where=where, ratio=np.inf, got=got_value,
                           expected=expected, note=note, allowed=allowed, kernel_error=groups[0].kernel_error,
                           floor=floor)  # fmt: skip

    try:  # NumPy is expected; a CuPy array or a (float32/16/64, bfloat16) torch tensor is brought over too
        arr = got if isinstance(got, np.ndarray) else _as_numpy(got)
    except Exception as err:  # an object NumPy cannot read
        return fail(f"returned {type(got).__name__}, not an array ({err})")
    if arr.shape != x64.shape:
        return fail(f"shape {arr.shape}, expected {x64.shape}")
    if arr.dtype != numpy_dtype(dtype):
        return fail(f"dtype {arr.dtype}, expected {dtype}")
    g = arr.astype(np.float64)
    excused = np.zeros(g.shape, dtype=bool)
    if excused_rows is not None:
        rows = np.broadcast_to(excused_rows[..., None], g.shape)
        excused = rows & (np.isnan(g) if excuse == "nan" else np.isfinite(g))
    bad = ~np.isfinite(g) & ~excused & np.isfinite(x64)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return fail(f"{g[where]} where the reference is finite", where, float(g[where]))
    with np.errstate(invalid="ignore"):
        diff = np.abs(np.where(excused, 0.0, g) - x64)
        if last_rounding:  # the output's own rounding to the dtype, at most half a spacing at the value returned
            diff = np.maximum(diff - half_spacing(np.where(excused, 0.0, g), dtype), 0.0)
    diff = np.where(excused, 0.0, diff)
    worst: OutputCheck | None = None
    for group in groups:
        allowed, floor = policy.allowed(kind or output, group.magnitude, group.kernel_error, dtype)
        numbers = {"allowed": allowed, "kernel_error": group.kernel_error, "floor": floor}
        part = diff if group.where is None else np.where(group.where, diff, -1.0)
        if part.size == 0 or not np.any(part >= 0):
            check = OutputCheck(case=case, output=output, error=0.0, where=None, ratio=0.0, **numbers)
        else:
            where = tuple(int(i) for i in np.unravel_index(int(np.argmax(part)), part.shape))
            error = float(part[where])
            ratio = error / allowed if allowed > 0 else (0.0 if error == 0 else np.inf)
            note = f"on the {group.label}" if group.label and ratio > 0 else ""
            check = OutputCheck(case=case, output=output, error=error, where=where, ratio=ratio, got=float(g[where]),
                                expected=float(x64[where]), note=note, **numbers)  # fmt: skip
        if worst is None or check.ratio > worst.ratio:
            worst = check
    assert worst is not None
    return worst


def _as_numpy(got: Any) -> np.ndarray:
    """A NumPy array of ``got``: a torch tensor of any dtype (bfloat16 through ml_dtypes), a CuPy array, ..."""
    if type(got).__module__.startswith("torch"):
        from .torch_wrap import torch_to_numpy

        return torch_to_numpy(got)
    return to_numpy(got)


def exception_check(case: str, output: str, err: BaseException) -> OutputCheck:
    """A failed row for an implementation (or module) that raised ``err``."""
    message = f"raised {type(err).__name__}: {err}".replace("\n", " ")
    return OutputCheck(case=case, output=output, error=np.inf, where=None, allowed=np.nan, ratio=np.inf,
                       note=message[:160])  # fmt: skip


def _unsupported_check(case: str, output: str, reason: str) -> OutputCheck:
    return OutputCheck(case=case, output=output, error=np.nan, where=None, allowed=np.nan, ratio=np.nan,
                       note=f"not supported: {reason}", supported=False)  # fmt: skip


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


_NDARRAY_LACKS = re.compile(r"'numpy\.ndarray' object has no attribute '(\w+)'")


def _torch_hint(err: BaseException) -> str | None:
    """A hint when ``err`` is a torch function complaining about the NumPy arrays it was given.

    Recognised: torch naming a ``Tensor`` it expected together with the NumPy type it got ("must be Tensor, not
    numpy.ndarray", "invalid combination of arguments ... dtype=numpy.dtype"), or an ndarray lacking a method
    that torch tensors have (``masked_fill``, ``transpose(-1, -2)``'s cousins).
    """
    message = str(err)
    lacks = _NDARRAY_LACKS.search(message)
    if lacks is not None:
        try:
            import torch
        except ImportError:
            return None
        torch_method = hasattr(torch.Tensor, lacks.group(1))
    else:
        torch_method = False
    if not torch_method and not ("Tensor" in message and ("numpy" in message or "ndarray" in message)):
        return None
    one_line = " ".join(message.split())[:200]
    return (
        f"the function takes torch tensors, not the NumPy arrays it was given ({type(err).__name__}: {one_line}); "
        "wrap it with attention_ref.testing.from_torch (on the command line: add --torch)"
    )


def check_attention(
    fn: Callable[..., Any] | None,
    grad_fn: Callable[..., Any] | None = None,
    *,
    dtype: str = "float32",
    cases: Sequence[Case | str] | Case | str | None = None,
    masked_rows: str = "zero",
    policy: Policy = DEFAULT_POLICY,
    unsupported: Collection[str] | None = None,
) -> Report:
    """Check an attention implementation (and optionally its gradients) on the battery.

    Inputs:
        fn: ``fn(q, k, v, *, mask, bias, scale) -> out`` on NumPy arrays of ``dtype``; ``None`` to check only
            ``grad_fn``.
        grad_fn: ``grad_fn(q, k, v, dout, *, mask, bias, scale) -> (dq, dk, dv)``, or ``None``. Positional, so
            that ``check_attention(*from_torch(torch_fn))`` works.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        cases: ``None`` for the whole battery, or a non-empty list of names from it and/or your own :class:`Case`
            objects.
        masked_rows: what a query row with no allowed key must give in ``out`` and ``dq``:
            ``"zero"`` (default): 0, as the reference does;
            ``"nan-ok"``: 0 or NaN (``dk``, ``dv`` are still checked everywhere: a NaN row must not leak into them);
            ``"finite-ok"``: any finite value (e.g. the mean of ``v``, from masking with a large negative number
            instead of ``-inf``); ``grad_fn`` then gets ``dout`` with those rows set to 0, so that ``dk`` and
            ``dv`` (which get nothing from such a row in the reference) stay comparable.
        policy: the tolerance constants (:class:`~attention_ref.testing.tolerance.Policy`).
        unsupported: features of :data:`~attention_ref.testing.cases.FEATURES` the implementation does not take
            (e.g. ``{"d != dv", "custom scale"}``); cases that have one are reported as not supported. Default:
            ``fn.unsupported`` (and ``grad_fn.unsupported``) when set. ``fn`` may also raise :class:`NotSupported`.

    Returns:
        :class:`Report`, one :class:`OutputCheck` per case and output; ``report.ok``; ``print(report)``.
        An exception raised by ``fn`` or ``grad_fn`` is recorded as a failure of that case, not re-raised.

    Raises:
        ValueError for bad arguments (an empty ``cases``, an unknown case name, dtype, ``masked_rows`` or
        feature); TypeError when ``fn`` is a torch function given NumPy arrays (the message says to wrap it
        with :func:`~attention_ref.testing.from_torch`).
    """
    if fn is None and grad_fn is None:
        raise ValueError("check_attention needs fn, grad_fn, or both")
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows must be one of {', '.join(MASKED_ROWS)}; got {masked_rows!r}")
    numpy_dtype(dtype)  # validates the name early
    policy = check_policy(policy)
    declared = _declared(fn, grad_fn, unsupported)
    chosen = select_cases(cases)
    wanted = [o for o in OUTPUTS if (o == "out" and fn is not None) or (o != "out" and grad_fn is not None)]
    checks: list[OutputCheck] = []
    for case in chosen:
        missing = sorted(case.features & declared)
        if missing:
            checks.extend(_unsupported_check(case.name, o, ", ".join(missing)) for o in wanted)
            continue
        ref = reference(case, dtype, policy)
        dead = case.dead_rows if masked_rows != "zero" else None
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
            if masked_rows == "finite-ok" and case.dead_rows.any():
                x["dout"] = np.where(case.dead_rows[..., None], 0, x["dout"]).astype(x["dout"].dtype)
            try:
                grads = grad_fn(x["q"], x["k"], x["v"], x["dout"], **{n: x[n] for n in kw})
                if len(grads) != 3:
                    raise ValueError(f"grad_fn must return (dq, dk, dv), got {len(grads)} values")
                results.update(zip(("dq", "dk", "dv"), grads, strict=True))
            except Exception as err:
                results.update(dq=err, dk=err, dv=err)
        for output in wanted:
            result = results[output]
            if isinstance(result, NotSupported):
                checks.append(_unsupported_check(case.name, output, str(result) or type(result).__name__))
            elif isinstance(result, Exception):
                if hint := _torch_hint(result):  # a torch function given NumPy arrays: a usage error, said once
                    raise TypeError(hint) from result
                checks.append(exception_check(case.name, output, result))
            else:
                query_rows = output in _QUERY_ROW_OUTPUTS
                checks.append(
                    compare_output(
                        case.name,
                        output,
                        result,
                        ref.exact[output],
                        ref.kernel_error[output],
                        ref.magnitude[output],
                        dtype,
                        policy=policy,
                        excused_rows=dead if query_rows else None,
                        excuse="finite" if masked_rows == "finite-ok" else "nan",
                        groups=ref.groups[output],
                        last_rounding=True,
                    )
                )
    return Report(dtype=dtype, checks=tuple(checks), masked_rows=masked_rows)


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
