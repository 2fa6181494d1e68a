"""The public functions under bad input: a table of calls, the inputs that go wrong, and a verdict on each result.

Used by ``tests/test_properties.py`` (hypothesis draws from it) and ``scripts/probe_bad_input.py``
(which runs every case and counts the verdicts). A row of :data:`SPECS` is one public forward
(and its backward): its valid inputs, small and seeded, and the options it takes. :func:`cases` turns a
row into calls that change one thing — an array's dtype, shape or values, an option, the backward's
``dout`` or cache — each marked with what it must give: an error (a documented ``ValueError``,
``TypeError`` or ``MemoryError``, raised by attention_ref's own code), or a value, which
:func:`judge` compares with the same call in float64.

To cover a new function, add a :class:`Spec` row to :data:`SPECS` (or to ``EXTRA_SPECS`` from another
module): nothing else changes.
"""

from __future__ import annotations

import dis
import math
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import attention_ref as ar
from attention_ref.interop import flux_rope_tables
from attention_ref.ops import (
    patchify_backward,
    patchify_forward,
    rms_norm_backward,
    rms_norm_forward,
    rope_angles,
    rope_backward,
    rope_forward,
    unpatchify_backward,
    unpatchify_forward,
)

#: the exception types the documentation promises (docs/numerics.md, "Errors")
DOCUMENTED = (ValueError, TypeError, MemoryError)
PACKAGE = Path(ar.__file__).parent

Array = np.ndarray


@dataclass(frozen=True)
class Spec:
    """One public forward (and its backward), with valid inputs.

    arrays: the floating array arguments, name → a maker ``rng -> array`` (float64); passed by name, or
        positionally when listed in ``positional``.
    masks: boolean array arguments, name → maker.
    options: the other arguments' valid values; ``bad``: option → values that must be refused.
    params: a maker of a block's parameter dict (float64), passed as ``params``.
    refuses_inf: array arguments in which an infinite entry must be refused (attention and the blocks).
    any_dtype: the function only moves entries (split/merge heads): integer inputs are fine.
    extra_dtypes: array → the dtypes it may have besides float16/32/64 (rope_angles' integer positions).
    mixed_ok: arrays that may have another floating dtype than the others (rope's cos and sin tables, which
        are cast to the compute dtype).
    dtype_option: the option that sets the result's dtype (rope_angles' ``dtype``); by default the result has
        the first floating array's dtype.

    A forward may return a tuple of arrays (rope_angles' ``(cos, sin)``, joint attention's ``(y, y_context)``,
    ``None`` for an absent one); its backward then takes a tuple of douts, one per output.
    """

    name: str
    forward: Callable[..., Any]
    arrays: Mapping[str, Callable[[np.random.Generator], Array]]
    positional: tuple[str, ...] = ()
    masks: Mapping[str, Callable[[np.random.Generator], Array]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    bad: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    params: Callable[[], dict[str, Array]] | None = None
    backward: Callable[[Any, Any], Any] | None = None
    returns_pair: bool = True  # forward returns (out, cache); False: the output alone
    refuses_inf: tuple[str, ...] = ()
    any_dtype: bool = False
    large: tuple[str, ...] = ()  # arrays scaled by 300 in the float16 "large values" case
    required_param: str = "out.weight"  # a parameter the block cannot do without
    extra_dtypes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mixed_ok: tuple[str, ...] = ()
    dtype_option: str | None = None


def _randn(*shape: int) -> Callable[[np.random.Generator], Array]:
    return lambda rng: rng.standard_normal(shape)


def _bools(*shape: int) -> Callable[[np.random.Generator], Array]:
    def make(rng: np.random.Generator) -> Array:
        m = rng.random(shape) < 0.7
        m[..., 0] = True  # no fully masked row (those are tested elsewhere)
        return m

    return make


def _jittered(params: dict[str, Array]) -> dict[str, Array]:
    rng = np.random.default_rng(7)
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}


INTS = (0, -1, 2.0, True, None, "2", 10**9)  # bad values for a positive int option (2 divides every size here)
INTS_3 = (*INTS, 3)  # and 3, which divides none
EPS_BAD = (-1.0, math.nan, math.inf, None, "1e-5", True)
SCALE_BAD = (math.nan, math.inf, "0.5", True, (1.0,))
AXIS_BAD = (2, -3, None, 1.0, (0, 1), True, "0")

_ATTN = {"q": _randn(2, 3, 4), "k": _randn(2, 5, 4), "v": _randn(2, 5, 3)}
_MAP_QKV = {"q": _randn(1, 4, 4, 2), "k": _randn(1, 4, 4, 2), "v": _randn(1, 4, 4, 3)}
_POS = ("q", "k", "v")

SPECS: list[Spec] = [
    Spec(
        "softmax",
        ar.softmax_forward,
        {"x": _randn(3, 4)},
        ("x",),
        masks={"mask": _bools(3, 4)},
        options={"axis": -1},
        bad={"axis": AXIS_BAD},
        backward=ar.softmax_backward,
        large=("x",),
    ),
    Spec(
        "logsumexp",
        ar.logsumexp,
        {"x": _randn(3, 4)},
        ("x",),
        masks={"mask": _bools(3, 4)},
        options={"axis": -1, "keepdims": False},
        bad={"axis": AXIS_BAD},
        returns_pair=False,
        large=("x",),
    ),
    Spec(
        "linear",
        ar.linear_forward,
        {"x": _randn(2, 3, 4), "W": _randn(4, 5), "b": _randn(5)},
        ("x", "W", "b"),
        backward=ar.linear_backward,
    ),
    Spec(
        "group_norm",
        ar.group_norm_forward,
        {"x": _randn(2, 3, 3, 4), "weight": _randn(4), "bias": _randn(4)},
        ("x", "weight", "bias"),
        options={"groups": 2, "eps": 1e-5},
        bad={"groups": INTS_3, "eps": EPS_BAD},
        backward=ar.group_norm_backward,
        large=("x",),
    ),
    Spec(
        "layer_norm",
        ar.layer_norm_forward,
        {"x": _randn(2, 3, 4), "weight": _randn(4), "bias": _randn(4)},
        ("x", "weight", "bias"),
        options={"eps": 1e-5},
        bad={"eps": EPS_BAD},
        backward=ar.layer_norm_backward,
        large=("x",),
    ),
    Spec(
        "split_heads",
        ar.split_heads_forward,
        {"x": _randn(2, 3, 4)},
        ("x",),
        options={"heads": 2},
        bad={"heads": INTS_3},
        backward=ar.split_heads_backward,
    ),
    Spec("merge_heads", ar.merge_heads_forward, {"x": _randn(2, 2, 3, 2)}, ("x",), backward=ar.merge_heads_backward),
    Spec(
        "split_heads_plain",
        ar.split_heads,
        {"x": _randn(2, 3, 4)},
        ("x",),
        options={"heads": 2},
        bad={"heads": INTS_3},
        returns_pair=False,
        any_dtype=True,
    ),
    Spec("merge_heads_plain", ar.merge_heads, {"x": _randn(2, 2, 3, 2)}, ("x",), returns_pair=False, any_dtype=True),
    Spec(
        "conv2d",
        ar.conv2d_forward,
        {"x": _randn(1, 4, 4, 2), "weight": _randn(3, 3, 2, 3), "bias": _randn(3)},
        ("x", "weight", "bias"),
        options={"padding": 1},
        bad={"padding": (-1, 3, 1.0, True, None, (1,), "valid")},
        backward=ar.conv2d_backward,
    ),
    Spec("erf", ar.erf, {"x": _randn(5)}, ("x",), returns_pair=False),
    Spec("erfc", ar.erfc, {"x": _randn(5)}, ("x",), returns_pair=False),
    Spec("gelu", ar.gelu_forward, {"x": _randn(2, 3)}, ("x",), backward=ar.gelu_backward),
    Spec("geglu", ar.geglu_forward, {"x": _randn(2, 4)}, ("x",), backward=ar.geglu_backward),
    Spec("silu", ar.silu_forward, {"x": _randn(2, 3)}, ("x",), backward=ar.silu_backward),
    Spec(
        "upsample_nearest",
        ar.upsample_nearest_forward,
        {"x": _randn(1, 2, 2, 3)},
        ("x",),
        options={"factor": 2},
        bad={"factor": (0, -1, 2.0, True, None, "2")},
        backward=ar.upsample_nearest_backward,
    ),
    Spec(
        "avg_pool",
        ar.avg_pool_forward,
        {"x": _randn(1, 4, 4, 3)},
        ("x",),
        options={"factor": 2},
        bad={"factor": (0, -1, 2.0, True, None, "2", 3)},
        backward=ar.avg_pool_backward,
    ),
    Spec(
        "timestep_embedding",
        ar.timestep_embedding_forward,
        {"t": lambda rng: rng.uniform(0, 1000, (3,))},
        ("t",),
        options={"dim": 8, "max_period": 10000.0},
        bad={"dim": (0, -2, 3, 8.0, True, None), "max_period": (0.0, -1.0, math.nan, math.inf, None, "1e4")},
        backward=ar.timestep_embedding_backward,
    ),
    Spec(
        "attention",
        ar.attention_forward,
        {**_ATTN, "bias": _randn(3, 5)},
        _POS,
        masks={"mask": _bools(3, 5)},
        options={"scale": None},
        bad={"scale": SCALE_BAD},
        backward=ar.attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "chunked_attention",
        ar.chunked_attention_forward,
        {**_ATTN, "bias": _randn(3, 5)},
        _POS,
        masks={"mask": _bools(3, 5)},
        options={"scale": None, "block_size": 2},
        bad={"scale": SCALE_BAD, "block_size": (0, -1, 2.0, True, "2", (2,), (2, 0))},
        backward=ar.chunked_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "linear_attention",
        ar.linear_attention_forward,
        dict(_ATTN),
        _POS,
        masks={"key_mask": _bools(2, 5)},
        options={"eps": 1e-6, "kind": "elu"},
        bad={"eps": (-1.0, math.nan, math.inf, None, "0", True), "kind": ("softmax", None, 1)},
        backward=ar.linear_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "window_attention",
        ar.window_attention_forward,
        dict(_MAP_QKV),
        _POS,
        options={"window": 2, "shift": 1, "scale": None},
        bad={"window": (0, -1, 3, 2.0, True, None, "2"), "shift": (-1, 2, 1.0, True, None), "scale": SCALE_BAD},
        backward=ar.window_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "neighborhood_attention",
        ar.neighborhood_attention_forward,
        dict(_MAP_QKV),
        _POS,
        options={"kernel": 3, "scale": None},
        bad={"kernel": (0, -1, 2, 5, 3.0, True, None, "3"), "scale": SCALE_BAD},
        backward=ar.neighborhood_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "attention_layer",
        ar.attention_layer_forward,
        {"h": _randn(2, 4, 8)},
        ("h",),
        options={"heads": 2, "groups": 4, "eps": 1e-5, "rescale": 1.5, "scale": None},
        bad={
            "heads": INTS_3,
            "groups": INTS_3,
            "eps": EPS_BAD,
            "rescale": (0, -0.0, math.nan, math.inf, None, "1", True),
            "scale": SCALE_BAD,
        },
        params=lambda: _jittered(ar.init_attention_layer(8, heads=2, groups=4, bias=True, rng=0)),
        backward=ar.attention_layer_backward,
        refuses_inf=("h",),
    ),
    Spec(
        "self_attention",
        ar.self_attention_forward,
        {"x": _randn(1, 2, 2, 8)},
        ("x",),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "rescale": 1.0, "scale": None},
        bad={
            "heads": INTS_3,
            "groups": INTS_3,
            "eps": EPS_BAD,
            "rescale": (0, math.nan, math.inf, None, True),
            "scale": SCALE_BAD,
        },
        params=lambda: _jittered(ar.init_self_attention(8, heads=2, groups=4, rng=0)),
        backward=ar.self_attention_backward,
        refuses_inf=("x",),
    ),
    Spec(
        "cross_attention",
        ar.cross_attention_forward,
        {"x": _randn(1, 2, 2, 8), "context": _randn(1, 3, 6)},
        ("x", "context"),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "rescale": 1.0, "scale": None},
        bad={"heads": INTS_3, "groups": INTS_3, "eps": EPS_BAD, "rescale": (0, math.nan, None, True)},
        params=lambda: _jittered(ar.init_cross_attention(8, 6, heads=2, groups=4, rng=0)),
        backward=ar.cross_attention_backward,
        refuses_inf=("x", "context"),
    ),
    Spec(
        "geglu_ff",
        ar.geglu_ff_forward,
        {"x": _randn(2, 3, 4)},
        ("x",),
        params=lambda: {
            k: v
            for k, v in _jittered(
                {
                    "proj.weight": np.zeros((4, 12)),
                    "proj.bias": np.zeros(12),
                    "out.weight": np.zeros((6, 4)),
                    "out.bias": np.zeros(4),
                }
            ).items()
        },
        backward=ar.geglu_ff_backward,
        refuses_inf=("x",),
    ),
    Spec(
        "transformer_block",
        ar.transformer_block_forward,
        {"h": _randn(1, 4, 8), "context": _randn(1, 3, 6)},
        ("h", "context"),
        options={"heads": 2, "norm_eps": 1e-5, "scale": None},
        bad={"heads": INTS_3, "norm_eps": EPS_BAD, "scale": SCALE_BAD},
        params=lambda: {
            k[len("blocks.0.") :]: v
            for k, v in _jittered(ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)).items()
            if k.startswith("blocks.0.")
        },
        backward=ar.transformer_block_backward,
        required_param="attn1.out.weight",
        refuses_inf=("h", "context"),
    ),
    Spec(
        "spatial_transformer",
        ar.spatial_transformer_forward,
        {"x": _randn(1, 2, 2, 8), "context": _randn(1, 3, 6)},
        ("x", "context"),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "norm_eps": 1e-5},
        bad={"heads": INTS_3, "groups": INTS_3, "eps": EPS_BAD, "norm_eps": EPS_BAD},
        params=lambda: _jittered(ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)),
        backward=ar.spatial_transformer_backward,
        required_param="proj_out.weight",
        refuses_inf=("x", "context"),
    ),
    Spec(
        "res_block",
        ar.blocks.res_block_forward,
        {"x": _randn(1, 3, 4, 4), "temb": _randn(1, 5)},
        ("x", "temb"),
        options={"groups": 2, "eps": 1e-6},
        bad={"groups": INTS_3, "eps": EPS_BAD},
        params=lambda: _jittered(ar.blocks.init_res_block(4, 6, 5, rng=0)),
        backward=ar.blocks.res_block_backward,
        required_param="conv2.weight",
        refuses_inf=("x", "temb"),
        large=("x",),
    ),
]

_SIZES_BAD = (0, -1, 2.0, True, None, "2")
SPECS += [
    Spec(
        "init_self_attention",
        ar.init_self_attention,
        {},
        options={"channels": 8, "heads": 2, "groups": 4, "rng": 0},
        bad={"channels": _SIZES_BAD, "heads": INTS_3, "groups": (0, -1, 2.0, True, "2", 3)},
        returns_pair=False,
    ),
    Spec(
        "init_cross_attention",
        ar.init_cross_attention,
        {},
        options={"channels": 8, "context_dim": 6, "heads": 2, "groups": 4, "rng": 0},
        bad={"context_dim": _SIZES_BAD, "heads": INTS_3, "groups": (0, 2.0, True, 3)},
        returns_pair=False,
    ),
    Spec(
        "init_attention_layer",
        ar.init_attention_layer,
        {},
        options={"channels": 8, "heads": 2, "groups": 4, "rng": 0},
        bad={"heads": INTS_3, "head_dim": (0, 2.0, True, "2"), "groups": (0, 2.0, True, 3)},
        returns_pair=False,
    ),
    Spec(
        "init_spatial_transformer",
        ar.init_spatial_transformer,
        {},
        options={"channels": 8, "context_dim": 6, "heads": 2, "groups": 4, "rng": 0},
        bad={
            "heads": INTS_3,
            "groups": (0, 2.0, True, None, 3),
            "depth": _SIZES_BAD,
            "ff_mult": _SIZES_BAD,
            "head_dim": (0, 2.0, True),
        },
        returns_pair=False,
    ),
    Spec(
        "init_res_block",
        ar.blocks.init_res_block,
        {},
        options={"c_in": 4, "c_out": 6, "time_dim": 5, "rng": 0},
        bad={"c_in": _SIZES_BAD, "c_out": _SIZES_BAD, "time_dim": _SIZES_BAD, "dtype": ("int64", "complex128")},
        returns_pair=False,
    ),
]


# ---------------------------------------------------------------- the diffusion transformers' pieces



def _joint_rope(x: Array, context: Array, params: Any, *, cos: Any, sin: Any, **options: Any) -> Any:
    """Joint attention with RoPE, its tables passed as two arrays (so that the table changes each one)."""
    return ar.blocks.joint_attention_forward(x, context, params, rope=(cos, sin), **options)


def _joint_single(x: Array, params: Any, **options: Any) -> Any:
    """Joint attention with one stream (Flux's single-stream blocks): no context."""
    return ar.blocks.joint_attention_forward(x, None, params, **options)


def _positions(rng: np.random.Generator) -> Array:
    return rng.uniform(0, 5, (3, 2))  # 3 tokens at real positions on 2 axes


_ORDER_BAD = ("text", None, 1)
_JOINT = {"x": _randn(1, 4, 8), "context": _randn(1, 3, 6)}  # N = 4 image, M = 3 text tokens: L = 7
_JOINT_BAD = {"heads": INTS_3, "eps": EPS_BAD, "scale": SCALE_BAD, "order": _ORDER_BAD, "qk_norm": ("l2", 1, None)}
_PATCH_BAD = (0, -1, 2.0, True, None, "2", 3, (2,), (2, 0), (2, 2.0), (2, 2, 2))
_CHANNEL_ORDER_BAD = ("chw", None, 1)
_PAIRS_BAD = ("rotate_half", None, 1)

SPECS += [
    Spec(
        "rms_norm",
        rms_norm_forward,
        {"x": _randn(2, 3, 4), "weight": _randn(4)},
        ("x", "weight"),
        options={"eps": 1e-6},
        bad={"eps": EPS_BAD},
        backward=rms_norm_backward,
        large=("x",),
    ),
    Spec(
        "rope_angles",
        rope_angles,
        {"positions": _positions},
        ("positions",),
        options={"axes_dims": (4, 2), "theta": 10000.0, "pairs": "interleaved", "dtype": "float64"},
        bad={
            "axes_dims": ((3, 1), (4, -2), (4, 0), (), (4,), (4.0, 2), (True, 2), None, 4, "42"),
            "theta": (0, 0.0, -1.0, math.nan, math.inf, None, "1e4", True),
            "pairs": _PAIRS_BAD,
            "dtype": ("bfloat16", "int64", None, "float"),
        },
        returns_pair=False,
        extra_dtypes={"positions": ("int64", "int32")},
        dtype_option="dtype",
    ),
    Spec(
        "rope",
        rope_forward,
        {"x": _randn(1, 2, 3, 4), "cos": _randn(3, 4), "sin": _randn(3, 4)},
        ("x", "cos", "sin"),
        options={"pairs": "interleaved", "compute_dtype": None},
        bad={"pairs": _PAIRS_BAD, "compute_dtype": ("bfloat16", "int32", "float", 1)},
        backward=rope_backward,
        mixed_ok=("x", "cos", "sin"),
    ),
    Spec(
        "rope_halves",
        rope_forward,
        {"x": _randn(2, 3, 6), "cos": _randn(2, 3, 6), "sin": _randn(2, 3, 6)},
        ("x", "cos", "sin"),
        options={"pairs": "halves", "compute_dtype": "float64"},
        backward=rope_backward,
        mixed_ok=("x", "cos", "sin"),
    ),
    Spec(
        "patchify",
        patchify_forward,
        {"x": _randn(1, 4, 6, 2)},
        ("x",),
        options={"patch": 2, "channel_order": "pqc"},
        bad={"patch": _PATCH_BAD, "channel_order": _CHANNEL_ORDER_BAD},
        backward=patchify_backward,
    ),
    Spec(
        "unpatchify",
        unpatchify_forward,
        {"tokens": _randn(1, 6, 8)},
        ("tokens",),
        options={"grid": (2, 3), "patch": 2, "channel_order": "cpq"},
        bad={
            "grid": ((2, 2), (0, 6), (2.0, 3), (True, 3), None, 6, (2, 3, 1), "23"),
            "patch": _PATCH_BAD,
            "channel_order": _CHANNEL_ORDER_BAD,
        },
        backward=unpatchify_backward,
    ),
    Spec(
        "joint_attention",
        ar.blocks.joint_attention_forward,
        dict(_JOINT),
        ("x", "context"),
        masks={"mask": _bools(7, 7)},
        options={"heads": 2, "order": "image_first", "qk_norm": "rms_norm", "eps": 1e-6, "scale": None},
        bad=_JOINT_BAD,
        params=lambda: _jittered(ar.blocks.init_joint_attention(8, 6, heads=2, qk_norm="rms_norm", rng=0)),
        backward=ar.blocks.joint_attention_backward,
        required_param="q.weight",
        refuses_inf=("x", "context"),
    ),
    Spec(
        "joint_attention_rope",
        _joint_rope,
        {**_JOINT, "cos": _randn(7, 4), "sin": _randn(7, 4)},
        ("x", "context"),
        options={
            "heads": 2,
            "order": "text_first",
            "qk_norm": "rms_norm",
            "rope_pairs": "interleaved",
            "rope_dtype": None,
        },
        bad={**_JOINT_BAD, "rope_pairs": _PAIRS_BAD, "rope_dtype": ("bfloat16", "float", 1)},
        params=lambda: _jittered(ar.blocks.init_joint_attention(8, 6, heads=2, qk_norm="rms_norm", rng=1)),
        backward=ar.blocks.joint_attention_backward,
        required_param="add_q.weight",
        refuses_inf=("x", "context"),
        mixed_ok=("cos", "sin"),
    ),
    Spec(
        "joint_attention_single",
        _joint_single,
        {"x": _randn(2, 5, 8)},
        ("x",),
        options={"heads": 2, "qk_norm": "layer_norm", "eps": 1e-6},
        bad=_JOINT_BAD,
        params=lambda: _jittered(
            ar.blocks.init_joint_attention(8, heads=2, qk_norm="layer_norm", pre_only=True, rng=2)
        ),
        backward=ar.blocks.joint_attention_backward,
        required_param="q.weight",
        refuses_inf=("x",),
    ),
    Spec(
        "init_joint_attention",
        ar.blocks.init_joint_attention,
        {},
        options={"dim": 8, "context_dim": 6, "heads": 2, "qk_norm": "rms_norm", "rng": 0},
        bad={
            "dim": _SIZES_BAD,
            "context_dim": (0, -1, 2.0, True, "2"),
            "heads": INTS_3,
            "head_dim": (0, -1, 2.0, True, "2"),
            "qk_norm": ("l2", 1),
            "out_dim": (0, -1, 2.0, True),
            "context_out_dim": (0, -1, 2.0, True),
            "dtype": ("int64", "complex128"),
        },
        returns_pair=False,
    ),
    Spec(
        "flux_rope_tables",
        flux_rope_tables,
        {"txt_ids": lambda rng: np.zeros((2, 3)), "img_ids": lambda rng: rng.integers(0, 4, (4, 3)).astype(float)},
        ("txt_ids", "img_ids"),
        options={"axes_dims_rope": (2, 2, 4), "theta": 10000.0, "dtype": "float64"},
        bad={
            "axes_dims_rope": ((2, 2), (2, 2, 3), (2, -2, 4), None, 8, (2.0, 2, 4)),
            "theta": (0, -1.0, math.nan, math.inf, None, "1e4", True),
            "dtype": ("bfloat16", "int64", None),
        },
        returns_pair=False,
        # integer ids, and bfloat16 ones (a bfloat16 Flux pipeline's): exact in float32, as FluxPosEmbed reads them
        extra_dtypes=dict.fromkeys(("txt_ids", "img_ids"), ("int64", "int32", "bfloat16")),
        mixed_ok=("txt_ids", "img_ids"),
        dtype_option="dtype",
    ),
]

DIT_SPECS = [
    "rms_norm",
    "rope_angles",
    "rope",
    "rope_halves",
    "patchify",
    "unpatchify",
    "joint_attention",
    "joint_attention_rope",
    "joint_attention_single",
    "init_joint_attention",
    "flux_rope_tables",
]

#: rows another module adds (a new op's own Spec); :func:`all_specs` appends them
EXTRA_SPECS: list[Spec] = []


def all_specs() -> list[Spec]:
    return SPECS + EXTRA_SPECS


# ---------------------------------------------------------------- one call, changed in one way


@dataclass
class Case:
    """One call: the spec, what was changed, the inputs, and whether it must be refused."""

    spec: Spec
    what: str  # e.g. "x dtype int64"
    arg: str  # the argument that was changed (the error should name it)
    arrays: dict[str, Any]
    masks: dict[str, Any]
    options: dict[str, Any]
    params: Any
    must_fail: bool
    dout: Callable[[Array], Any] | None = None  # from the forward's output, the dout to pass (None: random)
    cache: Callable[[Any], Any] | None = None  # from the forward's cache, the cache to pass


def base_case(spec: Spec, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    arrays = {n: make(rng) for n, make in spec.arrays.items()}
    masks = {n: make(rng) for n, make in spec.masks.items()}
    params = spec.params() if spec.params else None
    return Case(spec, "valid", "", arrays, masks, dict(spec.options), params, must_fail=False)


def _cast(a: Any, dtype: Any) -> Any:
    return a.astype(dtype) if isinstance(a, np.ndarray) else a


def _with_float_dtype(case: Case, dtype: Any) -> Case:
    """Every floating array (and parameter) in ``dtype``."""
    arrays = {n: _cast(a, dtype) for n, a in case.arrays.items()}
    params = None if case.params is None else {k: _cast(v, dtype) for k, v in case.params.items()}
    return replace(case, arrays=arrays, params=params)


def _bfloat16() -> Any:
    try:
        import ml_dtypes

        return ml_dtypes.bfloat16
    except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
        return None


def _poke(a: Array, value: float) -> Array:
    a = a.copy()
    a.reshape(-1)[0] = value
    return a


def cases(spec: Spec, seed: int = 0) -> Iterator[Case]:
    """Every one-change variation of ``spec``'s valid call (and the valid call itself)."""
    base = base_case(spec, seed)
    yield base
    yield replace(_with_float_dtype(base, np.float32), what="all float32")
    yield replace(_with_float_dtype(base, np.float16), what="all float16")
    if spec.large:
        big = _with_float_dtype(base, np.float16)
        big.arrays = {n: (a * 300).astype(np.float16) if n in spec.large else a for n, a in big.arrays.items()}
        # 300 in every entry (issue 23: q = k = 300, d = 4 overflows float16's logits)
        big.arrays = {
            n: np.full_like(a, 300) if n in spec.large and n in ("q", "k") else a for n, a in big.arrays.items()
        }
        yield replace(big, what="float16, large values", arg=spec.large[0])
    bf16 = _bfloat16()
    for name, a in base.arrays.items():
        bad_dtypes = [np.int64, np.int32, np.bool_, np.complex128] + ([bf16] if bf16 is not None else [])
        for dt in bad_dtypes:
            arrays = {**base.arrays, name: a.astype(dt) if dt is not np.bool_ else a > 0}
            accepted = np.dtype(dt).name in spec.extra_dtypes.get(name, ())
            yield replace(
                base,
                what=f"{name} dtype {np.dtype(dt).name}",
                arg=name,
                arrays=arrays,
                must_fail=not (spec.any_dtype or accepted),
            )
        if len(base.arrays) > 1 or base.params is not None:
            yield replace(
                base,
                what=f"{name} alone float32",
                arg=name,
                arrays={**base.arrays, name: a.astype(np.float32)},
                must_fail=name not in spec.mixed_ok,
            )
        # shapes: an empty axis, one too long, an extra axis, a 0-d array
        for axis in range(a.ndim):
            shape = list(a.shape)
            shape[axis] = 0
            yield replace(
                base,
                what=f"{name} axis {axis} empty",
                arg=name,
                arrays={**base.arrays, name: np.zeros(shape)},
                must_fail=_empty_mismatch(spec, name, axis),
            )
            shape[axis] = a.shape[axis] + 1
            grown = np.random.default_rng(seed).standard_normal(shape)
            yield replace(
                base,
                what=f"{name} axis {axis} grown",
                arg=name,
                arrays={**base.arrays, name: grown},
                must_fail=not _free(FREE_GROW, spec, name, axis),
            )
        yield replace(
            base,
            what=f"{name} 0-d",
            arg=name,
            arrays={**base.arrays, name: np.array(1.5)},
            must_fail=not _free(FREE_0D, spec, name, 0),
        )
        yield replace(
            base,
            what=f"{name} extra axis",
            arg=name,
            arrays={**base.arrays, name: a[None]},
            must_fail=not _free(FREE_EXTRA, spec, name, 0),
        )
        # values
        yield replace(base, what=f"{name} NaN", arg=name, arrays={**base.arrays, name: _poke(a, math.nan)})
        for value in (math.inf, -math.inf):
            yield replace(
                base,
                what=f"{name} {value}",
                arg=name,
                arrays={**base.arrays, name: _poke(a, value)},
                must_fail=name in spec.refuses_inf,
            )
        # not arrays
        required = name not in ("b", "weight", "bias") or (spec.name == "conv2d" and name == "weight")
        for label, value in (("None", None), ("list", a.tolist()), ("float", 1.5), ("str", "x")):
            if label == "None" and not required:
                continue
            yield replace(base, what=f"{name} {label}", arg=name, arrays={**base.arrays, name: value}, must_fail=True)
    for name, m in base.masks.items():
        yield replace(
            base, what=f"{name} float", arg=name, masks={**base.masks, name: m.astype(np.float64)}, must_fail=True
        )
        yield replace(
            base, what=f"{name} int", arg=name, masks={**base.masks, name: m.astype(np.int64)}, must_fail=True
        )
        yield replace(
            base,
            what=f"{name} grown",
            arg=name,
            masks={**base.masks, name: np.ones((*m.shape[:-1], m.shape[-1] + 1), bool)},
            must_fail=True,
        )
        yield replace(base, what=f"{name} all False", arg=name, masks={**base.masks, name: np.zeros_like(m)})
    for name, values in spec.bad.items():
        for value in values:
            yield replace(
                base, what=f"{name}={value!r}", arg=name, options={**base.options, name: value}, must_fail=True
            )
    if spec.params is not None:
        p = base.params
        first = sorted(p)[0]
        required = spec.required_param
        yield replace(base, what="params None", arg="params", params=None, must_fail=True)
        yield replace(base, what="params list", arg="params", params=list(p.values()), must_fail=True)
        yield replace(
            base,
            what=f"params {first} float32",
            arg=first,
            params={**p, first: p[first].astype(np.float32)},
            must_fail=True,
        )
        yield replace(
            base, what=f"params {first} int", arg=first, params={**p, first: p[first].astype(np.int64)}, must_fail=True
        )
        yield replace(base, what=f"params {first} None", arg=first, params={**p, first: None}, must_fail=True)
        infinite = {**p, first: _poke(p[first], math.inf)}
        yield replace(base, what=f"params {first} inf", arg=first, params=infinite, must_fail=bool(spec.refuses_inf))
        yield replace(base, what=f"params {first} NaN", arg=first, params={**p, first: _poke(p[first], math.nan)})
        yield replace(
            base,
            what=f"params missing {required}",
            arg=required,
            params={k: v for k, v in p.items() if k != required},
            must_fail=True,
        )
    if spec.backward is not None:
        for dt in (np.int64, np.bool_, np.float32, np.complex128):
            yield replace(
                base,
                what=f"dout {np.dtype(dt).name}",
                arg="dout",
                dout=lambda o, dt=dt: (
                    (o > 0) if dt is np.bool_ else (o * 3).astype(dt) if dt is np.int64 else o.astype(dt)
                ),
                must_fail=True,
            )
        yield replace(
            base,
            what="dout grown",
            arg="dout",
            dout=lambda o: np.ones((*o.shape[:-1], o.shape[-1] + 1)),
            must_fail=True,
        )
        yield replace(base, what="dout 0-d", arg="dout", dout=lambda o: np.array(1.0), must_fail=True)
        yield replace(base, what="dout None", arg="dout", dout=lambda o: None, must_fail=True)
        yield replace(base, what="dout list", arg="dout", dout=lambda o: o.tolist(), must_fail=True)
        yield replace(base, what="dout NaN", arg="dout", dout=lambda o: _poke(np.ones_like(o), math.nan))
        yield replace(base, what="cache None", arg="cache", cache=lambda c: None, must_fail=True)
        yield replace(base, what="cache str", arg="cache", cache=lambda c: "cache", must_fail=True)
        yield replace(
            base,
            what="cache of softmax",
            arg="cache",
            cache=lambda c: ar.softmax_forward(np.ones((2, 2)))[1],
            must_fail=spec.name != "softmax",
        )


def _empty_mismatch(spec: Spec, name: str, axis: int) -> bool:
    """Whether emptying ``axis`` of ``name`` alone makes attention's inputs disagree (so it must be refused).

    Elsewhere an empty axis is a value case: the result, or a clear error.
    """
    if spec.name in ("attention", "chunked_attention", "linear_attention"):
        # q's N, v's dv may be 0 on their own; batch, d and M must agree between the arrays
        return (name, axis) in {
            ("q", 0),
            ("q", 2),
            ("k", 0),
            ("k", 1),
            ("k", 2),
            ("v", 0),
            ("v", 1),
            ("bias", 0),
            ("bias", 1),
        }
    return False


ALL = "all"
#: (array, axis) whose growth by one leaves a valid call (everything else must be refused)
FREE_GROW: dict[str, Any] = {
    **dict.fromkeys(("erf", "erfc", "gelu", "silu", "merge_heads", "merge_heads_plain"), ALL),
    **dict.fromkeys(("upsample_nearest", "timestep_embedding"), ALL),
    "linear": {("x", 0), ("x", 1)},
    "group_norm": {("x", 0), ("x", 1), ("x", 2)},
    "layer_norm": {("x", 0), ("x", 1)},
    "split_heads": {("x", 0), ("x", 1)},
    "split_heads_plain": {("x", 0), ("x", 1)},
    "conv2d": {("x", 0), ("x", 1), ("x", 2), ("weight", 0), ("weight", 1)},
    "geglu": {("x", 0)},
    "avg_pool": {("x", 0), ("x", 3)},
    "attention": {("v", 2)},
    "chunked_attention": {("v", 2)},
    "linear_attention": {("q", 1), ("v", 2)},
    "window_attention": {("v", 3)},
    "neighborhood_attention": {("v", 3)},
    "attention_layer": {("h", 0), ("h", 1)},
    "self_attention": {("x", 0), ("x", 1), ("x", 2)},
    "cross_attention": {("x", 1), ("x", 2), ("context", 1)},
    "geglu_ff": {("x", 0), ("x", 1)},
    "transformer_block": {("h", 1), ("context", 1)},
    "spatial_transformer": {("x", 1), ("x", 2), ("context", 1)},
    "res_block": {("x", 1), ("x", 2)},
    "rms_norm": {("x", 0), ("x", 1)},
    "rope_angles": {("positions", 0)},
    "rope": {("x", 0), ("x", 1)},
    "patchify": {("x", 0), ("x", 3)},
    "unpatchify": {("tokens", 0)},
    "joint_attention_single": {("x", 0), ("x", 1)},
    "flux_rope_tables": {("txt_ids", 0), ("img_ids", 0)},
}
#: arrays that may take one more leading axis
FREE_EXTRA: dict[str, Any] = {
    **dict.fromkeys(("softmax", "logsumexp", "erf", "erfc", "gelu", "silu", "geglu"), ALL),
    **dict.fromkeys(("merge_heads", "merge_heads_plain", "split_heads", "split_heads_plain"), ALL),
    **dict.fromkeys(("linear", "layer_norm", "group_norm", "geglu_ff"), frozenset({("x", 0)})),
    **dict.fromkeys(("attention", "chunked_attention"), frozenset({("bias", 0)})),
    **dict.fromkeys(("rms_norm", "rope", "rope_halves"), frozenset({("x", 0)})),
}
#: arrays that may be 0-d
FREE_0D: dict[str, Any] = {
    **dict.fromkeys(("erf", "erfc", "gelu", "silu"), ALL),
    **dict.fromkeys(("attention", "chunked_attention"), frozenset({("bias", 0)})),
}


def _free(table: Mapping[str, Any], spec: Spec, name: str, axis: int) -> bool:
    entry = table.get(spec.name, set())
    return entry == ALL or (name, axis) in entry


# ---------------------------------------------------------------- running a case and judging the result


@dataclass
class Verdict:
    kind: str  # "correct" | "clear error" | "vague error" | "silent wrong" | "internal error"
    detail: str


def _call(case: Case, arrays: dict[str, Any], params: Any) -> Any:
    spec = case.spec
    args = [arrays[n] for n in spec.positional if n in arrays]
    kwargs = {n: a for n, a in arrays.items() if n not in spec.positional}
    kwargs.update(case.masks)
    kwargs.update(case.options)
    if spec.params is not None:
        # positional parameters come before params for the blocks
        args.append(params)
    return spec.forward(*args, **kwargs)


def call(case: Case) -> Any:
    """Run the forward of ``case`` on its own inputs: ``(out, cache)``, or the output alone."""
    return _call(case, case.arrays, case.params)


def _float64(case: Case) -> tuple[dict[str, Any], Any]:
    """The case's inputs with every numeric array in float64 (what the result is compared with)."""

    def f64(a: Any) -> Any:
        if isinstance(a, np.ndarray) and (a.dtype.kind in "fiub" or a.dtype.name == "bfloat16"):
            return a.astype(np.float64)
        return a

    arrays = {n: f64(a) for n, a in case.arrays.items()}
    params = None if case.params is None else {k: f64(v) for k, v in case.params.items()}
    return arrays, params


def _deliberate(err: BaseException) -> bool:
    """Raised by a ``raise`` statement in attention_ref's own code (not by NumPy, not by a failed operation).

    Read from the bytecode of the innermost frame (the instruction that raised is ``RAISE_VARARGS``), so that
    it does not depend on the source file matching the running code.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not Path(code.co_filename).resolve().is_relative_to(PACKAGE.resolve()):
        return False
    raising = next((i for i in dis.get_instructions(code) if i.offset == tb.tb_lasti), None)
    return raising is not None and raising.opname == "RAISE_VARARGS"


def classify_error(err: BaseException, arg: str) -> Verdict:
    text = f"{type(err).__name__}: {err}"
    if not isinstance(err, DOCUMENTED) or not _deliberate(err):
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Verdict("internal error", f"{text} (at {Path(where.filename).name}:{where.lineno})")
    names = {"dout": ("dout", "dy", "dh_out"), "cache": ("cache", "Cache")}.get(arg, (arg, arg.split(".")[0]))
    if arg and not any(n in str(err) for n in names):
        return Verdict("vague error", text)
    return Verdict("clear error", text)


def _tolerance(dtype: Any) -> float:
    return {"float16": 3e-2, "float32": 2e-4}.get(np.dtype(dtype).name, 1e-9)


def _compare(got: Any, want: Any, dtype: Any, finite_inputs: bool, magnitude: float = 1.0) -> str | None:
    """None when ``got`` equals ``want`` (float64) to the dtype's tolerance, else what differs."""
    if isinstance(want, tuple):  # several outputs: each (None where the forward gives none)
        if not isinstance(got, tuple) or len(got) != len(want):
            return f"returned a {type(got).__name__}, not {len(want)} outputs"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if (g is None) != (w is None):
                return f"output {i}: {g!r:.40} where float64 gives {w!r:.40}"
            problem = None if w is None else _compare(g, w, dtype, finite_inputs, magnitude)
            if problem:
                return f"output {i}: {problem}"
        return None
    if isinstance(want, dict):  # a parameter dict: every entry
        if not isinstance(got, dict) or set(got) != set(want):
            return "a different set of keys"
        problems = [_compare(got[k], want[k], None, finite_inputs) for k in sorted(want)]
        return next((p for p in problems if p), None)
    if isinstance(got, np.generic):  # NumPy's 0-d results come back as scalars
        got = np.asarray(got)
    if not isinstance(got, np.ndarray):
        return f"returned a {type(got).__name__}, not an array"
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if dtype is None:  # a function that only moves entries: any dtype, the same entries
        return (
            None if np.array_equal(got, want.astype(got.dtype), equal_nan=got.dtype.kind in "fc") else "moved wrongly"
        )
    if got.dtype.kind != "f" or (dtype is not None and got.dtype != dtype):
        return f"dtype {got.dtype}, expected {np.dtype(dtype) if dtype is not None else 'floating'}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    bad_nan = np.isnan(g) != np.isnan(w)
    if bad_nan.any():
        return (
            f"NaN where the float64 result has {w[bad_nan][:3]}"
            if np.isnan(g[bad_nan]).any()
            else "a number where float64 gives NaN"
        )
    limit = float(np.finfo(got.dtype).max)
    both = ~np.isnan(w)
    overflow = np.isinf(g) & (np.abs(w) >= limit)  # a value beyond the dtype's range is inf there: fine
    ok_inf = np.isinf(w) & (g == w)
    check = both & ~overflow & ~ok_inf
    if np.isinf(g[check]).any():
        return "inf where the float64 result is finite"
    scale = max(magnitude, float(np.max(np.abs(w[check]), initial=0.0)))
    err = float(np.max(np.abs(g[check] - w[check]), initial=0.0))
    if err > _tolerance(got.dtype) * scale:
        return f"off by {err:.3g} (scale {scale:.3g})"
    if finite_inputs and not np.all(np.isfinite(g)) and not overflow.any():
        return "non-finite output from finite inputs"
    return None


def _finite(case: Case) -> bool:
    def ok(a: Any) -> bool:
        return not isinstance(a, np.ndarray) or a.dtype.kind not in "fc" or bool(np.all(np.isfinite(a)))

    return all(ok(a) for a in case.arrays.values()) and (
        case.params is None or not isinstance(case.params, dict) or all(ok(v) for v in case.params.values())
    )


def run_case(case: Case) -> Verdict:
    """Run ``case`` (forward, then backward) and judge it; warnings turned into errors count as errors."""
    spec = case.spec
    with warnings.catch_warnings():
        # finite inputs must not warn; NaN and inf may (as NumPy's own arithmetic does), unless refused
        warnings.simplefilter("error" if _finite(case) else "ignore")
        try:
            result = _call(case, case.arrays, case.params)
        except Exception as err:
            return classify_error(err, case.arg)
        out, cache = result if spec.returns_pair else (result, None)
        grads = None
        if spec.backward is not None:
            dout = _douts(case, out)
            try:
                grads = spec.backward(dout, case.cache(cache) if case.cache else cache)
            except Exception as err:
                if case.dout is None and case.cache is None:
                    return classify_error(err, case.arg)
                return classify_error(err, "dout" if case.dout else "cache")
    if case.must_fail:
        return Verdict("silent wrong", f"returned instead of refusing ({case.what})")
    # the same call in float64
    arrays64, params64 = _float64(case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _call(case, arrays64, params64)
            ref_out, ref_cache = ref if spec.returns_pair else (ref, None)
            ref_grads = None
            if grads is not None:
                d = each(lambda a: np.asarray(a, dtype=np.float64), _douts(case, out))
                ref_grads = spec.backward(d, ref_cache)
    except Exception as err:
        return Verdict("silent wrong", f"returned, but the float64 call fails: {type(err).__name__}: {err}")
    dtype = _result_dtype(case)
    finite = _finite(case) and (case.dout is None or "NaN" not in case.what)
    problem = _compare(out, each(np.asarray, ref_out), dtype, finite)
    if problem is None and grads is not None:
        for name in sorted(ref_grads):
            if name not in grads:
                problem = f"gradient {name!r} missing"
                break
            problem = _compare(grads[name], np.asarray(ref_grads[name]), _grad_dtype(case), finite, _magnitude(case))
            if problem:
                problem = f"gradient {name}: {problem}"
                break
    if problem:
        return Verdict("silent wrong", problem)
    return Verdict("correct", "")


def each(f: Callable[[Any], Any], out: Any) -> Any:
    """``f`` of each output of a forward that returns a tuple (``None`` kept), or of its one output."""
    if isinstance(out, tuple):
        return tuple(None if o is None else f(o) for o in out)
    if isinstance(out, dict):
        return out
    return f(out)


def _douts(case: Case, out: Any) -> Any:
    """The dout(s) to pass: the case's change of each output, or a seeded random array of its shape and dtype."""
    rng = np.random.default_rng(1)
    if case.dout:
        return each(lambda o: case.dout(np.asarray(o)), out)
    return each(lambda o: rng.standard_normal(np.shape(o)).astype(np.asarray(o).dtype), out)


def _magnitude(case: Case) -> float:
    """The largest finite input entry (at least 1): gradients are products with the inputs, rounded at that scale."""
    big = [
        float(np.max(np.abs(a[np.isfinite(a)]), initial=1.0))
        for a in case.arrays.values()
        if isinstance(a, np.ndarray) and a.dtype.kind == "f"
    ]
    return max([1.0, *big])


def _result_dtype(case: Case) -> Any:
    if case.spec.dtype_option is not None:
        return np.dtype(case.options[case.spec.dtype_option])
    return _grad_dtype(case)


def _grad_dtype(case: Case) -> Any:
    """The dtype of the gradients: that of the first floating array (the forward's input)."""
    floats = [a.dtype for a in case.arrays.values() if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    if case.spec.any_dtype:
        return None
    return floats[0] if floats else None
