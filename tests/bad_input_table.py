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
``EXTRA_SPECS`` from another module): nothing else changes. ``_pair_row`` and its kin write the common kinds of row
(a forward and its backward, named by the forward; an attention kernel; a resampling; an ``init_*``).
"""

from __future__ import annotations

import math
from typing import Any

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
#: what the attention layer and its self- and cross-attention blocks refuse alike
_LAYER_BAD = {"heads": INTS_3, "groups": INTS_3, "eps": EPS_BAD}


def _pair_row(forward: Any, backward: Any, arrays: dict, positional: tuple[str, ...], **fields: Any) -> Spec:
    """The row of a forward ``<name>_forward`` and its ``backward``, named ``<name>``."""
    return Spec(forward.__name__.removesuffix("_forward"), forward, arrays, positional, backward=backward, **fields)


def _factor_row(forward: Any, backward: Any, shape: tuple[int, ...], bad_factors: tuple[Any, ...]) -> Spec:
    """The row of a resampling of a map ``x`` by ``factor=2`` (up-sampling, average pooling): the factors every one
    of them refuses, and ``bad_factors``, the ones this one refuses besides."""
    bad = (0, -1, 2.0, True, None, "2", *bad_factors)
    return _pair_row(forward, backward, {"x": randn(*shape)}, ("x",), options={"factor": 2}, bad={"factor": bad})


def _attention_row(forward: Any, backward: Any, arrays: dict, **fields: Any) -> Spec:
    """The row of an attention kernel ``<name>_forward``: ``q, k, v`` positional, an infinite entry in any of them
    refused, ``q`` and ``k`` the arrays scaled up in the float16 "large values" case."""
    return _pair_row(forward, backward, arrays, _POS, refuses_inf=_POS, large=("q", "k"), **fields)


def _init_row(init: Any, options: dict, bad: dict) -> Spec:
    """The row of an ``init_*`` function: no arrays in, a parameter dict out (not an ``(out, cache)`` pair)."""
    return Spec(init.__name__, init, {}, options=options, bad=bad, returns_pair=False)


SPECS: list[Spec] = [
    _pair_row(
        ar.softmax_forward,
        ar.softmax_backward,
        {"x": randn(3, 4)},
        ("x",),
        masks={"mask": bools(3, 4)},
        options={"axis": -1},
        bad={"axis": AXIS_BAD},
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
    _pair_row(
        ar.ops.linear_forward,
        ar.ops.linear_backward,
        {"x": randn(2, 3, 4), "W": randn(4, 5), "b": randn(5)},
        ("x", "W", "b"),
    ),
    _pair_row(
        ar.ops.group_norm_forward,
        ar.ops.group_norm_backward,
        {"x": randn(2, 3, 3, 4), "weight": randn(4), "bias": randn(4)},
        ("x", "weight", "bias"),
        options={"groups": 2, "eps": 1e-5},
        bad={"groups": INTS_3, "eps": EPS_BAD},
        large=("x",),
    ),
    _pair_row(
        ar.ops.layer_norm_forward,
        ar.ops.layer_norm_backward,
        {"x": randn(2, 3, 4), "weight": randn(4), "bias": randn(4)},
        ("x", "weight", "bias"),
        options={"eps": 1e-5},
        bad={"eps": EPS_BAD},
        large=("x",),
    ),
    _pair_row(
        ar.ops.split_heads_forward,
        ar.ops.split_heads_backward,
        {"x": randn(2, 3, 4)},
        ("x",),
        options={"heads": 2},
        bad={"heads": INTS_3},
    ),
    _pair_row(ar.ops.merge_heads_forward, ar.ops.merge_heads_backward, {"x": randn(2, 2, 3, 2)}, ("x",)),
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
    _pair_row(
        ar.ops.conv2d_forward,
        ar.ops.conv2d_backward,
        {"x": randn(1, 4, 4, 2), "weight": randn(3, 3, 2, 3), "bias": randn(3)},
        ("x", "weight", "bias"),
        options={"padding": 1},
        bad={"padding": (-1, 3, 1.0, True, None, (1,), "valid")},
    ),
    Spec("erf", ar.ops.erf, {"x": randn(5)}, ("x",), returns_pair=False),
    Spec("erfc", ar.ops.erfc, {"x": randn(5)}, ("x",), returns_pair=False),
    _pair_row(ar.ops.gelu_forward, ar.ops.gelu_backward, {"x": randn(2, 3)}, ("x",)),
    _pair_row(ar.ops.geglu_forward, ar.ops.geglu_backward, {"x": randn(2, 4)}, ("x",)),
    _pair_row(ar.ops.silu_forward, ar.ops.silu_backward, {"x": randn(2, 3)}, ("x",)),
    _factor_row(ar.ops.upsample_nearest_forward, ar.ops.upsample_nearest_backward, (1, 2, 2, 3), ()),
    _factor_row(ar.ops.avg_pool_forward, ar.ops.avg_pool_backward, (1, 4, 4, 3), (3,)),  # 3 does not divide 4
    _pair_row(
        ar.ops.timestep_embedding_forward,
        ar.ops.timestep_embedding_backward,
        {"t": lambda rng: rng.uniform(0, 1000, (3,))},
        ("t",),
        options={"dim": 8, "max_period": 10000.0},
        bad={"dim": (0, -2, 3, 8.0, True, None), "max_period": (0.0, -1.0, math.nan, math.inf, None, "1e4")},
    ),
    _attention_row(
        ar.attention_forward,
        ar.attention_backward,
        {**_ATTN, "bias": randn(3, 5)},
        masks={"mask": bools(3, 5)},
        options={"scale": None},
        bad={"scale": SCALE_BAD},
    ),
    _attention_row(
        ar.chunked_attention_forward,
        ar.chunked_attention_backward,
        {**_ATTN, "bias": randn(3, 5)},
        masks={"mask": bools(3, 5)},
        options={"scale": None, "block_size": 2},
        bad={"scale": SCALE_BAD, "block_size": (0, -1, 2.0, True, "2", (2,), (2, 0))},
    ),
    _attention_row(
        ar.attention.linear_attention_forward,
        ar.attention.linear_attention_backward,
        dict(_ATTN),
        masks={"key_mask": bools(2, 5)},
        options={"eps": 1e-6, "kind": "elu"},
        bad={"eps": (-1.0, math.nan, math.inf, None, "0", True), "kind": ("softmax", None, 1)},
    ),
    _attention_row(
        ar.attention.window_attention_forward,
        ar.attention.window_attention_backward,
        dict(_MAP_QKV),
        options={"window": 2, "shift": 1, "scale": None},
        bad={"window": (0, -1, 3, 2.0, True, None, "2"), "shift": (-1, 2, 1.0, True, None), "scale": SCALE_BAD},
    ),
    _attention_row(
        ar.attention.neighborhood_attention_forward,
        ar.attention.neighborhood_attention_backward,
        dict(_MAP_QKV),
        options={"kernel": 3, "scale": None},
        bad={"kernel": (0, -1, 2, 5, 3.0, True, None, "3"), "scale": SCALE_BAD},
    ),
    _pair_row(
        ar.attention_layer_forward,
        ar.attention_layer_backward,
        {"h": randn(2, 4, 8)},
        ("h",),
        options={"heads": 2, "groups": 4, "eps": 1e-5, "rescale": 1.5, "scale": None},
        bad={**_LAYER_BAD, "rescale": (0, -0.0, math.nan, math.inf, None, "1", True), "scale": SCALE_BAD},
        params=lambda: jittered(ar.init_attention_layer(8, heads=2, groups=4, bias=True, rng=0)),
        refuses_inf=("h",),
    ),
    _pair_row(
        ar.self_attention_forward,
        ar.self_attention_backward,
        {"x": randn(1, 2, 2, 8)},
        ("x",),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "rescale": 1.0, "scale": None},
        bad={**_LAYER_BAD, "rescale": (0, math.nan, math.inf, None, True), "scale": SCALE_BAD},
        params=lambda: jittered(ar.init_self_attention(8, heads=2, groups=4, rng=0)),
        refuses_inf=("x",),
    ),
    _pair_row(
        ar.cross_attention_forward,
        ar.cross_attention_backward,
        {"x": randn(1, 2, 2, 8), "context": randn(1, 3, 6)},
        ("x", "context"),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "rescale": 1.0, "scale": None},
        bad={**_LAYER_BAD, "rescale": (0, math.nan, None, True)},
        params=lambda: jittered(ar.init_cross_attention(8, 6, heads=2, groups=4, rng=0)),
        refuses_inf=("x", "context"),
    ),
    _pair_row(
        ar.blocks.geglu_ff_forward,
        ar.blocks.geglu_ff_backward,
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
        refuses_inf=("x",),
    ),
    _pair_row(
        ar.transformer_block_forward,
        ar.transformer_block_backward,
        {"h": randn(1, 4, 8), "context": randn(1, 3, 6)},
        ("h", "context"),
        options={"heads": 2, "norm_eps": 1e-5, "scale": None},
        bad={"heads": INTS_3, "norm_eps": EPS_BAD, "scale": SCALE_BAD},
        params=lambda: {
            k[len("blocks.0.") :]: v
            for k, v in jittered(ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)).items()
            if k.startswith("blocks.0.")
        },
        required_param="attn1.out.weight",
        refuses_inf=("h", "context"),
    ),
    _pair_row(
        ar.spatial_transformer_forward,
        ar.spatial_transformer_backward,
        {"x": randn(1, 2, 2, 8), "context": randn(1, 3, 6)},
        ("x", "context"),
        options={"heads": 2, "groups": 4, "eps": 1e-6, "norm_eps": 1e-5},
        bad={"heads": INTS_3, "groups": INTS_3, "eps": EPS_BAD, "norm_eps": EPS_BAD},
        params=lambda: jittered(ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=0)),
        required_param="proj_out.weight",
        refuses_inf=("x", "context"),
    ),
    _pair_row(
        ar.blocks.res_block_forward,
        ar.blocks.res_block_backward,
        {"x": randn(1, 3, 4, 4), "temb": randn(1, 5)},
        ("x", "temb"),
        options={"groups": 2, "eps": 1e-6},
        bad={"groups": INTS_3, "eps": EPS_BAD},
        params=lambda: jittered(ar.blocks.init_res_block(4, 6, 5, rng=0)),
        required_param="conv2.weight",
        refuses_inf=("x", "temb"),
        large=("x",),
    ),
]

SPECS += [
    _init_row(
        ar.init_self_attention,
        {"channels": 8, "heads": 2, "groups": 4, "rng": 0},
        {"channels": SIZES_BAD, "heads": INTS_3, "groups": (0, -1, 2.0, True, "2", 3)},
    ),
    _init_row(
        ar.init_cross_attention,
        {"channels": 8, "context_dim": 6, "heads": 2, "groups": 4, "rng": 0},
        {"context_dim": SIZES_BAD, "heads": INTS_3, "groups": (0, 2.0, True, 3)},
    ),
    _init_row(
        ar.init_attention_layer,
        {"channels": 8, "heads": 2, "groups": 4, "rng": 0},
        {"heads": INTS_3, "head_dim": (0, 2.0, True, "2"), "groups": (0, 2.0, True, 3)},
    ),
    _init_row(
        ar.init_spatial_transformer,
        {"channels": 8, "context_dim": 6, "heads": 2, "groups": 4, "rng": 0},
        {
            "heads": INTS_3,
            "groups": (0, 2.0, True, None, 3),
            "depth": SIZES_BAD,
            "ff_mult": SIZES_BAD,
            "head_dim": (0, 2.0, True),
        },
    ),
    _init_row(
        ar.blocks.init_res_block,
        {"c_in": 4, "c_out": 6, "time_dim": 5, "rng": 0},
        {"c_in": SIZES_BAD, "c_out": SIZES_BAD, "time_dim": SIZES_BAD, "dtype": ("int64", "complex128")},
    ),
]

SPECS += DIT_ROWS

#: rows another module adds (a new op's own Spec); :func:`all_specs` appends them
EXTRA_SPECS: list[Spec] = []


def all_specs() -> list[Spec]:
    return SPECS + EXTRA_SPECS
