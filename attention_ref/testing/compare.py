"""One output against its float64 reference, by the rule of :mod:`.tolerance`; the rows for what was not compared.

:func:`compare_output` is the comparison every check of the oracle ends in (kernels, blocks, recorded calls);
:func:`exception_check` and :func:`unsupported_check` are the rows of an implementation that raised, or of a case
it does not take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import to_numpy
from .dtypes import half_spacing, numpy_dtype
from .policy import DEFAULT_POLICY, Policy, check_policy
from .report import OutputCheck
from .tolerance import Group
from .torch_wrap import torch_to_numpy

__all__ = ["compare_output", "exception_check", "numpy_of", "unsupported_check"]


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
                           floor=floor, policy=policy.name)  # fmt: skip

    try:  # NumPy is expected; a CuPy array or a (float32/16/64, bfloat16) torch tensor is brought over too
        arr = got if isinstance(got, np.ndarray) else numpy_of(got)
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
        numbers = {"allowed": allowed, "kernel_error": group.kernel_error, "floor": floor, "policy": policy.name}
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


def numpy_of(got: Any) -> np.ndarray:
    """A NumPy array of ``got``: a torch tensor of any dtype (bfloat16 through ml_dtypes), a CuPy array, ..."""
    if type(got).__module__.startswith("torch"):
        return torch_to_numpy(got)
    return to_numpy(got)


def exception_check(case: str, output: str, err: BaseException) -> OutputCheck:
    """A failed row for an implementation (or module) that raised ``err``."""
    message = f"raised {type(err).__name__}: {err}".replace("\n", " ")
    return OutputCheck(case=case, output=output, error=np.inf, where=None, allowed=np.nan, ratio=np.inf,
                       note=message[:160])  # fmt: skip


def unsupported_check(case: str, output: str, reason: str) -> OutputCheck:
    return OutputCheck(case=case, output=output, error=np.nan, where=None, allowed=np.nan, ratio=np.nan,
                       note=f"not supported: {reason}", supported=False)  # fmt: skip
