"""The cost of the attention variants against map size, log-log, from ``python -m attention_ref complexity``.

Reads the JSON that command writes (schema ``attention_ref.complexity/1``, see
:mod:`attention_ref.cli.complexity`): for each variant and map side, the forward and
backward wall times and the peak memory, next to the theoretical memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._common import new_figure

__all__ = ["load_complexity", "plot_complexity", "scaling_exponents"]

SCHEMA = "attention_ref.complexity/1"
COLOURS = {
    "exact": "#d95f02",
    "chunked": "#7570b3",
    "linear": "#1b9e77",
    "window": "#e7298a",
    "neighborhood": "#66a61e",
}


def load_complexity(data: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The complexity report as a dict, from a path to its JSON or the dict itself; checks the schema."""
    if isinstance(data, (str, Path)):
        data = json.loads(Path(data).read_text(encoding="utf-8"))
    data = dict(data)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"expected a report with schema {SCHEMA!r}, got {data.get('schema')!r}")
    return data


def _series(data: Mapping[str, Any], key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """variant → (tokens, values) for the rows that were run and have ``key``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in data["results"]:
        if row.get("skipped"):
            continue
        value = row["forward_s"] + row["backward_s"] if key == "time" else row[key]
        if value is None:
            continue
        out.setdefault(row["variant"], ([], []))
        out[row["variant"]][0].append(row["tokens"])
        out[row["variant"]][1].append(value)
    return {v: (np.array(n), np.array(y, dtype=float)) for v, (n, y) in out.items()}


def scaling_exponents(data: str | Path | Mapping[str, Any], key: str = "peak_bytes") -> dict[str, float]:
    """variant → slope of ``log(key)`` against ``log N`` over the two largest measured sizes.

    ``key`` is ``"peak_bytes"``, ``"theory_bytes"`` or ``"time"`` (forward + backward seconds).
    The largest sizes are used because small maps are dominated by fixed overheads.
    """
    exps = {}
    for variant, (n, y) in _series(load_complexity(data), key).items():
        if len(n) >= 2 and np.all(y[-2:] > 0):
            exps[variant] = float(np.diff(np.log(y[-2:]))[0] / np.diff(np.log(n[-2:]))[0])
    return exps


def plot_complexity(data: str | Path | Mapping[str, Any], *, title: str | None = None) -> Figure:
    """Time (forward + backward) and peak memory against the number of pixels, log-log, per variant.

    Measured values are solid lines with markers, the theoretical memory dashed;
    the legend gives each variant's measured slope between the two largest maps
    (2 means O(N²), 1 means O(N)).
    """
    data = load_complexity(data)
    time_exp = scaling_exponents(data, "time")
    mem_exp = scaling_exponents(data, "peak_bytes")
    fig = new_figure(8.6, 3.4, layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    for variant, (n, t) in _series(data, "time").items():
        label = f"{variant} (slope {time_exp[variant]:.1f})" if variant in time_exp else variant
        ax_time.loglog(n, t, "o-", color=COLOURS.get(variant), label=label, markersize=4)
    for variant, (n, m) in _series(data, "peak_bytes").items():
        label = f"{variant} (slope {mem_exp[variant]:.1f})" if variant in mem_exp else variant
        ax_mem.loglog(n, m / 2**20, "o-", color=COLOURS.get(variant), label=label, markersize=4)
    for variant, (n, m) in _series(data, "theory_bytes").items():
        ax_mem.loglog(n, m / 2**20, "--", color=COLOURS.get(variant), linewidth=0.9, alpha=0.7)
    dim = data["config"].get("dim")
    ax_time.set_title("time, forward + backward", fontsize=10)
    ax_mem.set_title("peak memory (dashed: theory)", fontsize=10)
    for ax in (ax_time, ax_mem):
        ax.set_xlabel("pixels N = H·W")
        ax.legend(fontsize=7, frameon=False)
        ax.grid(True, which="major", alpha=0.3)
    ax_time.set_ylabel("seconds")
    ax_mem.set_ylabel("MiB")
    if title is None:
        others = [e for v, e in mem_exp.items() if v != "exact"]
        title = f"Peak memory grows as N^{mem_exp['exact']:.1f} for exact attention" if "exact" in mem_exp else ""
        if others:
            title += f", as N^{min(others):.1f}–N^{max(others):.1f} for the rest (d = {dim}, float64)"
    fig.suptitle(title, fontsize=11)
    return fig
