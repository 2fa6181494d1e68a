"""The machine's limit for a case: its matrix products at the machine's peak GEMM rate, plus its exponentials
at the machine's ``exp`` rate, both measured here, in the same run, on the same threads as the case.

Attention forward and backward is matrix products and exponentials; everything else (maxima, sums,
subtractions, the elementwise products of the backward) only moves numbers through memory. So no
implementation on this machine, with this BLAS and this ``exp``, can beat

    t_limit = flops / (peak GEMM rate) + exponentials / (exp rate),

and ``time / t_limit`` says how much of the time goes to anything else (passes over memory, Python, threads
waiting for each other, products of shapes the BLAS runs below its peak).

* Peak GEMM rate: square ``2048 × 2048`` products (``8192 × 8192`` on a GPU), the best of two ways to
  use ``threads`` cores: one BLAS call on ``threads`` BLAS threads, and ``threads`` single-threaded calls
  side by side (the way the tiled path runs). Square products of that size run at the BLAS's best; thin
  ones (the ``(N, 64)`` operands of attention) do not, and that shortfall counts against the
  implementation, not the limit.
* ``exp`` rate: ``threads`` threads side by side, each computing ``exp`` of its own cache-sized array of
  numbers in ``[-10, 0]`` (the range softmax exponentiates) into another, with NumPy's ``exp`` (or the
  backend's; on a GPU one ``8192 × 8192`` array).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..backend import limited_threads, parallel_map
from .measure import Device, best_seconds

GEMM_SIDE = 2048
EXP_SHAPE = (256, 512)  # 1 MiB in float64 with its output: stays in a core's L2 cache
EXP_CALLS = 40  # per thread and timed run
# on a GPU, sizes that fill it: a 2048² product or a 128K-element exp is over before the GPU is busy
GPU_GEMM_SIDE = 8192
GPU_EXP_SHAPE = (8192, 8192)


@dataclass(frozen=True)
class MachineLimit:
    """The two rates the limit is made of, for one dtype on ``threads`` threads."""

    dtype: str
    threads: int
    gemm_flops_per_s: float  # best of one BLAS call on `threads` threads and `threads` single-threaded calls
    gemm_one_call_flops_per_s: float
    gemm_side_by_side_flops_per_s: float
    exp_per_s: float  # exponentials per second, all threads together

    def seconds(self, flops: float, exps: float) -> float:
        """``flops / peak GEMM rate + exps / exp rate``."""
        return flops / self.gemm_flops_per_s + exps / self.exp_per_s

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["exp_ns_per_core"] = 1e9 * self.threads / self.exp_per_s
        return record


def measure_limit(dtype: str, threads: int, device: Device, *, repeats: int = 5) -> MachineLimit:
    """The peak GEMM and ``exp`` rates of this machine for ``dtype`` on ``threads`` threads (see the module)."""
    xp, sync = device.xp, device.sync
    rng = np.random.default_rng(0)
    on_gpu = device.name != "numpy"
    n = GPU_GEMM_SIDE if on_gpu else GEMM_SIDE
    flops = 2.0 * n**3
    workers = threads if device.name == "numpy" else 1
    a = [device.asarray(rng.standard_normal((n, n)).astype(dtype)) for _ in range(workers)]
    b = [device.asarray(rng.standard_normal((n, n)).astype(dtype)) for _ in range(workers)]
    like = a[0]
    with limited_threads(threads):
        one_call = flops / best_seconds(lambda: xp.matmul(a[0], b[0]), repeats, sync=sync)
        side_by_side = one_call
        if workers > 1:

            def products() -> Any:
                return parallel_map(lambda i: xp.matmul(a[i], b[i]), list(range(workers)), like=like)

            side_by_side = workers * flops / best_seconds(products, repeats, sync=sync)

        shape = GPU_EXP_SHAPE if on_gpu else EXP_SHAPE
        src = [device.asarray((-10.0 * rng.random(shape)).astype(dtype)) for _ in range(workers)]
        dst = [xp.empty_like(s) for s in src]

        def exps(i: int) -> None:
            for _ in range(EXP_CALLS):
                xp.exp(src[i], out=dst[i])

        seconds = best_seconds(lambda: parallel_map(exps, list(range(workers)), like=like), repeats, sync=sync)
    exp_per_s = workers * EXP_CALLS * src[0].size / seconds
    return MachineLimit(
        dtype=dtype,
        threads=threads,
        gemm_flops_per_s=max(one_call, side_by_side),
        gemm_one_call_flops_per_s=one_call,
        gemm_side_by_side_flops_per_s=side_by_side,
        exp_per_s=exp_per_s,
    )
