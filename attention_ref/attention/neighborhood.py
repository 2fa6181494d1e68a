r"""Neighborhood attention (NATTEN): every pixel attends to the kernel × kernel pixels around it.

Along one axis of length ``L`` with (odd) kernel ``k`` and ``r = ⌊k/2⌋``, pixel ``i`` sees the keys
``start(i), …, start(i) + k − 1`` with

.. math:: \text{start}(i) = \operatorname{clip}(i - r,\ 0,\ L - k):

centred on ``i`` inside the map, shifted (not shrunk) at the borders, so every query sees exactly
``k²`` keys — NATTEN's convention (its window start is ``max(i − r, 0)`` moved back by
``i + r − (L − 1)`` when ``i + r`` runs past the end). On the map, query ``(i, j)`` sees the keys
``(start_h(i) + a, start_w(j) + b)`` for offsets ``0 ≤ a < k_h``, ``0 ≤ b < k_w``. This equals exact
attention under :func:`attention_ref.attention.neighborhood_mask`; it costs ``N·k²·(d + dv)`` instead of
``N²·(d + dv)``.

Forward, one key offset ``(a, b)`` at a time (a loop over ``k²`` offsets, each vectorised over all
pixels; memory stays ``O(N·(d + k²))``):

* gather: ``K_ab[i, j] = K[start_h(i) + a, start_w(j) + b]`` — two ``take``\ s, along H then W;
* ``S_ab[i, j] = scale · q[i, j] · K_ab[i, j]``;
* ``P = softmax`` over the ``k²`` offsets; ``O[i, j] = Σ_ab P_ab[i, j] V_ab[i, j]``.

Dilation is not supported (NATTEN's ``dilation > 1`` runs the same pattern on each of the ``δ²``
interleaved sub-grids); the kernel must be odd, as in NATTEN, so that "centred" has one meaning.

Backward. With ``dO``:

* ``dP_ab = dO · V_ab`` (per pixel), ``dS`` = the softmax backward over the offsets;
* ``dQ = scale · Σ_ab dS_ab K_ab``;
* ``dK`` and ``dV`` collect ``scale · dS_ab Q`` and ``P_ab dO`` back at the keys they were gathered
  from: the adjoint of the gather. Along one axis the gather ``y[i] = x[start(i) + a]`` has adjoint
  ``x̄[p] = Σ_{i : start(i) + a = p} ȳ[i]``. ``start`` takes the value 0 for ``i = 0…r`` (one run),
  ``i − r`` in the interior (one each) and ``L − k`` for ``i = L−1−r…L−1`` (one run), so the adjoint is:
  sum the first ``r + 1`` entries, keep the middle ones, sum the last ``r + 1`` (giving ``L − k + 1``
  values, one per start), then pad with ``a`` zeros before and ``k − 1 − a`` after.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from .._checks import as_dtype, check_cache, in_working_dtype, require_dout
from ..backend import Array, device_of, namespace
from ..ops.softmax import SoftmaxCache, softmax_backward, softmax_forward
from .dense_rows import check_row_range, spread_rows
from .inputs import check_scale
from .maps import check_map_qkv
from .masks import check_kernel, neighborhood_starts

__all__ = ["NeighborhoodAttentionCache", "neighborhood_attention_backward", "neighborhood_attention_forward"]


@dataclass(frozen=True)
class NeighborhoodAttentionCache:
    """Inputs and the ``(..., H, W, k_h·k_w)`` neighborhood weights (kept for plotting)."""

    backward_names: ClassVar[tuple[str, ...]] = ("neighborhood_attention_backward",)  # the backward that takes it

    q: Array  # (..., H, W, d)
    k: Array  # (..., H, W, d)
    v: Array  # (..., H, W, dv)
    weights: Array  # (..., H, W, k_h·k_w): weights[..., i, j, a·k_w + b] is for key (start_h(i) + a, start_w(j) + b)
    kernel: tuple[int, int]
    scale: float

    def weight_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the dense weights ``(..., stop − start, H·W)`` over the flattened map.

        Query token ``t = i·W + j``; the row holds the weights of its neighborhood and 0 elsewhere —
        the weights of exact attention under ``neighborhood_mask(H, W, kernel)``. Builds only the rows
        asked for: ``weight_rows(0, H·W)`` is the whole ``(H·W)²`` matrix.
        """
        xp, dev = namespace(self.weights), device_of(self.weights)
        *lead, height, width, K = self.weights.shape
        kh, kw = self.kernel
        start, stop = check_row_range(start, stop, height * width)
        local_rows = xp.reshape(self.weights, (*lead, height * width, K))[..., start:stop, :]  # (..., R, K)
        tokens = xp.arange(start, stop, device=dev)  # (R,)
        top = xp.take(neighborhood_starts(xp, height, kh, dev), tokens // width)  # start_h(i)   (R,)
        left = xp.take(neighborhood_starts(xp, width, kw, dev), tokens % width)  # start_w(j)
        # slot a·kw + b is key (start_h(i) + a, start_w(j) + b)
        slot = xp.arange(K, device=dev)
        key_row = xp.expand_dims(top, axis=-1) + slot // kw  # (R, K)
        key_col = xp.expand_dims(left, axis=-1) + slot % kw
        return spread_rows(xp, local_rows, key_row * width + key_col, height * width)


def _axis_index(axis: int, index: slice) -> tuple:
    """The key ``x[..., index, :, …]`` that slices axis ``axis`` (negative) and keeps the others."""
    return (Ellipsis, index) + (slice(None),) * (-axis - 1)


def _gather_offsets(xp: ModuleType, length: int, kernel: int, device: Any) -> list[Array]:
    """For each offset ``a``: the index ``start(i) + a`` of the key that pixel ``i`` sees, ``(length,)``."""
    start = neighborhood_starts(xp, length, kernel, device)
    return [start + a for a in range(kernel)]


def _gather_adjoint(xp: ModuleType, g: Array, axis: int, kernel: int, offset: int) -> Array:
    """Adjoint of ``take(x, start + offset, axis=axis)``: scatter-add ``g`` back to the key positions.

    ``x̄[p] = Σ_{i : start(i) + offset = p} g[i]``, along ``axis``; the shape of ``g`` is kept.
    """
    length, r = g.shape[axis], kernel // 2
    if length == kernel:  # every pixel starts at 0
        per_start = xp.sum(g, axis=axis, keepdims=True)
    else:
        # start = 0 for i ≤ r, i − r in the middle, L − k for i ≥ L − 1 − r   → (L − k + 1) entries
        first = xp.sum(g[_axis_index(axis, slice(0, r + 1))], axis=axis, keepdims=True)
        middle = g[_axis_index(axis, slice(r + 1, length - 1 - r))]
        last = xp.sum(g[_axis_index(axis, slice(length - 1 - r, length))], axis=axis, keepdims=True)
        per_start = xp.concat([first, middle, last], axis=axis)
    # key p = start + offset: pad with `offset` zeros before and `kernel − 1 − offset` after   → L entries
    pieces = []
    for n in (offset, kernel - 1 - offset):
        shape = list(g.shape)
        shape[axis] = n
        pieces.append(xp.zeros(tuple(shape), dtype=g.dtype, device=device_of(g)))
    return xp.concat([pieces[0], per_start, pieces[1]], axis=axis)


def _neighbors(xp: ModuleType, x: Array, rows: Array, cols: Array) -> Array:
    """``x[..., rows[i], cols[j], :]`` for every pixel ``(i, j)``: ``(..., H, W, c)``."""
    return xp.take(xp.take(x, rows, axis=-3), cols, axis=-2)


def neighborhood_attention_forward(
    q: Array, k: Array, v: Array, *, kernel: int | tuple[int, int], scale: float | None = None
) -> tuple[Array, NeighborhoodAttentionCache]:
    """NATTEN neighborhood attention: each pixel attends to the ``kernel × kernel`` pixels around it.

    Inputs:
        q: ``(..., H, W, d)`` queries, one per pixel, with at least one leading axis (batch or heads).
        k: ``(..., H, W, d)`` keys.
        v: ``(..., H, W, dv)`` values.
        kernel: neighborhood size, odd, int or ``(rows, cols)``, at most ``(H, W)`` (else ``ValueError``).
        scale: multiplies ``q · k``; default ``1/sqrt(d)``.

    Returns:
        out: ``(..., H, W, dv)``, equal to ``attention_forward`` on the flattened map under
            ``neighborhood_mask(H, W, kernel)``.
        cache: :class:`NeighborhoodAttentionCache`; ``cache.weights`` is ``(..., H, W, k_h·k_w)``.
    """
    xp, height, width = check_map_qkv(q, k, v)
    kernel = check_kernel(height, width, kernel)
    scale = check_scale(scale, q.shape[-1])
    # float16 is computed in float32 (q·k overflows float16 at 65,504), as exact attention does; out and the
    # weights are rounded back
    q_w, k_w, v_w = in_working_dtype(xp, q, k, v)
    rows = _gather_offsets(xp, height, kernel[0], device_of(q))
    cols = _gather_offsets(xp, width, kernel[1], device_of(q))
    logits = []
    for a in range(kernel[0]):
        k_a = xp.take(k_w, rows[a], axis=-3)  # (..., H, W, d): row i holds key row start_h(i) + a
        for b in range(kernel[1]):
            k_ab = xp.take(k_a, cols[b], axis=-2)  # (..., H, W, d): K[start_h(i) + a, start_w(j) + b]
            # S_ab = scale · q · K_ab   (..., H, W)
            logits.append(scale * xp.sum(q_w * k_ab, axis=-1))
    # P = softmax over the k_h·k_w neighbours   (..., H, W, k_h·k_w)
    weights, _ = softmax_forward(xp.stack(logits, axis=-1), axis=-1)
    out = 0.0
    for a in range(kernel[0]):
        v_a = xp.take(v_w, rows[a], axis=-3)
        for b in range(kernel[1]):
            # O += P_ab V_ab   (..., H, W, dv)
            out = out + weights[..., a * kernel[1] + b : a * kernel[1] + b + 1] * xp.take(v_a, cols[b], axis=-2)
    out, weights = as_dtype(xp, out, q.dtype), as_dtype(xp, weights, q.dtype)
    return out, NeighborhoodAttentionCache(q=q, k=k, v=v, weights=weights, kernel=kernel, scale=scale)


def neighborhood_attention_backward(dout: Array, cache: NeighborhoodAttentionCache) -> dict[str, Array]:
    """Gradients of :func:`neighborhood_attention_forward`.

    Inputs:
        dout: ``(..., H, W, dv)``, the gradient of the loss with respect to ``out``.
        cache: from :func:`neighborhood_attention_forward`.

    Returns:
        ``{"q": (..., H, W, d), "k": (..., H, W, d), "v": (..., H, W, dv)}``.
    """
    check_cache(cache, NeighborhoodAttentionCache, "neighborhood_attention_backward")
    kh, kw = cache.kernel
    xp = require_dout(dout, (*cache.q.shape[:-1], cache.v.shape[-1]), cache.q.dtype, like=cache.q)
    dtype, scale = dout.dtype, cache.scale
    # float16 in float32, as the forward (the weights are the forward's float16 ones, widened)
    q, k, v, weights, dout = in_working_dtype(xp, cache.q, cache.k, cache.v, cache.weights, dout)
    height, width = q.shape[-3], q.shape[-2]
    rows = _gather_offsets(xp, height, kh, device_of(q))
    cols = _gather_offsets(xp, width, kw, device_of(q))

    # dP_ab = dO · V_ab   (..., H, W, k_h·k_w)
    dweights = []
    for a in range(kh):
        v_a = xp.take(v, rows[a], axis=-3)
        for b in range(kw):
            dweights.append(xp.sum(dout * xp.take(v_a, cols[b], axis=-2), axis=-1))
    # dS = P ∘ (dP − Σ P dP), over the neighbours
    dlogits = softmax_backward(xp.stack(dweights, axis=-1), SoftmaxCache(weights=weights, axis=-1))["x"]

    dq, dk, dv = 0.0, 0.0, 0.0
    for a in range(kh):
        k_a = xp.take(k, rows[a], axis=-3)
        dk_a, dv_a = 0.0, 0.0  # gradients at the gathered rows start_h(i) + a, before the row scatter
        for b in range(kw):
            ab = slice(a * kw + b, a * kw + b + 1)
            ds_ab, p_ab = dlogits[..., ab], weights[..., ab]  # (..., H, W, 1)
            # dQ += scale · dS_ab K_ab
            dq = dq + ds_ab * xp.take(k_a, cols[b], axis=-2)
            # dK_ab = scale · dS_ab q and dV_ab = P_ab dO, scattered back along W to the columns they came from
            dk_a = dk_a + _gather_adjoint(xp, ds_ab * q, -2, kw, b)
            dv_a = dv_a + _gather_adjoint(xp, p_ab * dout, -2, kw, b)
        # … and along H to the rows they came from
        dk = dk + _gather_adjoint(xp, dk_a, -3, kh, a)
        dv = dv + _gather_adjoint(xp, dv_a, -3, kh, a)
    return {"q": as_dtype(xp, scale * dq, dtype), "k": as_dtype(xp, scale * dk, dtype), "v": as_dtype(xp, dv, dtype)}
