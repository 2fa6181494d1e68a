r"""The trace's arithmetic: attention weights from a module's parameters and one call's inputs.

Everything here is the reference's own operations (:mod:`attention_ref.ops`) on whatever backend the inputs
are (the trace runs it on the call's torch tensors, on the model's device). The softmax over the keys is taken
in row chunks (:func:`softmax_rows`), so that a large ``Q × K`` never exists at once: only the rows and key
columns asked for are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..._checks import dtype_name
from ...backend import Array, namespace
from ...ops.group_norm import group_norm_forward
from ...ops.heads import split_heads
from ...ops.layer_norm import layer_norm_forward
from ...ops.linear import linear_forward
from ...ops.rms_norm import rms_norm_forward
from ...ops.softmax import softmax_forward

__all__ = [
    "CHUNK_BYTES",
    "attention_weights",
    "linear_rows",
    "softmax_rows",
    "stream_keys_queries",
]

CHUNK_BYTES = 32 * 2**20  # the logits of one chunk of rows: at most this many bytes (one row at least)


def _rows_of(a: Array | None, start: int, stop: int) -> Array | None:
    """Rows ``start:stop`` (axis −2) of a mask or bias that has one row per query; a broadcast row as it is."""
    if a is None or a.shape[-2] == 1:
        return a
    return a[..., start:stop, :]


def _by_row_chunks(like: Array, rows: int, per_row: int, chunk_bytes: int, chunk: Callable[[int, int], Array],
                   reduce: Callable[[Array], Array] | None) -> Array:  # fmt: skip
    """``chunk(start, stop)`` over the ``rows`` in chunks of at most ``chunk_bytes`` (``per_row`` bytes a row; one row
    at least), each chunk ``reduce``-d when given, joined along axis −2 in ``like``'s namespace."""
    step = max(1, min(rows, chunk_bytes // per_row))
    pieces = []
    for start in range(0, rows, step):
        p = chunk(start, min(rows, start + step))
        pieces.append(p if reduce is None else reduce(p))
    return pieces[0] if len(pieces) == 1 else namespace(like).concat(pieces, axis=-2)


def softmax_rows(
    qh: Array,
    kh: Array,
    scale: float,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    columns: slice | None = None,
    reduce: Callable[[Array], Array] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Array:
    r"""``P = softmax(scale · Q Kᵀ + bias)`` over all the keys, computed in chunks of rows; key ``columns`` kept.

    .. math::
        P_{bhik} = \frac{\exp(\text{scale}\,q_{bhi}\cdot k_{bhk} + \text{bias}_{bik})}
                        {\sum_{k'\ \text{allowed}} \exp(\text{scale}\,q_{bhi}\cdot k_{bhk'} + \text{bias}_{bik'})}

    Inputs:
        qh: ``(B, heads, Q, d)`` the query rows; kh: ``(B, heads, K, d)`` every key.
        scale: the logits' factor. bias: added to the logits; mask: boolean, True = may attend (a row with
            no allowed key gets weights 0); both ``(B or 1, heads or 1, 1 or Q, K)``, optional.
        columns: the keys to keep, after the softmax over all of them (default all).
        reduce: applied to each chunk ``(B, heads, R, K')`` before it is kept, e.g. the mean over the heads;
            its result must keep the rows on axis −2.
        chunk_bytes: the most bytes one chunk's logits take (at least one row is computed at a time).

    Returns:
        ``(B, heads, Q, K')`` (or what ``reduce`` makes of it), the rows in order.
    """
    B, heads, Q, _ = qh.shape
    K = kh.shape[-2]
    per_row = max(1, B * heads * K * qh.dtype.itemsize if hasattr(qh.dtype, "itemsize") else B * heads * K * 8)
    kt = namespace(qh).matrix_transpose(kh)  # (B, heads, d, K)

    def chunk(start: int, stop: int) -> Array:
        # S = scale · Q Kᵀ (+ bias)   (B, heads, R, K)
        logits = (scale * qh[..., start:stop, :]) @ kt
        b = _rows_of(bias, start, stop)
        if b is not None:
            logits = logits + b
        # P = softmax(S) over the allowed keys of each row
        p, _ = softmax_forward(logits, axis=-1, mask=_rows_of(mask, start, stop))
        return p if columns is None else p[..., columns]

    return _by_row_chunks(qh, Q, per_row, chunk_bytes, chunk, reduce)


def attention_weights(
    h: Array,
    params: dict[str, Array],
    options: dict[str, Any],
    *,
    context: Array | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    rows: Array | None = None,
    reduce: Callable[[Array], Array] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Array:
    """The attention weights of a diffusers ``Attention`` on one call, rows ``rows`` only.

    The chain of :func:`attention_ref.attention_layer_forward` up to the softmax, without the values
    and the output projection, and only for the query rows asked for. Any backend (the trace runs it on
    the model's own torch tensors, on the model's device).

    Inputs:
        h: ``(B, N, C)`` the call's tokens (a ``(B, C, H, W)`` input as ``(B, H·W, C)``, row-major).
        params, options: from :func:`attention_ref.interop.from_diffusers` (``heads``, ``scale``, and
            ``groups``, ``eps`` when the module has a group norm), h's dtype and backend.
        context: ``(B, M, D)`` for cross-attention, ``None`` for self-attention (keys are ``h``'s tokens).
        mask: boolean ``(B, 1, 1 or N, M)``, True = may attend; bias: ``(B, 1, 1 or N, M)`` added to the
            logits (diffusers' additive ``attention_mask``); both optional, rows of ``N`` as given.
        rows: ``(Q,)`` integer query tokens to compute (h's backend); ``None`` for all ``N``.
        reduce: applied to each chunk of rows (:func:`softmax_rows`), e.g. the mean over the heads.
        chunk_bytes: the softmax is taken in chunks of rows whose logits take at most this (:func:`softmax_rows`).

    Returns:
        ``(B, heads, Q, M)`` weights (``M = N`` for self-attention; what ``reduce`` makes of them); each row
        sums to 1 (0 when every key of it is masked).
    """
    xp = namespace(h)
    # n = GroupNorm(h) over the N tokens of each sample, when the module has a group norm   (B, N, C)
    n = h
    if "norm.weight" in params:
        n, _ = group_norm_forward(h, params["norm.weight"], params.get("norm.bias"), groups=options["groups"],
                                  eps=options["eps"])  # fmt: skip
    # s = n (self-attention) or the context (cross-attention)   (B, M, C or D)
    s = n if context is None else context
    queries = n if rows is None else xp.take(n, rows, axis=1)  # (B, Q, C)
    # Q = n W_q + b_q   (B, Q, inner);   K = s W_k + b_k   (B, M, inner)
    q, _ = linear_forward(queries, params["q.weight"], params.get("q.bias"))
    k, _ = linear_forward(s, params["k.weight"], params.get("k.bias"))
    heads = options["heads"]
    qh, kh = split_heads(q, heads), split_heads(k, heads)  # (B, heads, Q, d), (B, heads, M, d)
    if rows is not None:
        # the rows of a mask or bias that has one per query; a broadcast row as it is
        bias = bias if bias is None or bias.shape[-2] == 1 else xp.take(bias, rows, axis=-2)
        mask = mask if mask is None or mask.shape[-2] == 1 else xp.take(mask, rows, axis=-2)
    return softmax_rows(qh, kh, options["scale"], bias=bias, mask=mask, reduce=reduce, chunk_bytes=chunk_bytes)


def linear_rows(
    fq: Array,
    fk: Array,
    eps: float,
    *,
    reduce: Callable[[Array], Array] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Array:
    r"""The weights of linear attention with feature maps ``φ``: each query's share of each key, in chunks of rows.

    .. math::
        A_{ij} = \frac{\phi(q_i)\cdot\phi(k_j)}{\sum_{j'} \phi(q_i)\cdot\phi(k_{j'}) + \varepsilon}

    (linear attention's output ``Σ_j A_ij v_j``, computed there as ``φ(q_i)ᵀ(Σ_j φ(k_j) v_jᵀ)`` without the
    weights; a row sums to just under 1).

    Inputs:
        fq: ``(B, heads, Q, d)`` the query rows' features ``φ(q)``; fk: ``(B, heads, N, d)`` every key's ``φ(k)``.
        eps: added to the denominator. reduce, chunk_bytes: as in :func:`softmax_rows`.

    Returns:
        ``(B, heads, Q, N)`` (or what ``reduce`` makes of it).
    """
    xp = namespace(fq)
    B, heads, Q, _ = fq.shape
    N = fk.shape[-2]
    name = dtype_name(fq.dtype)
    per_row = max(1, B * heads * N * (2 if "16" in name else 4 if "32" in name else 8))
    z = xp.sum(fk, axis=-2)[..., None]  # z = Σ_j φ(k_j)   (B, heads, d, 1)
    kt = xp.matrix_transpose(fk)  # (B, heads, d, N)

    def chunk(start: int, stop: int) -> Array:
        rows = fq[..., start:stop, :]  # (B, heads, R, d)
        # A = φ(q) φ(k)ᵀ / (φ(q)·z + ε)   (B, heads, R, N)
        return (rows @ kt) / (rows @ z + eps)

    return _by_row_chunks(fq, Q, per_row, chunk_bytes, chunk, reduce)


def stream_keys_queries(
    tokens: Array,
    params: dict[str, Array],
    options: dict[str, Any],
    *,
    text: bool = False,
    rows: Array | None = None,
    queries: bool = True,
) -> tuple[Array | None, Array]:
    r"""One stream's per-head queries and keys, as a joint (MMDiT) module computes them, before any RoPE.

    .. math::
        Q = \operatorname{norm}_q(\operatorname{split}(x W_q + b_q)), \quad
        K = \operatorname{norm}_k(\operatorname{split}(x W_k + b_k))

    with the q/k norms per head (``options["qk_norm"]``: ``"rms_norm"`` or ``"layer_norm"``, ``options["eps"]``;
    none without it) — the chain of :func:`attention_ref.blocks.joint_attention_forward` up to the join.

    Inputs:
        tokens: ``(B, L, C)``; params, options: from :func:`attention_ref.interop.from_diffusers_joint`.
        text: the text stream (``add_q``, ``add_k``, ``norm_added_q``, ``norm_added_k``), else the image's.
        rows: ``(Q,)`` the query tokens to compute (default all); queries: ``False`` to compute the keys only.

    Returns:
        ``(Q or None, K)``: ``(B, heads, Q, d)`` and ``(B, heads, L, d)``.
    """
    xp = namespace(tokens)
    q_name, k_name = ("add_q", "add_k") if text else ("q", "k")
    norms = ("norm_added_q", "norm_added_k") if text else ("norm_q", "norm_k")
    heads = options["heads"]

    def project(x: Array, name: str, norm: str) -> Array:
        y, _ = linear_forward(x, params[f"{name}.weight"], params.get(f"{name}.bias"))
        yh = split_heads(y, heads)  # (B, heads, L, d)
        if options.get("qk_norm") == "rms_norm":
            yh, _ = rms_norm_forward(yh, params.get(f"{norm}.weight"), eps=options["eps"])
        elif options.get("qk_norm") == "layer_norm":
            yh, _ = layer_norm_forward(yh, params.get(f"{norm}.weight"), params.get(f"{norm}.bias"), eps=options["eps"])
        return yh

    k = project(tokens, k_name, norms[1])
    if not queries:
        return None, k
    q = project(tokens if rows is None else xp.take(tokens, rows, axis=1), q_name, norms[0])
    return q, k
