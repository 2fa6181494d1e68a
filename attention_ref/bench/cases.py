"""What the benchmark runs: our attention paths and the bare matrix products of the same shapes.

Each :class:`Runner` is a pair of closures over prepared inputs, ``state = fwd()``
and ``bwd(state)``, with the flop count of its matrix products. Parts:

* ``"plain"`` — :func:`attention_forward` / :func:`attention_backward` on
  ``q, k, v (1, heads, N, d)``;
* ``"tiled"`` — ``chunked_attention_forward`` / ``chunked_attention_backward`` (the
  FlashAttention-style path), when this version of the package has it;
* ``"block"`` — ``self_attention_forward`` / ``self_attention_backward`` on a
  ``(1, √N, √N, heads·d)`` map, when this version has it.

The GEMM bound of a part does only its matrix products, with the same shapes:
``4·N²·d`` flops per head forward (``S = Q Kᵀ``, ``O = P V``) and ``8·N²·d`` backward
(``dP = dO Vᵀ``, ``dV = Pᵀ dO``, ``dQ = dS K``, ``dK = dSᵀ Q``), plus, for the block,
the four ``C×C`` projections (``2·N·C²`` flops each forward, twice that backward).
Its backward multiplies by a fixed random stand-in for ``P`` and ``dS``: the values
do not change the time, only the shapes do.
"""

from __future__ import annotations

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

PARTS = ("plain", "tiled", "block")

# the functions each part needs, looked up on the package when the benchmark runs
_NEEDS = {
    "plain": ("attention_forward", "attention_backward"),
    "tiled": ("chunked_attention_forward", "chunked_attention_backward"),
    "block": ("init_self_attention", "self_attention_forward", "self_attention_backward"),
}


@dataclass
class Runner:
    """One implementation of one case: ``state = fwd()``, then ``bwd(state)``."""

    impl: str  # "ours", "torch" or "gemm"
    fwd: Callable[[], Any]
    bwd: Callable[[Any], Any]
    memory_method: str | None  # how peak memory is measured; None: not measured
    flops_fwd: float
    flops_bwd: float


@dataclass
class Inputs:
    """Random NumPy inputs of one case (fixed seed); peers convert them to their own arrays."""

    part: str
    n: int
    heads: int
    d: int
    dtype: str
    q: np.ndarray  # (1, heads, N, d)
    k: np.ndarray  # (1, heads, N, d)
    v: np.ndarray  # (1, heads, N, d)
    dout: np.ndarray  # (1, heads, N, d); for the block, (1, side, side, C)
    x: np.ndarray | None = None  # the block's input map (1, side, side, C)
    params: dict[str, np.ndarray] | None = None  # the block's parameters, stored (in, out)

    @property
    def channels(self) -> int:
        return self.heads * self.d

    @property
    def side(self) -> int:
        return math.isqrt(self.n)


def part_available(part: str) -> bool:
    """Whether this version of attention_ref has the functions ``part`` needs."""
    return all(hasattr(attention_ref, name) for name in _NEEDS[part])


def part_runs_at(part: str, n: int) -> str | None:
    """``None`` when ``part`` runs at this N, else the reason it does not."""
    if not part_available(part):
        return f"{'/'.join(_NEEDS[part][-2:])} not in this version of attention_ref"
    if part in ("plain", "block") and n > FULL_MATRIX_LIMIT:
        return f"holds N×N matrices: runs up to N = {FULL_MATRIX_LIMIT}"
    if part == "block" and math.isqrt(n) ** 2 != n:
        return "the block needs a square map: N must be a perfect square"
    return None


def make_inputs(part: str, n: int, heads: int, d: int, dtype: str, seed: int = 0) -> Inputs:
    """Seeded standard-normal inputs for one case."""
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((1, heads, n, d)).astype(dtype) for _ in range(4))
    inputs = Inputs(part, n, heads, d, dtype, q, k, v, dout)
    if part == "block":
        side, c = math.isqrt(n), heads * d
        inputs.x = rng.standard_normal((1, side, side, c)).astype(dtype)
        inputs.dout = rng.standard_normal((1, side, side, c)).astype(dtype)
        params = attention_ref.init_self_attention(c, heads=heads, groups=BLOCK_GROUPS, rng=rng, dtype=dtype)
        inputs.params = {name: np.asarray(attention_ref.backend.to_numpy(p)) for name, p in params.items()}
    return inputs


def attention_flops(inputs: Inputs) -> tuple[float, float]:
    """Flops of the attention matrix products, forward and backward: 4·N²·d and 8·N²·d per head."""
    per_head = inputs.n * inputs.n * inputs.d
    return 4.0 * inputs.heads * per_head, 8.0 * inputs.heads * per_head


def case_flops(inputs: Inputs) -> tuple[float, float]:
    """Flops of every matrix product of the case (attention, plus the block's four projections)."""
    fwd, bwd = attention_flops(inputs)
    if inputs.part == "block":
        projections = 4 * 2.0 * inputs.n * inputs.channels**2
        fwd, bwd = fwd + projections, bwd + 2 * projections
    return fwd, bwd


def ours(inputs: Inputs, device: Device, tiled_options: dict[str, Any] | None = None) -> Runner:
    """Our implementation of the case, on ``device``'s arrays."""
    to = device.asarray
    dout = to(inputs.dout)
    if inputs.part == "block":
        x = to(inputs.x)
        params = {name: to(p) for name, p in inputs.params.items()}
        forward, backward = attention_ref.self_attention_forward, attention_ref.self_attention_backward

        def fwd() -> Any:
            return forward(x, params, heads=inputs.heads, groups=BLOCK_GROUPS)

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

    return Runner("ours", fwd, bwd, device.memory_method, *case_flops(inputs))


def gemm_bound(inputs: Inputs, device: Device) -> Runner:
    """The bare matrix products of the case, done the fastest way NumPy can do them here.

    The products of one head are independent of the other heads', and within a head those of one band of
    ``GEMM_ROWS`` queries of the others' (up to the sums into ``dK`` and ``dV``). So the work is cut into
    (head, group of query bands) tasks and spread over the cores with single-threaded BLAS calls
    (:func:`attention_ref.backend.parallel_map`), which beats one multi-threaded BLAS call per product
    on these thin shapes; on a GPU the tasks run one after another.
    """
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

    return Runner("gemm", fwd, bwd, None, *case_flops(inputs))
