"""The benchmark's table and its JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .limits import MachineLimit

COLUMNS = (
    f"{'part':<11} {'N':>6}  {'dtype':<8} {'impl':<6} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} "
    f"{'GFLOP/s':>8} {'peak MiB':>10}  {'×limit':>7} {'×torch':>7} {'×GEMM':>7} {'others':>7}"
)

# how the peak of each row was measured, as a one-letter tag after the number
_TAGS = {"tracemalloc": "t", "rss": "r", "cuda": "c", "cupy-pool": "p"}


def header() -> str:
    return COLUMNS + "\n" + "-" * len(COLUMNS)


def _fmt(x: float | None, spec: str, width: int) -> str:
    return f"{x:{width}{spec}}" if x is not None else f"{'–':>{width}}"


def limit_line(limit: MachineLimit) -> str:
    """One line for the measured rates the limits are made of."""
    return (
        f"# limit, {limit.dtype} on {limit.threads} threads: GEMM {limit.gemm_flops_per_s / 1e9:.1f} GFLOP/s "
        f"(one call {limit.gemm_one_call_flops_per_s / 1e9:.1f}, {limit.threads} side by side "
        f"{limit.gemm_side_by_side_flops_per_s / 1e9:.1f}), exp {1e9 * limit.threads / limit.exp_per_s:.2f} ns "
        "per element per thread"
    )


def row_lines(records: list[dict[str, Any]]) -> list[str]:
    """One table line per record; ×limit on every line, ×torch and ×GEMM (fwd+bwd) on the "ours" line."""
    lines = []
    for r in records:
        peak = r["peak_mib"]
        peak_text = f"{peak:9.0f}{_TAGS[r['peak_method']]}" if peak is not None else f"{'–':>10}"
        load = r.get("other_load") if r["impl"] == "ours" else None
        n_text = f"{r['n']}" if r.get("batch", 1) == 1 else f"{r['batch']}×{r['n']}"
        lines.append(
            f"{r['part']:<11} {n_text:>6}  {r['dtype']:<8} {r['impl']:<6} {r['fwd_s'] * 1e3:9.1f} "
            f"{r['bwd_s'] * 1e3:9.1f} {r['total_s'] * 1e3:11.1f} {_fmt(r['gflops'], '.1f', 8)} {peak_text}  "
            f"{_fmt(r.get('total_vs_limit'), '.2f', 7)} {_fmt(r.get('total_vs_torch'), '.2f', 7)} "
            f"{_fmt(r.get('total_vs_gemm'), '.2f', 7)} {_fmt(None if load is None else 100 * load, '.0f', 6)}"
            + ("%" if load is not None else "")
        )
    return lines


LEGEND = (
    "times: medians. limit: the case's matrix-product flops at the machine's peak GEMM rate plus its\n"
    "exponentials at the machine's exp rate, both measured in this run on the same threads (bench/limits.py);\n"
    "×limit: each row's fwd+bwd time over it. ×torch, ×GEMM: ours' fwd+bwd time over torch SDPA + autograd's\n"
    "and over the bare matrix products'. others: the share of the CPU other processes used during the case.\n"
    "peak MiB measured by t = tracemalloc (NumPy), r = peak RSS growth (torch CPU),\n"
    "c = torch.cuda.max_memory_allocated, p = CuPy memory-pool growth. N for the small blocks: batch×tokens"
)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
