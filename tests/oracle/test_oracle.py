"""The test oracle's rule: the battery, the tolerance and its policies, and correct implementations passing it.

The harness around it (reports, unsupported cases, usage errors, layouts): tests/oracle/test_oracle_harness.py.
"""

from __future__ import annotations

import numpy as np
import oracle_impls as impl
import oracle_kernels as kernels
import pytest
from conftest import needs_torch

from attention_ref.testing import (
    CASE_NAMES,
    DEFAULT_POLICY,
    Case,
    Policy,
    assert_attention_close,
    battery,
    check_attention,
    examples,
    from_torch,
    tolerance,
)
from attention_ref.testing.dtypes import DTYPES, eps, numpy_dtype
from attention_ref.testing.examples import numpy_attention, numpy_attention_grad
from attention_ref.testing.rounding import RoundingModel
from attention_ref.testing.tolerance import OUTPUTS, reference, simulate_attention_core, simulated_attention

LOW = ["float32", "float16", "bfloat16"]


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
    # causal with N < M in both alignments, which differ only when N ≠ M: top-left j ≤ i, bottom-right j ≤ i + M − N
    np.testing.assert_array_equal(cases["causal top-left N<M"].mask, np.tril(np.ones((10, 16), dtype=bool)))
    np.testing.assert_array_equal(cases["causal bottom-right N<M"].mask, np.tril(np.ones((10, 16), dtype=bool), k=6))
    assert cases["scale=0"].scale == 0.0 and "custom scale" in cases["scale=0"].features
    wide = cases["4096 keys"]  # Stable Diffusion's first level: a 64×64 latent, values of non-zero mean
    assert wide.k.shape[-2] == 4096 and abs(np.mean(wide.v) - 1.5) < 0.05 and wide.q.shape[-1] == wide.v.shape[-1]
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
        for arithmetic in ("fused", "eager"):
            r = RoundingModel("float64", np.random.default_rng(0))
            r.u = r.w = 0.0
            out, grads = simulate_attention_core(
                r, *(as64[n] for n in ("q", "k", "v", "dout", "bias")), case.mask, case.scale, arithmetic=arithmetic
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
    monkeypatch.setattr(tolerance, "_CACHE", type(tolerance._CACHE)())  # simulate again, not from the cache
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


FUSED_KERNELS = {
    "key by key": kernels.ordered_attention("sequential"),
    "tiled over 32 keys": kernels.tiled_attention(32),
    "two-pass forward": kernels.lse_attention("two-pass"),
    "split-K merged by lse": kernels.lse_attention("split-k"),
    "backward from lse, D = ΣP∘dP": kernels.lse_attention(d_from="ΣP∘dP"),
}


@pytest.mark.parametrize("dtype", [*LOW, "float64"])
@pytest.mark.parametrize("name", list(FUSED_KERNELS))
def test_fused_kernels_pass(name, dtype):
    # every sum key by key; FlashAttention's tiles; and the logsumexp formulations: P = exp(S − lse) from an lse
    # kept in float32, in a second pass, in split-K merged by lse, and in the backward with D = Σ P∘dP
    assert assert_attention_close(*FUSED_KERNELS[name], dtype=dtype).worst_ratio() < 0.5


@pytest.mark.parametrize("dtype", [*LOW, "float64"])
def test_eager_code_passes_the_eager_policy(dtype):
    # every op's result rounded to the dtype, and the backward through m = max S, which leaves a rounding residue
    # on each row's argmax entry
    report = assert_attention_close(*kernels.eager_attention(), dtype=dtype, policy="eager")
    assert report.worst_ratio() < 0.5 and report.policy == "eager" and "eager policy" in report.summary()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_eager_code_fails_the_fused_policy_and_is_told_why(dtype):
    report = check_attention(*kernels.eager_attention(), dtype=dtype)
    assert not report.ok and "fused policy" in report.summary()
    # the logits rounded to the dtype move by w·|S| where |S| is in the hundreds: that is what fused kernels avoid
    assert {"large logits", "large logits masked"} & set(report.failed_cases)
    hint = [n for n in report.notes if "fails the fused policy but passes eager" in n]
    assert len(hint) == 1 and "policy='eager'" in hint[0] and "\n" not in hint[0] and hint[0] in str(report)
    # a wrong formula gets no such excuse
    assert not any("passes eager" in n for n in check_attention(impl.wrong_scale, dtype=dtype).notes)


def test_in_float32_and_float64_eager_code_is_fused_code():
    for dtype in ("float32", "float64"):
        assert check_attention(*kernels.eager_attention(), dtype=dtype).ok


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
    assert report.worst_ratio() < 0.5 and report.policy == "fused"
    no_scale = ["mask+bias+scale", "custom scale", "scale=0"]
    assert report.unsupported_cases == (no_scale if peer == "torch_mha" else [])


@needs_torch
@pytest.mark.parametrize("dtype", [*LOW, "float64"])
def test_autograd_through_an_undetached_max_shift_passes(dtype):
    # the residue of −Σ_k dS_k lands on one key's dk: before the model drew it, long sequence failed at 6.9
    # (float16), 3.8 (bfloat16) and up to 1.4 (float32, re-seeded); on 4096 keys in float16 the division's backward
    # runs through subnormal numbers and the residue grows (1.36 before the model drew that)
    policy = "eager" if dtype in ("float16", "bfloat16") else "fused"  # in float32/64 eager code is fused code
    report = assert_attention_close(*from_torch(kernels.torch_eager_attention), dtype=dtype, policy=policy)
    assert report.worst_ratio() < 0.5


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


# ---------------------------------------------------------------- policies and the rule's parts


def test_the_default_policy_is_fused_and_every_report_names_its_policy():
    assert DEFAULT_POLICY.arithmetic == "fused" and DEFAULT_POLICY.name == "fused"
    fused = check_attention(numpy_attention, cases=["plain"])
    eager = check_attention(numpy_attention, cases=["plain"], policy="eager")
    assert fused.policy == "fused" and "in float32, fused policy:" in fused.summary()
    assert eager.policy == "eager" and "in float32, eager policy:" in str(eager)
    assert check_attention(numpy_attention, cases=["plain"], policy=Policy("eager")).policy == "eager"
    custom = Policy("fused", samples=4)
    assert (
        custom.name == "fused (custom constants)"
        and check_attention(numpy_attention, cases="plain", policy=custom).policy == custom.name
    )
    assert all(c.policy == "fused" for c in fused.checks)
    with pytest.raises(ValueError, match="arithmetic must be one of fused, eager"):
        Policy("lazy")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_logits_are_float32_eager_logits_are_the_dtype(dtype):
    # |S| in the hundreds: stored in the dtype it moves by w·|S| (bfloat16: up to 1), in float32 by 3e-5. The eager
    # allowance on the large-logits case is many times the fused one; elsewhere the two are alike
    for name, factor in (("large logits", 5), ("plain", 0.5)):
        fused, eager = (reference(by_name(name), dtype, p).kernel_error["out"] for p in ("fused", "eager"))
        assert eager > factor * fused, (name, fused, eager)


def test_the_output_s_own_last_rounding_is_deducted_exactly():
    from attention_ref.testing.dtypes import half_spacing
    from attention_ref.testing.harness import compare_output

    # half the dtype's spacing at the value returned, the most that rounding to nearest can have moved it
    for dtype in DTYPES:
        x = np.array([0.0, 1e-30, 6e-5, 1.0, 1.5, 2.0, -3.0, 500.0]).astype(numpy_dtype(dtype))
        x = x[np.isfinite(x.astype(np.float64))]
        want = np.array([np.spacing(np.abs(a)) for a in x]).astype(np.float64) / 2
        np.testing.assert_array_equal(half_spacing(x.astype(np.float64), dtype), want)
    # an exact value rounded to float16 is within half a spacing: error 0; one more ulp is not
    exact = np.array([1.0 + 2**-12, 3.0 + 2**-9])  # halfway-ish between float16 numbers
    got = exact.astype(np.float16)
    same = compare_output("c", "out", got, exact, 1e-9, 1.0, "float16", last_rounding=True)
    assert same.error == 0 and same.ok
    off = compare_output("c", "out", np.nextafter(got, np.float16(10)), exact, 1e-9, 1.0, "float16",
                         last_rounding=True)  # fmt: skip
    assert off.error > 0 and not off.ok
    plain = compare_output("c", "out", got, exact, 1e-9, 1.0, "float16")
    assert plain.error > 0  # without the deduction the rounding itself counts


def test_the_argmax_residue_is_allowed_only_on_the_keys_it_reaches():
    # autograd through an un-detached max puts −Σ_k dS_k on each row's largest logit: only those keys' dk get room
    # for it, the other 1020 keys of the long sequence keep a tight allowance (dK = 0 on them is caught)
    ref = reference(by_name("long sequence"), "float16", "eager")
    rest, reach = ref.groups["dk"]
    assert reach.label == "argmax keys" and rest.label == ""
    assert 1 <= reach.where[..., 0].sum() <= 4 and not np.any(rest.where & reach.where)
    assert np.all(rest.where | reach.where) and reach.kernel_error > 20 * rest.kernel_error
    assert [g.where for g in ref.groups["dq"]] == [None]  # the residue reaches every dq row: one group


def test_a_rounding_to_the_dtype_moves_a_subnormal_by_half_a_subnormal_spacing():
    r = RoundingModel("float16", np.random.default_rng(0))
    x = np.full(20000, 1e-6)  # float16's subnormals are 6e-8 apart: w·|x| = 5e-10 would be far too small
    moved = np.abs(r.rel(x, r.w) - x)
    assert 0.9 * 2.0**-25 < moved.max() <= 2.0**-25 and np.all(r.rel(np.zeros(3), r.w) == 0)
    big = np.full(20000, 3.0)
    assert np.abs(r.rel(big, r.w) - big).max() <= 3.0 * 2.0**-11


def test_references_are_kept_per_numbers_dtype_and_policy():
    case = by_name("plain")
    a, b = reference(case, "float16"), reference(by_name("plain"), "float16")
    assert a is b  # the same numbers: simulated once
    assert reference(case, "float16", "eager") is not a and reference(case, "bfloat16") is not a
    with pytest.raises(ValueError, match="read-only"):
        a.exact["out"][...] = 0
    moved = Case("plain", case.q + 1.0, case.k, case.v)
    assert reference(moved, "float16") is not a  # same name, other numbers: another reference
