"""The checks of the attention layer's inputs (:func:`attention_ref.blocks.attention_layer_forward`).

Every check names what it refuses and the entry point that was called (``where``): ``ValueError`` for
shapes, sizes and options, ``TypeError`` for dtypes and for what is not an array. The checks of a
context and of a mask serve joint attention too (:mod:`attention_ref.blocks.joint_checks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NoReturn

from .._checks import (
    array_namespace,
    check_eps,
    check_positive_int,
    check_real,
    require_array,
    require_bool,
    require_broadcastable_to,
    require_divisible,
    require_finite,
    require_floating,
)
from ..backend import Array, namespace
from .attend import check_attention_choice
from .params import check_keys, check_param_dtypes, check_params

__all__ = ["CROSS_NORMS", "check_block_mask", "check_context_shape", "check_layer_inputs"]

_WEIGHTS = ("q.weight", "k.weight", "v.weight", "out.weight")
_OPTIONAL = (
    "norm.weight",
    "norm.bias",
    "norm_cross.weight",
    "norm_cross.bias",
    "q.bias",
    "k.bias",
    "v.bias",
    "out.bias",
)
#: The norms a cross-attention layer can put on its context (diffusers' ``cross_attention_norm``).
CROSS_NORMS = ("layer_norm", "group_norm")


def _fail(where: str, message: str) -> NoReturn:
    raise ValueError(f"{where}: {message}")


def check_context_shape(
    context: Array, x_shape: tuple[int, ...], where: str, *, tokens: str = "", x_name: str = "x"
) -> None:
    """``ValueError`` unless ``context`` is ``(B, M, D)`` with ``x``'s ``B``; ``tokens`` says what the context's
    tokens are ("text tokens"), ``x_name`` what the message calls ``x``."""
    B = x_shape[0]
    if context.ndim != 3 or context.shape[0] != B:
        what = f" {tokens}" if tokens else ""
        hint = "; for one (M, D) sequence pass context[None]" if context.ndim == 2 else ""
        _fail(
            where,
            f"context must be (B, M, D) = ({B}, M, D){what} for {x_name} of shape {tuple(x_shape)}, "
            f"got shape {tuple(context.shape)}{hint}",
        )


def check_block_mask(
    xp: ModuleType,
    mask: Array,
    target: tuple[int, int, int, int],
    where: str,
    *,
    axes: tuple[str, str] = ("N", "M"),
    shown: str = "",
    key_mask_hint: str = "",
    detail: str = "",
) -> None:
    """``TypeError`` unless ``mask`` is boolean; ``ValueError`` unless it is ``(N, M)`` or 4-D and broadcasts to
    ``target`` ``(B, heads, N, M)``.

    A 3-D mask is refused rather than guessed at: it could be diffusers' per-sample ``(B, N, M)`` or a
    per-head ``(heads, N, M)``, and broadcasting would read the one as the other when ``B = heads``.
    ``axes`` names the query and key axes in the messages (joint attention: ``("L", "L")``); ``shown``,
    ``key_mask_hint`` and ``detail`` add to the messages what the caller knows (the joined order).
    """
    require_bool(xp, "mask", mask)
    n, m = axes
    if mask.ndim not in (2, 4):
        _fail(
            where,
            f"mask of shape {tuple(mask.shape)} must be ({n}, {m}) or (B or 1, heads or 1, {n}, {m}){shown}; "
            f"a per-sample (B, {n}, {m}) mask is mask[:, None], a per-head (heads, {n}, {m}) one mask[None]"
            + key_mask_hint,
        )
    try:
        require_broadcastable_to("mask", tuple(mask.shape), target)
    except ValueError:
        _fail(where, f"mask of shape {tuple(mask.shape)} does not broadcast to (B, heads, {n}, {m}) = {target}{detail}")


def _channels_hint(shape: tuple[int, ...], grid: tuple[int, int] | None, expected: int) -> str:
    """A hint when the channels seem to sit on another axis: a (B, C, H, W) map or (B, C, N) tokens."""
    if grid is not None and grid[0] == expected:
        return (
            f"; maps are (B, H, W, C), channels last, and this map's axis 1 has {expected} entries: move the channels "
            "of a (B, C, H, W) map last (x.transpose(0, 2, 3, 1) in NumPy, x.permute(0, 2, 3, 1) in torch)"
        )
    if grid is None and len(shape) == 3 and shape[1] == expected:
        return f"; tokens are (B, N, C), channels last, and axis 1 has {expected} entries: is it (B, C, N)?"
    return ""


def _check_shapes(
    params: Mapping[str, Array],
    C: int,
    source_width: int,
    heads: int,
    residual: bool,
    where: str,
    is_cross: bool,
    input_shape: tuple[int, ...] = (),
    grid: tuple[int, int] | None = None,
) -> None:
    """``ValueError`` unless every parameter's shape fits ``C`` channels and a source of ``source_width``.

    ``input_shape`` and ``grid`` (the map's (H, W) when the tokens came from one) let the message say
    when the channels seem to sit on another axis.
    """
    for name in _WEIGHTS:
        if params[name].ndim != 2:
            _fail(where, f"{name} must be a matrix (in, out), got shape {tuple(params[name].shape)}")
    q_in, inner = params["q.weight"].shape
    if q_in != C:
        _fail(
            where,
            f"q.weight of shape {(q_in, inner)} expects {q_in} input channels but the input has {C}"
            + _channels_hint(input_shape, grid, q_in),
        )
    source = "context width" if is_cross else "input's channels"
    for name in ("k.weight", "v.weight"):
        shape = tuple(params[name].shape)
        if shape[0] != source_width:
            _fail(where, f"{name} of shape {shape} expects {shape[0]} input channels; the {source} is {source_width}")
        if shape[1] != inner:
            _fail(where, f"{name} of shape {shape} does not match q.weight's {inner} output channels")
    out_in, C_out = params["out.weight"].shape
    if out_in != inner:
        _fail(where, f"out.weight of shape {(out_in, C_out)} expects {out_in} inputs but q/k/v give {inner}")
    require_divisible(inner, heads, "attention channels", "heads", where=where)
    if residual and C_out != C:
        _fail(where, f"the residual needs out.weight to return {C} channels, it returns {C_out}")
    for name, n in (("q.bias", inner), ("k.bias", inner), ("v.bias", inner), ("out.bias", C_out)):
        if name in params and tuple(params[name].shape) != (n,):
            _fail(where, f"{name} of shape {tuple(params[name].shape)} should be ({n},)")
    for norm, width in (("norm", C), ("norm_cross", source_width)):
        if f"{norm}.bias" in params and f"{norm}.weight" not in params:
            _fail(where, f"{norm}.bias is given without {norm}.weight")
        for kind in ("weight", "bias"):
            p = params.get(f"{norm}.{kind}")
            if p is not None and tuple(p.shape) != (width,):
                _fail(where, f"{norm}.{kind} of shape {tuple(p.shape)} should be ({width},)")


def check_layer_inputs(
    h: Array,
    params: Mapping[str, Array],
    heads: Any,
    context: Array | None,
    context_mask: Array | None,
    mask: Array | None,
    groups: Any,
    eps: Any,
    cross_norm: Any,
    cross_norm_groups: Any,
    cross_norm_eps: Any,
    residual: bool,
    rescale: Any,
    attention: Any,
    attention_options: Any,
    grid: Any,
    where: str,
) -> tuple[float, float, float, dict[str, Any]]:
    """Every check of :func:`attention_ref.blocks.attention_layer_forward`'s inputs, which it passes in the
    order of its signature; returns ``(eps, cross_norm_eps, rescale, attention options)`` as checked.

    ``ValueError`` naming the shapes (and the entry point that takes them, ``where``) for anything that
    does not fit, ``TypeError`` for dtypes and non-arrays.
    """
    eps = check_eps("eps", eps, where)
    cross_norm_eps = check_eps("cross_norm_eps", cross_norm_eps, where)
    rescale = check_real("rescale", rescale, where, nonzero=True)
    check_params(params, where)
    require_array(f"{where}: h", h)
    xp = array_namespace(h=h, context=context, context_mask=context_mask, mask=mask)
    namespace(h, *params.values())  # the parameters' library is h's
    require_floating(xp, "h", h)
    heads = check_positive_int("heads", heads, where)
    check_positive_int("groups", groups, where)
    if h.ndim != 3:
        way_out = ""
        if h.ndim == 4:
            way_out = (
                "; a (B, H, W, C) map goes to self_attention_forward / cross_attention_forward, "
                "or reshape it to (B, H·W, C) tokens and pass grid=(H, W)"
            )
        _fail(where, f"h must be (B, N, C) token sequences, got shape {tuple(h.shape)}{way_out}")
    check_keys(params, required=_WEIGHTS, optional=_OPTIONAL, where=where)
    check_param_dtypes(h, params, where)
    B, N, C = h.shape
    is_cross = context is not None
    source_width = C
    if is_cross:
        require_floating(xp, "context", context)
        if context.dtype != h.dtype:
            raise TypeError(f"{where}: context has dtype {context.dtype} but the input has dtype {h.dtype}")
        check_context_shape(context, tuple(h.shape), where, tokens="token sequences", x_name="an input")
        source_width = context.shape[-1]
    elif context_mask is not None:
        _fail(where, "context_mask is only for cross-attention (it marks padded context tokens)")
    require_finite(xp, "h", h, where)
    if is_cross:
        require_finite(xp, "context", context, where)
    M = context.shape[1] if is_cross else N
    if B == 0 or N == 0 or M == 0:
        what = f"input of shape {tuple(h.shape)}" + (
            f" and context of shape {tuple(context.shape)}" if is_cross else ""
        )
        _fail(
            where,
            f"{what}: needs at least one sample, one query token and one key token (B, N, M ≥ 1); "
            "attention over no keys has no softmax (pad the context and mask the padding with context_mask instead)",
        )
    _check_shapes(params, C, source_width, heads, residual, where, is_cross, tuple(h.shape), grid)
    if "norm.weight" in params:
        require_divisible(C, groups, "channels", "groups", where=where)
    if cross_norm is not None:
        if not is_cross:
            _fail(where, f"cross_norm={cross_norm!r} normalises the context, but self-attention has none")
        if cross_norm not in CROSS_NORMS:
            _fail(where, f"cross_norm must be one of {CROSS_NORMS} or None, got {cross_norm!r}")
        if cross_norm == "group_norm":
            n_groups = check_positive_int("cross_norm_groups", cross_norm_groups, where)
            require_divisible(source_width, n_groups, "channels", "groups", where=where, whose="the context's ")
    elif "norm_cross.weight" in params:
        _fail(where, "norm_cross.weight is given but cross_norm is None; pass cross_norm='layer_norm' or 'group_norm'")
    if context_mask is not None:
        require_bool(xp, "context_mask", context_mask)
        allowed = [(M,), (B, M)]
        if tuple(context_mask.shape) not in allowed:
            _fail(where, f"context_mask of shape {tuple(context_mask.shape)} should be one of {allowed}")
    if mask is not None:
        check_block_mask(xp, mask, (B, heads, N, M), where)
    if grid is not None:
        if len(grid) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid):
            _fail(where, f"grid must be (H, W), two positive ints, got {grid!r}")
        if grid[0] * grid[1] != N:
            _fail(where, f"grid {tuple(grid)} has {grid[0] * grid[1]} pixels but the input has {N} tokens")
    options = check_attention_choice(
        attention, attention_options, self_attention=not is_cross, keys=M, grid=grid, mask=mask, where=where
    )
    return eps, cross_norm_eps, rescale, options

