"""The cost of the attention variants against map size, log-log, from ``python -m attention_ref complexity``.

Reads the JSON that command writes (schemas ``attention_ref.complexity/2`` and the older ``/1``, see
:mod:`attention_ref.bench.complexity`): for each variant and map side, the forward and backward
times and the peak memory, next to the theoretical memory.

Time is the *CPU time* of one thread, the best of several runs (schema 2; schema 1 reports only wall
time, which is used then), so that a busy machine changes the curves little; a run during which the
process did not get most of a core is marked ``disturbed`` and drawn hollow. Slopes are fitted by
least squares over the largest sizes, where fixed overheads no longer dominate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._common import new_figure, note

__all__ = ["load_complexity", "plot_complexity", "scaling_exponents"]

SCHEMAS = ("attention_ref.complexity/2", "attention_ref.complexity/1")
COLOURS = {
    "exact": "#d95f02",
    "chunked": "#7570b3",
    "linear": "#1b9e77",
    "window": "#e7298a",
    "neighborhood": "#66a61e",
}
FIT_POINTS = 3  # slopes are fitted over this many of the largest sizes


def load_complexity(data: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The complexity report as a dict, from a path to its JSON or the dict itself; checks the schema."""
    if isinstance(data, (str, Path)):
        data = json.loads(Path(data).read_text(encoding="utf-8"))
    data = dict(data)
    if data.get("schema") not in SCHEMAS:
        raise ValueError(f"expected a report with schema {' or '.join(map(repr, SCHEMAS))}, got {data.get('schema')!r}")
    return data


def _value(row: Mapping[str, Any], key: str) -> float | None:
    """``row[key]``; ``"time"`` is forward + backward, CPU time where the row has it, else wall time;
    ``"flops"`` is ``flops_forward + flops_backward``."""
    if key == "flops":
        return row["flops_forward"] + row["flops_backward"] if row.get("flops_forward") is not None else None
    if key != "time":
        return row.get(key)
    if row.get("forward_cpu_s") is not None:
        return row["forward_cpu_s"] + row["backward_cpu_s"]
    if row.get("forward_s") is not None:
        return row["forward_s"] + row["backward_s"]
    return None


def _series(data: Mapping[str, Any], key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """variant → (tokens, values, disturbed) for the rows that were run and have ``key``, by size."""
    out: dict[str, list[tuple[int, float, bool]]] = {}
    for row in data["results"]:
        value = None if row.get("skipped") else _value(row, key)
        if value is None:
            continue
        disturbed = bool(row.get("disturbed")) and key == "time"  # memory counts are exact either way
        out.setdefault(row["variant"], []).append((row["tokens"], float(value), disturbed))
    series = {}
    for variant, points in out.items():
        points.sort()
        n, y, bad = zip(*points, strict=True)
        series[variant] = (np.array(n), np.array(y, dtype=float), np.array(bad, dtype=bool))
    return series


def _fit(n: np.ndarray, y: np.ndarray, disturbed: np.ndarray, points: int) -> tuple[float, float] | None:
    """``(slope, intercept)`` of ``log y = slope · log n + intercept`` over the ``points`` largest sizes.

    Disturbed sizes are left out when at least two others remain; None with fewer than two sizes.
    """
    use = np.flatnonzero((y > 0) & ~disturbed)
    if use.size < 2:
        use = np.flatnonzero(y > 0)
    use = use[-points:]
    if use.size < 2:
        return None
    slope, intercept = np.polyfit(np.log(n[use]), np.log(y[use]), 1)
    return float(slope), float(intercept)


def scaling_exponents(
    data: str | Path | Mapping[str, Any], key: str = "peak_bytes", *, points: int = FIT_POINTS
) -> dict[str, float]:
    """variant → least-squares slope of ``log(key)`` against ``log N`` over the ``points`` largest sizes.

    ``key`` is ``"peak_bytes"``, ``"theory_bytes"``, ``"flops"`` (forward + backward, theory) or
    ``"time"`` (forward + backward CPU seconds; wall seconds for a schema-1 report). The largest
    sizes are used because small maps are dominated by fixed overheads; disturbed runs are left out
    when two other sizes remain.
    A slope of 2 means O(N²), 1 means O(N).
    """
    if points < 2:
        raise ValueError(f"a slope needs at least 2 points, got points={points}")
    exps = {}
    for variant, (n, y, bad) in _series(load_complexity(data), key).items():
        fit = _fit(n, y, bad, points)
        if fit is not None:
            exps[variant] = fit[0]
    return exps


def _power_range(exps: list[float], decimals: int = 1) -> str:
    """``N^2.0`` or ``N^1.9–N^2.1`` (mathtext) for the slopes of a group of variants, to ``decimals``
    (``N`` for a power that rounds to ``1`` with no decimals)."""
    lo, hi = f"{min(exps):.{decimals}f}", f"{max(exps):.{decimals}f}"

    def power(e: str) -> str:
        return "$N$" if e == "1" else f"$N^{{{e}}}$"

    return power(lo) if lo == hi else f"{power(lo)}–{power(hi)}"


def _grouped(exps: dict[str, float], decimals: int = 1) -> str:
    """ "N^2.0 for exact, chunked; N^1.0 for linear, window": the variants grouped by quadratic or linear slope."""
    quadratic = {v: e for v, e in exps.items() if e >= 1.5}
    linear = {v: e for v, e in exps.items() if e < 1.5}
    parts = []
    for group in (quadratic, linear):
        if group:
            parts.append(f"{_power_range(list(group.values()), decimals)} for {', '.join(group)}")
    return "; ".join(parts)


def _side_ticks(ax: Any, tokens: np.ndarray) -> None:
    """x ticks at the measured map sizes, labelled ``S×S`` at the sides that are powers of two (they never crowd)."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    sides = np.sqrt(tokens).round().astype(int)
    labelled = [n for n, s in zip(tokens, sides, strict=True) if s & (s - 1) == 0]
    ax.xaxis.set_major_locator(FixedLocator(labelled))
    ax.xaxis.set_minor_locator(FixedLocator([n for n in tokens if n not in labelled]))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{round(np.sqrt(n))}²" for n in labelled])


def _work_line(
    n: np.ndarray, t: np.ndarray, bad: np.ndarray, flops: dict[int, float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The operation count at the measured sizes, in seconds: ``flops · c`` with ``c`` the geometric mean of
    ``t / flops`` over the :data:`FIT_POINTS` largest undisturbed sizes (all of them when fewer than two)."""
    use = np.flatnonzero(~bad & (t > 0))
    if use.size < 2:
        use = np.flatnonzero(t > 0)
    use = use[-FIT_POINTS:]
    if use.size == 0 or any(int(k) not in flops for k in n):
        return None
    work = np.array([flops[int(k)] for k in n], dtype=float)
    # c = exp(mean(log t − log flops))
    c = float(np.exp(np.mean(np.log(t[use]) - np.log(work[use]))))
    return n, work * c


def plot_complexity(data: str | Path | Mapping[str, Any], *, title: str | None = None) -> Figure:
    """Time (forward + backward) and peak memory against the number of pixels, log-log, per variant.

    Time: the measured CPU times are dots (hollow: a disturbed run, see the module docstring), the
    lines are the operation counts (``flops_forward + flops_backward``, theory) scaled to the dots of
    the largest sizes, so the slope of a line is exact whatever the machine did, and the dots show how
    closely the measurement follows it; the legend gives both slopes (:func:`scaling_exponents`).
    Memory: measured peaks joined by lines, the theoretical memory dashed (its legend entry says what
    it counts). The theory counts the arrays a pass must hold (the weights or features, the output and
    the gradients); the measured peak also holds the backward's temporaries, about as large as the
    largest of those arrays (exact attention's dP = dO Vᵀ next to P), so it sits about 2× above: each
    variant's legend entry gives measured ÷ theory at its largest map.
    """
    data = load_complexity(data)
    time_exp = scaling_exponents(data, "time")
    mem_exp = scaling_exponents(data, "peak_bytes")
    work_exp = scaling_exponents(data, "flops")
    flops = {v: dict(zip(n.tolist(), f.tolist(), strict=True)) for v, (n, f, _) in _series(data, "flops").items()}
    fig = new_figure(9.6, 4.1, layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    all_tokens: set[int] = set()
    any_disturbed = False
    for variant, (n, t, bad) in _series(data, "time").items():
        colour = COLOURS.get(variant)
        all_tokens.update(int(k) for k in n)
        any_disturbed |= bool(bad.any())
        ax_time.loglog(n[~bad], t[~bad], "o", color=colour, markersize=5)
        ax_time.loglog(n[bad], t[bad], "o", color=colour, markersize=5, markerfacecolor="white")
        line = _work_line(n, t, bad, flops.get(variant, {}))
        if line is not None:
            ax_time.loglog(*line, "-", color=colour, linewidth=1.2)
        parts = [f"work ∝ N{'²' if round(work_exp[variant]) == 2 else ''}"] if variant in work_exp else []
        parts += [f"measured slope {time_exp[variant]:.1f}"] if variant in time_exp else []
        ax_time.plot([], [], "o-", color=colour, markersize=5, linewidth=1.2, label=f"{variant}: {', '.join(parts)}")
    theory = {
        v: dict(zip(n.tolist(), m.tolist(), strict=True)) for v, (n, m, _) in _series(data, "theory_bytes").items()
    }
    ratios = []
    for variant, (n, m, _) in _series(data, "peak_bytes").items():
        colour = COLOURS.get(variant)
        all_tokens.update(int(k) for k in n)
        parts = [f"slope {mem_exp[variant]:.1f}"] if variant in mem_exp else []
        largest = theory.get(variant, {}).get(int(n[-1]))
        if largest:
            ratios.append(m[-1] / largest)
            parts.append(f"{ratios[-1]:.1f}× theory")
        ax_mem.loglog(
            n,
            m / 2**20,
            "o-",
            color=colour,
            markersize=5,
            linewidth=1.2,
            label=f"{variant} ({', '.join(parts)})" if parts else variant,
        )
    for variant, (n, m, _) in _series(data, "theory_bytes").items():
        if variant in mem_exp:  # the variants that were run
            ax_mem.loglog(n, m / 2**20, "--", color=COLOURS.get(variant), linewidth=0.9, alpha=0.7)
    if theory:
        ax_mem.plot([], [], "--", color="#555555", linewidth=0.9, label="dashed: theory, the arrays held*")
    tokens = np.array(sorted(all_tokens))
    for ax in (ax_time, ax_mem):
        if tokens.size:
            _side_ticks(ax, tokens)
        ax.set_xlabel("map size H×W (pixels N = H·W)")
        ax.legend(fontsize=8, frameon=False)
        ax.grid(True, which="major", alpha=0.3)
    config = data["config"]
    runs = f"best of ≥ {config.get('repeats', '?')} runs"
    cpu = "forward_cpu_s" in next((r for r in data["results"] if not r.get("skipped")), {})
    ax_time.set_title(
        f"{'CPU time of one thread' if cpu else 'wall time'}, forward + backward: dots ({runs});\n"
        "lines: operation counts, scaled to the dots of the largest maps",
        fontsize=9,
    )
    ax_mem.set_title("peak memory of forward + backward: measured (dots), theory (dashed)", fontsize=9)
    ax_time.set_ylabel("seconds")
    ax_mem.set_ylabel("MiB")
    for ax in (ax_time, ax_mem):
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 12)  # room above the curves for the legend
    machine = data.get("machine", {})
    where = f"measured on {machine['cpu']}, float64, d = {config.get('dim')}" if machine.get("cpu") else ""
    if ratios:
        where += (
            f"{chr(10) if where else ''}* theory: the weights (or features), the output and the gradients a pass must "
            f"hold. The measured peaks are {min(ratios):.1f}–{max(ratios):.1f}× that at the largest maps:\nthe "
            "backward's temporaries come on top (exact attention holds dP = dO Vᵀ beside P, both N×N: 2× its theory)"
        )
    if any_disturbed:
        where += (
            "\nhollow: timed while other processes held the core (this one had under 80% of it): "
            "that stretches wall time, CPU time less"
        )
    note(fig, where)
    if title is None:
        lines = [f"The work grows as {_grouped(work_exp, 0)}"] if work_exp else []
        lines += [f"peak memory as {_grouped(mem_exp)}"] if mem_exp else []
        title = ";\n".join(lines)
    fig.suptitle(title, fontsize=11)
    return fig
