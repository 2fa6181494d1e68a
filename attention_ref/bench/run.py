"""The benchmark loop: every case, every implementation, interleaved, medians, ratios."""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import attention_ref

from ..backend import cpu_model, limited_threads, thread_count
from . import peers
from .cases import (
    FULL_MATRIX_LIMIT,
    PARTS,
    SMALL_PARTS,
    SMALL_SIDE,
    Runner,
    gemm_bound,
    make_inputs,
    ours,
    part_runs_at,
)
from .limits import MachineLimit, measure_limit
from .measure import Device, OtherLoad, load_average, peak_memory_mib, time_pair

DEFAULT_SIZES = (1024, 4096, 16384)
DTYPES = ("float64", "float32")
# pause before each timed run: BLAS and OpenMP worker threads spin for a while after their work
# ends, and would otherwise slow down whichever implementation runs next
PAUSE_S = 0.2
# a case during which other processes took more than this share of the CPU is flagged as noisy
NOISY_LOAD = 0.05
RETRY_WAIT_S = 20


def repeats_at(n: int, repeats: int) -> int:
    """Timed runs per implementation: ``repeats``, halved (rounded up) above N = 4096 where one run takes seconds."""
    return repeats if n <= FULL_MATRIX_LIMIT else max(1, (repeats + 1) // 2)


def cpu_flags() -> list[str]:
    """The processor's vector extensions that matter for GEMM and ``exp`` (from /proc/cpuinfo on Linux)."""
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def blas_info() -> str:
    """The BLAS NumPy calls: library, version, the kernel architecture it chose, its threads (threadpoolctl)."""
    if importlib.util.find_spec("threadpoolctl") is None:
        return "unknown (threadpoolctl not installed)"
    from threadpoolctl import threadpool_info

    libs = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return (
        "; ".join(
            f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture', '?')} kernels, "
            f"{lib.get('num_threads')} threads by default)"
            for lib in libs
        )
        or "none found"
    )


def numpy_simd() -> str:
    """The SIMD extensions NumPy's own loops (``exp``, sums) use here."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

        found = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
        return " ".join(found) or "baseline only"
    except ImportError:
        return "unknown"


def machine_info(device: Device, threads: int | None) -> dict[str, Any]:
    import os

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "blas": blas_info(),
        "numpy_simd": numpy_simd(),
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


def _case_fields(inputs: Any) -> dict[str, Any]:
    """The case's sizes and dtype, as every table record of it carries them."""
    return {"n": inputs.n, "m": inputs.keys, "batch": inputs.batch, "dtype": inputs.dtype, "heads": inputs.heads,
            "d": inputs.d}  # fmt: skip


def _record(runner: Runner, inputs: Any, fwd: list[float], bwd: list[float]) -> dict[str, Any]:
    total = [f + b for f, b in zip(fwd, bwd, strict=True)]
    med = statistics.median(total)
    return {
        "part": inputs.part,
        "impl": runner.impl,
        **_case_fields(inputs),
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "total_s": med,
        "runs_fwd_s": fwd,
        "runs_bwd_s": bwd,
        "flops": runner.work.flops,
        "exps": runner.work.exps,
        "gflops": runner.work.flops / med / 1e9 if med > 0 else None,
        "peak_mib": None,
        "peak_method": None,
    }


def limit_record(inputs: Any, runner: Runner, limit: MachineLimit) -> dict[str, Any]:
    """The machine's limit for ``runner``'s work on this case, as a table record (impl ``"limit"``)."""
    w = runner.work
    fwd, bwd = limit.seconds(w.flops_fwd, w.exps_fwd), limit.seconds(w.flops_bwd, w.exps_bwd)
    return {
        "part": inputs.part,
        "impl": "limit",
        **_case_fields(inputs),
        "fwd_s": fwd,
        "bwd_s": bwd,
        "total_s": fwd + bwd,
        "gemm_s": w.flops / limit.gemm_flops_per_s,
        "exp_s": w.exps / limit.exp_per_s,
        "flops": w.flops,
        "exps": w.exps,
        "gflops": w.flops / (fwd + bwd) / 1e9 if fwd + bwd > 0 else None,
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
    limit: MachineLimit | None = None,
    pause: float = PAUSE_S,
) -> list[dict[str, Any]]:
    """Time ours, torch and the GEMM bound on one case, interleaved run by run; return one record each,
    preceded by the machine's limit for our work on the case when ``limit`` is given."""
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
    if limit is not None:
        bound = limit_record(inputs, runners[0], limit)
        bound["other_load"] = other_load
        for record in records:
            for key in ("fwd", "bwd", "total"):
                record[f"{key}_vs_limit"] = record[f"{key}_s"] / bound[f"{key}_s"] if bound[f"{key}_s"] > 0 else None
        records = [bound, *records]
    return records


def _noisy(records: list[dict[str, Any]]) -> bool:
    load = records[0].get("other_load")
    return load is not None and load > NOISY_LOAD


def _least_noisy(
    measure: Callable[[], list[dict[str, Any]]], retries: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """``measure()``, repeated up to ``retries`` more times while other processes disturbed it; the quietest try."""
    best: list[dict[str, Any]] | None = None
    for attempt in range(retries + 1):
        load_before = load_average()
        records = measure()
        for r in records:
            r["load_before"], r["load_after"], r["attempt"] = load_before, load_average(), attempt + 1
        if best is None or (records[0].get("other_load") or 0.0) < (best[0].get("other_load") or 0.0):
            best = records
        if not _noisy(best) or attempt == retries:
            break
        log(f"# other processes used {records[0]['other_load']:.0%} of the CPU: measuring again in {RETRY_WAIT_S} s")
        time.sleep(RETRY_WAIT_S)
    return best


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
    retries: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every (N, part, dtype) case; return ``{"machine", "config", "limits", "results", "skipped"}``.

    First the machine's limits are measured for each dtype (:mod:`.limits`); each case then gets a
    ``"limit"`` record (the limit for our work on it) and every implementation's time over it.

    ``log`` gets each table line as it is measured. A case during which other
    processes took more than ``NOISY_LOAD`` of the CPU is measured again, up to
    ``retries`` times, and the quietest try is kept (its ``other_load`` is recorded). torch takes part when
    ``with_torch`` and it is installed; on the CPU it runs with ``threads`` threads
    (default: as many as the machine has cores), restored afterwards.
    """
    from .report import header, limit_line, row_lines

    device = Device.create(backend)
    if with_torch and not peers.torch_available(device.torch_device):
        log(f"# torch {'with CUDA ' if device.torch_device == 'cuda' else ''}is not available: no torch column")
        with_torch = False
    if threads is None:
        threads = thread_count()
    previous = peers.torch_threads(threads) if with_torch else None
    # ours and the GEMM bound get the same number of threads as torch: their own threads and the BLAS
    # library's (attention_ref.backend.limited_threads, below)
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
            "retries": retries,
        },
        "limits": {},
        "results": [],
        "skipped": [],
    }
    load = load_average()
    log(f"# {result['machine']['cpu']}, {result['machine']['cores']} cores, {threads} threads; load {load}")
    log(f"# CPU flags: {' '.join(result['machine']['cpu_flags'])}; NumPy SIMD loops: {result['machine']['numpy_simd']}")
    log(f"# BLAS: {result['machine']['blas']}")
    if load is not None and result["machine"]["cores"] and load > 0.5 * result["machine"]["cores"]:
        log("# the machine is busy: times may be noisy; rerun when it is idle")
    limits = contextlib.ExitStack()
    try:
        limits.enter_context(limited_threads(threads))
        machine_limits: dict[str, MachineLimit] = {}
        for dtype in dtypes:
            machine_limits[dtype] = measure_limit(dtype, threads, device)
            result["limits"][dtype] = machine_limits[dtype].as_dict()
            log(limit_line(machine_limits[dtype]))
        log(header())
        # the small blocks do not depend on N: they run once, first
        cases = [(part, SMALL_SIDE * SMALL_SIDE) for part in parts if part in SMALL_PARTS]
        cases += [(part, n) for n in sizes for part in parts if part not in SMALL_PARTS]
        for part, n in cases:
            reason = part_runs_at(part, n)
            if reason is not None:
                result["skipped"].append({"part": part, "n": n, "reason": reason})
                log(f"{part:<11} {n:>6}  skipped: {reason}")
                continue
            for dtype in dtypes:
                records = _least_noisy(
                    lambda part=part, n=n, dtype=dtype: bench_case(
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
                        limit=machine_limits[dtype],
                        pause=pause,
                    ),
                    retries,
                    log,
                )
                result["results"] += records
                for line in row_lines(records):
                    log(line)
                if _noisy(records):
                    log(f"# noisy: other processes used {records[0]['other_load']:.0%} of the CPU during this case")
    finally:
        limits.close()
        if previous is not None:
            peers.torch_threads(previous)
    return result
