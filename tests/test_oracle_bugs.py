"""The oracle has teeth: each planted bug fails, on the cases that expose it, and only the outputs it touches.

Every buggy implementation in oracle_impls.py differs from a correct one in one line (marked # BUG).
"""

from __future__ import annotations

import numpy as np
import oracle_impls as impl
import pytest

from attention_ref.testing import CASE_NAMES, battery, check_attention

CASES = {c.name: c for c in battery()}
MASKED = {n for n, c in CASES.items() if c.mask is not None}
DEAD_ROWS = {n for n, c in CASES.items() if c.dead_rows.any()}
BIASED = {n for n, c in CASES.items() if c.bias is not None}
LARGE_LOGITS = {"large logits", "large logits masked"}
MULTI_TILE = {n for n, c in CASES.items() if c.k.shape[-2] > impl.BLOCK}
PARTIAL_TILE = {n for n in MULTI_TILE if CASES[n].k.shape[-2] % impl.BLOCK}


def failing_outputs(report) -> set[str]:
    return {c.output for c in report.failures}


def test_wrong_default_scale():
    report = check_attention(impl.wrong_scale)
    failed = set(report.failed_cases)
    assert "plain" in failed
    # an explicit scale, or a single key (all weights 1), hides the bug
    assert not failed & {"custom scale", "mask+bias+scale", "M=1", "d=1"}


def test_softmax_over_the_wrong_axis():
    assert set(check_attention(impl.softmax_wrong_axis).failed_cases) >= {"plain", "cross-attention", "N=1"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_no_max_subtraction_overflows_on_large_logits(dtype):
    report = check_attention(impl.no_max_subtraction, dtype=dtype)
    assert set(report.failed_cases) == LARGE_LOGITS
    assert all("where the reference is finite" in c.note for c in report.failures)


def test_mask_ignored():
    failed = set(check_attention(impl.mask_ignored).failed_cases)
    assert {"causal", "key padding", "window", "random mask"} <= failed <= MASKED


def test_mask_inverted():
    failed = set(check_attention(impl.inverted_mask).failed_cases)
    assert {"causal", "key padding"} <= failed <= MASKED


def test_nan_on_fully_masked_rows_fails_unless_nan_is_accepted():
    report = check_attention(impl.nan_on_fully_masked_rows)
    assert set(report.failed_cases) == DEAD_ROWS
    assert all(c.output == "out" and "nan" in c.note for c in report.failures)
    assert check_attention(impl.nan_on_fully_masked_rows, masked_rows="nan-ok").ok


def test_finite_mask_value_gives_nonzero_output_on_fully_masked_rows():
    # masking with -1e9 instead of -inf: a row with no key averages all values instead of giving 0
    for masked_rows in ("zero", "nan-ok"):
        report = check_attention(impl.finite_mask_value, masked_rows=masked_rows)
        assert set(report.failed_cases) == DEAD_ROWS
        bad = report.failures[0]
        assert CASES[bad.case].dead_rows[bad.where[:-1]]  # the worst error sits on a dead row


def test_bias_ignored():
    assert set(check_attention(impl.bias_ignored).failed_cases) == BIASED


def test_logits_rounded_to_float16():
    # a float32 kernel that stores S in float16 is off everywhere: narrower than the dtype under test ...
    assert "plain" in check_attention(impl.logits_rounded_to_float16, dtype="float32").failed_cases
    # ... while a float16 kernel may store S in float16, as an unfused one does (PyTorch's eager matmul and
    # softmax on half tensors, diffusers' AttnProcessor): every op may round its result to the dtype under test
    assert check_attention(impl.logits_rounded_to_float16, dtype="float16").ok


def test_last_key_dropped():
    assert set(check_attention(impl.key_dropped).failed_cases) == set(CASE_NAMES)


def test_online_softmax_without_rescaling():
    failed = set(check_attention(impl.online_softmax_without_rescale).failed_cases)
    assert {"tile edges", "odd sizes", "cross-attention"} <= failed <= MULTI_TILE


def test_last_partial_tile_dropped():
    failed = set(check_attention(impl.last_partial_tile_dropped).failed_cases)
    assert {"tile edges", "odd sizes", "cross-attention"} <= failed <= PARTIAL_TILE


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_values_accumulated_in_the_low_precision_dtype(dtype):
    assert check_attention(impl.pv_accumulated_in_dtype, dtype=dtype, cases=["plain"]).ok  # short sums survive
    assert "long sequence" in check_attention(impl.pv_accumulated_in_dtype, dtype=dtype).failed_cases


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_values_accumulated_in_bfloat16(dtype):
    # Σ_j P_ij v_j summed in bfloat16 over 1024 keys of weight ~1/1024 onto ~2: the sum stalls where the
    # terms fall under half a unit of bfloat16 — in any dtype, and far outside the tolerance
    report = check_attention(impl.pv_accumulated_in_bfloat16, dtype=dtype, cases=["long sequence"])
    assert report.failed_cases == ["long sequence"] and report.worst_ratio() > 10


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dv_accumulated_in_the_low_precision_dtype_over_the_queries(dtype):
    # Σ_i P_ij dO_i over 1024 queries onto ~16 (dout of mean 1) in the dtype: only the long query axis shows it
    report = check_attention(None, impl.grad_dv_accumulated_in_dtype, dtype=dtype)
    assert report.failed_cases == ["long query axis"] and failing_outputs(report) == {"dv"}
    assert check_attention(None, impl.grad_dv_accumulated_in_dtype, dtype="float32").ok  # float32 is legitimate


def test_mask_applied_on_the_query_axis():
    report = check_attention(impl.mask_on_query_axis)
    failed = set(report.failed_cases)
    # with N == M the transposed mask broadcasts and silently masks the wrong entries; a symmetric mask hides it
    assert "causal" in failed and "window" not in failed and failed <= MASKED
    square = {n for n, c in CASES.items() if c.q.shape[-2] == c.k.shape[-2]}
    assert all(c.note.startswith("raised") for c in report.failures if c.case not in square)


def test_dropout_left_on():
    # a tenth of the weights dropped and the rest scaled by 1/0.9: every case fails ...
    for dtype in ("float32", "float16"):
        assert set(check_attention(impl.dropout_left_on, dtype=dtype).failed_cases) == set(CASE_NAMES), dtype
    # ... except, in bfloat16, where logits in the hundreds may be: stored in bfloat16 (legitimate) they are off
    # by up to 0.5, which can move the weights as much as the dropout does
    failed = set(check_attention(impl.dropout_left_on, dtype="bfloat16").failed_cases)
    assert set(CASE_NAMES) - LARGE_LOGITS <= failed


def test_last_query_tile_size_used_for_every_tile():
    assert check_attention(impl.query_tiled).ok  # the same code, correct
    failed = set(check_attention(impl.last_query_tile_size_everywhere).failed_cases)
    # only where N is not a multiple of the tile does the last tile differ: 37 and 33 queries
    ragged = {n for n, c in CASES.items() if c.q.shape[-2] % impl.QUERY_TILE and c.q.shape[-2] > impl.QUERY_TILE}
    assert failed == ragged == {"odd sizes", "tile edges"}


def test_backward_missing_the_softmax_subtraction():
    report = check_attention(None, grad_fn=impl.grad_missing_softmax_term)
    assert "plain" in report.failed_cases
    assert failing_outputs(report) == {"dq", "dk"}  # dV = Pᵀ dO does not involve the softmax backward


def test_backward_dq_without_the_scale():
    report = check_attention(None, grad_fn=impl.grad_dq_missing_scale)
    assert "plain" in report.failed_cases and failing_outputs(report) == {"dq"}


def test_backward_dk_without_the_transpose():
    report = check_attention(None, grad_fn=impl.grad_dk_not_transposed)
    assert set(report.failed_cases) == set(CASE_NAMES)
    square = {n for n, c in CASES.items() if c.q.shape[-2] == c.k.shape[-2]}
    assert {c.output for c in report.failures if c.case in square} == {"dk"}
    # with N ≠ M the matmul itself fails: the exception is reported, not raised
    assert any(c.note.startswith("raised ValueError") for c in report.failures if c.case not in square)


def test_backward_recomputes_the_weights_without_the_mask():
    report = check_attention(impl.numpy_forward, grad_fn=impl.grad_recomputes_p_without_mask)
    assert {"causal", "key padding"} <= set(report.failed_cases) <= MASKED
    assert "out" not in failing_outputs(report)  # the forward is right; only the gradients are not


def test_every_bug_is_far_over_the_tolerance_in_float16():
    worst = {
        name: check_attention(getattr(impl, name), dtype="float16").worst_ratio()
        for name in ("wrong_scale", "mask_ignored", "bias_ignored", "online_softmax_without_rescale")
    }
    assert min(worst.values()) > 50, worst
    assert np.isinf(check_attention(impl.nan_on_fully_masked_rows, dtype="float16").worst_ratio())
