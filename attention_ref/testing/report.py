"""The verdict: one row per case and output, printable, with ``report.ok``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["OutputCheck", "Report"]


@dataclass(frozen=True)
class OutputCheck:
    """How one output of one case compared with the float64 reference.

    Attributes:
        case: the case's name.
        output: ``"out"``, ``"dq"``, ``"dk"`` or ``"dv"`` (for blocks: ``"y"``, ``"dx"``, ``"dq.weight"``, ...).
        error: ``max|X − X₆₄|`` (``inf`` for NaN/Inf where the reference is finite, or no usable result).
        where: index of that largest error (``None`` when there is no array to point into).
        allowed: the tolerance, ``c·kernel_error + floor``.
        ratio: ``error / allowed``; the check passes when it is ≤ 1.
        kernel_error: the error of the kernel-like reference (see :mod:`.tolerance`).
        floor: the dtype-resolution floor.
        got, expected: the implementation's and the reference's value at ``where``.
        note: why it failed when the reason is not a number (an exception, a wrong shape or dtype, NaN).
    """

    case: str
    output: str
    error: float
    where: tuple[int, ...] | None
    allowed: float
    ratio: float
    kernel_error: float = math.nan
    floor: float = math.nan
    got: float = math.nan
    expected: float = math.nan
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0 and not self.note


@dataclass(frozen=True)
class Report:
    """All checks of one :func:`~attention_ref.testing.check_attention` run.

    ``report.ok`` is True when every check passed; ``print(report)`` shows a table;
    ``report.failures`` lists the failed checks; ``report.worst_ratio(output)`` is the
    largest ratio seen (over all outputs when ``output`` is None).
    """

    dtype: str
    checks: tuple[OutputCheck, ...]
    title: str = "attention"
    masked_rows: str = "zero"
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def failed_cases(self) -> list[str]:
        """Names of the cases with at least one failed output, in order."""
        seen: list[str] = []
        for c in self.failures:
            if c.case not in seen:
                seen.append(c.case)
        return seen

    def worst_ratio(self, output: str | None = None) -> float:
        ratios = [c.ratio for c in self.checks if output is None or c.output == output]
        return max(ratios) if ratios else 0.0

    def __str__(self) -> str:
        cases = []
        for c in self.checks:
            if c.case not in cases:
                cases.append(c.case)
        verdict = "PASSED" if self.ok else f"FAILED ({len(self.failures)} of {len(self.checks)} checks)"
        lines = [
            f"{self.title} check in {self.dtype}: {len(cases)} cases, {len(self.checks)} checks — {verdict}",
            f"fully masked rows: {self.masked_rows}; ratio = error / allowed, pass when ≤ 1",
            *self.notes,
        ]
        width = max([len(c) for c in cases] + [4])
        out_width = max([len(c.output) for c in self.checks] + [6])
        numbers = f"{'max|err|':>9}  {'allowed':>9}  {'ratio':>8}"
        head = f"{'case':<{width}}  {'output':<{out_width}}  {numbers}  where / got vs want"
        lines += [head, "-" * len(head)]
        for c in self.checks:
            mark = "" if c.ok else "  <-- FAIL"
            detail = c.note if c.note else _where(c)
            numbers = f"{c.error:9.2e}  {c.allowed:9.2e}  {_ratio(c.ratio):>8}"
            lines.append(f"{c.case:<{width}}  {c.output:<{out_width}}  {numbers}  {detail}{mark}")
        outputs = list(dict.fromkeys(c.output for c in self.checks))
        worst = ", ".join(f"{o} {_ratio(self.worst_ratio(o))}" for o in outputs)
        lines.append(f"worst ratio: {worst}")
        return "\n".join(lines)


def _ratio(r: float) -> str:
    return "inf" if math.isinf(r) else ("nan" if math.isnan(r) else f"{r:.3g}")


def _where(c: OutputCheck) -> str:
    if c.where is None:
        return ""
    return f"{c.where}: {c.got:.6g} vs {c.expected:.6g}"
