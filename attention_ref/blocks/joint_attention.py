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

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import numpy as np

from .._checks import require_bool, require_broadcastable_to, require_floating
from ..attention import AttentionCache, attention_backward, attention_forward
from ..backend import Array, device_of, namespace
from ..ops.heads import merge_heads, split_heads
from ..ops.layer_norm import LayerNormCache, layer_norm_backward, layer_norm_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.rms_norm import RMSNormCache, rms_norm_backward, rms_norm_forward
from ..ops.rope import PAIR_LAYOUTS, RopeCache, rope_backward, rope_forward
from .params import check_keys, check_param_dtypes, init_linear

__all__ = [
    "JointAttentionCache",
    "QK_NORMS",
    "STREAM_ORDERS",
    "init_joint_attention",
    "joint_attention_backward",
    "joint_attention_forward",
]

#: The per-head normalisations of queries and keys.
QK_NORMS = ("rms_norm", "layer_norm")
#: Where the image tokens go in the joined sequence: SD3 puts them first, Flux after the text.
STREAM_ORDERS = ("image_first", "text_first")

# each stream's projections and norms: (query, key, value, output), (query norm, key norm)
_PROJECTIONS = {"image": ("q", "k", "v", "out"), "text": ("add_q", "add_k", "add_v", "add_out")}
_NORMS = {"image": ("norm_q", "norm_k"), "text": ("norm_added_q", "norm_added_k")}


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

    backward_name = "joint_attention_backward"

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


# ---------------------------------------------------------------- parameters


def init_joint_attention(
    dim: int,
    context_dim: int | None = None,
    *,
    heads: int,
    head_dim: int | None = None,
    qk_norm: str | None = None,
    bias: bool = True,
    out_bias: bool = True,
    pre_only: bool = False,
    context_pre_only: bool = False,
    out_dim: int | None = None,
    context_out_dim: int | None = None,
    rng: np.random.Generator | int | None = None,
    dtype: Any = "float64",
) -> dict[str, np.ndarray]:
    """Random parameters for :func:`joint_attention_forward`, as NumPy arrays.

    Inputs:
        dim: ``C``, the image tokens' width.
        context_dim: ``D``, the text tokens' width; ``None`` for one stream (no ``add_*`` parameters).
        heads, head_dim: ``inner = heads · head_dim`` (default ``head_dim = dim/heads``).
        qk_norm: ``None``, ``"rms_norm"`` (scale ``(d,)`` = 1) or ``"layer_norm"`` (scale 1, shift 0).
        bias: give the q/k/v projections of both streams biases (SD3 and Flux have them);
            out_bias: give the output projections biases.
        pre_only: no image output projection (Flux's single-stream blocks);
            context_pre_only: no text output projection (SD3's last block).
        out_dim, context_out_dim: the output projections' widths (default ``dim`` for both, as diffusers'
            ``to_out`` and ``to_add_out``).
        rng, dtype: a generator or seed, and the arrays' floating dtype.

    Returns:
        ``{"q.weight" (C, inner), "k.weight", "v.weight", "out.weight" (inner, out_dim), "add_q.weight"
        (D, inner), "add_k.weight", "add_v.weight", "add_out.weight" (inner, context_out_dim), their biases,
        "norm_q.weight" (d,), "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight" (and ``.bias``
        for layer norm)}``, as asked; linear weights uniform in ``±1/√fan_in`` (PyTorch's default).
    """
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if head_dim is None:
        if dim % heads != 0:
            raise ValueError(f"{dim} channels are not divisible into {heads} heads; give head_dim")
        head_dim = dim // heads
    if qk_norm is not None and qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm must be one of {QK_NORMS} or None, got {qk_norm!r}")
    if context_dim is None and context_pre_only:
        raise ValueError("context_pre_only needs a text stream (context_dim)")
    rng = np.random.default_rng(rng)
    inner = heads * head_dim
    params: dict[str, np.ndarray] = {}
    streams = {"image": dim} if context_dim is None else {"image": dim, "text": context_dim}
    for stream, width in streams.items():
        q, k, v, out = _PROJECTIONS[stream]
        for name in (q, k, v):
            init_linear(params, name, width, inner, bias=bias, rng=rng, dtype=dtype)
        no_out = pre_only if stream == "image" else context_pre_only
        if not no_out:
            n_out = (out_dim if stream == "image" else context_out_dim) or dim
            init_linear(params, out, inner, n_out, bias=out_bias, rng=rng, dtype=dtype)
        if qk_norm is not None:
            for norm in _NORMS[stream]:
                params[f"{norm}.weight"] = np.ones(head_dim, dtype=np.dtype(dtype))
                if qk_norm == "layer_norm":
                    params[f"{norm}.bias"] = np.zeros(head_dim, dtype=np.dtype(dtype))
    return params


# ---------------------------------------------------------------- checks


def _fail(message: str) -> NoReturn:
    raise ValueError(f"joint attention: {message}")


def _stream_keys(stream: str, qk_norm: str | None) -> tuple[list[str], list[str]]:
    """The required and optional parameter keys of one stream."""
    q, k, v, out = _PROJECTIONS[stream]
    required = [f"{q}.weight", f"{k}.weight", f"{v}.weight"]
    optional = [f"{q}.bias", f"{k}.bias", f"{v}.bias", f"{out}.weight", f"{out}.bias"]
    if qk_norm is not None:
        optional += [f"{norm}.weight" for norm in _NORMS[stream]]
    if qk_norm == "layer_norm":
        optional += [f"{norm}.bias" for norm in _NORMS[stream]]
    return required, optional


def _check_stream_shapes(params: Mapping[str, Array], stream: str, width: int, heads: int) -> int:
    """``ValueError`` unless one stream's parameters fit tokens of ``width`` channels; returns ``inner``."""
    q, k, v, out = _PROJECTIONS[stream]
    inner = params["q.weight"].shape[-1] if params["q.weight"].ndim == 2 else -1
    for name in (q, k, v):
        shape = tuple(params[f"{name}.weight"].shape)
        if shape != (width, inner):
            what = "image tokens" if stream == "image" else "text tokens"
            _fail(
                f"{name}.weight of shape {shape} should be (in, inner) = {(width, inner)} for {what} of width {width}"
            )
        b = params.get(f"{name}.bias")
        if b is not None and tuple(b.shape) != (inner,):
            _fail(f"{name}.bias of shape {tuple(b.shape)} should be ({inner},)")
    if f"{out}.bias" in params and f"{out}.weight" not in params:
        _fail(f"{out}.bias is given without {out}.weight")
    if f"{out}.weight" in params:
        W = params[f"{out}.weight"]
        if W.ndim != 2 or W.shape[0] != inner:
            _fail(f"{out}.weight of shape {tuple(W.shape)} should be (inner, out) with inner = {inner}")
        b = params.get(f"{out}.bias")
        if b is not None and tuple(b.shape) != (W.shape[1],):
            _fail(f"{out}.bias of shape {tuple(b.shape)} should be ({W.shape[1]},)")
    if inner % heads:
        _fail(f"{inner} attention channels are not divisible into {heads} heads")
    d = inner // heads
    for norm in _NORMS[stream]:
        for kind in ("weight", "bias"):
            p = params.get(f"{norm}.{kind}")
            if p is not None and tuple(p.shape) != (d,):
                _fail(f"{norm}.{kind} of shape {tuple(p.shape)} should be (head_dim,) = ({d},)")
    return inner


def _check_inputs(
    x: Array,
    context: Array | None,
    params: Mapping[str, Array],
    heads: int,
    order: str,
    qk_norm: str | None,
    eps: float,
    rope: Any,
    rope_pairs: str,
    mask: Array | None,
) -> None:
    """Every check of :func:`joint_attention_forward`'s inputs (``ValueError`` / ``TypeError`` naming them)."""
    xp = namespace(x, context, mask, *params.values())
    require_floating(xp, "x", x)
    if x.ndim != 3:
        _fail(f"x must be (B, N, C) image tokens, got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if context is not None:
        require_floating(xp, "context", context)
        if context.dtype != x.dtype:
            raise TypeError(f"joint attention: context has dtype {context.dtype} but x has dtype {x.dtype}")
        if context.ndim != 3 or context.shape[0] != B:
            _fail(
                f"context must be (B, M, D) = ({B}, M, D) text tokens for x of shape {(B, N, C)}, "
                f"got {tuple(context.shape)}"
            )
    M = 0 if context is None else context.shape[1]
    if B == 0 or N == 0 or (context is not None and M == 0):
        given = f"x of shape {(B, N, C)}" + ("" if context is None else f", context of shape {tuple(context.shape)}")
        _fail(f"needs at least one sample and one token per stream (B, N, M ≥ 1), got {given}")
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
        _fail(f"heads must be a positive int, got {heads!r}")
    if order not in STREAM_ORDERS:
        _fail(f"order must be one of {STREAM_ORDERS}, got {order!r}")
    if qk_norm is not None and qk_norm not in QK_NORMS:
        _fail(f"qk_norm must be one of {QK_NORMS} or None, got {qk_norm!r}")
    required, optional = _stream_keys("image", qk_norm)
    if context is not None:
        text_required, text_optional = _stream_keys("text", qk_norm)
        required, optional = required + text_required, optional + text_optional
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown and qk_norm is None and any(key.startswith("norm_") for key in unknown):
        _fail(f"{unknown} are given but qk_norm is None; pass qk_norm='rms_norm' or 'layer_norm'")
    if unknown and context is None and any(key.startswith("add_") for key in unknown):
        _fail(f"{unknown} belong to a text stream, but context is None")
    check_keys(params, required=required, optional=optional, where="joint attention")
    check_param_dtypes(x, params, "joint attention")
    inner = _check_stream_shapes(params, "image", C, heads)
    if context is not None and _check_stream_shapes(params, "text", context.shape[2], heads) != inner:
        _fail("the text stream's projections must have the image stream's width inner")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        _fail(f"eps must be a real number ≥ 0, got {eps!r}")
    L, d = N + M, inner // heads
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"joint attention: rope must be a (cos, sin) pair of arrays, got {type(rope).__name__}")
        if rope_pairs not in PAIR_LAYOUTS:
            _fail(f"rope_pairs must be one of {PAIR_LAYOUTS}, got {rope_pairs!r}")
        for name, table in zip(("cos", "sin"), rope, strict=True):
            namespace(x, table)
            if table.ndim < 2 or tuple(table.shape[-2:]) != (L, d):
                _fail(
                    f"rope's {name} of shape {tuple(table.shape)} should be (L, head_dim) = {(L, d)}: one row per "
                    f"token of the joined sequence ({N} image + {M} text, in the order {order!r})"
                )
    if mask is not None:
        require_bool(xp, "mask", mask)
        try:
            require_broadcastable_to("mask", tuple(mask.shape), (B, heads, L, L))
        except ValueError:
            _fail(
                f"mask of shape {tuple(mask.shape)} does not broadcast to (B, heads, L, L) = {(B, heads, L, L)} "
                "(the joined order)"
            )


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
    q_name, k_name, v_name, _ = _PROJECTIONS[stream]
    norm_q_name, norm_k_name = _NORMS[stream]
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
        rope: ``(cos, sin)``, each ``(L, d)`` (or broadcastable ``(..., L, d)``), ``L = N + M``, rows in the
            joined order, applied to the joined queries and keys after the norms; ``None`` for no RoPE.
        rope_pairs: ``"interleaved"`` (Flux) or ``"halves"``, the tables' pair layout
            (:func:`attention_ref.ops.rope_forward`).
        rope_dtype: the dtype the rotation runs in (default x's working dtype); ``"float32"`` reproduces
            diffusers' Flux, which rotates in float32 whatever the model's dtype.
        mask: boolean, broadcastable to ``(B, heads, L, L)`` in the joined order, True = may attend.
        scale: multiplies ``QKᵀ``; default ``1/sqrt(d)``.

    Returns:
        ``(y, y_context)``: ``y`` ``(B, N, C_out)`` (``(B, N, inner)`` without ``"out.weight"``), ``y_context``
        ``(B, M, D_out)`` (``(B, M, inner)`` without ``"add_out.weight"``; ``None`` for one stream);
        cache: :class:`JointAttentionCache`, with ``cache.weights`` ``(B, heads, L, L)`` in the joined
        order and ``cache.image_tokens`` / ``cache.text_tokens`` the streams' places in it.
    """
    _check_inputs(x, context, params, heads, order, qk_norm, eps, rope, rope_pairs, mask)
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
        image=image,
        text=text,
        rope_q=rope_q,
        rope_k=rope_k,
        attention=attention_cache,
        heads=heads,
        order=order,
        N=N,
        M=M,
        x_shape=tuple(x.shape),
        context_shape=None if context is None else tuple(context.shape),
    )
    return (y, y_context), cache


# ---------------------------------------------------------------- backward


def _output_width(stream: _StreamCache) -> int:
    """The width of a stream's output: its projection's, or ``inner`` without one."""
    return stream.out.W.shape[1] if stream.out is not None else stream.q.W.shape[1]


def _check_douts(douts: Any, cache: JointAttentionCache) -> tuple[Array | None, Array | None]:
    """``(dy, dy_context)`` checked against the forward's outputs: shapes, dtype, backend."""
    if not isinstance(douts, (tuple, list)) or len(douts) != 2:
        raise TypeError(
            "joint_attention_backward takes (dy, dy_context), the gradients of the forward's two outputs "
            f"(dy_context None for one stream), got {type(douts).__name__}"
        )
    dy, dy_context = douts
    dtype = cache.image.q.x.dtype
    B, N, _ = cache.x_shape
    for name, d, stream, n in (("dy", dy, cache.image, N), ("dy_context", dy_context, cache.text, cache.M)):
        if d is None:
            continue
        if stream is None:
            raise ValueError("joint_attention_backward: dy_context is given but the forward had no text stream")
        namespace(d, cache.image.q.x)
        width = _output_width(stream)
        if tuple(d.shape) != (B, n, width):
            raise ValueError(
                f"joint_attention_backward: {name} of shape {tuple(d.shape)} does not match the output shape "
                f"{(B, n, width)}"
            )
        if d.dtype != dtype:
            raise TypeError(f"joint_attention_backward: {name} has dtype {d.dtype} but the forward ran in {dtype}")
    if dy is None and dy_context is None:
        raise ValueError("joint_attention_backward: give dy or dy_context (None stands for a zero gradient)")
    return dy, dy_context


def _output_backward(
    grads: dict[str, Array], d: Array | None, stream: _StreamCache, name: str, shape: tuple[int, int], heads: int
) -> Array:
    """``dO`` of one stream ``(B, heads, n, d)`` from its output gradient (``None``: zero), through its projection.

    ``shape`` is ``(B, n)``, the stream's samples and tokens."""
    if d is None:
        x = stream.q.x  # the stream's tokens: their dtype and device
        xp = namespace(x)
        d = xp.zeros((*shape, _output_width(stream)), dtype=x.dtype, device=device_of(x))
    do = d
    if stream.out is not None:
        g = linear_backward(d, stream.out)
        grads[f"{name}.weight"] = g["W"]
        if "b" in g:
            grads[f"{name}.bias"] = g["b"]
        do = g["x"]  # (B, n, inner)
    return split_heads(do, heads)  # (B, heads, n, d)


def _norm_backward(grads: dict[str, Array], g: Array, norm: RMSNormCache | LayerNormCache | None, name: str) -> Array:
    """Through one q/k norm: its scale's (and shift's) gradient stored under ``name``; returns the input gradient."""
    if norm is None:
        return g
    ng = rms_norm_backward(g, norm) if isinstance(norm, RMSNormCache) else layer_norm_backward(g, norm)
    for kind in ("weight", "bias"):
        if kind in ng:
            grads[f"{name}.{kind}"] = ng[kind]
    return ng["x"]


def _stream_backward(
    grads: dict[str, Array], dq: Array, dk: Array, dv: Array, stream: _StreamCache, which: str
) -> Array:
    """From one stream's ``dQ, dK, dV`` ``(B, heads, n, d)`` back to its tokens: ``ds = ds_Q + ds_K + ds_V``."""
    q_name, k_name, v_name, _ = _PROJECTIONS[which]
    norm_q_name, norm_k_name = _NORMS[which]
    # through the q/k norms   (B, heads, n, d)
    dq = _norm_backward(grads, dq, stream.norm_q, norm_q_name)
    dk = _norm_backward(grads, dk, stream.norm_k, norm_k_name)
    total = None
    for name, dh, lin in ((q_name, dq, stream.q), (k_name, dk, stream.k), (v_name, dv, stream.v)):
        # heads merged back   (B, n, inner); then the projection's backward   (B, n, width)
        g = linear_backward(merge_heads(dh), lin)
        grads[f"{name}.weight"] = g["W"]
        if "b" in g:
            grads[f"{name}.bias"] = g["b"]
        # the tokens feed Q, K and V: ds = ds_Q + ds_K + ds_V
        total = g["x"] if total is None else total + g["x"]
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
    if not isinstance(cache, JointAttentionCache):
        raise TypeError(
            f"joint_attention_backward needs the JointAttentionCache of its forward, got a {type(cache).__name__}"
        )
    dy, dy_context = _check_douts(douts, cache)
    xp = namespace(cache.image.q.x)
    grads: dict[str, Array] = {}
    B = cache.x_shape[0]
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
