"""The public functions under bad input: a table of calls, the inputs that go wrong, and a verdict on each result.

Used by ``tests/test_properties.py`` (hypothesis draws from it) and ``scripts/probe_bad_input.py``
(which runs every case and counts the verdicts). A row of :data:`SPECS` is one public forward
(and its backward): its valid inputs, small and seeded, and the options it takes. :func:`cases` turns a
row into calls that change one thing — an array's dtype, shape or values, an option, the backward's
``dout`` or cache — each marked with what it must give: an error (a documented ``ValueError``,
``TypeError`` or ``MemoryError``, raised by attention_ref's own code), or a value, which
:func:`run_case` compares with the same call in float64.

The rows are here (the diffusion transformers' in ``bad_input_dit.py``); what a row is, in ``bad_input_spec.py``;
the calls made from a row, in ``bad_input_cases.py``; running and judging them, in ``bad_input_judge.py``. This
module gives all of it to its users. To cover a new function, add a :class:`Spec` row to :data:`SPECS` (or to
``EXTRA_SPECS`` from another module): nothing else changes.
"""

from __future__ import annotations

import math

import numpy as np
from bad_input_cases import Case, base_case, cases
from bad_input_dit import DIT_ROWS, DIT_SPECS
from bad_input_judge import DOCUMENTED, Verdict, call, classify_error, each, run_case
from bad_input_spec import AXIS_BAD, EPS_BAD, INTS_3, SCALE_BAD, SIZES_BAD, Spec, bools, jittered, randn

import attention_ref as ar

__all__ = [
    "DIT_SPECS",
    "DOCUMENTED",
    "EXTRA_SPECS",
    "SPECS",
    "Case",
    "Spec",
    "Verdict",
    "all_specs",
    "base_case",
    "call",
    "cases",
    "classify_error",
    "each",
    "run_case",
]

_ATTN = {"q": randn(2, 3, 4), "k": randn(2, 5, 4), "v": randn(2, 5, 3)}
_MAP_QKV = {"q": randn(1, 4, 4, 2), "k": randn(1, 4, 4, 2), "v": randn(1, 4, 4, 3)}
_POS = ("q", "k", "v")

SPECS: list[Spec] = [
    Spec(
        "softmax",
        ar.softmax_forward,
        {"x": randn(3, 4)},
        ("x",),
        masks={"mask": bools(3, 4)},
        options={"axis": -1},
        bad={"axis": AXIS_BAD},
        backward=ar.softmax_backward,
        large=("x",),
    ),
    Spec(
        "logsumexp",
        ar.ops.logsumexp,
        {"x": randn(3, 4)},
        ("x",),
        masks={"mask": bools(3, 4)},
        options={"axis": -1, "keepdims": False},
        bad={"axis": AXIS_BAD},
        returns_pair=False,
        large=("x",),
    ),
    Spec(
        "linear",
        ar.ops.linear_forward,
        {"x": randn(2, 3, 4), "W": randn(4, 5), "b": randn(5)},
        ("x", "W", "b"),
        backward=ar.ops.linear_backward,
    ),
    Spec(
        "group_norm",
        ar.ops.group_norm_forward,
        {"x": randn(2, 3, 3, 4), "weight": randn(4), "bias": randn(4)},
        ("x", "weight", "bias"),
        options={"groups": 2, "eps": 1e-5},
        bad={"groups": INTS_3, "eps": EPS_BAD},
        backward=ar.ops.group_norm_backward,
        large=("x",),
    ),
    Spec(
        "layer_norm",
        ar.ops.layer_norm_forward,
        {"x": randn(2, 3, 4), "weight": randn(4), "bias": randn(4)},
        ("x", "weight", "bias"),
        options={"eps": 1e-5},
        bad={"eps": EPS_BAD},
        backward=ar.ops.layer_norm_backward,
        large=("x",),
    ),
    Spec(
        "split_heads",
        ar.ops.split_heads_forward,
        {"x": randn(2, 3, 4)},
        ("x",),
        options={"heads": 2},
        bad={"heads": INTS_3},
        backward=ar.ops.split_heads_backward,
    ),
    Spec(
        "merge_heads",
        ar.ops.merge_heads_forward,
        {"x": randn(2, 2, 3, 2)},
        ("x",),
        backward=ar.ops.merge_heads_backward,
    ),
    Spec(
        "split_heads_plain",
        ar.split_heads,
        {"x": randn(2, 3, 4)},
        ("x",),
        options={"heads": 2},
        bad={"heads": INTS_3},
        returns_pair=False,
        any_dtype=True,
    ),
    Spec("merge_heads_plain", ar.merge_heads, {"x": randn(2, 2, 3, 2)}, ("x",), returns_pair=False, any_dtype=True),
    Spec(
        "conv2d",
        ar.ops.conv2d_forward,
        {"x": randn(1, 4, 4, 2), "weight": randn(3, 3, 2, 3), "bias": randn(3)},
        ("x", "weight", "bias"),
        options={"padding": 1},
        bad={"padding": (-1, 3, 1.0, True, None, (1,), "valid")},
        backward=ar.ops.conv2d_backward,
    ),
    Spec("erf", ar.ops.erf, {"x": randn(5)}, ("x",), returns_pair=False),
    Spec("erfc", ar.ops.erfc, {"x": randn(5)}, ("x",), returns_pair=False),
    Spec("gelu", ar.ops.gelu_forward, {"x": randn(2, 3)}, ("x",), backward=ar.ops.gelu_backward),
    Spec("geglu", ar.ops.geglu_forward, {"x": randn(2, 4)}, ("x",), backward=ar.ops.geglu_backward),
    Spec("silu", ar.ops.silu_forward, {"x": randn(2, 3)}, ("x",), backward=ar.ops.silu_backward),
    Spec(
        "upsample_nearest",
        ar.ops.upsample_nearest_forward,
        {"x": randn(1, 2, 2, 3)},
        ("x",),
        options={"factor": 2},
        bad={"factor": (0, -1, 2.0, True, None, "2")},
        backward=ar.ops.upsample_nearest_backward,
    ),
    Spec(
        "avg_pool",
        ar.ops.avg_pool_forward,
        {"x": randn(1, 4, 4, 3)},
        ("x",),
        options={"factor": 2},
        bad={"factor": (0, -1, 2.0, True, None, "2", 3)},
        backward=ar.ops.avg_pool_backward,
    ),
    Spec(
        "timestep_embedding",
        ar.ops.timestep_embedding_forward,
        {"t": lambda rng: rng.uniform(0, 1000, (3,))},
        ("t",),
        options={"dim": 8, "max_period": 10000.0},
        bad={"dim": (0, -2, 3, 8.0, True, None), "max_period": (0.0, -1.0, math.nan, math.inf, None, "1e4")},
        backward=ar.ops.timestep_embedding_backward,
    ),
    Spec(
        "attention",
        ar.attention_forward,
        {**_ATTN, "bias": randn(3, 5)},
        _POS,
        masks={"mask": bools(3, 5)},
        options={"scale": None},
        bad={"scale": SCALE_BAD},
        backward=ar.attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "chunked_attention",
        ar.chunked_attention_forward,
        {**_ATTN, "bias": randn(3, 5)},
        _POS,
        masks={"mask": bools(3, 5)},
        options={"scale": None, "block_size": 2},
        bad={"scale": SCALE_BAD, "block_size": (0, -1, 2.0, True, "2", (2,), (2, 0))},
        backward=ar.chunked_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "linear_attention",
        ar.attention.linear_attention_forward,
        dict(_ATTN),
        _POS,
        masks={"key_mask": bools(2, 5)},
        options={"eps": 1e-6, "kind": "elu"},
        bad={"eps": (-1.0, math.nan, math.inf, None, "0", True), "kind": ("softmax", None, 1)},
        backward=ar.attention.linear_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "window_attention",
        ar.attention.window_attention_forward,
        dict(_MAP_QKV),
        _POS,
        options={"window": 2, "shift": 1, "scale": None},
        bad={"window": (0, -1, 3, 2.0, True, None, "2"), "shift": (-1, 2, 1.0, True, None), "scale": SCALE_BAD},
        backward=ar.attention.window_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "neighborhood_attention",
        ar.attention.neighborhood_attention_forward,
        dict(_MAP_QKV),
        _POS,
        options={"kernel": 3, "scale": None},
        bad={"kernel": (0, -1, 2, 5, 3.0, True, None, "3"), "scale": SCALE_BAD},
        backward=ar.attention.neighborhood_attention_backward,
        refuses_inf=_POS,
        large=("q", "k"),
    ),
    Spec(
        "attention_layer",
        ar.attention_layer_forward,
        {"h": randn(2, 4, 8)},
        ("h",),
        options={"heads": 2, "groups": 4, "eps": 1e-5, "rescale": 1.5, "scale": None},
        bad={
            "heads": INTS_3,
            "groups": INTS_3,
            "eps": EPS_BAD,
            "rescale": (0, -0.0, math.nan, math.inf, None, "1", True),
            "scale": SCALE_BAD,
        },
        params=lambda: jittered(ar.init_attention_layer(8, heads=2, groups=4, bias=True, rng=0)),
        backward=ar.attention_layer_backward,
        refuses_inf=("h",),
    ),
    Spec(
        "self_attention",
        ar.self_attention_forward,
        {"x": randn(1, 2, 2, 8)},
        ("x",),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "rescale": 1.0, "scale": None},
        bad={
            "heads": INTS_3,
            "groups": INTS_3,
            "eps": EPS_BAD,
            "rescale": (0, math.nan, math.inf, None, True),
            "scale": SCALE_BAD,
        },
        params=lambda: jittered(ar.init_self_attention(8, heads=2, groups=4, rng=0)),
        backward=ar.self_attention_backward,
        refuses_inf=("x",),
    ),
    Spec(
        "cross_attention",
        ar.cross_attention_forward,
        {"x": randn(1, 2, 2, 8), "context": randn(1, 3, 6)},
        ("x", "context"),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "rescale": 1.0, "scale": None},
        bad={"heads": INTS_3, "groups": INTS_3, "eps": EPS_BAD, "rescale": (0, math.nan, None, True)},
        params=lambda: jittered(ar.init_cross_attention(8, 6, heads=2, groups=4, rng=0)),
        backward=ar.cross_attention_backward,
        refuses_inf=("x", "context"),
    ),
    Spec(
        "geglu_ff",
        ar.blocks.geglu_ff_forward,
        {"x": randn(2, 3, 4)},
        ("x",),
        params=lambda: {
            k: v
            for k, v in jittered(
                {
                    "proj.weight": np.zeros((4, 12)),
                    "proj.bias": np.zeros(12),
                    "out.weight": np.zeros((6, 4)),
                    "out.bias": np.zeros(4),
                }
            ).items()
        },
        backward=ar.blocks.geglu_ff_backward,
        refuses_inf=("x",),
    ),
    Spec(
        "transformer_block",
        ar.transformer_block_forward,
        {"h": randn(1, 4, 8), "context": randn(1, 3, 6)},
        ("h", "context"),
        options={"heads": 2, "norm_eps": 1e-5, "scale": None},
        bad={"heads": INTS_3, "norm_eps": EPS_BAD, "scale": SCALE_BAD},
        params=lambda: {
            k[len("blocks.0.") :]: v
            for k, v in jittered(ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)).items()
            if k.startswith("blocks.0.")
        },
        backward=ar.transformer_block_backward,
        required_param="attn1.out.weight",
        refuses_inf=("h", "context"),
    ),
    Spec(
        "spatial_transformer",
        ar.spatial_transformer_forward,
        {"x": randn(1, 2, 2, 8), "context": randn(1, 3, 6)},
        ("x", "context"),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "norm_eps": 1e-5},
        bad={"heads": INTS_3, "groups": INTS_3, "eps": EPS_BAD, "norm_eps": EPS_BAD},
        params=lambda: jittered(ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)),
        backward=ar.spatial_transformer_backward,
        required_param="proj_out.weight",
        refuses_inf=("x", "context"),
    ),
    Spec(
        "res_block",
        ar.blocks.res_block_forward,
        {"x": randn(1, 3, 4, 4), "temb": randn(1, 5)},
        ("x", "temb"),
        options={"groups": 2, "eps": 1e-6},
        bad={"groups": INTS_3, "eps": EPS_BAD},
        params=lambda: jittered(ar.blocks.init_res_block(4, 6, 5, rng=0)),
        backward=ar.blocks.res_block_backward,
        required_param="conv2.weight",
        refuses_inf=("x", "temb"),
        large=("x",),
    ),
]

SPECS += [
    Spec(
        "init_self_attention",
        ar.init_self_attention,
        {},
        options={"channels": 8, "heads": 2, "groups": 4, "rng": 0},
        bad={"channels": SIZES_BAD, "heads": INTS_3, "groups": (0, -1, 2.0, True, "2", 3)},
        returns_pair=False,
    ),
    Spec(
        "init_cross_attention",
        ar.init_cross_attention,
        {},
        options={"channels": 8, "context_dim": 6, "heads": 2, "groups": 4, "rng": 0},
        bad={"context_dim": SIZES_BAD, "heads": INTS_3, "groups": (0, 2.0, True, 3)},
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
            "depth": SIZES_BAD,
            "ff_mult": SIZES_BAD,
            "head_dim": (0, 2.0, True),
        },
        returns_pair=False,
    ),
    Spec(
        "init_res_block",
        ar.blocks.init_res_block,
        {},
        options={"c_in": 4, "c_out": 6, "time_dim": 5, "rng": 0},
        bad={"c_in": SIZES_BAD, "c_out": SIZES_BAD, "time_dim": SIZES_BAD, "dtype": ("int64", "complex128")},
        returns_pair=False,
    ),
]

SPECS += DIT_ROWS

#: rows another module adds (a new op's own Spec); :func:`all_specs` appends them
EXTRA_SPECS: list[Spec] = []


def all_specs() -> list[Spec]:
    return SPECS + EXTRA_SPECS
