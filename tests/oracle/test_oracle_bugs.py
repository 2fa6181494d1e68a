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
    # ... a float16 kernel that does is not fused (FlashAttention keeps S in float32): it fails where |S| is in the
    # hundreds, and is told that it would pass as eager code (PyTorch's eager matmul and softmax on half tensors,
    # diffusers' AttnProcessor), which it passes
    report = check_attention(impl.logits_rounded_to_float16, dtype="float16")
    assert set(report.failed_cases) == LARGE_LOGITS and any("passes eager" in n for n in report.notes)
    assert check_attention(impl.logits_rounded_to_float16, dtype="float16", policy="eager").ok


def test_last_key_dropped():
    # every case, except where no query may attend to the last key (top-left causal with N < M)
    unseen = {n for n, c in CASES.items() if c.mask is not None and not np.any(np.asarray(c.mask)[..., -1])}
    assert unseen == {"causal top-left N<M"}
    assert set(check_attention(impl.key_dropped).failed_cases) == set(CASE_NAMES) - unseen


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
    # a tenth of the weights dropped and the rest scaled by 1/0.9: every case fails, in every dtype (under the fused
    # policy the large logits are float32 too: the eager policy's logits stored in bfloat16 could hide it there)
    for dtype in ("float32", "float16", "bfloat16"):
        assert set(check_attention(impl.dropout_left_on, dtype=dtype).failed_cases) == set(CASE_NAMES), dtype


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


# ---------------------------------------------------------------- bugs of the dtypes kernels ship in
# Each was passed by the oracle before the fused policy (ratios in the comments: the old verdict); each now fails
# under the default (fused) policy in every dtype named for it.

CAUSAL_N_LT_M = {"causal top-left N<M", "causal bottom-right N<M"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_causal_alignment_swapped(dtype):
    # a wrapper handing PyTorch's top-left causal mask to a kernel's bottom-right causal flag, or the reverse: the
    # same mask when N == M (the only causal case before), off by M − N keys otherwise
    wrong_way = check_attention(impl.causal_bottom_right_for_top_left, dtype=dtype)
    assert wrong_way.failed_cases == ["causal top-left N<M"] and wrong_way.worst_ratio() > 10
    reverse = check_attention(impl.causal_top_left_for_bottom_right, dtype=dtype)
    assert reverse.failed_cases == ["causal bottom-right N<M"] and reverse.worst_ratio() > 10


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_a_scale_of_zero_taken_as_the_default(dtype):
    report = check_attention(impl.scale_or_default, impl.grad_scale_or_default, dtype=dtype)
    assert report.failed_cases == ["scale=0"] and failing_outputs(report) == {"out", "dq", "dk", "dv"}


def fused_ratio(fn, grad_fn, dtype, cases):
    report = check_attention(fn, grad_fn, dtype=dtype, cases=cases)
    assert report.policy == "fused" and not report.ok
    return report.worst_ratio()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_online_softmax_sum_kept_in_float16(dtype):
    # bfloat16 kernel, running ℓ stored in float16 between tiles of 16 keys (was 0.53): ~0.2 % of the output on
    # 4096 keys, less than half a unit of bfloat16's last place, but the last rounding is deducted exactly
    assert fused_ratio(impl.online_sum_in_float16, None, dtype, ["4096 keys"]) > 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_softmax_sum_accumulated_in_float16(dtype):
    # "a correct bfloat16 kernel whose softmax sum is accumulated in float16" (was 0.49): over 4096 keys the
    # float16 sum stalls
    assert fused_ratio(impl.softmax_sum_in_float16, None, dtype, ["4096 keys"]) > 10


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_backward_s_lse_from_a_sum_in_float16(dtype):
    # was 0.19 (bfloat16), 0.86 (float16)
    report = check_attention(None, impl.grad_lse_from_sum_in_float16, dtype=dtype)
    assert "4096 keys" in report.failed_cases and report.worst_ratio() > 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_numerator_s_max_in_float16(dtype):
    # the numerator shifted by the max rounded to float16, the denominator by the float32 max: exp(Δm) off where
    # |m| is in the hundreds (was 0.21 in bfloat16, where logits stored in the dtype were allowed)
    assert fused_ratio(impl.max_in_float16_numerator, None, dtype, ["large logits"]) > 5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_masking_by_multiplying_exp_with_the_max_over_masked_keys(dtype):
    # rows whose allowed logits sit hundreds below a masked one underflow to 0 (was 0.66 in bfloat16)
    report = check_attention(impl.mask_by_multiplying_exp, dtype=dtype)
    assert report.failed_cases == ["large logits masked"] and report.worst_ratio() > 10


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dk_zero_for_long_sequences(dtype):
    # was 0.17 (bfloat16), 0.999 (float16): the eager max-shift residue was allowed on every key's dk; it lands on
    # each row's argmax key only, and the other keys keep a tight allowance
    report = check_attention(None, impl.grad_dk_zero_for_long_sequences, dtype=dtype)
    assert {"long sequence", "4096 keys"} <= set(report.failed_cases) and failing_outputs(report) == {"dk"}
    assert report.worst_ratio() > 10
    # and under the eager policy too: the residue has room on the argmax keys only
    assert not check_attention(None, impl.grad_dk_zero_for_long_sequences, dtype=dtype, cases=["long sequence"],
                               policy="eager").ok  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gradients_zeroed_for_large_queries(dtype):
    # was 0.96 (bfloat16)
    report = check_attention(None, impl.grad_zero_for_large_queries, dtype=dtype)
    assert set(report.failed_cases) == LARGE_LOGITS and report.worst_ratio() > 10
