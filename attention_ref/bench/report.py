"""The benchmark's table and its JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (
    f"{'part':<6} {'N':>6}  {'dtype':<8} {'impl':<6} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} "
    f"{'GFLOP/s':>8} {'peak MiB':>10}  {'×torch':>7} {'×GEMM':>7}"
)

# how the peak of each row was measured, as a one-letter tag after the number
_TAGS = {"tracemalloc": "t", "rss": "r", "cuda": "c", "cupy-pool": "p"}


def header() -> str:
    return COLUMNS + "\n" + "-" * len(COLUMNS)


def _fmt(x: float | None, spec: str, width: int) -> str:
    return f"{x:{width}{spec}}" if x is not None else f"{'–':>{width}}"


def row_lines(records: list[dict[str, Any]]) -> list[str]:
    """One table line per record; the ratios (fwd+bwd) stand on the "ours" line."""
    lines = []
    for r in records:
        peak = r["peak_mib"]
        peak_text = f"{peak:9.0f}{_TAGS[r['peak_method']]}" if peak is not None else f"{'–':>10}"
        lines.append(
            f"{r['part']:<6} {r['n']:>6}  {r['dtype']:<8} {r['impl']:<6} {r['fwd_s'] * 1e3:9.1f} "
            f"{r['bwd_s'] * 1e3:9.1f} {r['total_s'] * 1e3:11.1f} {_fmt(r['gflops'], '.1f', 8)} {peak_text}  "
            f"{_fmt(r.get('total_vs_torch'), '.2f', 7)} {_fmt(r.get('total_vs_gemm'), '.2f', 7)}"
        )
    return lines


LEGEND = (
    "times: medians; ×torch, ×GEMM: ours' fwd+bwd time over torch SDPA + autograd's and over the bare matrix\n"
    "products'; peak MiB measured by t = tracemalloc (NumPy), r = peak RSS growth (torch CPU),\n"
    "c = torch.cuda.max_memory_allocated, p = CuPy memory-pool growth"
)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
