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
the Python loop runs only ``⌈N/512⌉·⌈M/512⌉`` times per problem (64 tiles at N = M = 4096). Peak extra
memory is a handful of ``block_q × block_k`` tiles per thread plus O(N·(d + dv)) for the outputs and
gradients, and, where one problem's key tiles are shared between threads, one more ``(N, d)`` share of
``dQ`` per share (see Speed).

Speed. What costs time is the seven matrix products per tile and the two exponentials per weight;
everything else is arranged to cost almost nothing:

* The subtractions ride in the products. A column appended to each operand puts a per-row number into
  a product: ``[scale·Q_i | -m] [K_j | 1]ᵀ = S_j - m`` and ``[dO_i | -D_i] [V_j | 1]ᵀ = dP - D_i``, and the
  ones column of ``[V_j | 1]`` makes ``P̃ [V_j | 1] = [P̃ V_j | Σ_k P̃_k]`` deliver the row sums ``ℓ``. So the
  backward's tile is product, ``exp``, product, product, one elementwise product ``dS = P ∘ (dP − D)``,
  product, product; no subtraction, no sum.
* The forward keeps its shift. The online softmax above needs ``m`` only to keep ``exp`` in range: any
  shift does, as long as it is the same for every tile of a row. So after its first key tile a query tile
  keeps the maximum found there as its shift, and each later tile is one product (``S_j - m``, shift
  included), an in-place ``exp``, and ``[A | ℓ] += P̃ [V_j | 1]`` — no pass for the maximum, no rescaling.
  A tile whose weights outgrow ``SHIFT_AGAIN_ABOVE`` (2¹⁶) in some row (a logit more than about 11 above
  the shift; also an ``exp`` that overflowed, or a NaN) is done again the careful way, with ``m`` moved
  to the new maximum and ``α`` as above; so is the first tile, and every tile while a row has no weight
  yet (fully masked so far). ``lse = m + log ℓ`` holds for any shift.
* The in-place ``exp`` (:func:`attention_ref.backend.exp_inplace`) writes over the tile it reads.
* ``dK_jᵀ += Q_iᵀ dS`` and ``dV_jᵀ += dO_iᵀ P`` are formed transposed: alone, OpenBLAS ran that product
  at 0.88 of its peak against 0.77 for ``Pᵀ dO_i`` (float64, 512² tiles, AMD EPYC).
* On NumPy the stack (batch × heads) is cut into its ``(N, M)`` problems, one at a time per thread, so
  that a tile is one problem's (2 MiB in float64, a core's L2 cache) rather than every head's at once.
  Elsewhere (CuPy, torch, array_api_strict) each tile takes the whole stack in one call.

The work is spread over the CPU's cores with :func:`attention_ref.backend.parallel_map`: forward, every
(problem, query tile) is independent; backward, each problem's key tiles are dealt round-robin into
groups (as many as it takes to give every worker work, one per problem when there are enough problems),
each group owns its tiles' ``dK_j`` and ``dV_j`` and sums its own share of ``dQ`` (and ``d bias``), and the
shares are added up at the end. The time against the machine's limit: docs/performance.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import ClassVar

from .._checks import as_dtype, check_cache, in_working_dtype, require_dout, sum_to_shape
from ..backend import (
    Array,
    cpu_workers,
    device_of,
    exp_inplace,
    matmul_into,
    namespace,
    namespace_name,
    overflow_unreported,
    parallel_map,
)
from ..ops.softmax import safe_shift
from .inputs import check_attention_inputs
from .masks import as_pair
from .per_matrix import Index, broadcast_index, matrix_indices, take

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "ChunkedAttentionCache",
    "chunked_attention_backward",
    "chunked_attention_forward",
]

DEFAULT_BLOCK_SIZE = 512
# a tile shifted by the running maximum m whose weights sum to more than this in some row is computed again
# with m moved to its own maximum (see Speed in the docstring)
SHIFT_AGAIN_ABOVE = 2.0**16


@dataclass(frozen=True)
class ChunkedAttentionCache:
    """What :func:`chunked_attention_backward` needs: inputs, output and per-row log-sum-exp, no N×M array.

    ``weights`` is always ``None``: the point of this variant is never to store the ``(..., N, M)``
    weight matrix. :meth:`weight_rows` recomputes any band of its rows exactly.
    """

    backward_names: ClassVar[tuple[str, ...]] = ("chunked_attention_backward",)  # the backward that takes it

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
    xp: ModuleType,
    q_scaled: Array,
    k_cols: Array,
    mask: Array | None,
    bias: Array | None,
    rows: slice,
    cols: slice,
    out: Array | None = None,
) -> Array:
    """One tile of logits, ``-inf`` where masked: ``(..., rows, cols)``; in ``out``'s memory when it fits."""
    # S = scale · Q Kᵀ + bias   (..., block_q, block_k); the scale was applied to Q already
    logits = matmul_into(xp, q_scaled, xp.matrix_transpose(k_cols), _fitting(out, q_scaled, k_cols))
    if bias is not None:
        logits += _tile(bias, rows, cols)
    if mask is not None:
        logits = xp.where(_tile(mask, rows, cols), logits, -xp.inf)
    return logits


def _fitting(buffer: Array | None, a: Array, b: Array) -> Array | None:
    """``buffer`` when it has the shape of the product ``a bᵀ`` (a full tile), else ``None`` (a ragged one)."""
    if buffer is None or tuple(buffer.shape[-2:]) != (a.shape[-2], b.shape[-2]):
        return None
    return buffer


def _tile_buffer(xp: ModuleType, like: Array, rows: int, cols: int) -> Array:
    """Scratch memory for one tile, ``(..., rows, cols)``: every full tile of a loop is formed in it, so that it
    stays in the CPU's cache (:func:`attention_ref.backend.matmul_into`)."""
    return xp.empty((*like.shape[:-2], rows, cols), dtype=like.dtype, device=device_of(like))


def _with_ones_column(xp: ModuleType, a: Array) -> Array:
    """``[a | 1]``: ``a`` ``(..., n, c)`` with a column of ones appended, ``(..., n, c + 1)``."""
    ones = xp.ones((*a.shape[:-1], 1), dtype=a.dtype, device=device_of(a))
    return xp.concat([a, ones], axis=-1)


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

    k_ones, v_ones = _with_ones_column(xp, k_w), _with_ones_column(xp, v_w)  # [K | 1], [V | 1]
    rank = q.ndim
    # the work: every tile of queries of every problem (see Speed), each independent of the others
    items = [(index, rows) for index in _problems(xp, q) for rows in _blocks(q.shape[-2], block_q, at_least_one=True)]

    def query_tile(item: tuple[Index, slice]) -> tuple[Array, Array]:
        index, rows = item
        q_scaled = scale * q_w[index][..., rows, :]
        mask_i, bias_i = take(mask2, index, rank), take(bias2, index, rank)
        return _forward_rows(xp, q_scaled, k_w[index], k_ones[index], v_ones[index], mask_i, bias_i, rows, block_k)

    # on NumPy the items run on all cores (see attention_ref.backend.parallel_map)
    tiles = parallel_map(query_tile, items, like=q)
    out = xp.empty((*q.shape[:-1], v.shape[-1]), dtype=q_w.dtype, device=device_of(q))  # O   (..., N, dv)
    lse = xp.empty(q.shape[:-1], dtype=q_w.dtype, device=device_of(q))  # (..., N)
    for (index, rows), (out_rows, lse_rows) in zip(items, tiles, strict=True):
        out[(*index[:-1], ..., rows, slice(None))] = out_rows
        lse[(*index[:-1], ..., rows)] = lse_rows
    out = as_dtype(xp, out, q.dtype)
    cache = ChunkedAttentionCache(
        q=q,
        k=k,
        v=v,
        out=out,
        logsumexp=lse,
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
    k_ones: Array,
    v_ones: Array,
    mask: Array | None,
    bias: Array | None,
    rows: slice,
    block_k: int,
) -> tuple[Array, Array]:
    """Output ``(..., rows, dv)`` and log-sum-exp ``(..., rows)`` of one tile of queries, by online softmax.

    ``k_ones = [K | 1]`` ``(..., M, d + 1)`` and ``v_ones = [V | 1]`` ``(..., M, dv + 1)``: see Speed in the
    module's docstring.
    """
    dev, dtype = device_of(q_scaled), q_scaled.dtype
    stats_shape = (*q_scaled.shape[:-1], 1)  # (..., block_q, 1): one number per query row
    running_max = xp.full(stats_shape, -xp.inf, dtype=dtype, device=dev)  # m
    # [A | ℓ]: the running unnormalised output A, and in the last column the running sum ℓ   (..., block_q, dv + 1)
    acc = xp.zeros((*q_scaled.shape[:-1], v_ones.shape[-1]), dtype=dtype, device=dev)
    # [scale·Q_i | -m], so that [scale·Q_i | -m] [K_j | 1]ᵀ = S_j - m   (..., block_q, d + 1)
    q_shift = xp.concat([q_scaled, xp.zeros(stats_shape, dtype=dtype, device=dev)], axis=-1)
    every_row_has_weight = False  # ℓ > 0 in every row: m is a finite maximum, fit to shift the next tiles by
    buffer = _tile_buffer(xp, q_scaled, q_scaled.shape[-2], min(block_k, k.shape[-2]))
    for cols in _blocks(k.shape[-2], block_k):
        if every_row_has_weight:
            # the shift m stays: P̃ = exp(S_j - m), [A | ℓ] += P̃ [V_j | 1]
            with overflow_unreported():  # inf and NaN are checked for below
                shifted = _logits_tile(xp, q_shift, k_ones[..., cols, :], mask, bias, rows, cols, buffer)  # S_j - m
                part = exp_inplace(xp, shifted) @ v_ones[..., cols, :]
            # unless a logit of this tile exceeds m by so much that its weights outgrow SHIFT_AGAIN_ABOVE
            # (or are inf or NaN): then this tile is done again below, with m moved to its maximum
            if bool(xp.all(part[..., -1] <= SHIFT_AGAIN_ABOVE)):
                acc += part
                continue
        logits = _logits_tile(xp, q_scaled, k[..., cols, :], mask, bias, rows, cols, buffer)  # (..., block_q, block_k)
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
        # [A' | ℓ'] = α [A | ℓ] + P̃ [V_j | 1], that is A' = α A + P̃ V_j and ℓ' = α ℓ + Σ_k P̃_k
        acc = alpha * acc + p_tilde @ v_ones[..., cols, :]
        running_max = new_max
        q_shift[..., -1:] = -shift
        every_row_has_weight = bool(xp.all(acc[..., -1:] > 0.0))
    running_sum = acc[..., -1:]  # ℓ   (..., block_q, 1)
    shift = safe_shift(xp, running_max)
    dead = running_sum == 0.0  # no allowed key (a NaN sum is not 0: NaN is never taken for "masked")
    # O = A / ℓ   (a fully masked row has A = 0 and ℓ = 0: divide by 1 instead)
    out = acc[..., :-1] / xp.where(dead, 1.0, running_sum)
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
    xp = require_dout(dout, cache.out.shape, cache.q.dtype, like=cache.q)
    dtype, scale = cache.q.dtype, cache.scale
    q, k, v, bias, dout, out = in_working_dtype(xp, cache.q, cache.k, cache.v, cache.bias, dout, cache.out)
    mask, bias = _at_least_2d(xp, cache.mask), _at_least_2d(xp, bias)
    row_blocks = _blocks(q.shape[-2], cache.block_q, at_least_one=True)
    col_blocks = _blocks(k.shape[-2], cache.block_k, at_least_one=True)
    rank = q.ndim
    # D_i = Σ_k P_ik dP_ik = dO_i · O_i   (..., N, 1)
    delta = xp.sum(dout * out, axis=-1, keepdims=True)
    lse = _safe_lse(xp, cache.logsumexp)  # (..., N, 1)
    # [scale·Q | -lse] [K | 1]ᵀ = S - lse and [dO | -D] [V | 1]ᵀ = dP - D: the subtractions ride in the products
    q_shift = xp.concat([scale * q, -lse], axis=-1)  # (..., N, d + 1)
    dout_shift = xp.concat([dout, -delta], axis=-1)  # (..., N, dv + 1)
    k_ones, v_ones = _with_ones_column(xp, k), _with_ones_column(xp, v)  # (..., M, d + 1), (..., M, dv + 1)

    def key_tiles(item: tuple[Index, list[int]]) -> _KeyTilesGrads:
        """Gradients from some key tiles of one problem: their own dK_j, dV_j, and their share of dQ and d bias."""
        index, tile_indices = item
        q_i, k_i, dout_i, q_shift_i, dout_shift_i = q[index], k[index], dout[index], q_shift[index], dout_shift[index]
        k_ones_i, v_ones_i = k_ones[index], v_ones[index]
        mask_i, bias_i = take(mask, index, rank), take(bias, index, rank)
        part = _KeyTilesGrads(dq_tiles=[None] * len(row_blocks))
        # every full tile of P and dS is formed in these two (see _tile_buffer)
        block_rows, block_cols = row_blocks[0].stop - row_blocks[0].start, col_blocks[0].stop - col_blocks[0].start
        p_buffer, ds_buffer = (_tile_buffer(xp, q_shift_i, block_rows, block_cols) for _ in range(2))
        for cj in tile_indices:
            cols = col_blocks[cj]
            k_j = k_i[..., cols, :]
            dk_j_t, dv_j_t = None, None  # dK_jᵀ (..., d, block_k) and dV_jᵀ (..., dv, block_k)
            for ri, rows in enumerate(row_blocks):
                # P = exp(S - lse): the forward's weights, recomputed exactly
                q_rows, k_cols = q_shift_i[..., rows, :], k_ones_i[..., cols, :]
                shifted = _logits_tile(xp, q_rows, k_cols, mask_i, bias_i, rows, cols, p_buffer)
                weights = exp_inplace(xp, shifted)  # (..., block_q, block_k)
                # dV_jᵀ += dO_iᵀ P   (the transposed product runs faster than Pᵀ dO_i)
                dv_j_t = _add(dv_j_t, xp.matrix_transpose(dout_i[..., rows, :]) @ weights)
                # dP - D = dO_i V_jᵀ - D_i
                dout_rows, v_cols = dout_shift_i[..., rows, :], v_ones_i[..., cols, :]
                ds_out = _fitting(ds_buffer, dout_rows, v_cols)
                dlogits = matmul_into(xp, dout_rows, xp.matrix_transpose(v_cols), ds_out)
                # dS = P ∘ (dP - D), formed in its memory
                dlogits *= weights
                # dQ_i += dS K_j ;  dK_jᵀ += Q_iᵀ dS   (times scale, below)
                part.dq_tiles[ri] = _add(part.dq_tiles[ri], dlogits @ k_j)
                dk_j_t = _add(dk_j_t, xp.matrix_transpose(q_i[..., rows, :]) @ dlogits)
                if bias_i is not None:
                    _accumulate_bias_grad(xp, part.dbias_tiles, dlogits, bias_i, ri, cj)
            part.dk_tiles[cj] = xp.matrix_transpose(dk_j_t)
            part.dv_tiles[cj] = xp.matrix_transpose(dv_j_t)
        return part

    # Each key tile owns its dK_j and dV_j; dQ and d bias collect from every key tile. So the key tiles of each
    # problem are dealt round-robin into groups, one work item per (problem, group): enough items to keep every
    # worker busy. Each item sums its own share of dQ and d bias, and the shares are added up at the end.
    problems = _problems(xp, q)
    workers = cpu_workers(q)
    n_groups = min(len(col_blocks), workers // math.gcd(len(problems), workers))
    items = [(index, list(range(g, len(col_blocks), n_groups))) for index in problems for g in range(n_groups)]
    parts = parallel_map(key_tiles, items, like=q)

    dev = device_of(q)
    dq = xp.zeros(q.shape, dtype=q.dtype, device=dev)  # (..., N, d)
    dk = xp.empty(k.shape, dtype=k.dtype, device=dev)  # (..., M, d)
    dv = xp.empty(v.shape, dtype=v.dtype, device=dev)  # (..., M, dv)
    dbias = None if bias is None else xp.zeros(bias.shape, dtype=bias.dtype, device=dev)
    for (index, _), part in zip(items, parts, strict=True):
        lead = index[:-1]
        for rows, dq_rows in zip(row_blocks, part.dq_tiles, strict=True):
            dq[(*lead, ..., rows, slice(None))] += dq_rows
        for cj, dk_j in part.dk_tiles.items():
            dk[(*lead, ..., col_blocks[cj], slice(None))] = dk_j
            dv[(*lead, ..., col_blocks[cj], slice(None))] = part.dv_tiles[cj]
        if dbias is not None:
            # this problem's part of the bias (a leading axis of size 1 is shared by every problem), tile by tile
            where = broadcast_index(tuple(bias.shape), index, rank)[:-2]
            for (ri, cj), g in part.dbias_tiles.items():
                rows = slice(None) if bias.shape[-2] == 1 else row_blocks[ri]
                cols = slice(None) if bias.shape[-1] == 1 else col_blocks[cj]
                dbias[(*where, rows, cols)] += g

    grads = {
        "q": scale * dq,  # dQ = scale · dS K   (..., N, d)
        "k": scale * dk,  # dK = scale · dSᵀ Q   (..., M, d)
        "v": dv,  # dV = Pᵀ dO   (..., M, dv)
    }
    if dbias is not None:
        grads["bias"] = xp.reshape(dbias, cache.bias_shape)
    return {name: as_dtype(xp, g, dtype) for name, g in grads.items()}


def _add(total: Array | None, term: Array) -> Array:
    """``total + term``, summed in ``total``'s memory; ``term`` itself when there is no total yet."""
    if total is None:
        return term
    total += term
    return total


def _problems(xp: ModuleType, q: Array) -> list[Index]:
    """The leading indices the work is cut along: on NumPy each ``(N, M)`` problem of the stack (batch, head), so
    that one tile stays in a core's cache; elsewhere the whole stack at once, ``[(...,)]`` (one call per tile)."""
    if namespace_name(xp) != "numpy":
        return [(...,)]
    return matrix_indices(tuple(q.shape[:-2]))


@dataclass
class _KeyTilesGrads:
    """One work item of the backward: its key tiles' dK_j and dV_j, its sums into dQ and d bias."""

    dq_tiles: list[Array | None]  # per query tile: Σ over this item's key tiles of dS K_j, (..., block_q, d)
    dk_tiles: dict[int, Array] = field(default_factory=dict)  # key tile index → Σ_i dSᵀ Q_i
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
    if key in tiles:
        tiles[key] = tiles[key] + g
    else:  # a copy when nothing was summed: dS's memory is the next tile's
        tiles[key] = xp.asarray(g, copy=True) if g is dlogits else g
