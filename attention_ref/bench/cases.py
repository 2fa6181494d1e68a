"""What the benchmark runs: our attention paths, the bare matrix products of the same shapes, and the work
(matrix-product flops and exponentials) each path does, from which :mod:`.limits` makes the machine's limit.

Each :class:`Runner` is a pair of closures over prepared inputs, ``state = fwd()``
and ``bwd(state)``, with the work of its case. Parts:

* ``"plain"`` — :func:`attention_forward` / :func:`attention_backward` on
  ``q, k, v (1, heads, N, d)`` (the readable path's fast twin, holding ``N × N`` weights);
* ``"tiled"`` — ``chunked_attention_forward`` / ``chunked_attention_backward`` (the
  FlashAttention-style path), when this version of the package has it;
* ``"block"`` — ``self_attention_forward`` / ``self_attention_backward`` on a
  ``(1, √N, √N, heads·d)`` map, when this version has it;
* ``"self-small"``, ``"cross-small"`` — the self- and cross-attention blocks on a batch of
  ``SMALL_BATCH`` maps of ``8 × 8 × 64`` (cross: ``SMALL_CONTEXT`` context tokens of width 64), the size of
  the toys and of a diffusion U-Net's inner stages: very few flops, so what they measure is overhead.
  They do not depend on N and run once.

Work per head, ``N`` queries, ``M`` keys, width ``d``:

* matrix products: ``4·N·M·d`` flops forward (``S = Q Kᵀ``, ``O = P V``) and ``8·N·M·d`` backward
  (``dP = dO Vᵀ``, ``dV = Pᵀ dO``, ``dQ = dS K``, ``dK = dSᵀ Q``); the tiled path recomputes ``S`` in its
  backward (``2·N·M·d`` more), the plain path keeps ``P``;
* exponentials: ``N·M`` forward; the tiled path recomputes ``P = exp(S − lse)`` backward (``N·M`` more);
* the blocks add their projections (``2·rows·in·out`` flops each forward, twice that backward).

The GEMM bound of a part does only the plain path's matrix products, with the same shapes. Its backward
multiplies by a fixed random stand-in for ``P`` and ``dS``: the values do not change the time, only the
shapes do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import attention_ref
from attention_ref.backend import cpu_workers, parallel_map

from .measure import Device

# parts that hold whole N×N matrices run up to this N (at 16,384 one float64 head's weights are 2 GiB)
FULL_MATRIX_LIMIT = 4096
# the GEMM bound multiplies this many query rows at a time (tiles that stay in cache, fit in memory at any N)
GEMM_ROWS = 512
BLOCK_GROUPS = 32
# the small blocks: SMALL_BATCH maps of SMALL_SIDE × SMALL_SIDE × SMALL_CHANNELS; cross-attention to
# SMALL_CONTEXT tokens of width SMALL_CHANNELS
SMALL_BATCH = 32
SMALL_SIDE = 8
SMALL_CHANNELS = 64
SMALL_CONTEXT = 16

PARTS = ("plain", "tiled", "block", "self-small", "cross-small")
SMALL_PARTS = ("self-small", "cross-small")
BLOCK_PARTS = ("block", *SMALL_PARTS)

# the functions each part needs, looked up on the package when the benchmark runs
_NEEDS = {
    "plain": ("attention_forward", "attention_backward"),
    "tiled": ("chunked_attention_forward", "chunked_attention_backward"),
    "block": ("init_self_attention", "self_attention_forward", "self_attention_backward"),
    "self-small": ("init_self_attention", "self_attention_forward", "self_attention_backward"),
    "cross-small": ("init_cross_attention", "cross_attention_forward", "cross_attention_backward"),
}


@dataclass(frozen=True)
class Work:
    """What one implementation of a case computes: matrix-product flops and exponentials, forward and backward."""

    flops_fwd: float
    flops_bwd: float
    exps_fwd: float
    exps_bwd: float

    @property
    def flops(self) -> float:
        return self.flops_fwd + self.flops_bwd

    @property
    def exps(self) -> float:
        return self.exps_fwd + self.exps_bwd


@dataclass
class Runner:
    """One implementation of one case: ``state = fwd()``, then ``bwd(state)``."""

    impl: str  # "ours", "torch" or "gemm"
    fwd: Callable[[], Any]
    bwd: Callable[[Any], Any]
    memory_method: str | None  # how peak memory is measured; None: not measured
    work: Work


@dataclass
class Inputs:
    """Random NumPy inputs of one case (fixed seed); peers convert them to their own arrays."""

    part: str
    n: int  # tokens per map (queries)
    heads: int
    d: int
    dtype: str
    q: np.ndarray  # (batch, heads, N, d)
    k: np.ndarray  # (batch, heads, M, d)
    v: np.ndarray  # (batch, heads, M, d)
    dout: np.ndarray  # (batch, heads, N, d); for the blocks, (batch, side, side, C)
    batch: int = 1
    m: int | None = None  # keys (None: N); for cross-attention, the context tokens
    x: np.ndarray | None = None  # the blocks' input maps (batch, side, side, C)
    context: np.ndarray | None = None  # cross-attention's context (batch, M, C)
    params: dict[str, np.ndarray] | None = None  # the blocks' parameters, stored (in, out)

    @property
    def channels(self) -> int:
        return self.heads * self.d

    @property
    def side(self) -> int:
        return math.isqrt(self.n)

    @property
    def keys(self) -> int:
        return self.n if self.m is None else self.m


def part_available(part: str) -> bool:
    """Whether this version of attention_ref has the functions ``part`` needs."""
    return all(hasattr(attention_ref, name) for name in _NEEDS[part])


def part_runs_at(part: str, n: int) -> str | None:
    """``None`` when ``part`` runs at this N, else the reason it does not (the small parts ignore N)."""
    if not part_available(part):
        return f"{'/'.join(_NEEDS[part][-2:])} not in this version of attention_ref"
    if part in SMALL_PARTS:
        return None
    if part in ("plain", "block") and n > FULL_MATRIX_LIMIT:
        return f"holds N×N matrices: runs up to N = {FULL_MATRIX_LIMIT}"
    if part == "block" and math.isqrt(n) ** 2 != n:
        return "the block needs a square map: N must be a perfect square"
    return None


def make_inputs(part: str, n: int, heads: int, d: int, dtype: str, seed: int = 0) -> Inputs:
    """Seeded standard-normal inputs for one case (the small parts take their own sizes, and ``heads``)."""
    rng = np.random.default_rng(seed)
    batch, m = 1, None
    if part in SMALL_PARTS:
        batch, n, d = SMALL_BATCH, SMALL_SIDE * SMALL_SIDE, SMALL_CHANNELS // heads
        m = SMALL_CONTEXT if part == "cross-small" else None
    keys = n if m is None else m
    q, dout = (rng.standard_normal((batch, heads, n, d)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((batch, heads, keys, d)).astype(dtype) for _ in range(2))
    inputs = Inputs(part, n, heads, d, dtype, q, k, v, dout, batch=batch, m=m)
    if part in BLOCK_PARTS:
        side, c = math.isqrt(n), heads * d
        inputs.x = rng.standard_normal((batch, side, side, c)).astype(dtype)
        inputs.dout = rng.standard_normal((batch, side, side, c)).astype(dtype)
        if part == "cross-small":
            inputs.context = rng.standard_normal((batch, keys, c)).astype(dtype)
            params = attention_ref.init_cross_attention(c, c, heads=heads, groups=BLOCK_GROUPS, rng=rng, dtype=dtype)
        else:
            params = attention_ref.init_self_attention(c, heads=heads, groups=BLOCK_GROUPS, rng=rng, dtype=dtype)
        inputs.params = {name: np.asarray(attention_ref.backend.to_numpy(p)) for name, p in params.items()}
    return inputs


def work(inputs: Inputs, impl: str = "ours") -> Work:
    """The flops and exponentials ``impl`` does on the case (see the module docstring).

    The tiled path (ours, and torch's CPU kernel, which is tiled too) recomputes ``S`` and ``P`` in its
    backward; the plain path, the blocks (exact attention) and the bare GEMMs do not.
    """
    problems = inputs.batch * inputs.heads
    logits = problems * inputs.n * inputs.keys  # N·M per head, all heads and samples
    flops_fwd, flops_bwd = 4.0 * logits * inputs.d, 8.0 * logits * inputs.d
    exps_fwd, exps_bwd = float(logits), 0.0
    if inputs.part == "tiled" and impl != "gemm":
        flops_bwd += 2.0 * logits * inputs.d
        exps_bwd += logits
    if inputs.part in BLOCK_PARTS:
        rows, c = inputs.batch * inputs.n, inputs.channels
        key_rows = inputs.batch * inputs.keys
        # Q and the output projection on the map's rows, K and V on the keys' (the map's, or the context's)
        projections = 2.0 * (2 * rows + 2 * key_rows) * c * c
        flops_fwd, flops_bwd = flops_fwd + projections, flops_bwd + 2 * projections
    if impl == "gemm":
        exps_fwd = 0.0
    return Work(flops_fwd, flops_bwd, exps_fwd, exps_bwd)


def case_flops(inputs: Inputs) -> tuple[float, float]:
    """Flops of the plain path's matrix products (attention, plus the blocks' projections), forward and backward."""
    w = work(inputs, "gemm")
    return w.flops_fwd, w.flops_bwd


def ours(inputs: Inputs, device: Device, tiled_options: dict[str, Any] | None = None) -> Runner:
    """Our implementation of the case, on ``device``'s arrays."""
    to = device.asarray
    dout = to(inputs.dout)
    if inputs.part in BLOCK_PARTS:
        x = to(inputs.x)
        params = {name: to(p) for name, p in inputs.params.items()}
        if inputs.part == "cross-small":
            context = to(inputs.context)
            backward = attention_ref.cross_attention_backward

            def fwd() -> Any:
                return attention_ref.cross_attention_forward(
                    x, context, params, heads=inputs.heads, groups=BLOCK_GROUPS
                )

        else:
            backward = attention_ref.self_attention_backward

            def fwd() -> Any:
                return attention_ref.self_attention_forward(x, params, heads=inputs.heads, groups=BLOCK_GROUPS)

    else:
        q, k, v = to(inputs.q), to(inputs.k), to(inputs.v)
        if inputs.part == "plain":
            forward, backward, options = attention_ref.attention_forward, attention_ref.attention_backward, {}
        else:
            forward, backward = attention_ref.chunked_attention_forward, attention_ref.chunked_attention_backward
            options = dict(tiled_options or {})

        def fwd() -> Any:
            return forward(q, k, v, **options)

    def bwd(state: Any) -> Any:
        _, cache = state
        return backward(dout, cache)

    return Runner("ours", fwd, bwd, device.memory_method, work(inputs, "ours"))


def gemm_bound(inputs: Inputs, device: Device) -> Runner:
    """The bare matrix products of the case, done the fastest way NumPy can do them here.

    The products of one head are independent of the other heads', and within a head those of one band of
    ``GEMM_ROWS`` queries of the others' (up to the sums into ``dK`` and ``dV``). So the work is cut into
    (head, group of query bands) tasks and spread over the cores with single-threaded BLAS calls
    (:func:`attention_ref.backend.parallel_map`), which beats one multi-threaded BLAS call per product
    on these thin shapes; on a GPU the tasks run one after another. The small blocks' products are
    batched calls, cut by sample into one task per core.
    """
    if inputs.part in SMALL_PARTS:
        return _small_gemm_bound(inputs, device)
    xp, to = device.xp, device.asarray
    n, heads = inputs.n, inputs.heads
    # dO has q's shape (the block's map-shaped dout is for our block, not for its products)
    q, k, v, dout = (to(a[0]) for a in (inputs.q, inputs.k, inputs.v, inputs.q[..., ::-1, :]))  # (heads, N, d)
    rows = min(n, GEMM_ROWS)
    bands = [slice(s, min(s + rows, n)) for s in range(0, n, rows)]
    # enough (head, band group) tasks to keep every worker busy: ⌈workers / heads⌉ groups per head
    groups = min(len(bands), math.ceil(cpu_workers(q) / heads))
    tasks = [(h, bands[g::groups]) for h in range(heads) for g in range(groups)]
    # a fixed (rows, N) stand-in for P and dS in the backward's products
    stand_in = to(np.random.default_rng(1).standard_normal((rows, n)).astype(inputs.dtype))
    if inputs.part == "block":
        c = inputs.channels
        h_map = to(np.random.default_rng(2).standard_normal((n, c)).astype(inputs.dtype))  # (N, C)
        w = to(np.random.default_rng(3).standard_normal((c, c)).astype(inputs.dtype) / c)  # (C, C)

    def fwd_task(task: tuple[int, list[slice]]) -> list[Any]:
        h, my_bands = task
        kT = xp.matrix_transpose(k[h, ...])
        # S = Q Kᵀ (rows, N), then O = S V (rows, d), band by band
        return [xp.matmul(xp.matmul(q[h, band, :], kT), v[h, ...]) for band in my_bands]

    def bwd_task(task: tuple[int, list[slice]]) -> list[Any]:
        h, my_bands = task
        dv, dk, dq = 0, 0, []
        for band in my_bands:
            P = stand_in[: band.stop - band.start, :]
            do = dout[h, band, :]
            dS = xp.matmul(do, xp.matrix_transpose(v[h, ...]))  # dP (rows, N); its values stand in for dS
            dv = dv + xp.matmul(xp.matrix_transpose(P), do)
            dq.append(xp.matmul(dS, k[h, ...]))
            dk = dk + xp.matmul(xp.matrix_transpose(dS), q[h, band, :])
        return [dv, dk, *dq]

    def projections(backward: bool) -> list[Any]:
        if inputs.part != "block":
            return []
        if not backward:
            return [xp.matmul(h_map, w) for _ in range(4)]  # Q, K, V and output projections
        grads = []
        for _ in range(4):  # dX = dY Wᵀ and dW = Xᵀ dY for each projection
            grads += [xp.matmul(h_map, xp.matrix_transpose(w)), xp.matmul(xp.matrix_transpose(h_map), h_map)]
        return grads

    def fwd() -> Any:
        return parallel_map(fwd_task, tasks, like=q) + projections(backward=False)

    def bwd(state: Any) -> Any:
        return parallel_map(bwd_task, tasks, like=q) + projections(backward=True)

    return Runner("gemm", fwd, bwd, None, work(inputs, "gemm"))


def _small_gemm_bound(inputs: Inputs, device: Device) -> Runner:
    """The small blocks' bare products: projections as one ``(rows, C) @ (C, C)`` product each, attention as
    batched ``(N, d)`` products, the batch cut into one slab of samples per core."""
    xp, to = device.xp, device.asarray
    q, k, v = to(inputs.q), to(inputs.k), to(inputs.v)  # (batch, heads, N or M, d)
    c = inputs.channels
    rng = np.random.default_rng(2)
    h_map = to(rng.standard_normal((inputs.batch * inputs.n, c)).astype(inputs.dtype))  # the map's rows
    h_keys = to(rng.standard_normal((inputs.batch * inputs.keys, c)).astype(inputs.dtype))  # the keys' rows
    w = to(rng.standard_normal((c, c)).astype(inputs.dtype) / c)
    workers = max(1, min(cpu_workers(q), inputs.batch))
    bounds = [inputs.batch * i // workers for i in range(workers + 1)]
    slabs = [slice(a, b) for a, b in itertools.pairwise(bounds)]

    def fwd_slab(s: slice) -> Any:
        S = xp.matmul(q[s], xp.matrix_transpose(k[s]))  # (slab, heads, N, M)
        return xp.matmul(S, v[s])

    def bwd_slab(s: slice) -> Any:
        dS = xp.matmul(q[s], xp.matrix_transpose(v[s]))  # stands in for dP, P and dS
        return [
            xp.matmul(xp.matrix_transpose(dS), q[s]),  # dV = Pᵀ dO
            xp.matmul(dS, k[s]),  # dQ = dS K
            xp.matmul(xp.matrix_transpose(dS), q[s]),  # dK = dSᵀ Q
        ]

    def fwd() -> Any:
        # Q and the output projection on the map's rows, K and V on the keys'
        return [
            xp.matmul(h_map, w),
            xp.matmul(h_map, w),
            xp.matmul(h_keys, w),
            xp.matmul(h_keys, w),
            *parallel_map(fwd_slab, slabs, like=q),
        ]

    def bwd(state: Any) -> Any:
        grads = []
        for rows in (h_map, h_map, h_keys, h_keys):  # dX = dY Wᵀ and dW = Xᵀ dY for each projection
            grads += [xp.matmul(rows, xp.matrix_transpose(w)), xp.matmul(xp.matrix_transpose(rows), rows)]
        return grads + parallel_map(bwd_slab, slabs, like=q)

    return Runner("gemm", fwd, bwd, None, work(inputs, "gemm"))
