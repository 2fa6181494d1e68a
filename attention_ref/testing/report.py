"""The verdict: one row per case and output, printable, with ``report.ok``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["OutputCheck", "Report"]


@dataclass(frozen=True, kw_only=True)
class OutputCheck:
    """How one output of one case compared with the float64 reference (built with keywords only).

    Attributes:
        case: the case's name.
        output: ``"out"``, ``"dq"``, ``"dk"`` or ``"dv"`` (for blocks: ``"y"``, ``"dx"``, ``"dq.weight"``, ...).
        error: ``max|X − X₆₄|`` (``inf`` for NaN/Inf where the reference is finite, or no usable result).
        where: index of that largest error (``None`` when there is no array to point into).
        allowed: the tolerance, ``c·kernel_error + floor``.
        ratio: ``error / allowed``; the check passes when it is ≤ 1.
        kernel_error: the yardstick, the simulated kernels' error (see :mod:`.tolerance`).
        floor: the dtype-resolution floor.
        got, expected: the implementation's and the reference's value at ``where``.
        note: why it failed when the reason is not a number (an exception, a wrong shape or dtype, NaN), why it
            was not run, or a remark on a passing row.
        supported: False when the implementation declared the case unsupported: the row was not run and
            counts neither for nor against it.
        policy: the name of the policy the row was judged under (``"fused"``, ``"eager"``); ``""`` when none
            applied (an exception, a row not run).
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
    supported: bool = True
    policy: str = ""

    @property
    def ok(self) -> bool:
        """True when the check ran and passed (an unsupported row is neither ok nor a failure)."""
        return self.supported and self.ratio <= 1.0

    @property
    def failed(self) -> bool:
        """True when the check ran and did not pass."""
        return self.supported and not self.ratio <= 1.0


@dataclass(frozen=True)
class Report:
    """All checks of one :func:`~attention_ref.testing.check_attention` run.

    ``report.ok`` is True when at least one check ran and every check that ran passed; ``print(report)``
    shows a table of every row, ``report.format()`` a summary and the failing rows only;
    ``report.failures`` lists the failed checks; ``report.worst_ratio(output)`` is the largest ratio seen
    (over all outputs when ``output`` is None); ``report.unsupported_cases`` names the cases the
    implementation declared it does not support.
    """

    dtype: str
    checks: tuple[OutputCheck, ...]
    title: str = "attention"
    masked_rows: str = "zero"
    notes: tuple[str, ...] = field(default=())
    policy: str = "fused"
    missing_core: tuple[str, ...] = field(default=())
    last_rounding: bool = True

    @property
    def ran(self) -> list[OutputCheck]:
        """The checks that ran (not declared unsupported)."""
        return [c for c in self.checks if c.supported]

    @property
    def ok(self) -> bool:
        """At least one check ran, every check that ran passed, and no core group went unrun (:attr:`missing_core`)."""
        return bool(self.ran) and all(c.ok for c in self.ran) and not self.missing_core

    @property
    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if c.failed]

    @property
    def cases(self) -> list[str]:
        """Every case's name, in order."""
        return list(dict.fromkeys(c.case for c in self.checks))

    @property
    def failed_cases(self) -> list[str]:
        """Names of the cases with at least one failed output, in order."""
        return list(dict.fromkeys(c.case for c in self.failures))

    @property
    def unsupported_cases(self) -> list[str]:
        """Names of the cases the implementation declared unsupported, in order."""
        return list(dict.fromkeys(c.case for c in self.checks if not c.supported))

    def worst_ratio(self, output: str | None = None) -> float:
        ratios = [c.ratio for c in self.ran if output is None or c.output == output]
        return max(ratios) if ratios else 0.0

    def summary(self) -> str:
        """Two lines: the verdict with the counts, and the worst ratio per output."""
        cases, skipped = self.cases, self.unsupported_cases
        ran = len(cases) - len(skipped)
        if not self.ran:
            verdict = "NOTHING CHECKED (every case unsupported)"
        elif self.failures:
            n = len(self.failed_cases)
            verdict = f"FAILED ({len(self.failures)} of {len(self.ran)} checks, in {n} case{'s' if n != 1 else ''})"
        elif self.missing_core:
            verdict = f"NOT OK: core cases never ran ({', '.join(self.missing_core)})"
        else:
            verdict = "PASSED"
        counted = _count(len(cases), "case")
        if skipped:
            counted = f"{ran} of {len(cases)} cases ran ({len(skipped)} not supported)"
        head = (
            f"{self.title} check in {self.dtype}, {self.policy} policy: {counted}, {_count(len(self.ran), 'check')}"
            f" — {verdict}"
        )
        outputs = list(dict.fromkeys(c.output for c in self.ran))
        worst = ", ".join(f"{o} {_ratio(self.worst_ratio(o))}" for o in outputs) or "-"
        return f"{head}\nworst ratio: {worst}"

    def format(self, verbose: bool = True) -> str:
        """The report as text: every row when ``verbose``, otherwise the summary and the failing rows only."""
        head, worst = self.summary().split("\n")
        error = "error (beyond the output's own last rounding)" if self.last_rounding else "error"
        rule = f"ratio = {error} / allowed, pass when ≤ 1"
        lines = [head, *self.notes, f"fully masked rows: {self.masked_rows}; {rule}"]
        rows = list(self.checks) if verbose else self.failures
        if rows:
            width = max([len(c.case) for c in rows] + [4])
            out_width = max([len(c.output) for c in rows] + [6])
            numbers = f"{'max|err|':>9}  {'allowed':>9}  {'ratio':>8}"
            title = f"{'case':<{width}}  {'output':<{out_width}}  {numbers}  where / got vs want"
            lines += [title, "-" * len(title)]
            for c in rows:
                if not c.supported:
                    lines.append(f"{c.case:<{width}}  {c.output:<{out_width}}  {'not supported':>30}  {c.note}")
                    continue
                mark = "" if c.ok else "  <-- FAIL"
                detail = c.note if c.note else _where(c)
                numbers = f"{c.error:9.2e}  {c.allowed:9.2e}  {_ratio(c.ratio):>8}"
                lines.append(f"{c.case:<{width}}  {c.output:<{out_width}}  {numbers}  {detail}{mark}")
        if not verbose and self.unsupported_cases:
            lines.append(f"not supported: {', '.join(self.unsupported_cases)}")
        lines.append(worst)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format(verbose=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _ratio(r: float) -> str:
    return "inf" if math.isinf(r) else ("nan" if math.isnan(r) else f"{r:.3g}")


def _where(c: OutputCheck) -> str:
    if c.where is None:
        return ""
    return f"{c.where}: {c.got:.6g} vs {c.expected:.6g}"
