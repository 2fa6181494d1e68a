"""The benchmark loop: every case, every implementation, interleaved, medians, ratios."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import attention_ref

from . import peers
from .cases import FULL_MATRIX_LIMIT, PARTS, Runner, gemm_bound, make_inputs, ours, part_runs_at
from .measure import Device, OtherLoad, load_average, peak_memory_mib, time_pair

DEFAULT_SIZES = (1024, 4096, 16384)
DTYPES = ("float64", "float32")
# pause before each timed run: BLAS and OpenMP worker threads spin for a while after their work
# ends, and would otherwise slow down whichever implementation runs next
PAUSE_S = 0.2
# a case during which other processes took more than this share of the CPU is flagged as noisy
NOISY_LOAD = 0.05


def repeats_at(n: int, repeats: int) -> int:
    """Timed runs per implementation: ``repeats``, halved (rounded up) above N = 4096 where one run takes seconds."""
    return repeats if n <= FULL_MATRIX_LIMIT else max(1, (repeats + 1) // 2)


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Device, threads: int | None) -> dict[str, Any]:
    import os

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "backend": device.name,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "attention_ref": attention_ref.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if peers.torch_available():
        import torch

        info["torch"] = torch.__version__
    if device.name == "cupy":
        info["cupy"] = device.xp.__version__
        info["gpu"] = device.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return info


def _record(runner: Runner, inputs: Any, fwd: list[float], bwd: list[float]) -> dict[str, Any]:
    total = [f + b for f, b in zip(fwd, bwd, strict=True)]
    med = statistics.median(total)
    return {
        "part": inputs.part,
        "impl": runner.impl,
        "n": inputs.n,
        "dtype": inputs.dtype,
        "heads": inputs.heads,
        "d": inputs.d,
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "total_s": med,
        "runs_fwd_s": fwd,
        "runs_bwd_s": bwd,
        "gflops": (runner.flops_fwd + runner.flops_bwd) / med / 1e9 if med > 0 else None,
        "peak_mib": None,
        "peak_method": None,
    }


def bench_case(
    part: str,
    n: int,
    dtype: str,
    *,
    heads: int,
    d: int,
    repeats: int,
    device: Device,
    with_torch: bool,
    memory: bool,
    tiled_options: dict[str, Any] | None,
    pause: float = PAUSE_S,
) -> list[dict[str, Any]]:
    """Time ours, torch and the GEMM bound on one case, interleaved run by run; return one record each."""
    inputs = make_inputs(part, n, heads, d, dtype)
    runners = [ours(inputs, device, tiled_options)]
    syncs: list[Callable[[], None]] = [device.sync]
    if with_torch:
        runners.append(peers.torch_runner(inputs, device.torch_device))
        syncs.append(lambda: peers.torch_sync(device.torch_device))
    runners.append(gemm_bound(inputs, device))
    syncs.append(device.sync)

    meter = OtherLoad()
    meter.start()
    count = repeats_at(n, repeats)
    warmup = 1 if n <= FULL_MATRIX_LIMIT else 0
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in runners]
    for i in range(warmup + count):
        for runner, sync, (fwd, bwd) in zip(runners, syncs, times, strict=True):
            time.sleep(pause)  # let the previous implementation's idle threads stop spinning
            t_fwd, t_bwd = time_pair(runner.fwd, runner.bwd, sync)
            if i >= warmup:
                fwd.append(t_fwd)
                bwd.append(t_bwd)
    records = [_record(r, inputs, f, b) for r, (f, b) in zip(runners, times, strict=True)]
    other_load = meter.stop()
    for record in records:
        record["other_load"] = other_load

    if memory:
        for runner, record in zip(runners, records, strict=True):
            if runner.memory_method is not None:

                def run(r: Runner = runner) -> Any:
                    state = r.fwd()
                    return state, r.bwd(state)

                record["peak_mib"] = peak_memory_mib(run, runner.memory_method)
                record["peak_method"] = runner.memory_method

    by_impl = {r["impl"]: r for r in records}
    mine = by_impl["ours"]
    for peer in ("torch", "gemm"):
        if peer in by_impl:
            for key in ("fwd", "bwd", "total"):
                mine[f"{key}_vs_{peer}"] = mine[f"{key}_s"] / by_impl[peer][f"{key}_s"]
    return records


def run_bench(
    *,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    dtypes: tuple[str, ...] = DTYPES,
    parts: tuple[str, ...] = PARTS,
    heads: int = 4,
    d: int = 64,
    repeats: int = 5,
    threads: int | None = None,
    backend: str = "numpy",
    with_torch: bool = True,
    memory: bool = True,
    tiled_options: dict[str, Any] | None = None,
    pause: float = PAUSE_S,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every (N, part, dtype) case; return ``{"machine", "config", "results", "skipped"}``.

    ``log`` gets each table line as it is measured. torch takes part when
    ``with_torch`` and it is installed; on the CPU it runs with ``threads`` threads
    (default: as many as the machine has cores), restored afterwards.
    """
    import os

    from .report import header, row_lines

    device = Device.create(backend)
    if with_torch and not peers.torch_available(device.torch_device):
        log(f"# torch {'with CUDA ' if device.torch_device == 'cuda' else ''}is not available: no torch column")
        with_torch = False
    if threads is None:
        threads = os.cpu_count()
    previous = peers.torch_threads(threads) if with_torch else None
    result: dict[str, Any] = {
        "machine": machine_info(device, threads),
        "config": {
            "sizes": list(sizes),
            "dtypes": list(dtypes),
            "parts": list(parts),
            "heads": heads,
            "d": d,
            "repeats": repeats,
            "torch": with_torch,
            "tiled_options": tiled_options or {},
            "pause_s": pause,
        },
        "results": [],
        "skipped": [],
    }
    load = load_average()
    log(f"# {result['machine']['cpu']}, {result['machine']['cores']} cores, {threads} threads; load {load}")
    if load is not None and result["machine"]["cores"] and load > 0.5 * result["machine"]["cores"]:
        log("# the machine is busy: times may be noisy; rerun when it is idle")
    log(header())
    try:
        for n in sizes:
            for part in parts:
                reason = part_runs_at(part, n)
                if reason is not None:
                    result["skipped"].append({"part": part, "n": n, "reason": reason})
                    log(f"{part:<6} {n:>6}  skipped: {reason}")
                    continue
                for dtype in dtypes:
                    load_before = load_average()
                    records = bench_case(
                        part,
                        n,
                        dtype,
                        heads=heads,
                        d=d,
                        repeats=repeats,
                        device=device,
                        with_torch=with_torch,
                        memory=memory,
                        tiled_options=tiled_options,
                        pause=pause,
                    )
                    for r in records:
                        r["load_before"], r["load_after"] = load_before, load_average()
                    result["results"] += records
                    for line in row_lines(records):
                        log(line)
                    if records[0]["other_load"] is not None and records[0]["other_load"] > NOISY_LOAD:
                        log(f"# noisy: other processes used {records[0]['other_load']:.0%} of the CPU during this case")
    finally:
        if previous is not None:
            peers.torch_threads(previous)
    return result
