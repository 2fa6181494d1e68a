r"""Tiled exact attention (the FlashAttention algorithm): O(N) memory, the same result as :mod:`.exact`.

Exact attention forms the ``N × M`` weight matrix ``P``; at 128×128 pixels that is 2 GiB per head in
float64. This module computes the same ``O = softmax(S) V`` one tile of ``block_q`` queries ×
``block_k`` keys at a time and never holds more than one tile of ``S`` or ``P``.

Forward: online softmax. For one tile of queries, walk over the key tiles ``j`` keeping, per query
row, the running maximum ``m``, the running sum ``ℓ`` of ``exp(S − m)`` and the running unnormalised
output ``A``. With ``S_j`` the logits against key tile ``j``:

.. math::
    m' = \max(m, \max_k S_{j,k}), \quad \alpha = e^{m - m'}, \quad
    \tilde P_j = e^{S_j - m'}, \quad
    \ell' = \alpha\,\ell + \textstyle\sum_k \tilde P_{j,k}, \quad
    A' = \alpha A + \tilde P_j V_j .

Multiplying by ``α`` re-expresses everything summed so far relative to the new maximum, so after the
last tile ``A = Σ_k e^{S_k − m} V_k`` and ``ℓ = Σ_k e^{S_k − m}`` with ``m`` the row's true maximum:

.. math:: O = A / \ell, \qquad \operatorname{lse} = m + \log \ell = \log \textstyle\sum_k e^{S_k}.

Backward: nothing ``N × M`` was saved, only ``O`` and ``lse`` (``(..., N)``). Each tile of weights is
recomputed exactly from them, ``P = exp(S − lse)``, and then the gradients of :mod:`.exact` are formed
tile by tile:

.. math::
    dV_j \mathrel{+}= P^\top dO_i, \quad dP = dO_i V_j^\top, \quad
    dS = P \circ (dP - D_i), \quad dQ_i \mathrel{+}= \text{scale}\; dS\,K_j, \quad
    dK_j \mathrel{+}= \text{scale}\; dS^\top Q_i,

with ``D_i = Σ_k P_ik dP_ik = dO_i · O_i`` (one number per query, computed once from ``O``), and
``d bias`` = ``dS`` summed per tile to the bias's own shape.

Masks and biases stay in their broadcast shape: each tile slices the rows and columns it needs, and an
axis of size 1 is used whole. A query with no allowed key has ``ℓ = 0``: its output is 0, its ``lse`` is
``−inf``, and its recomputed weights (and so its gradients) are 0. A NaN logit makes its row's output and
``lse`` NaN, a ``+inf`` logit its output NaN and its ``lse`` ``+inf``, as in :mod:`.exact`; float16 inputs
are computed in float32 (``lse`` stays float32) and the results rounded to float16.

Block size. ``block_size=None`` uses ``DEFAULT_BLOCK_SIZE`` = 512 queries × 512 keys: a float64 tile is
2 MiB, small enough that the few temporaries of a tile stay cache-friendly and that memory is
dominated by the O(N·d) inputs and outputs, large enough that each tile is a real matrix product and
the Python loop runs only ``⌈N/512⌉·⌈M/512⌉`` times (64 tiles at N = M = 4096). Peak extra memory is
a handful of ``block_q × block_k`` tiles per thread plus O(N·(d + dv)) for the outputs and gradients, and
one more ``(..., N, d)`` share of ``dQ`` per thread (see Speed).

Speed. Each tile's elementwise work runs in the memory of the tile it starts from (in-place ``-=`` and
``*=``, and an in-place ``exp`` where the backend has one: :func:`attention_ref.backend.exp_inplace`),
so a tile costs its matrix products plus four passes over ``block_q × block_k`` numbers forward (max,
subtract, exp, sum) and four backward (subtract, exp, subtract, multiply). The work is spread over the
CPU's cores with :func:`attention_ref.backend.parallel_map`: forward, the query tiles are independent;
backward, the key tiles are dealt round-robin to the workers, each of which owns its tiles' ``dK_j`` and
``dV_j`` and sums its own share of ``dQ`` (and ``d bias``), added up at the end — each worker holds
one more ``(..., N, d)`` array. On one worker (any backend but NumPy) the order of the sums is the
original one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from .._checks import as_dtype, in_working_dtype, sum_to_shape
from ..backend import Array, cpu_workers, device_of, exp_inplace, namespace, parallel_map
from ..ops.softmax import safe_shift
from .inputs import check_attention_inputs, check_cache, check_dout
from .masks import as_pair

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ChunkedAttentionCache",
    "chunked_attention_backward",
    "chunked_attention_forward",
]

DEFAULT_BLOCK_SIZE = 512


@dataclass(frozen=True)
class ChunkedAttentionCache:
    """What :func:`chunked_attention_backward` needs: inputs, output and per-row log-sum-exp, no N×M array.

    ``weights`` is always ``None``: the point of this variant is never to store the ``(..., N, M)``
    weight matrix. :meth:`weight_rows` recomputes any band of its rows exactly.
    """

    q: Array  # (..., N, d)
    k: Array  # (..., M, d)
    v: Array  # (..., M, dv)
    out: Array  # O, (..., N, dv)
    # lse_i = log Σ_j exp(S_ij) over allowed keys, (..., N); -inf for fully masked rows; float32 for float16 input
    logsumexp: Array
    scale: float
    mask: Array | None  # as given (broadcastable to (..., N, M))
    bias: Array | None  # as given (broadcastable to (..., N, M))
    block_q: int
    block_k: int
    weights: None = field(default=None, init=False)  # never stored; see weight_rows

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return None if self.bias is None else tuple(self.bias.shape)

    def weight_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the weights ``P``, ``(..., stop − start, M)``, recomputed as ``exp(S − lse)``."""
        xp = namespace(self.q)
        rows = slice(start, stop)
        q, k, bias = in_working_dtype(xp, self.q, self.k, self.bias)
        mask, bias = _at_least_2d(xp, self.mask), _at_least_2d(xp, bias)
        q_rows = self.scale * q[..., rows, :]
        lse = _safe_lse(xp, self.logsumexp[..., rows])
        tiles = []
        for cols in _blocks(k.shape[-2], self.block_k, at_least_one=True):
            logits = _logits_tile(xp, q_rows, k[..., cols, :], mask, bias, rows, cols)
            tiles.append(xp.exp(logits - lse))
        return as_dtype(xp, xp.concat(tiles, axis=-1), self.q.dtype)


# ---------------------------------------------------------------- tiles


def _block_sizes(block_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """``(block_q, block_k)`` from ``None`` (the default), one int (both) or a pair."""
    if block_size is None:
        return DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE
    block_q, block_k = as_pair("block_size", block_size)
    if min(block_q, block_k) < 1:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return block_q, block_k


def _blocks(n: int, size: int, *, at_least_one: bool = False) -> list[slice]:
    """``[0:size], [size:2·size], …`` covering ``range(n)``; the last one may be shorter.

    For ``n = 0`` there are no blocks, or one empty block ``[0:0]`` with ``at_least_one`` (so that
    results with an axis of length 0 still get their shape from the loop over blocks).
    """
    blocks = [slice(start, min(start + size, n)) for start in range(0, n, size)]
    return blocks or ([slice(0, 0)] if at_least_one else [])


def _at_least_2d(xp: ModuleType, a: Array | None) -> Array | None:
    """A mask or bias with fewer than 2 dims, viewed as ``(1, M)`` or ``(1, 1)`` so it has row and column axes."""
    if a is None or a.ndim >= 2:
        return a
    return xp.reshape(a, (1,) * (2 - a.ndim) + tuple(a.shape))


def _tile(a: Array, rows: slice, cols: slice) -> Array:
    """``a[..., rows, cols]`` for a broadcastable mask or bias; an axis of size 1 is taken whole."""
    r = slice(None) if a.shape[-2] == 1 else rows
    c = slice(None) if a.shape[-1] == 1 else cols
    return a[..., r, c]


def _logits_tile(
    xp: ModuleType, q_scaled: Array, k_cols: Array, mask: Array | None, bias: Array | None, rows: slice, cols: slice
) -> Array:
    """One tile of logits, ``-inf`` where masked: ``(..., rows, cols)``."""
    # S = scale · Q Kᵀ + bias   (..., block_q, block_k); the scale was applied to Q already
    logits = q_scaled @ xp.matrix_transpose(k_cols)
    if bias is not None:
        logits += _tile(bias, rows, cols)
    if mask is not None:
        logits = xp.where(_tile(mask, rows, cols), logits, -xp.inf)
    return logits


def _safe_lse(xp: ModuleType, lse: Array) -> Array:
    """``lse`` as ``(..., rows, 1)``, safe to subtract (:func:`attention_ref.ops.softmax.safe_shift`).

    0 for fully masked rows, so that ``exp(-inf - 0) = 0``, never NaN; NaN for a row whose ``lse`` is
    ``+inf``, so that its weights are NaN (as the forward's) without the warning ``inf - inf`` raises.
    """
    return safe_shift(xp, xp.expand_dims(lse, axis=-1))


# ---------------------------------------------------------------- forward


def chunked_attention_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    block_size: int | tuple[int, int] | None = None,
) -> tuple[Array, ChunkedAttentionCache]:
    """Exact attention ``softmax(scale · q kᵀ + bias) v`` computed tile by tile, in O(N) memory.

    Inputs (as :func:`attention_ref.attention_forward`):
        q: ``(..., N, d)`` queries.
        k: ``(..., M, d)`` keys; leading dims equal to q's.
        v: ``(..., M, dv)`` values.
        mask: boolean, broadcastable to ``(..., N, M)``; True = may attend. Sliced per tile, never expanded.
        bias: float (q's dtype), broadcastable to ``(..., N, M)``; sliced per tile.
        scale: multiplies ``q kᵀ``; default ``1/sqrt(d)``.
        block_size: ``int`` (queries and keys per tile) or ``(block_q, block_k)``; default 512.

    Returns:
        out: ``(..., N, dv)``, equal to ``attention_forward``'s to rounding.
        cache: :class:`ChunkedAttentionCache`; ``cache.logsumexp`` is ``(..., N)``.
    """
    xp, scale = check_attention_inputs(q, k, v, mask, bias, scale)
    block_q, block_k = _block_sizes(block_size)
    q_w, k_w, v_w, bias_w = in_working_dtype(xp, q, k, v, bias)
    mask2, bias2 = _at_least_2d(xp, mask), _at_least_2d(xp, bias_w)

    def query_tile(rows: slice) -> tuple[Array, Array]:
        return _forward_rows(xp, scale * q_w[..., rows, :], k_w, v_w, mask2, bias2, rows, block_k)

    # query tiles are independent: on NumPy they run on all cores (see attention_ref.backend.parallel_map)
    tiles = parallel_map(query_tile, _blocks(q.shape[-2], block_q, at_least_one=True), like=q)
    out_tiles, lse_tiles = [out_rows for out_rows, _ in tiles], [lse_rows for _, lse_rows in tiles]
    out = as_dtype(xp, xp.concat(out_tiles, axis=-2), q.dtype)  # (..., N, dv)
    cache = ChunkedAttentionCache(
        q=q,
        k=k,
        v=v,
        out=out,
        logsumexp=xp.concat(lse_tiles, axis=-1),  # (..., N)
        scale=scale,
        mask=mask,
        bias=bias,
        block_q=block_q,
        block_k=block_k,
    )
    return out, cache


def _forward_rows(
    xp: ModuleType,
    q_scaled: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    bias: Array | None,
    rows: slice,
    block_k: int,
) -> tuple[Array, Array]:
    """Output ``(..., rows, dv)`` and log-sum-exp ``(..., rows)`` of one tile of queries, by online softmax."""
    dev = device_of(q_scaled)
    stats_shape = (*q_scaled.shape[:-1], 1)  # (..., block_q, 1): one number per query row
    running_max = xp.full(stats_shape, -xp.inf, dtype=q_scaled.dtype, device=dev)  # m
    running_sum = xp.zeros(stats_shape, dtype=q_scaled.dtype, device=dev)  # ℓ
    acc = xp.zeros((*q_scaled.shape[:-1], v.shape[-1]), dtype=q_scaled.dtype, device=dev)  # A, (..., block_q, dv)
    shift = safe_shift(xp, running_max)
    for cols in _blocks(k.shape[-2], block_k):
        logits = _logits_tile(xp, q_scaled, k[..., cols, :], mask, bias, rows, cols)  # (..., block_q, block_k)
        # m' = max(m, max_k S_k)
        new_max = xp.maximum(running_max, xp.max(logits, axis=-1, keepdims=True))
        # subtract 0 instead of -inf while a row has seen no allowed key (exp(-inf - 0) = 0, not NaN),
        # and NaN instead of +inf once it has seen a +inf logit (its row is NaN; inf - inf would warn)
        shift = safe_shift(xp, new_max)
        # P̃ = exp(S - m'), computed in the logits' memory
        logits -= shift
        p_tilde = exp_inplace(xp, logits)
        # α = exp(m - m'): rescales what was summed under the old maximum
        alpha = xp.exp(running_max - shift)
        # ℓ' = α ℓ + Σ_k P̃_k
        running_sum = alpha * running_sum + xp.sum(p_tilde, axis=-1, keepdims=True)
        # A' = α A + P̃ V_j
        acc = alpha * acc + p_tilde @ v[..., cols, :]
        running_max = new_max
    dead = running_sum == 0.0  # no allowed key (a NaN sum is not 0: NaN is never taken for "masked")
    # O = A / ℓ   (a fully masked row has A = 0 and ℓ = 0: divide by 1 instead)
    out = acc / xp.where(dead, 1.0, running_sum)
    # lse = m + log ℓ, and -inf (the log of an empty sum) for a fully masked row, without a warning
    lse = xp.where(dead, -xp.inf, shift + xp.log(xp.where(dead, 1.0, running_sum)))
    # a row with a +inf logit (and no NaN): lse = +inf
    lse = xp.where(running_max == xp.inf, xp.inf, lse)
    return out, xp.squeeze(lse, axis=-1)


# ---------------------------------------------------------------- backward


def chunked_attention_backward(dout: Array, cache: ChunkedAttentionCache) -> dict[str, Array]:
    """Gradients of :func:`chunked_attention_forward`, recomputing the weights tile by tile.

    Inputs:
        dout: ``(..., N, dv)``, the gradient of the loss with respect to ``out``.
        cache: from :func:`chunked_attention_forward`.

    Returns:
        ``{"q": (..., N, d), "k": (..., M, d), "v": (..., M, dv)}``, plus ``"bias"`` in the bias's own
        shape when a bias was given — the same as :func:`attention_ref.attention_backward`.
    """
    check_cache(cache, ChunkedAttentionCache, "chunked_attention_backward")
    xp = check_dout(dout, like=cache.q, shape=cache.out.shape)
    dtype, scale = cache.q.dtype, cache.scale
    q, k, v, bias, dout, out = in_working_dtype(xp, cache.q, cache.k, cache.v, cache.bias, dout, cache.out)
    mask, bias = _at_least_2d(xp, cache.mask), _at_least_2d(xp, bias)
    row_blocks = _blocks(q.shape[-2], cache.block_q, at_least_one=True)
    col_blocks = _blocks(k.shape[-2], cache.block_k, at_least_one=True)
    # D_i = Σ_k P_ik dP_ik = dO_i · O_i   (..., N, 1)
    delta = xp.sum(dout * out, axis=-1, keepdims=True)
    lse = _safe_lse(xp, cache.logsumexp)  # (..., N, 1)
    q_scaled = scale * q

    def key_tiles(tile_indices: list[int]) -> _KeyTilesGrads:
        """Gradients from key tiles ``tile_indices``: their own dK_j, dV_j, and their share of dQ and d bias."""
        part = _KeyTilesGrads(dq_tiles=[0.0] * len(row_blocks))
        for cj in tile_indices:
            cols = col_blocks[cj]
            k_j, v_j = k[..., cols, :], v[..., cols, :]
            dk_j, dv_j = 0.0, 0.0
            for ri, rows in enumerate(row_blocks):
                dout_i = dout[..., rows, :]
                logits = _logits_tile(xp, q_scaled[..., rows, :], k_j, mask, bias, rows, cols)
                # P = exp(S - lse): the forward's weights, recomputed exactly in the logits' memory
                logits -= lse[..., rows, :]
                weights = exp_inplace(xp, logits)  # (..., block_q, block_k)
                # dV_j += Pᵀ dO_i
                dv_j = dv_j + xp.matrix_transpose(weights) @ dout_i
                # dP = dO_i V_jᵀ
                dweights = dout_i @ xp.matrix_transpose(v_j)
                # dS = P ∘ (dP - D_i), formed in dP's memory
                dweights -= delta[..., rows, :]
                dweights *= weights
                dlogits = dweights
                # dQ_i += dS K_j ;  dK_j += dSᵀ Q_i   (times scale, below)
                part.dq_tiles[ri] = part.dq_tiles[ri] + dlogits @ k_j
                dk_j = dk_j + xp.matrix_transpose(dlogits) @ q[..., rows, :]
                if bias is not None:
                    _accumulate_bias_grad(xp, part.dbias_tiles, dlogits, bias, ri, cj)
            part.dk_tiles[cj] = scale * dk_j
            part.dv_tiles[cj] = dv_j
        return part

    # Each key tile owns its dK_j and dV_j; dQ and d bias collect from every key tile. So the key tiles
    # are dealt round-robin to the workers (one group on one core, all on NumPy with several), each
    # worker sums its own share of dQ and d bias, and the shares are added up at the end.
    workers = min(cpu_workers(q), len(col_blocks))
    parts = parallel_map(key_tiles, [list(range(w, len(col_blocks), workers)) for w in range(workers)], like=q)
    dq_tiles, dk_tiles, dv_tiles, dbias_tiles = parts[0].dq_tiles, {}, {}, {}
    for part in parts[1:]:
        dq_tiles = [a + b for a, b in zip(dq_tiles, part.dq_tiles, strict=True)]
    for part in parts:
        dk_tiles.update(part.dk_tiles)
        dv_tiles.update(part.dv_tiles)
        for key, g in part.dbias_tiles.items():
            dbias_tiles[key] = g if key not in dbias_tiles else dbias_tiles[key] + g

    grads = {
        "q": scale * xp.concat(dq_tiles, axis=-2),  # dQ = scale · dS K   (..., N, d)
        "k": xp.concat([dk_tiles[cj] for cj in range(len(col_blocks))], axis=-2),  # dK = scale · dSᵀ Q
        "v": xp.concat([dv_tiles[cj] for cj in range(len(col_blocks))], axis=-2),  # dV = Pᵀ dO   (..., M, dv)
    }
    if bias is not None:
        grads["bias"] = xp.reshape(_assemble_bias_grad(xp, dbias_tiles), cache.bias_shape)
    return {name: as_dtype(xp, g, dtype) for name, g in grads.items()}


@dataclass
class _KeyTilesGrads:
    """One worker's share of the backward: its key tiles' dK_j and dV_j, its sums into dQ and d bias."""

    dq_tiles: list[Array]  # per query tile: Σ over this worker's key tiles of dS K_j, (..., block_q, d)
    dk_tiles: dict[int, Array] = field(default_factory=dict)  # key tile index → scale · Σ_i dSᵀ Q_i
    dv_tiles: dict[int, Array] = field(default_factory=dict)  # key tile index → Σ_i Pᵀ dO_i
    dbias_tiles: dict[tuple[int, int], Array] = field(default_factory=dict)  # as in _accumulate_bias_grad


def _accumulate_bias_grad(
    xp: ModuleType, tiles: dict[tuple[int, int], Array], dlogits: Array, bias: Array, ri: int, cj: int
) -> None:
    """Add ``dS`` of tile ``(ri, cj)``, summed to the bias tile's shape, into ``tiles``.

    A bias axis of size 1 was used whole by every tile along it, so its gradient collects
    into tile index 0 along that axis.
    """
    rows_len = 1 if bias.shape[-2] == 1 else dlogits.shape[-2]
    cols_len = 1 if bias.shape[-1] == 1 else dlogits.shape[-1]
    key = (0 if bias.shape[-2] == 1 else ri, 0 if bias.shape[-1] == 1 else cj)
    # d bias = dS, summed over every axis the bias was broadcast along
    g = sum_to_shape(xp, dlogits, (*bias.shape[:-2], rows_len, cols_len))
    tiles[key] = g if key not in tiles else tiles[key] + g


def _assemble_bias_grad(xp: ModuleType, tiles: dict[tuple[int, int], Array]) -> Array:
    """Glue the per-tile bias gradients back into one array of the (at least 2-D) bias shape."""
    n_rows = 1 + max(r for r, _ in tiles)
    n_cols = 1 + max(c for _, c in tiles)
    bands = [xp.concat([tiles[(r, c)] for c in range(n_cols)], axis=-1) for r in range(n_rows)]
    return xp.concat(bands, axis=-2)
