"""Joint attention's parameters and the checks of its inputs (:func:`attention_ref.blocks.joint_attention_forward`).

Each stream has its own projections and q/k norms, named as diffusers names them: the image stream
``q``, ``k``, ``v``, ``out`` and ``norm_q``, ``norm_k``; the text stream ``add_q``, ``add_k``, ``add_v``,
``add_out`` and ``norm_added_q``, ``norm_added_k``. Every check names what it refuses: ``ValueError`` for
shapes and options, ``TypeError`` for dtypes and for what is not an array.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from .._checks import (
    array_namespace,
    check_eps,
    check_positive_int,
    require_array,
    require_divisible,
    require_dout,
    require_finite,
    require_floating,
)
from ..backend import Array, namespace
from ..ops.rope import PAIR_LAYOUTS, float_dtype_named
from .layer_checks import check_block_mask, check_context_shape
from .params import check_keys, check_param_dtypes, check_params

__all__ = ["NORMS", "PROJECTIONS", "QK_NORMS", "STREAM_ORDERS", "check_joint_douts", "check_joint_inputs"]

#: The per-head normalisations of queries and keys.
QK_NORMS = ("rms_norm", "layer_norm")
#: Where the image tokens go in the joined sequence: SD3 puts them first, Flux after the text.
STREAM_ORDERS = ("image_first", "text_first")

#: Each stream's projections (query, key, value, output) and q/k norms (query norm, key norm).
PROJECTIONS = {"image": ("q", "k", "v", "out"), "text": ("add_q", "add_k", "add_v", "add_out")}
NORMS = {"image": ("norm_q", "norm_k"), "text": ("norm_added_q", "norm_added_k")}


_WHERE = "joint attention"


def _fail(message: str) -> NoReturn:
    raise ValueError(f"{_WHERE}: {message}")


def _stream_keys(stream: str, qk_norm: str | None) -> tuple[list[str], list[str]]:
    """The required and optional parameter keys of one stream."""
    q, k, v, out = PROJECTIONS[stream]
    required = [f"{q}.weight", f"{k}.weight", f"{v}.weight"]
    optional = [f"{q}.bias", f"{k}.bias", f"{v}.bias", f"{out}.weight", f"{out}.bias"]
    if qk_norm is not None:
        optional += [f"{norm}.weight" for norm in NORMS[stream]]
    if qk_norm == "layer_norm":
        optional += [f"{norm}.bias" for norm in NORMS[stream]]
    return required, optional


def _check_stream_shapes(params: Mapping[str, Array], stream: str, width: int, heads: int) -> int:
    """``ValueError`` unless one stream's parameters fit tokens of ``width`` channels; returns ``inner``."""
    q, k, v, out = PROJECTIONS[stream]
    inner = params["q.weight"].shape[-1] if params["q.weight"].ndim == 2 else -1
    for name in (q, k, v):
        shape = tuple(params[f"{name}.weight"].shape)
        if shape != (width, inner):
            what = "x (the image tokens)" if stream == "image" else "context (the text tokens)"
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
    require_divisible(inner, heads, "attention channels", "heads", where=_WHERE)
    d = inner // heads
    for norm in NORMS[stream]:
        for kind in ("weight", "bias"):
            p = params.get(f"{norm}.{kind}")
            if p is not None and tuple(p.shape) != (d,):
                _fail(
                    f"{norm}.{kind} of shape {tuple(p.shape)} should be (head_dim,) = ({d},), the {inner} attention "
                    f"channels split into heads = {heads}"
                )
    return inner


def check_joint_inputs(
    x: Array,
    context: Array | None,
    params: Mapping[str, Array],
    heads: Any,
    order: Any,
    qk_norm: Any,
    eps: Any,
    rope: Any,
    rope_pairs: Any,
    rope_dtype: Any,
    mask: Array | None,
) -> tuple[int, float]:
    """Every check of :func:`attention_ref.blocks.joint_attention_forward`'s inputs, which it passes in the
    order of its signature (``ValueError`` / ``TypeError`` naming them); returns ``(heads, eps)`` as an int
    and a float."""
    check_params(params, _WHERE)
    require_array(f"{_WHERE}: x", x)
    xp = array_namespace(x=x, context=context, mask=mask)
    namespace(x, *params.values())  # the parameters from x's library too
    require_floating(xp, "x", x)
    if x.ndim != 3:
        _fail(f"x must be (B, N, C) image tokens, got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if context is not None:
        require_floating(xp, "context", context)
        if context.dtype != x.dtype:
            raise TypeError(f"joint attention: context has dtype {context.dtype} but x has dtype {x.dtype}")
        check_context_shape(context, (B, N, C), _WHERE, tokens="text tokens")
    M = 0 if context is None else context.shape[1]
    if B == 0 or N == 0 or (context is not None and M == 0):
        given = f"x of shape {(B, N, C)}" + ("" if context is None else f", context of shape {tuple(context.shape)}")
        _fail(f"needs at least one sample and one token per stream (B, N, M ≥ 1), got {given}")
    heads = check_positive_int("heads", heads, _WHERE)
    if order not in STREAM_ORDERS:
        _fail(f"order must be one of {STREAM_ORDERS}, got {order!r}")
    if qk_norm is not None and qk_norm not in QK_NORMS:
        _fail(f"qk_norm must be one of {QK_NORMS} or None, got {qk_norm!r}")
    eps = check_eps("eps", eps, _WHERE)
    required, optional = _stream_keys("image", qk_norm)
    if context is not None:
        text_required, text_optional = _stream_keys("text", qk_norm)
        required, optional = required + text_required, optional + text_optional
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown and qk_norm is None and any(key.startswith("norm_") for key in unknown):
        _fail(f"{unknown} are given but qk_norm is None; pass qk_norm='rms_norm' or 'layer_norm'")
    if unknown and context is None and any(key.startswith("add_") for key in unknown):
        _fail(f"{unknown} belong to a text stream, but context is None")
    check_keys(params, required=required, optional=optional, where=_WHERE)
    check_param_dtypes(x, params, _WHERE, name="x")
    inner = _check_stream_shapes(params, "image", C, heads)
    if context is not None and _check_stream_shapes(params, "text", context.shape[2], heads) != inner:
        _fail("the text stream's projections must have the image stream's width inner")
    # an infinite token has no output (its q/k norm is inf − inf, its logits ±inf): refused, as in every block
    require_finite(xp, "x", x, _WHERE)
    if context is not None:
        require_finite(xp, "context", context, _WHERE)
    L, d = N + M, inner // heads
    tokens = f"{N} tokens of x" + ("" if context is None else f" + {M} of context, in the order {order!r}")
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"joint attention: rope must be a (cos, sin) pair of arrays, got {type(rope).__name__}")
        if rope_pairs not in PAIR_LAYOUTS:
            _fail(f"rope_pairs must be one of {PAIR_LAYOUTS}, got {rope_pairs!r}")
        if rope_dtype is not None:
            float_dtype_named(xp, rope_dtype, "rope_dtype", _WHERE)
        for name, table in zip(("cos", "sin"), rope, strict=True):
            require_array(f"{_WHERE}: rope's {name}", table)
            array_namespace(x=x, **{f"rope's {name}": table})
            require_floating(xp, f"{_WHERE}: rope's {name}", table)
            if table.ndim not in (2, 4) or tuple(table.shape[-2:]) != (L, d):
                # as for the mask: a 3-D table could be per sample (B, L, d) or per head (heads, L, d)
                _fail(
                    f"rope's {name} of shape {tuple(table.shape)} should be (L, head_dim) = {(L, d)}: one row per "
                    f"token of the joined sequence ({tokens}); or (B or 1, heads or 1, L, head_dim), per-sample "
                    f"(B, L, head_dim) tables being {name}[:, None]"
                )
            # a table entry of ±inf turns a query or key into ±inf: refused as an infinite input
            require_finite(xp, f"rope's {name}", table, _WHERE)
    if mask is not None:
        # a 1-D mask is refused too: a key mask or a batch's, broadcasting would pick one silently
        given = f"x of shape {tuple(x.shape)}"
        if context is not None:
            given += f" and context of shape {tuple(context.shape)}"
        check_block_mask(
            xp,
            mask,
            (B, heads, L, L),
            _WHERE,
            axes=("L", "L"),
            shown=f" = {(B, heads, L, L)} in the joined order ({tokens})",
            key_mask_hint=", a per-sample key mask (B, L) is mask[:, None, None, :]",
            detail=f": L = N + M for {given} ({tokens})",
        )
    return heads, eps


def check_joint_douts(
    douts: Any, shapes: tuple[tuple[int, ...], tuple[int, ...] | None], like: Array
) -> tuple[Array | None, Array | None]:
    """``(dy, dy_context)`` checked against the forward's two outputs: their ``shapes`` (``None`` for the text
    output of one stream), and the dtype and library of ``like``, an array of the forward."""
    if not isinstance(douts, (tuple, list)) or len(douts) != 2:
        raise TypeError(
            "joint_attention_backward takes (dy, dy_context), the gradients of the forward's two outputs "
            f"(dy_context None for one stream), got {type(douts).__name__}"
        )
    dy, dy_context = douts
    for name, d, shape in (("dy", dy, shapes[0]), ("dy_context", dy_context, shapes[1])):
        if d is None:
            continue
        if shape is None:
            raise ValueError("joint_attention_backward: dy_context is given but the forward had no text stream")
        require_dout(d, shape, like.dtype, where="joint_attention_backward", name=name, like=like)
    if dy is None and dy_context is None:
        raise ValueError("joint_attention_backward: give dy or dy_context (None stands for a zero gradient)")
    return dy, dy_context
