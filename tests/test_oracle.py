"""The test oracle: battery, tolerance policy, report, and correct implementations passing it."""

from __future__ import annotations

import numpy as np
import oracle_impls as impl
import pytest
from conftest import HAS_TORCH

from attention_ref.testing import (
    CASE_NAMES,
    DEFAULT_POLICY,
    Case,
    Policy,
    assert_attention_close,
    battery,
    check_attention,
    from_torch,
)
from attention_ref.testing.dtypes import eps, numpy_dtype
from attention_ref.testing.examples import numpy_attention, numpy_attention_grad, torch_sdpa
from attention_ref.testing.tolerance import reference

LOW = ["float32", "float16", "bfloat16"]
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

# ---------------------------------------------------------------- the battery


def test_battery_is_deterministic_and_names_are_unique():
    a, b = battery(), battery()
    assert [c.name for c in a] == list(CASE_NAMES) and len(set(CASE_NAMES)) == len(CASE_NAMES)
    for x, y in zip(a, b, strict=True):
        for n in ("q", "k", "v", "dout"):
            np.testing.assert_array_equal(getattr(x, n), getattr(y, n))


def test_battery_covers_what_breaks_implementations():
    cases = {c.name: c for c in battery()}
    dims = [(c.q.shape[-2], c.k.shape[-2], c.q.shape[-1], c.v.shape[-1]) for c in cases.values()]
    assert any(N == 1 for N, *_ in dims) and any(M == 1 for _, M, *_ in dims) and any(d == 1 for *_, d, _ in dims)
    assert any(N != M for N, M, *_ in dims) and any(d != dv for *_, d, dv in dims)
    assert any(M % 16 and M % 2 and M > 16 for _, M, *_ in dims)
    assert any(c.q.ndim == 4 for c in cases.values()) and any(c.q.ndim == 2 for c in cases.values())
    assert any(c.mask is not None and c.mask.shape[-2] == 1 for c in cases.values())  # broadcast key padding
    np.testing.assert_array_equal(cases["causal"].mask, np.tril(np.ones((12, 12), dtype=bool)))
    assert cases["fully masked rows"].dead_rows.sum() == 4 and not cases["random mask"].dead_rows.any()
    big = cases["large logits"]
    logits = (big.q @ np.swapaxes(big.k, -1, -2)) / np.sqrt(big.q.shape[-1])
    assert 100 < np.max(np.abs(logits)) < 1000  # exp overflows float32 (and float16) without max subtraction
    assert cases["custom scale"].scale == 2.5 and cases["bias"].bias is not None


def test_a_case_checks_its_inputs():
    q = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="feature size"):
        Case("bad", q, np.zeros((2, 5, 3)), np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="dout of shape"):
        Case("bad", q, q, q, dout=np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="no case named"):
        check_attention(numpy_attention, cases=["no such case"])
    with pytest.raises(ValueError, match="unique"):
        check_attention(numpy_attention, cases=["plain", "plain"])


def test_user_cases_and_subsets():
    rng = np.random.default_rng(0)
    mine = Case("mine", rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal((4, 2)))
    report = check_attention(numpy_attention, grad_fn=numpy_attention_grad, cases=["causal", mine])
    assert [c.case for c in report.checks] == ["causal"] * 4 + ["mine"] * 4 and report.ok


# ---------------------------------------------------------------- tolerance policy


def test_reference_rounds_inputs_and_measures_a_float32_kernel():
    case = battery()[0]
    ref = reference(case, "bfloat16")
    assert ref.inputs["q"].dtype == numpy_dtype("bfloat16") and ref.exact["out"].dtype == np.float64
    assert all(x.dtype == numpy_dtype("bfloat16") for x in ref.kernel.values())
    # the float64 reference is computed from the rounded inputs, so it differs from the unrounded one
    assert not np.array_equal(ref.inputs["q"].astype(np.float64), case.q)
    for o in ("out", "dq", "dk", "dv"):
        err = np.max(np.abs(ref.kernel[o].astype(np.float64) - ref.exact[o]))
        # the larger of the plain and the tiled order's errors: at least the plain one's
        assert ref.kernel_error[o] >= err and 0 < err <= ref.kernel_error[o] < 0.1
        assert ref.magnitude[o] >= np.max(np.abs(ref.exact[o]))


def test_allowed_error_is_c_times_kernel_error_plus_floor():
    ref = reference(battery()[0], "float16")
    allowed, floor = DEFAULT_POLICY.allowed("dq", ref.magnitude["dq"], ref.kernel_error["dq"], "float16")
    assert floor == DEFAULT_POLICY.floor["dq"] * eps("float16") * ref.magnitude["dq"]
    assert allowed == DEFAULT_POLICY.c["dq"] * ref.kernel_error["dq"] + floor
    assert DEFAULT_POLICY.c["dq"] > DEFAULT_POLICY.c["out"]  # gradients get more room
    with pytest.raises(ValueError, match="keys"):
        Policy(c={"out": 1.0})


def test_the_floor_and_the_tiled_order_keep_a_correct_kernel_passing_where_the_plain_order_is_exact(monkeypatch):
    # With one key, dq = 0 exactly and the plain kernel-like order gets exactly 0 too. FlashAttention's backward
    # computes D_i = dO_i · O_i from the rounded output, so its dq and dk are a rounding error away from 0: a pure
    # "c × the low-precision reference's error" rule (no floor) with the plain order alone allows nothing there.
    from attention_ref.testing import tolerance

    one_key = next(c for c in battery() if c.name == "M=1")
    ref = reference(one_key, "float32")
    assert np.max(np.abs(ref.kernel["dq"].astype(np.float64) - ref.exact["dq"])) == 0  # the plain order: exact
    assert ref.kernel_error["dq"] > 0  # the tiled order (D_i = dO_i · O_i) is not
    no_floor = Policy(floor=dict.fromkeys(("out", "dq", "dk", "dv"), 0.0))

    def check(policy=DEFAULT_POLICY):
        return check_attention(None, grad_fn=impl.flash_style_grad, dtype="float32", cases=["M=1"], policy=policy)

    assert check().ok and check(no_floor).ok  # the tiled order alone already covers it
    plain_only = tolerance._attention
    monkeypatch.setattr(tolerance, "_attention", lambda inputs, dtype, tiled=False: plain_only(inputs, dtype))
    pure = check(no_floor)
    assert not pure.ok and {c.output for c in pure.failures} == {"dq", "dk"}
    assert all(c.allowed == 0 and c.error > 0 for c in pure.failures)
    assert check().ok  # the floor alone covers it too


# ---------------------------------------------------------------- correct implementations pass


@pytest.mark.parametrize("dtype", LOW)
def test_a_correct_numpy_implementation_passes(dtype):
    report = assert_attention_close(numpy_attention, grad_fn=numpy_attention_grad, dtype=dtype)
    assert len(report.checks) == 4 * len(CASE_NAMES) and report.worst_ratio() < 0.5


@pytest.mark.parametrize("dtype", LOW)
def test_a_blocked_online_softmax_and_flash_style_rounding_pass(dtype):
    assert check_attention(impl.blocked, dtype=dtype).ok
    assert check_attention(impl.p_rounded_to_dtype, grad_fn=impl.flash_style_grad, dtype=dtype).ok


def test_float64_is_strict_a_float32_computation_fails_it():
    report = check_attention(numpy_attention, dtype="float64", cases=["plain"])
    assert not report.ok and report.worst_ratio() > 1e6


# ---------------------------------------------------------------- torch


@needs_torch
@pytest.mark.parametrize("dtype", [*LOW, "float64"])
def test_torch_sdpa_passes(dtype):
    fn, grad_fn = from_torch(torch_sdpa)
    report = assert_attention_close(fn, grad_fn=grad_fn, dtype=dtype)
    assert report.worst_ratio() < 0.8


@needs_torch
def test_from_torch_keeps_dtypes_and_zero_fills_unused_gradients():
    import torch

    seen = {}

    def first_value_only(q, k, v, *, mask=None, bias=None, scale=None):
        seen["dtype"] = q.dtype
        return v[..., :1, :].expand(*q.shape[:-1], v.shape[-1]) * 1.0  # does not depend on q or k

    fn, grad_fn = from_torch(first_value_only)
    bf16 = numpy_dtype("bfloat16")
    q = np.arange(6, dtype=np.float32).reshape(2, 3).astype(bf16)
    v = (np.arange(8, dtype=np.float32).reshape(4, 2) / 3).astype(bf16)
    out = fn(q, q[:1].repeat(4, 0), v)
    assert seen["dtype"] == torch.bfloat16 and out.dtype == bf16
    np.testing.assert_array_equal(out.astype(np.float32), np.broadcast_to(v[:1], (2, 2)).astype(np.float32))
    dq, dk, dv = grad_fn(q, q[:1].repeat(4, 0), v, np.ones((2, 2), dtype=bf16))
    assert dq.dtype == bf16 and not np.any(dq.astype(np.float32)) and not np.any(dk.astype(np.float32))
    np.testing.assert_array_equal(dv.astype(np.float32)[0], [2.0, 2.0])


@needs_torch
def test_a_naive_torch_attention_with_nan_rows_passes_forward_only_with_nan_ok():
    import torch

    def naive(q, k, v, *, mask=None, bias=None, scale=None):
        s = (scale or q.shape[-1] ** -0.5) * q @ k.transpose(-1, -2)
        s = s if bias is None else s + bias
        s = s if mask is None else s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v  # NaN on rows with no key

    fn, grad_fn = from_torch(naive)
    dead = ["fully masked rows", "mask+bias+scale"]
    assert set(check_attention(fn, cases=dead).failed_cases) == set(dead)
    assert check_attention(fn, cases=dead, masked_rows="nan-ok").ok
    # the NaN rows poison dv = Pᵀ dO through autograd: dk/dv are checked everywhere in both modes
    report = check_attention(None, grad_fn=grad_fn, cases=dead, masked_rows="nan-ok")
    assert {"dv"} <= {c.output for c in report.failures}


# ---------------------------------------------------------------- the report


def test_report_prints_a_row_per_case_and_output_and_flags_failures():
    report = check_attention(impl.bias_ignored, grad_fn=impl.grad, cases=["plain", "bias"], dtype="float16")
    text = str(report)
    assert "float16" in text and "FAILED (1 of 8 checks)" in text
    rows = [line for line in text.splitlines() if line.startswith(("plain ", "bias "))]
    assert len(rows) == 8 and sum("<-- FAIL" in r for r in rows) == 1
    bad = report.failures[0]
    assert (bad.case, bad.output) == ("bias", "out") and bad.ratio > 1 and bad.error > bad.allowed
    assert f"{bad.where}" in text and len(bad.where) == 3
    assert report.worst_ratio("dq") < 1 < report.worst_ratio("out")
    with pytest.raises(AssertionError, match=r"bias +out"):
        assert_attention_close(impl.bias_ignored, cases=["bias"])


def test_wrong_dtype_wrong_shape_and_exceptions_are_failures_with_a_reason():
    def upcast(q, k, v, **kw):
        return numpy_attention(q, k, v, **kw).astype(np.float32)

    def transposed(q, k, v, **kw):
        return np.swapaxes(numpy_attention(q, k, v, **kw), -1, -2)

    def crash(q, k, v, **kw):
        raise RuntimeError("kernel launch failed")

    assert "dtype float32, expected float16" in check_attention(upcast, dtype="float16", cases="plain").failures[0].note
    assert "shape" in check_attention(transposed, cases="d!=dv").failures[0].note
    report = check_attention(crash, grad_fn=crash, cases="plain")
    assert len(report.failures) == 4 and "RuntimeError: kernel launch failed" in str(report)


def test_an_implementation_that_writes_into_its_inputs_does_not_spoil_the_reference():
    def clobber(q, k, v, **kw):
        out = numpy_attention(q, k, v, **kw)
        q[...] = 0
        return out

    assert check_attention(clobber, grad_fn=numpy_attention_grad).ok


def test_bad_arguments():
    with pytest.raises(ValueError, match="masked_rows"):
        check_attention(numpy_attention, masked_rows="ignore")
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_attention(numpy_attention, dtype="int8")
    with pytest.raises(ValueError, match="fn, grad_fn, or both"):
        check_attention(None)


def test_results_from_other_array_libraries_are_read_and_a_non_array_fails():
    import array_api_strict as xs

    def strict(q, k, v, **kw):
        return xs.asarray(numpy_attention(q, k, v, **kw))

    assert check_attention(strict, cases=["plain", "causal"]).ok
    note = check_attention(lambda q, k, v, **kw: "out", cases="plain").failures[0].note
    assert note == "shape (), expected (2, 8, 16)"
