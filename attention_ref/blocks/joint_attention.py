r"""Joint attention (MMDiT): two token streams, one softmax — SD3's and Flux's attention, with its backward.

SD3, SD3.5 and Flux do not cross-attend from the image to the text. Each stream projects its own
queries, keys and values, the two are joined into one sequence, and every token — image or text —
attends to every token of both in one softmax. For image tokens ``x (B, N, C)`` and text tokens
``c (B, M, D)``, per head ``j`` (heads split head-major, ``d = inner/heads``):

.. math::
    Q^x &= \operatorname{norm}_q(x W_q + b_q), \quad K^x = \operatorname{norm}_k(x W_k + b_k),
        \quad V^x = x W_v + b_v \\
    Q^c &= \operatorname{norm}_{aq}(c W_{aq} + b_{aq}), \quad K^c = \operatorname{norm}_{ak}(c W_{ak} + b_{ak}),
        \quad V^c = c W_{av} + b_{av} \\
    Q &= \operatorname{RoPE}([Q^x; Q^c]), \quad K = \operatorname{RoPE}([K^x; K^c]), \quad V = [V^x; V^c]
        \qquad (L = N + M \text{ tokens}) \\
    P &= \operatorname{softmax}(\text{scale}\cdot Q K^\top), \qquad O = P V \qquad (L \times L \text{ weights}) \\
    y &= O^x W_o + b_o, \qquad y^c = O^c W_{ao} + b_{ao}

* **Stream order.** ``[·; ·]`` joins along the tokens: image first (``order="image_first"``, SD3's
  ``JointAttnProcessor2_0``) or text first (``"text_first"``, Flux). The order changes no number of the
  outputs — attention treats its keys as a set — but it decides where each stream's rows and columns
  are in the ``(L, L)`` weights, and, with RoPE, which position each token has.
* **Q/K norms** (``qk_norm``) act on each (token, head) vector of ``d`` channels, after the head split:
  ``"rms_norm"`` (SD3.5, Flux) or ``"layer_norm"``, each with its own learned scale (and, for layer norm,
  shift); the image stream uses ``norm_q``/``norm_k``, the text stream ``norm_added_q``/``norm_added_k``.
* **RoPE** (Flux) rotates the joined queries and keys, after the norms, with ``(cos, sin)`` tables of the
  joined sequence (:func:`attention_ref.ops.rope_angles`; Flux's text tokens sit at position 0).
* **One softmax.** A row of ``P`` sums to 1 over both streams: an image query's weights on the text tokens
  sum to the share of its output read from the text.
* **Output.** ``O`` is split back into its image and text rows; each has its own output projection.
  Without ``"out.weight"`` (Flux's single-stream blocks, ``pre_only``) ``y = O^x``; without
  ``"add_out.weight"`` (SD3's last block, ``context_pre_only``) ``y^c = O^c``, as diffusers returns them.
* **One stream** (``context=None``): the same code with no text stream — Flux's single-stream blocks
  (their input is the text and image tokens already joined; q/k norms, RoPE, no output projection) and
  SD3.5's second attention ``attn2`` (self-attention with q/k norms and an output projection).

Backward, step by step in reverse (each step the backward of its op):

* ``y = O^x W_o + b_o``  ⇒  ``dO^x``, ``dW_o``, ``db_o`` (:func:`attention_ref.ops.linear_backward`); the same
  for the text; without a projection ``dO^x = dy``;
* ``O = [O^x; O^c]`` is a split of ``O``'s rows  ⇒  ``dO = [dO^x; dO^c]``;
* ``O = softmax(scale·QKᵀ) V``  ⇒  ``dQ, dK, dV`` (:func:`attention_ref.attention_backward`), one softmax backward
  over all ``L`` keys: the text and image columns of a row share its ``Σ_k P_ik dP_ik``;
* RoPE is a rotation  ⇒  ``dQ`` and ``dK`` rotated back (:func:`attention_ref.ops.rope_backward`);
* the join  ⇒  ``dQ``, ``dK``, ``dV`` split into their image and text rows;
* the norms  ⇒  their backward (:func:`attention_ref.ops.rms_norm_backward`, ``layer_norm_backward``);
* the projections  ⇒  ``dx = dx_Q + dx_K + dx_V`` (x feeds all three), likewise ``dc``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from .._checks import check_cache
from ..attention import AttentionCache, attention_backward, attention_forward
from ..backend import Array, device_of, namespace
from ..ops.heads import merge_heads, split_heads
from ..ops.layer_norm import LayerNormCache, layer_norm_backward, layer_norm_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.rms_norm import RMSNormCache, rms_norm_backward, rms_norm_forward
from ..ops.rope import RopeCache, rope_backward, rope_forward
from .joint_checks import NORMS, PROJECTIONS, QK_NORMS, STREAM_ORDERS, check_joint_douts, check_joint_inputs
from .params import add_grads

__all__ = ["JointAttentionCache", "QK_NORMS", "STREAM_ORDERS", "joint_attention_backward", "joint_attention_forward"]

@dataclass(frozen=True)
class _StreamCache:
    """One stream's share of the forward: its projections and its q/k norms."""

    q: LinearCache
    k: LinearCache
    v: LinearCache
    norm_q: RMSNormCache | LayerNormCache | None  # None without qk_norm
    norm_k: RMSNormCache | LayerNormCache | None
    out: LinearCache | None  # None without an output projection


@dataclass(frozen=True)
class JointAttentionCache:
    """What :func:`joint_attention_backward` needs; ``weights`` holds the joint softmax for plotting."""

    backward_names: ClassVar[tuple[str, ...]] = ("joint_attention_backward",)  # the backward that takes it

    image: _StreamCache
    text: _StreamCache | None  # None for one stream
    rope_q: RopeCache | None  # None without RoPE
    rope_k: RopeCache | None
    attention: AttentionCache  # on the joined sequence, (B, heads, L, ·)
    heads: int
    order: str  # "image_first" or "text_first"
    N: int  # image tokens (all tokens, for one stream)
    M: int  # text tokens; 0 for one stream
    x_shape: tuple[int, int, int]  # (B, N, C)
    context_shape: tuple[int, int, int] | None  # (B, M, D); None for one stream

    @property
    def weights(self) -> Array:
        """``(B, heads, L, L)``, ``L = N + M``: the one softmax over the joined sequence, in the joined order.

        Row ``i`` holds query token ``i``'s weights on every key, image and text; it sums to 1 (0 when
        every key is masked). :attr:`image_tokens` and :attr:`text_tokens` say where each stream is, e.g.
        ``cache.weights[..., cache.image_tokens, cache.text_tokens]`` is ``(B, heads, N, M)``: how much
        each image token reads from each text token.
        """
        return self.attention.weights

    @property
    def image_tokens(self) -> slice:
        """The image stream's place in the joined sequence: ``0:N`` (image first) or ``M:M+N`` (text first)."""
        return _places(self.order, self.N, self.M)[0]

    @property
    def text_tokens(self) -> slice | None:
        """The text stream's place: ``N:N+M`` (image first) or ``0:M`` (text first); ``None`` for one stream."""
        return None if self.text is None else _places(self.order, self.N, self.M)[1]


def _places(order: str, N: int, M: int) -> tuple[slice, slice]:
    """Where the image and the text tokens are in the joined sequence of ``L = N + M``."""
    if order == "image_first":
        return slice(0, N), slice(N, N + M)
    return slice(M, M + N), slice(0, M)


# ---------------------------------------------------------------- forward


def _qk_norm(
    h: Array, params: Mapping[str, Array], name: str, qk_norm: str | None, eps: float
) -> tuple[Array, RMSNormCache | LayerNormCache | None]:
    """``norm(h)`` over each head's ``d`` channels with the scale (and shift) ``name.*``; ``h`` without qk_norm."""
    if qk_norm == "rms_norm":
        return rms_norm_forward(h, params.get(f"{name}.weight"), eps=eps)
    if qk_norm == "layer_norm":
        return layer_norm_forward(h, params.get(f"{name}.weight"), params.get(f"{name}.bias"), eps=eps)
    return h, None


def _project(
    s: Array, params: Mapping[str, Array], stream: str, heads: int, qk_norm: str | None, eps: float
) -> tuple[Array, Array, Array, _StreamCache]:
    """One stream's normed queries and keys and its values, ``(B, heads, n, d)`` each, and their caches
    (the output projection's comes later: ``out=None`` here)."""
    q_name, k_name, v_name, _ = PROJECTIONS[stream]
    norm_q_name, norm_k_name = NORMS[stream]
    # Q = s W_q + b_q,  K = s W_k + b_k,  V = s W_v + b_v   (B, n, inner)
    q, q_cache = linear_forward(s, params[f"{q_name}.weight"], params.get(f"{q_name}.bias"))
    k, k_cache = linear_forward(s, params[f"{k_name}.weight"], params.get(f"{k_name}.bias"))
    v, v_cache = linear_forward(s, params[f"{v_name}.weight"], params.get(f"{v_name}.bias"))
    # heads split head-major: channel j·d + i is entry i of head j   (B, heads, n, d)
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    # Q ← norm_q(Q), K ← norm_k(K), each (token, head) vector of d channels on its own   (B, heads, n, d)
    qh, norm_q_cache = _qk_norm(qh, params, norm_q_name, qk_norm, eps)
    kh, norm_k_cache = _qk_norm(kh, params, norm_k_name, qk_norm, eps)
    cache = _StreamCache(q=q_cache, k=k_cache, v=v_cache, norm_q=norm_q_cache, norm_k=norm_k_cache, out=None)
    return qh, kh, vh, cache


def _join(xp: Any, image: Array, text: Array | None, order: str) -> Array:
    """The joined sequence ``[image; text]`` or ``[text; image]`` along the tokens   (B, heads, L, ·)"""
    if text is None:
        return image
    parts = [image, text] if order == "image_first" else [text, image]
    return xp.concat(parts, axis=-2)


def _split(a: Array, order: str, N: int, M: int) -> tuple[Array, Array | None]:
    """The image rows and the text rows (``None`` for one stream) of a joined ``(B, heads, L, ·)`` array: the
    inverse of :func:`_join`."""
    image, text = _places(order, N, M)
    return a[..., image, :], (a[..., text, :] if M > 0 else None)


def _output(o: Array, params: Mapping[str, Array], name: str) -> tuple[Array, LinearCache | None]:
    """``o W + b`` with the projection ``name``, or ``o`` itself when there is none   (B, n, out or inner)"""
    if f"{name}.weight" not in params:
        return o, None
    return linear_forward(o, params[f"{name}.weight"], params.get(f"{name}.bias"))


def joint_attention_forward(
    x: Array,
    context: Array | None,
    params: Mapping[str, Array],
    *,
    heads: int,
    order: str = "image_first",
    qk_norm: str | None = None,
    eps: float = 1e-6,
    rope: tuple[Array, Array] | None = None,
    rope_pairs: str = "interleaved",
    rope_dtype: str | None = None,
    mask: Array | None = None,
    scale: float | None = None,
) -> tuple[tuple[Array, Array | None], JointAttentionCache]:
    """Joint attention of image tokens ``x`` and text tokens ``context``: one softmax over both streams.

    Inputs:
        x: ``(B, N, C)`` image tokens (for one stream: all the tokens), real floating.
        context: ``(B, M, D)`` text tokens of x's dtype, or ``None`` for one stream (Flux's single-stream
            blocks, SD3.5's ``attn2``).
        params: ``"q.weight"``, ``"k.weight"``, ``"v.weight"`` ``(C, inner)``; with a context
            ``"add_q.weight"``, ``"add_k.weight"``, ``"add_v.weight"`` ``(D, inner)``; optional biases
            ``(inner,)``; optional output projections ``"out.weight"`` ``(inner, C_out)`` and
            ``"add_out.weight"`` ``(inner, D_out)`` with biases; with ``qk_norm``, optional scales
            ``"norm_q.weight"``, ``"norm_k.weight"``, ``"norm_added_q.weight"``, ``"norm_added_k.weight"``
            ``(d,)`` (and ``.bias`` for layer norm). diffusers' names: ``to_q``, ``add_q_proj``, ``to_out.0``,
            ``to_add_out``, the norms as here (:func:`attention_ref.interop.from_diffusers_joint`).
        heads: number of heads; divides ``inner``, ``d = inner/heads``.
        order: ``"image_first"`` (SD3) or ``"text_first"`` (Flux): the joined sequence's order.
        qk_norm: ``None``, ``"rms_norm"`` or ``"layer_norm"``, on every stream's queries and keys, per head.
        eps: the q/k norms' epsilon (1e-6 in SD3 and Flux).
        rope: ``(cos, sin)``, each ``(L, d)`` (or ``(B or 1, heads or 1, L, d)``; a 3-D table is refused, as a
            3-D mask is), ``L = N + M``, rows in the joined order, applied to the joined queries and keys after
            the norms; ``None`` for no RoPE.
        rope_pairs: ``"interleaved"`` (Flux) or ``"halves"``, the tables' pair layout
            (:func:`attention_ref.ops.rope_forward`).
        rope_dtype: the dtype the rotation runs in (default x's working dtype); ``"float32"`` reproduces
            diffusers' Flux, which rotates in float32 whatever the model's dtype.
        mask: boolean ``(L, L)`` or ``(B or 1, heads or 1, L, L)`` (any axis of either may be 1), in the joined
            order, True = may attend. A 1-D or 3-D mask is refused: broadcasting would read diffusers' per-sample
            ``(B, L, L)`` as per-head when ``B = heads`` (pass ``mask[:, None]``), and a per-sample key mask
            ``(B, L)`` is ``mask[:, None, None, :]``.
        scale: multiplies ``QKᵀ``; default ``1/sqrt(d)``.

    Returns:
        ``(y, y_context)``: ``y`` ``(B, N, C_out)`` (``(B, N, inner)`` without ``"out.weight"``), ``y_context``
        ``(B, M, D_out)`` (``(B, M, inner)`` without ``"add_out.weight"``; ``None`` for one stream);
        cache: :class:`JointAttentionCache`, with ``cache.weights`` ``(B, heads, L, L)`` in the joined
        order and ``cache.image_tokens`` / ``cache.text_tokens`` the streams' places in it.
    """
    heads, eps = check_joint_inputs(x, context, params, heads, order, qk_norm, eps, rope, rope_pairs, rope_dtype, mask)
    xp = namespace(x)
    N, M = x.shape[1], (0 if context is None else context.shape[1])
    # each stream's queries, keys and values, Q and K normed   (B, heads, N or M, d)
    q_x, k_x, v_x, image = _project(x, params, "image", heads, qk_norm, eps)
    q_c = k_c = v_c = text = None
    if context is not None:
        q_c, k_c, v_c, text = _project(context, params, "text", heads, qk_norm, eps)
    # the joined sequence, in the stream order   (B, heads, L, d)
    q, k, v = _join(xp, q_x, q_c, order), _join(xp, k_x, k_c, order), _join(xp, v_x, v_c, order)
    rope_q = rope_k = None
    if rope is not None:
        cos, sin = rope
        # Q ← RoPE(Q), K ← RoPE(K): each channel pair turned by its token's angle   (B, heads, L, d)
        q, rope_q = rope_forward(q, cos, sin, pairs=rope_pairs, compute_dtype=rope_dtype)
        k, rope_k = rope_forward(k, cos, sin, pairs=rope_pairs, compute_dtype=rope_dtype)
    # O = softmax(scale · Q Kᵀ) V, one softmax over all L keys   (B, heads, L, d); P (B, heads, L, L)
    o, attention_cache = attention_forward(q, k, v, mask=mask, scale=scale)
    # the output split back into its streams' rows   (B, heads, N, d) and (B, heads, M, d)
    o_x, o_c = _split(o, order, N, M)
    # y = O^x W_o + b_o   (B, N, C_out), or O^x   (B, N, inner)
    y, out_cache = _output(merge_heads(o_x), params, "out")
    image = replace(image, out=out_cache)
    y_context = None
    if o_c is not None:
        # y^c = O^c W_ao + b_ao   (B, M, D_out), or O^c   (B, M, inner)
        y_context, add_out_cache = _output(merge_heads(o_c), params, "add_out")
        text = replace(text, out=add_out_cache)
    cache = JointAttentionCache(
        image=image, text=text, rope_q=rope_q, rope_k=rope_k, attention=attention_cache, heads=heads, order=order,
        N=N, M=M, x_shape=tuple(x.shape), context_shape=None if context is None else tuple(context.shape),
    )
    return (y, y_context), cache


# ---------------------------------------------------------------- backward


def _output_width(stream: _StreamCache) -> int:
    """The width of a stream's output: its projection's, or ``inner`` without one."""
    return stream.out.W.shape[1] if stream.out is not None else stream.q.W.shape[1]


def _output_backward(
    grads: dict[str, Array], d: Array | None, stream: _StreamCache, name: str, shape: tuple[int, int], heads: int
) -> Array:
    """``dO`` of one stream ``(B, heads, n, d)`` from its output gradient (``None``: zero), through its projection.

    ``shape`` is ``(B, n)``, the stream's samples and tokens."""
    if d is None:
        x = stream.q.x  # the stream's tokens: their dtype and device
        xp = namespace(x)
        d = xp.zeros((*shape, _output_width(stream)), dtype=x.dtype, device=device_of(x))
    do = d if stream.out is None else add_grads(grads, name, linear_backward(d, stream.out))  # (B, n, inner)
    return split_heads(do, heads)  # (B, heads, n, d)


def _norm_backward(grads: dict[str, Array], g: Array, norm: RMSNormCache | LayerNormCache | None, name: str) -> Array:
    """Through one q/k norm: its scale's (and shift's) gradient stored under ``name``; returns the input gradient."""
    if norm is None:
        return g
    ng = rms_norm_backward(g, norm) if isinstance(norm, RMSNormCache) else layer_norm_backward(g, norm)
    return add_grads(grads, name, ng)


def _stream_backward(
    grads: dict[str, Array], dq: Array, dk: Array, dv: Array, stream: _StreamCache, which: str
) -> Array:
    """From one stream's ``dQ, dK, dV`` ``(B, heads, n, d)`` back to its tokens: ``ds = ds_Q + ds_K + ds_V``."""
    q_name, k_name, v_name, _ = PROJECTIONS[which]
    norm_q_name, norm_k_name = NORMS[which]
    # through the q/k norms   (B, heads, n, d)
    dq = _norm_backward(grads, dq, stream.norm_q, norm_q_name)
    dk = _norm_backward(grads, dk, stream.norm_k, norm_k_name)
    total = None
    for name, dh, lin in ((q_name, dq, stream.q), (k_name, dk, stream.k), (v_name, dv, stream.v)):
        # heads merged back   (B, n, inner); then the projection's backward   (B, n, width)
        ds = add_grads(grads, name, linear_backward(merge_heads(dh), lin))
        # the tokens feed Q, K and V: ds = ds_Q + ds_K + ds_V
        total = ds if total is None else total + ds
    return total


def joint_attention_backward(douts: tuple[Array | None, Array | None], cache: JointAttentionCache) -> dict[str, Array]:
    """Gradients of :func:`joint_attention_forward`.

    Inputs:
        douts: ``(dy, dy_context)``, the gradients of the two outputs, each of its output's shape and
            dtype; either may be ``None`` for a zero gradient (SD3's last block discards ``y_context``;
            for one stream ``dy_context`` is ``None``).
        cache: from :func:`joint_attention_forward`.

    Returns:
        ``{"x": (B, N, C)}``, ``"context"`` ``(B, M, D)`` with a text stream, and one entry per key of
        ``params``, each in that parameter's shape.
    """
    check_cache(cache, JointAttentionCache, "joint_attention_backward")
    B = cache.x_shape[0]
    text_shape = None if cache.text is None else (B, cache.M, _output_width(cache.text))
    shapes = ((B, cache.N, _output_width(cache.image)), text_shape)
    dy, dy_context = check_joint_douts(douts, shapes, like=cache.image.q.x)
    xp = namespace(cache.image.q.x)
    grads: dict[str, Array] = {}
    # through the output projections: dO^x   (B, heads, N, d), dO^c   (B, heads, M, d)
    do_x = _output_backward(grads, dy, cache.image, "out", (B, cache.N), cache.heads)
    do_c = None
    if cache.text is not None:
        do_c = _output_backward(grads, dy_context, cache.text, "add_out", (B, cache.M), cache.heads)
    # O was split into the streams' rows: dO = [dO^x; dO^c] in the joined order   (B, heads, L, d)
    do = _join(xp, do_x, do_c, cache.order)
    # one softmax over all L keys: dQ, dK, dV   (B, heads, L, d)
    dheads = attention_backward(do, cache.attention)
    dq, dk, dv = dheads["q"], dheads["k"], dheads["v"]
    if cache.rope_q is not None:
        # RoPE turned Q and K: turn their gradients back   (B, heads, L, d)
        dq = rope_backward(dq, cache.rope_q)["x"]
        dk = rope_backward(dk, cache.rope_k)["x"]
    # the join: each stream's rows   (B, heads, N or M, d)
    (dq_x, dq_c), (dk_x, dk_c), (dv_x, dv_c) = (_split(a, cache.order, cache.N, cache.M) for a in (dq, dk, dv))
    grads["x"] = _stream_backward(grads, dq_x, dk_x, dv_x, cache.image, "image")
    if cache.text is not None:
        grads["context"] = _stream_backward(grads, dq_c, dk_c, dv_c, cache.text, "text")
    return grads
