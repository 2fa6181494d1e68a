"""Property-based tests: for any input, a public function gives the right answer or a documented error.

"Right" is an independent float64 reference written here (softmax, logsumexp, attention), or the same
call in float64 (``bad_input_table.run_case``); "documented" is a ``ValueError``, ``TypeError`` or
``MemoryError`` raised by attention_ref's own checks, naming the argument (docs/numerics.md, "Errors").
Never another exception, never a silently wrong value.

The examples are drawn with a fixed seed (``derandomize=True``), so a run is reproducible, and in a
bounded number, so it stays fast. A new public function joins by a row in ``bad_input_table.SPECS``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from bad_input_table import DOCUMENTED, all_specs, cases, classify_error, run_case
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import attention_ref as ar

SETTINGS = settings(
    max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
FLOATS = (np.float16, np.float32, np.float64)
TOLERANCE = {np.float16: 2e-2, np.float32: 1e-5, np.float64: 1e-12}


# ---------------------------------------------------------------- every case of the table


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_every_case_of_the_table_is_right_or_a_clear_error(spec):
    """The probe of scripts/probe_bad_input.py, one function at a time: no silent wrong answer, no internal error."""
    bad = [(case.what, v.kind, v.detail) for case in cases(spec) for v in [run_case(case)] if v.kind in _BAD]
    assert not bad, bad


_BAD = ("silent wrong", "internal error")


@SETTINGS
@given(data=st.data())
def test_the_tables_cases_on_other_inputs(data):
    """The same variations on other random inputs (another seed of every valid call)."""
    spec = data.draw(st.sampled_from(all_specs()), label="function")
    seed = data.draw(st.integers(1, 2**16), label="seed")
    case = data.draw(st.sampled_from(list(cases(spec, seed))), label="variation")
    verdict = run_case(case)
    assert verdict.kind not in _BAD, (spec.name, case.what, verdict.detail)


# ---------------------------------------------------------------- softmax and logsumexp: shapes, dtypes, axes, values


def _reference_softmax(x: np.ndarray, axis: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(softmax, logsumexp)`` in float64 by the documented rules (masked and empty rows, NaN, ±inf)."""
    x = np.where(True if mask is None else mask, x.astype(np.float64), -np.inf)
    with np.errstate(all="ignore"):
        top = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
        shift = np.where(np.isfinite(top), top, 0.0)
        e = np.exp(x - shift)
        total = np.sum(e, axis=axis, keepdims=True)
        p = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
        lse = np.where(total > 0, shift + np.log(np.where(total > 0, total, 1.0)), -np.inf)
        row_has_inf = np.any(x == np.inf, axis=axis, keepdims=True)
        row_has_nan = np.any(np.isnan(x), axis=axis, keepdims=True)
        p = np.where(row_has_inf | row_has_nan, np.nan, p)
        lse = np.where(row_has_nan, np.nan, np.where(row_has_inf, np.inf, lse))
    return p, lse


def _same(got: np.ndarray, want: np.ndarray, dtype: type, conditioning: float = 1.0) -> bool:
    """``got`` equals ``want`` where it is NaN or infinite, and to the dtype's tolerance elsewhere, scaled by
    ``conditioning`` (how much the inputs' rounding can move the result: large logits move a softmax)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
        return False
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]):
        return False
    scale = max(1.0, float(np.max(np.abs(want[finite]), initial=0.0)))
    return bool(np.all(np.abs(got[finite] - want[finite]) <= TOLERANCE[dtype] * scale * conditioning))


_values = st.one_of(
    st.floats(-30, 30, width=16), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e4, -1e4])
)
_axes = st.one_of(st.integers(-4, 4), st.none(), st.just(1.0), st.just((0, 1)), st.booleans(), st.just(np.int64(0)))


@SETTINGS
@given(
    dtype=st.sampled_from(FLOATS),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    axis=_axes,
    with_mask=st.booleans(),
    data=st.data(),
)
def test_softmax_and_logsumexp_are_right_or_refuse_naming_the_argument(dtype, shape, axis, with_mask, data):
    x = data.draw(hnp.arrays(dtype, shape, elements=_values), label="x")
    mask = None
    if with_mask:
        # a mask of x's shape with some axes broadcast (size 1), or one that does not fit
        mask_shape = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 4]), max_size=3).map(tuple), label="mask shape")
        mask = data.draw(hnp.arrays(np.bool_, mask_shape), label="mask")
    good_axis = not isinstance(axis, bool) and isinstance(axis, (int, np.integer)) and -x.ndim <= axis < x.ndim
    try:
        mask_fits = mask is None or (
            mask.ndim <= x.ndim and np.broadcast_shapes(mask.shape, x.shape) == x.shape
        )
    except ValueError:
        mask_fits = False
    for name, function in (("softmax", lambda: ar.softmax_forward(x, axis=axis, mask=mask)[0]),
                           ("logsumexp", lambda: ar.ops.logsumexp(x, axis=axis, mask=mask))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning, whatever the values
            try:
                got = function()
            except DOCUMENTED as err:
                verdict = classify_error(err, "axis" if not good_axis else "mask")
                assert verdict.kind in ("clear error", "vague error"), verdict.detail
                assert not (good_axis and mask_fits), f"{name} refused a valid call: {err}"
                continue
        assert good_axis and mask_fits, f"{name} accepted axis={axis!r}, mask {None if mask is None else mask.shape}"
        p, lse = _reference_softmax(x, int(axis), mask)
        want = p if name == "softmax" else np.squeeze(lse, axis=int(axis))
        assert got.dtype == dtype and _same(got, want, dtype), (name, x, got, want)


# ---------------------------------------------------------------- attention: shapes incl. 0, broadcast masks and biases


def _reference_attention(q, k, v, mask, bias, scale):
    """Exact attention in float64, by the documented rules (fully masked rows give 0)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if bias is not None:
        logits = logits + bias.astype(np.float64)
    p, _ = _reference_softmax(logits, -1, mask)
    return p @ v


def _largest(a: np.ndarray) -> float:
    """The largest finite magnitude in ``a`` (0 for none)."""
    a = np.abs(a.astype(np.float64))
    return float(np.max(a[np.isfinite(a)], initial=0.0))


def _fitting_shape(draw, target: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``target``: some leading axes dropped, some axes 1."""
    drop = draw(st.integers(0, len(target)))
    return tuple(1 if draw(st.booleans()) else n for n in target[drop:])


@SETTINGS
@given(
    dtype=st.sampled_from(FLOATS),
    sizes=st.tuples(*(st.integers(0, 3) for _ in range(5))),  # B, N, M, d, dv
    extras=st.sampled_from(["none", "mask", "bias", "both"]),
    poison=st.sampled_from(["none", "nan q", "inf q", "inf k", "-inf v", "large"]),
    chunked=st.booleans(),
    scale=st.one_of(st.none(), st.floats(-2, 2), st.sampled_from([np.nan, np.inf, True, "1"])),
    data=st.data(),
)
def test_attention_is_right_or_refuses_naming_the_argument(dtype, sizes, extras, poison, chunked, scale, data):
    B, N, M, d, dv = sizes
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((B, N, d), (B, M, d), (B, M, dv)))
    if poison == "large":
        q, k = np.full_like(q, 300), np.full_like(k, -300)  # logits of ±90,000·d: beyond float16
    elif poison != "none" and q.size and k.size and v.size:
        value, name = poison.split()
        target = {"q": q, "k": k, "v": v}[name]
        target.reshape(-1)[0] = float(value)
    target = (B, N, M)
    mask = bias = None
    if extras in ("mask", "both"):
        mask = rng.random(_fitting_shape(data.draw, target)) < 0.7
    if extras in ("bias", "both"):
        bias = rng.standard_normal(_fitting_shape(data.draw, target)).astype(dtype)
    forward = ar.chunked_attention_forward if chunked else ar.attention_forward
    backward = ar.chunked_attention_backward if chunked else ar.attention_backward
    options = {"block_size": 2} if chunked else {}
    infinite = any(np.isinf(a).any() for a in (q, k, v))
    bad_scale = isinstance(scale, (bool, str)) or (scale is not None and not math.isfinite(scale))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            out, cache = forward(q, k, v, mask=mask, bias=bias, scale=scale, **options)
        except DOCUMENTED as err:
            named = "scale" if bad_scale else ("q", "k", "v")
            assert classify_error(err, "").kind == "clear error", err
            assert bad_scale or infinite, f"refused a valid call: {err}"
            assert any(n in str(err) for n in named), err
            return
        assert not (bad_scale or infinite), "accepted an infinite input or a bad scale"
        used_scale = 1 / math.sqrt(d) if scale is None and d else 1.0 if scale is None else scale
        want = _reference_attention(q, k, v, mask, bias, used_scale)
        # a logit of size L is rounded by L·u, which moves the weights by as much
        logits = abs(used_scale) * _largest(q) * _largest(k) * d + (_largest(bias) if bias is not None else 0.0)
        conditioning = 1.0 + logits * float(np.finfo(dtype).eps) / TOLERANCE[dtype]
        assert out.dtype == dtype and _same(out, want, dtype, conditioning), (out, want)
        dout = rng.standard_normal(out.shape).astype(dtype)
        grads = backward(dout, cache)
        assert {g.dtype for g in grads.values()} == {np.dtype(dtype)}
        if poison == "none":
            assert all(np.all(np.isfinite(g)) for g in grads.values())
        with pytest.raises(TypeError, match="dout has dtype int64"):
            backward(dout.astype(np.int64), cache)


# ---------------------------------------------------------------- block options


_ints = st.one_of(st.integers(-1, 5), st.sampled_from([2.0, True, None, "2", np.int64(2)]))
_reals = st.one_of(st.floats(-1, 1), st.sampled_from([0.0, np.nan, np.inf, True, None, "1e-5", np.float32(1e-5)]))


#: what :func:`_right_or_refused` returns when the call was refused (as it had to be)
REFUSED = object()


def _right_or_refused(call, invalid: list[str]):
    """``call()``'s result, or :data:`REFUSED`: a call must be refused exactly when ``invalid`` names an argument,
    with a clear error naming one of them, and must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            result = call()
        except DOCUMENTED as err:
            event("refused")
            assert invalid, f"refused a valid call: {err}"
            assert classify_error(err, "").kind == "clear error", err
            assert any(name in str(err) for name in invalid), (invalid, err)
            return REFUSED
    event("computed")
    assert not invalid, f"accepted {invalid}"
    return result


def _positive_int(n) -> bool:
    return not isinstance(n, bool) and isinstance(n, (int, np.integer)) and n >= 1


def _real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.floating)) and math.isfinite(x)


@SETTINGS
@given(heads=_ints, groups=_ints, eps=_reals, rescale=_reals)
def test_block_options_are_used_or_refused_naming_them(heads, groups, eps, rescale):
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 8))
    params = ar.init_self_attention(8, heads=2, groups=4, rng=0)
    invalid = [
        name
        for name, ok in (
            ("heads", _positive_int(heads) and 8 % heads == 0),
            ("groups", _positive_int(groups) and 8 % groups == 0),
            ("eps", _real(eps) and eps >= 0),
            ("rescale", _real(rescale) and rescale != 0),
        )
        if not ok
    ]
    result = _right_or_refused(
        lambda: ar.self_attention_forward(x, params, heads=heads, groups=groups, eps=eps, rescale=rescale), invalid
    )
    if result is REFUSED:
        return
    y, _ = result
    canonical = {"heads": int(heads), "groups": int(groups), "eps": float(eps), "rescale": float(rescale)}
    want, _ = ar.self_attention_forward(x, params, **canonical)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, want)


# ---------------------------------------------------------------- the diffusion transformers' pieces


def _reference_angles(positions: np.ndarray, axes_dims: tuple[int, ...], theta: float) -> np.ndarray:
    """``(N, d/2)`` angles ``p_{n,a} / θ^(2i/D_a)``, axis by axis, in float64 (the interleaved layout's pairs)."""
    columns = []
    for a, D in enumerate(axes_dims):
        for i in range(D // 2):
            columns.append(positions[:, a].astype(np.float64) / float(theta) ** (2 * i / D))
    return np.stack(columns, axis=-1) if columns else np.zeros((len(positions), 0))


_dims = st.one_of(st.integers(-2, 8), st.sampled_from([2.0, True, None, "4", np.int64(4)]))


# valid draws as often as invalid ones (each invalid value alone must be refused)
_even = st.lists(st.sampled_from([2, 4, 6, 8, np.int64(4)]), min_size=1, max_size=3).map(tuple)


@SETTINGS
@given(
    axes_dims=st.one_of(_even, _even, st.lists(_dims, max_size=3).map(tuple), st.sampled_from([None, 4, "44"])),
    theta=st.one_of(
        st.floats(0.5, 1e5),
        st.floats(0.5, 1e5),
        st.floats(-10, 1e5),
        st.sampled_from([0.0, np.nan, np.inf, True, None, "1e4", np.float32(500)]),
    ),
    n=st.integers(0, 4),
    dtype=st.sampled_from([np.int64, np.int32, np.float32, np.float64, np.bool_, np.complex128]),
    data=st.data(),
)
def test_rope_angles_are_right_or_refuse_naming_the_argument(axes_dims, theta, n, dtype, data):
    A = len(axes_dims) if isinstance(axes_dims, tuple) else 2
    columns = data.draw(st.sampled_from([A, A, A, A + 1]), label="columns")
    positions = np.random.default_rng(n).integers(0, 9, (n, columns)).astype(dtype)
    bad = []
    if not isinstance(axes_dims, tuple) or not axes_dims or not all(
        _positive_int(D) and D % 2 == 0 for D in axes_dims
    ):
        bad.append("axes_dims")
    if not (_real(theta) and theta > 0):
        bad.append("theta")
    if dtype in (np.bool_, np.complex128) or columns != A:
        bad.append("positions")
    result = _right_or_refused(lambda: ar.ops.rope_angles(positions, axes_dims, theta), bad)
    if result is REFUSED:
        return
    cos, sin = result
    angles = _reference_angles(positions, tuple(int(D) for D in axes_dims), float(theta))
    np.testing.assert_allclose(cos, np.repeat(np.cos(angles), 2, axis=-1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sin, np.repeat(np.sin(angles), 2, axis=-1), rtol=1e-12, atol=1e-12)


_patch = st.one_of(
    st.integers(1, 2),
    st.tuples(st.integers(1, 3), st.integers(1, 2)),
    st.integers(-1, 4),
    st.tuples(st.integers(0, 4), st.integers(0, 4)),
    st.sampled_from([2.0, True, None, "2", (2,), (2, 2.0), np.int64(2)]),
)


@SETTINGS
@given(
    shape=st.tuples(st.integers(0, 2), st.integers(0, 6), st.integers(0, 6), st.integers(0, 3)),
    patch=_patch,
    order=st.sampled_from(["pqc", "cpq"]),
)
def test_patchify_moves_every_pixel_or_refuses_naming_the_argument(shape, patch, order):
    x = np.random.default_rng(0).standard_normal(shape)
    sizes = (patch, patch) if not isinstance(patch, tuple) else patch
    valid_patch = len(sizes) == 2 and all(_positive_int(p) for p in sizes)
    B, H, W, C = shape
    invalid = ["patch"] if not valid_patch or H % sizes[0] or W % sizes[1] else []
    result = _right_or_refused(lambda: ar.ops.patchify_forward(x, patch, channel_order=order), invalid)
    if result is REFUSED:
        return
    tokens, cache = result
    p_h, p_w = (int(p) for p in sizes)
    h, w = H // p_h, W // p_w
    assert tokens.shape == (B, h * w, p_h * p_w * C)
    # every pixel where the module's formula puts it, entry by entry
    for b, row, col, c in np.ndindex(*shape):
        i, u, j, v = row // p_h, row % p_h, col // p_w, col % p_w
        channel = (u * p_w + v) * C + c if order == "pqc" else (c * p_h + u) * p_w + v
        assert tokens[b, i * w + j, channel] == x[b, row, col, c]
    back, _ = ar.ops.unpatchify_forward(tokens, (h, w), patch, channel_order=order) if h and w else (x, None)
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(ar.ops.patchify_backward(tokens, cache)["x"], x)


@SETTINGS
@given(
    heads=st.one_of(st.just(2), st.just(np.int64(2)), _ints),
    eps=st.one_of(st.floats(0, 1), _reals),
    order=st.sampled_from(["image_first", "text_first"] * 2 + ["image", None, 1]),
)
def test_joint_attention_options_are_used_or_refused_naming_them(heads, eps, order):
    rng = np.random.default_rng(0)
    x, context = rng.standard_normal((1, 3, 8)), rng.standard_normal((1, 2, 6))
    params = ar.blocks.init_joint_attention(8, 6, heads=2, head_dim=2, qk_norm="rms_norm", rng=0)
    invalid = [
        name
        for name, ok in (
            ("heads", _positive_int(heads) and heads == 2),  # the q/k norms' scales are (head_dim,) = (2,)
            ("eps", _real(eps) and eps >= 0),
            ("order", order in ("image_first", "text_first")),
        )
        if not ok
    ]
    options = {"heads": heads, "eps": eps, "order": order, "qk_norm": "rms_norm"}
    result = _right_or_refused(lambda: ar.blocks.joint_attention_forward(x, context, params, **options), invalid)
    if result is REFUSED:
        return
    (y, y_context), _ = result
    canonical = {"heads": int(heads), "eps": float(eps), "order": order}
    (want, want_context), _ = ar.blocks.joint_attention_forward(x, context, params, qk_norm="rms_norm", **canonical)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(y_context))
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y_context, want_context)
