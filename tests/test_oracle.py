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
    NotSupported,
    Policy,
    assert_attention_close,
    battery,
    check_attention,
    examples,
    from_torch,
    tolerance,
)
from attention_ref.testing.dtypes import eps, numpy_dtype
from attention_ref.testing.examples import numpy_attention, numpy_attention_grad
from attention_ref.testing.rounding import RoundingModel
from attention_ref.testing.tolerance import OUTPUTS, reference, simulate_attention_core, simulated_attention

LOW = ["float32", "float16", "bfloat16"]
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def by_name(name: str) -> Case:
    return next(c for c in battery() if c.name == name)


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


def test_a_case_refuses_non_finite_and_empty_inputs():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    for name, bad in [("q", q), ("k", k), ("v", v)]:
        for value in (np.nan, np.inf):
            arrays = {"q": q, "k": k, "v": v}
            arrays[name] = bad.copy()
            arrays[name][0, 0] = value
            with pytest.raises(ValueError, match=f"{name} (holds NaN or Inf|has an infinite entry)"):
                Case("bad", **arrays)
    dout = np.ones((3, 2))
    dout[1, 1] = np.nan
    with pytest.raises(ValueError, match="dout holds NaN or Inf"):
        Case("bad", q, k, v, dout=dout)
    for value in (np.nan, np.inf):
        with pytest.raises(ValueError, match="bias holds NaN or Inf"):
            Case("bad", q, k, v, bias=np.full((3, 5), value))
    Case("fine", q, k, v, bias=np.full((3, 5), -np.inf))  # a bias of -inf drops keys, as a mask does
    with pytest.raises(ValueError, match=r"case 'empty': q of shape \(0, 4\) has no entries"):
        Case("empty", q[:0], k, v)


def test_inputs_that_overflow_the_dtype_are_the_case_s_error():
    rng = np.random.default_rng(0)
    big = Case("big", 1e6 * rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2)))
    with pytest.raises(ValueError, match=r"case 'big': q does not fit in float16: .* rounds to inf"):
        check_attention(numpy_attention, dtype="float16", cases=[big])
    assert check_attention(numpy_attention, dtype="float32", cases=[big]).checks  # fits in float32


def test_a_bias_row_of_minus_inf_is_a_fully_masked_row():
    rng = np.random.default_rng(0)
    bias = rng.standard_normal((4, 5))
    bias[2] = -np.inf
    case = Case("dead bias row", rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal((5, 3)),
                bias=bias)  # fmt: skip
    assert case.dead_rows.tolist() == [False, False, True, False] and "fully masked rows" in case.features
    assert not check_attention(impl.nan_on_fully_masked_rows, cases=[case]).ok
    assert check_attention(impl.nan_on_fully_masked_rows, cases=[case], masked_rows="nan-ok").ok


def test_user_cases_and_subsets():
    rng = np.random.default_rng(0)
    mine = Case("mine", rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal((4, 2)))
    report = check_attention(numpy_attention, grad_fn=numpy_attention_grad, cases=["causal", mine])
    assert [c.case for c in report.checks] == ["causal"] * 4 + ["mine"] * 4 and report.ok


# ---------------------------------------------------------------- tolerance policy


def test_reference_rounds_inputs_and_takes_its_yardstick_from_simulated_kernels():
    case = by_name("plain")
    ref = reference(case, "bfloat16")
    assert ref.inputs["q"].dtype == numpy_dtype("bfloat16") and ref.exact["out"].dtype == np.float64
    # the float64 reference is computed from the rounded inputs, so it differs from the unrounded one
    assert not np.array_equal(ref.inputs["q"].astype(np.float64), case.q)
    for o in OUTPUTS:
        # the yardstick: the RMS over the policy's samples of each simulated kernel's largest error
        rng = np.random.default_rng(tolerance._case_seed(case.name, "bfloat16"))
        errors = [np.max(np.abs(simulated_attention(ref.inputs, "bfloat16", rng)[o] - ref.exact[o])) for _ in range(8)]
        assert ref.kernel_error[o] == pytest.approx(np.sqrt(np.mean(np.square(errors))), rel=1e-12)
        # a bfloat16 kernel's error is a few of bfloat16's units, not more
        assert eps("bfloat16") * ref.magnitude[o] / 20 < ref.kernel_error[o] < 20 * eps("bfloat16") * ref.magnitude[o]
        assert ref.magnitude[o] >= np.max(np.abs(ref.exact[o]))


def test_without_rounding_the_simulated_kernel_is_the_reference():
    # u = w = 0: every error the model draws is 0, and what is left must be the reference's computation itself
    for name in ("mask+bias+scale", "fully masked rows", "cross-attention", "large logits"):
        case = by_name(name)
        ref = reference(case, "float64")
        as64 = {
            n: None if ref.inputs[n] is None else ref.inputs[n].astype(np.float64)
            for n in ("q", "k", "v", "dout", "bias")
        }
        r = RoundingModel("float64", np.random.default_rng(0))
        r.u = r.w = 0.0
        out, grads = simulate_attention_core(
            r, *(as64[n] for n in ("q", "k", "v", "dout", "bias")), case.mask, case.scale
        )
        for o, x in {"out": out, **grads}.items():
            np.testing.assert_allclose(
                x, ref.exact[o], rtol=0, atol=1e-12 * (1 + np.max(np.abs(ref.exact[o]))), err_msg=o
            )


def test_a_sum_error_has_the_any_order_size():
    # √n·u·Σ|terms| per sum: its draws have exactly that standard deviation
    r = RoundingModel("float32", np.random.default_rng(1))
    x = np.abs(np.random.default_rng(2).standard_normal((4000, 100)))
    draws = r.sum(x)[:, 0] - np.sum(x, axis=-1)
    sigma = np.sqrt(100) * 2.0**-24 * np.sum(x, axis=-1)
    assert np.std(draws / sigma) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("dtype", [*LOW, "float64"])
def test_the_allowance_barely_depends_on_the_float64_sum_order(dtype, monkeypatch):
    # the yardstick is float64 arithmetic plus seeded draws; another BLAS (another order of the float64 sums)
    # moves it by float64 rounding: nothing next to the draws of a float32/16/bf16 kernel's rounding, but the
    # draws of a float64 kernel are themselves of float64's size, so there the allowance moves by a few %
    cases = ["long sequence", "large logits", "cross-attention", "odd sizes"]
    before = [reference(by_name(n), dtype).kernel_error[o] for n in cases for o in OUTPUTS]

    def einsum_matmul(self, a, b, factor=1.0):  # NumPy's own loop instead of the BLAS: another summation order
        exact = np.einsum("...ij,...jk->...ik", a, b, optimize=False)
        return exact + self.sum_error(np.abs(a) @ np.abs(b), a.shape[-1], factor)

    monkeypatch.setattr(RoundingModel, "matmul", einsum_matmul)
    after = [reference(by_name(n), dtype).kernel_error[o] for n in cases for o in OUTPUTS]
    change = np.max(np.abs(np.subtract(after, before)) / np.asarray(before))
    if dtype == "float64":
        assert 0 < change < 0.1  # measured: up to 3 % (AMD EPYC Zen 4, OpenBLAS)
    else:
        assert change <= 1e-6  # measured: ~1e-10


def test_allowed_error_is_c_times_the_yardstick_plus_floor():
    ref = reference(by_name("plain"), "float16")
    allowed, floor = DEFAULT_POLICY.allowed("dq", ref.magnitude["dq"], ref.kernel_error["dq"], "float16")
    assert floor == DEFAULT_POLICY.floor["dq"] * eps("float16") * ref.magnitude["dq"]
    assert allowed == DEFAULT_POLICY.c["dq"] * ref.kernel_error["dq"] + floor
    with pytest.raises(ValueError, match="keys"):
        Policy(c={"out": 1.0})
    with pytest.raises(ValueError, match="samples"):
        Policy(samples=1)


def test_a_flash_style_backward_passes_where_the_exact_gradient_is_zero():
    # With one key every weight is 1 and dq = 0 exactly. FlashAttention's backward computes D_i = dO_i · O_i from
    # the rounded output, so its dq is a rounding error away from 0. A rule "c × the error of one low-precision
    # run" fails it whenever that run happens to be exact; the simulated kernels include that rounding of O (and
    # the floor would cover it too), so the allowance is not 0.
    one_key = by_name("M=1")
    ref = reference(one_key, "float32")
    assert not np.any(ref.exact["dq"]) and ref.kernel_error["dq"] > 0
    no_floor = Policy(floor=dict.fromkeys(OUTPUTS, 0.0))
    for policy in (DEFAULT_POLICY, no_floor):
        report = check_attention(None, impl.flash_style_grad, dtype="float32", cases=["M=1"], policy=policy)
        assert report.ok and report.worst_ratio("dq") > 0


# ---------------------------------------------------------------- correct implementations pass


@pytest.mark.parametrize("dtype", LOW)
def test_a_correct_numpy_implementation_passes(dtype):
    report = assert_attention_close(numpy_attention, grad_fn=numpy_attention_grad, dtype=dtype)
    assert len(report.checks) == 4 * len(CASE_NAMES) and report.worst_ratio() < 0.5


@pytest.mark.parametrize("dtype", LOW)
def test_a_blocked_online_softmax_and_flash_style_rounding_pass(dtype):
    assert check_attention(impl.blocked, dtype=dtype).ok
    assert check_attention(impl.p_rounded_to_dtype, grad_fn=impl.flash_style_grad, dtype=dtype).ok


@pytest.mark.parametrize("dtype", [*LOW, "float64"])
@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(impl.ordered_attention("sequential"), id="key by key"),
        pytest.param(impl.tiled_attention(32), id="tiled over 32 keys"),
        pytest.param(impl.eager_attention(), id="eager, autograd through the max shift"),
    ],
)
def test_a_key_by_key_and_a_tiled_kernel_pass(kernel, dtype):
    # the orders that a BLAS-measured yardstick rejected: every sum key by key, and FlashAttention's tiles; and
    # eager code whose backward runs through m = max S, leaving a rounding residue on each row's argmax entry
    assert assert_attention_close(*kernel, dtype=dtype).worst_ratio() < 0.5


def test_float64_is_strict_a_float32_computation_fails_it():
    report = check_attention(numpy_attention, dtype="float64", cases=["plain"])
    assert not report.ok and report.worst_ratio() > 1e6


# ---------------------------------------------------------------- torch


TORCH_PEERS = ["torch_sdpa", "torch_sdpa_math", "torch_sdpa_flash", "torch_mha"]


@needs_torch
@pytest.mark.parametrize("dtype", [*LOW, "float64"])
@pytest.mark.parametrize("peer", TORCH_PEERS)
def test_torch_attentions_pass(peer, dtype):
    # SDPA as PyTorch picks the backend, pinned to MATH and to the CPU FlashAttention kernel, and
    # F.multi_head_attention_forward: forward and autograd backward, every case each one takes
    report = assert_attention_close(*from_torch(getattr(examples, peer)), dtype=dtype)
    assert report.worst_ratio() < 0.5
    assert report.unsupported_cases == (["mask+bias+scale", "custom scale"] if peer == "torch_mha" else [])


def manual_softmax_attention(q, k, v, *, mask=None, bias=None, scale=None):
    """Eager PyTorch attention with the softmax written out and the max shift *not* detached: autograd sends
    −Σ_k dS_k (zero up to rounding) through ``amax`` to each row's largest logit."""
    import torch

    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s if bias is None else s + bias
    s = s if mask is None else s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total) @ v


@needs_torch
@pytest.mark.parametrize("dtype", [*LOW, "float64"])
def test_autograd_through_an_undetached_max_shift_passes(dtype):
    # the residue of −Σ_k dS_k lands on one key's dk: before the model drew it, long sequence failed at 6.9
    # (float16), 3.8 (bfloat16) and up to 1.4 (float32, re-seeded)
    assert assert_attention_close(*from_torch(manual_softmax_attention), dtype=dtype).worst_ratio() < 0.5


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
    with pytest.raises(TypeError, match=r"policy must be a Policy \(attention_ref.testing.Policy"):
        check_attention(numpy_attention, policy={"c": 3.0})


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
