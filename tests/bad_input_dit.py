"""The bad-input table's rows for the diffusion transformers' pieces: RMS norm, RoPE, patchify, joint attention,
Flux's RoPE tables (:mod:`bad_input_table` adds them to its rows)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from bad_input_spec import EPS_BAD, INTS_3, SCALE_BAD, SIZES_BAD, Array, Spec, bools, jittered, randn

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


def _joint_rope(x: Array, context: Array, params: Any, *, cos: Any, sin: Any, **options: Any) -> Any:
    """Joint attention with RoPE, its tables passed as two arrays (so that the table changes each one)."""
    return ar.blocks.joint_attention_forward(x, context, params, rope=(cos, sin), **options)


def _joint_single(x: Array, params: Any, **options: Any) -> Any:
    """Joint attention with one stream (Flux's single-stream blocks): no context."""
    return ar.blocks.joint_attention_forward(x, None, params, **options)


def _positions(rng: np.random.Generator) -> Array:
    return rng.uniform(0, 5, (3, 2))  # 3 tokens at real positions on 2 axes


_ORDER_BAD = ("text", None, 1)
_JOINT = {"x": randn(1, 4, 8), "context": randn(1, 3, 6)}  # N = 4 image, M = 3 text tokens: L = 7
_JOINT_BAD = {"heads": INTS_3, "eps": EPS_BAD, "scale": SCALE_BAD, "order": _ORDER_BAD, "qk_norm": ("l2", 1, None)}
_PATCH_BAD = (0, -1, 2.0, True, None, "2", 3, (2,), (2, 0), (2, 2.0), (2, 2, 2))
_CHANNEL_ORDER_BAD = ("chw", None, 1)
_PAIRS_BAD = ("rotate_half", None, 1)

DIT_ROWS: list[Spec] = [
    Spec(
        "rms_norm",
        rms_norm_forward,
        {"x": randn(2, 3, 4), "weight": randn(4)},
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
        {"x": randn(1, 2, 3, 4), "cos": randn(3, 4), "sin": randn(3, 4)},
        ("x", "cos", "sin"),
        options={"pairs": "interleaved", "compute_dtype": None},
        bad={"pairs": _PAIRS_BAD, "compute_dtype": ("bfloat16", "int32", "float", 1)},
        backward=rope_backward,
        mixed_ok=("x", "cos", "sin"),
    ),
    Spec(
        "rope_halves",
        rope_forward,
        {"x": randn(2, 3, 6), "cos": randn(2, 3, 6), "sin": randn(2, 3, 6)},
        ("x", "cos", "sin"),
        options={"pairs": "halves", "compute_dtype": "float64"},
        backward=rope_backward,
        mixed_ok=("x", "cos", "sin"),
    ),
    Spec(
        "patchify",
        patchify_forward,
        {"x": randn(1, 4, 6, 2)},
        ("x",),
        options={"patch": 2, "channel_order": "pqc"},
        bad={"patch": _PATCH_BAD, "channel_order": _CHANNEL_ORDER_BAD},
        backward=patchify_backward,
    ),
    Spec(
        "unpatchify",
        unpatchify_forward,
        {"tokens": randn(1, 6, 8)},
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
        masks={"mask": bools(7, 7)},
        options={"heads": 2, "order": "image_first", "qk_norm": "rms_norm", "eps": 1e-6, "scale": None},
        bad=_JOINT_BAD,
        params=lambda: jittered(ar.blocks.init_joint_attention(8, 6, heads=2, qk_norm="rms_norm", rng=0)),
        backward=ar.blocks.joint_attention_backward,
        required_param="q.weight",
        refuses_inf=("x", "context"),
    ),
    Spec(
        "joint_attention_rope",
        _joint_rope,
        {**_JOINT, "cos": randn(7, 4), "sin": randn(7, 4)},
        ("x", "context"),
        options={
            "heads": 2,
            "order": "text_first",
            "qk_norm": "rms_norm",
            "rope_pairs": "interleaved",
            "rope_dtype": None,
        },
        bad={**_JOINT_BAD, "rope_pairs": _PAIRS_BAD, "rope_dtype": ("bfloat16", "float", 1)},
        params=lambda: jittered(ar.blocks.init_joint_attention(8, 6, heads=2, qk_norm="rms_norm", rng=1)),
        backward=ar.blocks.joint_attention_backward,
        required_param="add_q.weight",
        refuses_inf=("x", "context"),
        mixed_ok=("cos", "sin"),
    ),
    Spec(
        "joint_attention_single",
        _joint_single,
        {"x": randn(2, 5, 8)},
        ("x",),
        options={"heads": 2, "qk_norm": "layer_norm", "eps": 1e-6},
        bad=_JOINT_BAD,
        params=lambda: jittered(
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
            "dim": SIZES_BAD,
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

#: the names of these rows (scripts/probe_bad_input.py probes them alone with 'dit')
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
