"""The test oracle's harness: reports, unsupported cases and masked-row conventions, how implementations are handed
over (usage errors, dtypes, from_torch), layouts, the core cases and the causal mask's alignment."""

from __future__ import annotations

import numpy as np
import oracle_impls as impl
import pytest
from conftest import needs_torch

from attention_ref.testing import (
    CASE_NAMES,
    NotSupported,
    assert_attention_close,
    battery,
    check_attention,
    examples,
    from_torch,
)
from attention_ref.testing.dtypes import numpy_dtype
from attention_ref.testing.examples import numpy_attention, numpy_attention_grad
from attention_ref.testing.harness import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the report


def test_report_prints_a_row_per_case_and_output_and_flags_failures():
    report = check_attention(impl.bias_ignored, grad_fn=impl.grad, cases=["plain", "bias"], dtype="float16")
    text = str(report)
    assert "float16" in text and "FAILED (1 of 8 checks, in 1 case)" in text
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

    def crash(*arrays, **kw):
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
    with pytest.raises(TypeError, match=r"policy must be 'fused', 'eager' or a Policy \(attention_ref.testing"):
        check_attention(numpy_attention, policy={"c": 3.0})
    with pytest.raises(ValueError, match="no policy named 'fast'; the policies: fused, eager"):
        check_attention(numpy_attention, policy="fast")
    with pytest.raises(ValueError, match="layout must be None, 'bhnd' or 'bnhd'"):
        check_attention(numpy_attention, layout="nhd")
    with pytest.raises(ValueError, match=r"unknown core groups \['mask'\].*the groups: long sequence, large logits"):
        check_attention(numpy_attention, missing_ok={"mask"})


def test_results_from_other_array_libraries_are_read_and_a_non_array_fails():
    import array_api_strict as xs

    def strict(q, k, v, **kw):
        return xs.asarray(numpy_attention(q, k, v, **kw))

    assert check_attention(strict, cases=["plain", "causal"]).ok
    note = check_attention(lambda q, k, v, **kw: "out", cases="plain").failures[0].note
    assert note == "shape (), expected (2, 8, 16)"


# ---------------------------------------------------------------- unsupported cases, masked-row conventions, usage


def test_declared_unsupported_features_are_reported_not_failed():
    def no_custom_scale(q, k, v, *, mask=None, bias=None, scale=None):
        if scale is not None:
            raise RuntimeError("no scale argument")
        return numpy_attention(q, k, v, mask=mask, bias=bias)

    failing = check_attention(no_custom_scale, cases=["plain", "custom scale", "mask+bias+scale"])
    assert failing.failed_cases == ["custom scale", "mask+bias+scale"]
    report = check_attention(
        no_custom_scale, cases=["plain", "custom scale", "mask+bias+scale"], unsupported={"custom scale"}
    )
    assert report.ok and report.unsupported_cases == ["custom scale", "mask+bias+scale"]
    assert "1 of 3 cases ran (2 not supported)" in str(report) and str(report).count("not supported: custom scale") == 2
    no_custom_scale.unsupported = ("custom scale",)  # the same, declared on the function
    assert check_attention(no_custom_scale, cases=["plain", "custom scale"]).unsupported_cases == ["custom scale"]
    everything_unsupported = check_attention(no_custom_scale, cases=["custom scale"])
    assert not everything_unsupported.ok and "NOTHING CHECKED" in str(everything_unsupported)
    with pytest.raises(ValueError, match=r"unknown features.*the features are: d != dv"):
        check_attention(numpy_attention, unsupported={"scale"})


def test_an_implementation_may_raise_not_supported():
    def only_square(q, k, v, **kw):
        if q.shape[-2] != k.shape[-2]:
            raise NotSupported("N != M")
        return numpy_attention(q, k, v, **kw)

    report = check_attention(only_square, cases=["plain", "cross-attention"])
    assert report.ok and report.unsupported_cases == ["cross-attention"]
    assert next(c for c in report.checks if c.case == "cross-attention").note == "not supported: N != M"


def test_case_features():
    features = {c.name: c.features for c in battery()}
    assert features["plain"] == frozenset() and features["d!=dv"] == {"d != dv", "N != M"}
    assert features["mask+bias+scale"] == {"d != dv", "N != M", "custom scale", "mask", "bias", "fully masked rows"}
    assert features["causal"] == {"mask"} and features["key padding"] == {"mask", "N != M"}


def test_finite_ok_accepts_any_finite_output_on_fully_masked_rows():
    dead = ["fully masked rows", "mask+bias+scale"]
    # masking with -1e9: a row with no key averages v (and its gradient flows into dk, dv)
    assert set(check_attention(impl.finite_mask_value, impl.grad_finite_mask_value, cases=dead).failed_cases) == set(
        dead
    )
    report = check_attention(impl.finite_mask_value, impl.grad_finite_mask_value, cases=dead, masked_rows="finite-ok")
    assert report.ok, str(report)
    # NaN is not finite: a NaN row still fails under finite-ok
    assert not check_attention(impl.nan_on_fully_masked_rows, cases=dead, masked_rows="finite-ok").ok
    # and finite-ok still checks every other row
    assert not check_attention(impl.wrong_scale, cases=dead, masked_rows="finite-ok").ok


def test_an_empty_case_list_is_an_error():
    with pytest.raises(ValueError, match=r"no cases given.*the battery has: plain"):
        check_attention(numpy_attention, cases=[])


@needs_torch
def test_a_torch_function_given_numpy_arrays_gets_one_hint():
    with pytest.raises(TypeError, match=r"takes torch tensors.*from_torch \(on the command line: add --torch\)"):
        check_attention(examples.torch_sdpa)
    with pytest.raises(TypeError, match="add --torch"):
        check_attention(examples.torch_mha)  # fails on .reshape / .transpose of a NumPy array in another way


def test_report_format_shows_the_summary_and_failing_rows_or_every_row():
    report = check_attention(impl.bias_ignored, cases=["plain", "bias"])
    short, full = report.format(verbose=False), report.format(verbose=True)
    assert "FAILED (1 of 2 checks, in 1 case)" in short and "<-- FAIL" in short
    assert not any(line.startswith("plain ") for line in short.splitlines())
    assert any(line.startswith("plain ") for line in full.splitlines()) and full == str(report)


# ---------------------------------------------------------------- how implementations are handed over


@needs_torch
def test_from_torch_pair_unpacks_into_check_attention_and_carries_the_declaration():
    fn, grad_fn = from_torch(examples.torch_mha)
    assert fn.unsupported == grad_fn.unsupported == ("custom scale",)
    report = check_attention(*from_torch(examples.torch_mha), cases=["plain", "custom scale"])
    assert [c.output for c in report.checks] == ["out", "dq", "dk", "dv"] * 2 and report.ok


def test_from_torch_functions_are_annotated():
    import typing

    fn, grad_fn = from_torch(lambda q, k, v, **kw: q)
    assert typing.get_type_hints(fn)["return"] is np.ndarray
    assert "return" in typing.get_type_hints(grad_fn)


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


def test_a_dtype_may_be_given_as_a_numpy_or_torch_dtype():
    for dtype in (np.dtype("float16"), np.float16, "float16"):
        assert check_attention(numpy_attention, dtype=dtype, cases=["plain"]).dtype == "float16"
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32, float64"):
        check_attention(numpy_attention, dtype=np.int8, cases=["plain"])


@needs_torch
def test_a_torch_dtype_works_and_a_numpy_function_may_return_torch_bfloat16():
    import torch

    assert check_attention(numpy_attention, dtype=torch.bfloat16, cases=["plain"]).dtype == "bfloat16"

    def as_torch(q, k, v, **kw):  # NumPy in, a torch tensor out (bfloat16 has no NumPy dtype of its own)
        out = numpy_attention(q, k, v, **kw)
        return torch.from_numpy(out.astype(np.float32)).to(torch.bfloat16)

    assert check_attention(as_torch, dtype="bfloat16", cases=["plain", "causal"]).ok


def test_a_grad_fn_returning_a_dict_is_told_what_is_expected():
    def as_dict(q, k, v, dout, **kw):
        dq, dk, dv = numpy_attention_grad(q, k, v, dout, **kw)
        return {"q": dq, "k": dk, "v": dv}

    with pytest.raises(UsageError, match=r"grad_fn returned a dict \(keys 'q', 'k', 'v'\); it must return a tuple "
                                         r"\(dq, dk, dv\)"):  # fmt: skip
        check_attention(None, as_dict, cases=["plain"])


def test_a_function_with_other_keywords_is_a_usage_error_said_once():
    def attn_mask_style(q, k, v, *, attn_mask=None, scale=None):
        return numpy_attention(q, k, v, mask=attn_mask, scale=scale)

    with pytest.raises(UsageError, match=r"fn must be fn\(q, k, v, \*, mask=None, bias=None, scale=None\) -> out; "
                                         r".*attn_mask_style\(q, k, v, \*, attn_mask=None, scale=None\) lacks mask=, "
                                         r"bias=: wrap it"):  # fmt: skip
        check_attention(attn_mask_style)
    check_attention(lambda q, k, v, **kw: numpy_attention(q, k, v, **kw), cases=["plain"])  # **kw takes them all
    with pytest.raises(UsageError, match="lacks 4 positional arrays"):
        check_attention(None, lambda q, k, v, *, mask=None, bias=None, scale=None: (q, k, v))


@needs_torch
def test_from_torch_checks_the_signature_and_a_numpy_function_under_it_is_a_usage_error():
    def torch_attn_mask(q, k, v, attn_mask=None):
        raise AssertionError("never called")

    with pytest.raises(UsageError, match="lacks mask=, bias=, scale="):
        from_torch(torch_attn_mask)
    with pytest.raises(UsageError, match=r"takes NumPy arrays, not the torch tensors.*drop --torch"):
        check_attention(*from_torch(numpy_attention, ), cases=["plain"])  # fmt: skip


# ---------------------------------------------------------------- layouts and the core cases


def four_d_only(layout):
    """A kernel that takes only 4-D arrays in ``layout`` (and 4-D mask/bias in the logits' order)."""

    def fn(q, k, v, *, mask=None, bias=None, scale=None):
        assert q.ndim == k.ndim == v.ndim == 4 and (mask is None or mask.ndim == 4) and (bias is None or bias.ndim == 4)
        if layout == "bnhd":  # (B, N, H, d) → (B, H, N, d) and back
            q, k, v = (np.swapaxes(a, 1, 2) for a in (q, k, v))
            return np.swapaxes(numpy_attention(q, k, v, mask=mask, bias=bias, scale=scale), 1, 2)
        return numpy_attention(q, k, v, mask=mask, bias=bias, scale=scale)

    def grad_fn(q, k, v, dout, *, mask=None, bias=None, scale=None):
        assert q.ndim == 4
        if layout == "bnhd":
            q, k, v, dout = (np.swapaxes(a, 1, 2) for a in (q, k, v, dout))
            return tuple(np.swapaxes(g, 1, 2) for g in numpy_attention_grad(q, k, v, dout, mask=mask, bias=bias,
                                                                             scale=scale))  # fmt: skip
        return numpy_attention_grad(q, k, v, dout, mask=mask, bias=bias, scale=scale)

    return fn, grad_fn


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_a_four_d_kernel_gets_every_case_in_its_layout(layout):
    report = check_attention(*four_d_only(layout), dtype="float16", layout=layout)
    assert report.ok and not report.unsupported_cases and len(report.checks) == 4 * len(CASE_NAMES)
    # without the layout it fails on the cases that are not 4-D (an assertion: a failed row, not a crash)
    plain = check_attention(*four_d_only(layout), dtype="float16", cases=["plain", "batch and heads"])
    assert plain.failed_cases == ["plain"] or layout == "bnhd"
    # a kernel that reads (B, N, H, d) as (B, H, N, d) fails where H > 1 and N ≠ H
    confused = check_attention(*four_d_only("bhnd"), dtype="float16", layout="bnhd", cases=["batch and heads"])
    assert not confused.ok


def test_core_cases_that_never_ran_are_named_and_not_ok():
    # a kernel taking only N == M and no mask: the long sequences, the large logits and the masks never run
    report = check_attention(numpy_attention, unsupported={"N != M", "mask"})
    assert not report.ok and set(report.missing_core) == {"long sequence", "large logits", "masks"}
    text = str(report)
    head = next(line for line in text.splitlines() if line.startswith("CORE CASES NEVER RAN"))
    assert "long sequence (long sequence, 4096 keys, long query axis)" in head and "missing_ok=" in head
    assert "NOT OK: core cases never ran" in report.summary()
    accepted = check_attention(numpy_attention, unsupported={"N != M", "mask"},
                               missing_ok={"long sequence", "large logits", "masks"})  # fmt: skip
    assert accepted.ok and "core cases not run (accepted by missing_ok)" in str(accepted)
    # a chosen subset without core cases has nothing to miss
    assert check_attention(numpy_attention, cases=["plain"], unsupported={"mask"}).ok


# ---------------------------------------------------------------- the causal mask's alignment


def test_causal_mask_alignments():
    from attention_ref import causal_mask

    np.testing.assert_array_equal(causal_mask(3, 5), [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    bottom_right = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(causal_mask(3, 5, "bottom_right"), bottom_right)
    np.testing.assert_array_equal(causal_mask(4, 4, "top_left"), causal_mask(4, 4, "bottom_right"))
    assert not causal_mask(5, 3, "bottom_right")[:2].any()  # N > M: the first N − M queries see no key
    with pytest.raises(ValueError, match="alignment must be one of top_left, bottom_right"):
        causal_mask(3, 5, "top-left")
    with pytest.raises(TypeError, match="non-negative ints"):
        causal_mask(-1, 5)


@needs_torch
def test_top_left_is_torch_is_causal():
    import torch

    from attention_ref import attention_forward, causal_mask

    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 9, 4)), rng.standard_normal((1, 9, 3))
    want = torch.nn.functional.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=True)
    got, _ = attention_forward(q, k, v, mask=causal_mask(5, 9, "top_left"))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-12)


def test_the_layouts_shapes():
    seen = {}

    def record(q, k, v, *, mask=None, bias=None, scale=None):
        seen.setdefault("q", []).append(q.shape)
        seen.setdefault("mask", []).append(None if mask is None else mask.shape)
        return np.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)

    check_attention(record, cases=["batch and heads", "fully masked rows", "no leading dims", "key padding"],
                    layout="bnhd")  # fmt: skip
    # (B, H, N, d) → (B, N, H, d); one leading dim is the batch (H = 1); none: B = H = 1
    assert seen["q"] == [(2, 10, 3, 8), (2, 8, 1, 8), (1, 6, 1, 4), (2, 7, 3, 8)]
    # masks stay in the logits' (B, H, N, M) order, 4-D, size-1 axes kept
    assert seen["mask"] == [None, (2, 1, 8, 9), None, (2, 1, 1, 10)]
