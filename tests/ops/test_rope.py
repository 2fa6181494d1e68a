"""Rotary position embedding: the angles against diffusers' Flux and Wan tables, the rotation against complex
multiplication and diffusers' apply_rotary_emb (with autograd), finite differences, identities (norms kept,
offsets only, the backward the inverse rotation), backends, and the inputs it refuses."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.ops import rope_angles, rope_backward, rope_forward

FD_TOL = 1e-7
HAS_DIFFUSERS = HAS_TORCH and importlib.util.find_spec("diffusers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="torch and diffusers are not installed")
PAIRS = ["interleaved", "halves"]


def flux_ids(M: int, h: int, w: int) -> np.ndarray:
    """Flux's ids: text tokens (0, 0, 0), then image tokens (0, row, col) row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([np.zeros(h * w), rows.ravel(), cols.ravel()], axis=-1)
    return np.concatenate([np.zeros((M, 3)), image])


def as_complex(x: np.ndarray, pairs: str) -> np.ndarray:
    """A head's pairs as complex numbers a + ib, in the layout of ``pairs``."""
    d = x.shape[-1]
    if pairs == "interleaved":
        return x[..., 0::2] + 1j * x[..., 1::2]
    return x[..., : d // 2] + 1j * x[..., d // 2 :]


# ---------------------------------------------------------------- angles


@needs_diffusers
@pytest.mark.parametrize(
    ("axes_dims", "theta", "size"),
    [((16, 56, 56), 10000, (3, 4, 5)), ((4, 6, 6), 10000, (2, 3, 3)), ((2, 8, 6), 500, (5, 6, 2))],
    ids=["Flux-dev", "tiny", "theta 500"],
)
def test_angles_equal_flux_pos_embed(axes_dims, theta, size):
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = flux_ids(*size)
    cos_t, sin_t = FluxPosEmbed(theta=theta, axes_dim=list(axes_dims))(torch.from_numpy(ids))
    # FluxPosEmbed computes in float64 and rounds to float32: so does dtype="float32", bit for bit
    cos, sin = rope_angles(ids, axes_dims, theta, dtype="float32")
    np.testing.assert_array_equal(cos, cos_t.numpy())
    np.testing.assert_array_equal(sin, sin_t.numpy())
    cos64, _ = rope_angles(ids.astype(np.int64), axes_dims, theta)  # integer positions: the same angles
    assert cos64.dtype == np.float64 and np.max(np.abs(cos64 - cos_t.numpy())) < 2**-24


@needs_diffusers
def test_angles_equal_wan_rotary_pos_embed():
    """Wan's 3-D (frame, row, col) positions: its head split (t, h, w) = (d − 2·2⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋)."""
    import torch
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    d, (f, h, w) = 20, (3, 2, 4)
    rope = WanRotaryPosEmbed(attention_head_dim=d, patch_size=(1, 1, 1), max_seq_len=16)
    cos_t, sin_t = rope(torch.zeros(1, 1, f, h, w))  # (1, f·h·w, 1, d)
    frames, rows, cols = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    positions = np.stack([frames.ravel(), rows.ravel(), cols.ravel()], axis=-1)
    axes = (rope.t_dim, rope.h_dim, rope.w_dim)
    cos, sin = rope_angles(positions, axes, 10000.0, dtype="float32")
    np.testing.assert_array_equal(cos, cos_t[0, :, 0].numpy())
    np.testing.assert_array_equal(sin, sin_t[0, :, 0].numpy())


@needs_diffusers
def test_halves_angles_equal_get_1d_rotary_pos_embed():
    import torch
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pos = np.arange(7.0)
    cos_t, sin_t = get_1d_rotary_pos_embed(
        12, torch.from_numpy(pos), use_real=True, repeat_interleave_real=False, freqs_dtype=torch.float64
    )
    cos, sin = rope_angles(pos, (12,), pairs="halves", dtype="float32")
    np.testing.assert_array_equal(cos, cos_t.numpy())
    np.testing.assert_array_equal(sin, sin_t.numpy())


def test_angles_are_the_formula(be):
    positions = np.array([[0, 0], [2, 5], [7, 1]])
    cos, sin = rope_angles(be(positions), (4, 2), 100.0)
    assert be.is_native(cos) and cos.shape == (3, 6)
    # axis 0 owns 4 channels (2 pairs, ω = 1, 1/100^(2/4)), axis 1 owns 2 (1 pair, ω = 1)
    angles = np.stack([positions[:, 0], positions[:, 0] / 10.0, positions[:, 1]], axis=-1)
    np.testing.assert_allclose(np_(cos), np.repeat(np.cos(angles), 2, axis=-1), rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np_(sin), np.repeat(np.sin(angles), 2, axis=-1), rtol=1e-15, atol=1e-15)
    cos_h, _ = rope_angles(be(positions), (4, 2), 100.0, pairs="halves")
    np.testing.assert_allclose(np_(cos_h), np.concatenate([np.cos(angles)] * 2, axis=-1), rtol=1e-15, atol=1e-15)


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("pairs", PAIRS)
def test_rotation_is_complex_multiplication(be, rng, pairs):
    """Each pair a + ib is multiplied by e^{iφ}: an independent statement of the rotation."""
    x = rng.standard_normal((2, 3, 5, 8))
    positions = rng.integers(0, 20, (5, 2))
    cos, sin = rope_angles(positions, (4, 4), pairs=pairs)
    y, _ = rope_forward(be(x), be(cos), be(sin), pairs=pairs)
    assert be.is_native(y)
    phi = np.arctan2(as_complex(sin, pairs).real, as_complex(cos, pairs).real)  # one angle per pair
    want = as_complex(x, pairs) * np.exp(1j * phi)
    np.testing.assert_allclose(as_complex(np_(y), pairs), want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("tables", ["(N, d)", "(B, 1, N, d)", "any tables"])
def test_rope_backward_matches_finite_differences(rng, pairs, tables):
    x = rng.standard_normal((2, 3, 4, 6))
    cos, sin = rope_angles(rng.integers(0, 9, (4, 3)), (2, 2, 2), 10.0, pairs=pairs)
    if tables == "(B, 1, N, d)":
        cos, sin = np.stack([cos, 0.5 * cos])[:, None], np.stack([sin, 2 * sin])[:, None]
    if tables == "any tables":  # cos and sin not equal within a pair: the general formula dy⊙cos + Rᵀ(dy⊙sin)
        cos, sin = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))

    def forward(x):
        return rope_forward(x, cos, sin, pairs=pairs)

    errs = check_backward(forward, rope_backward, {"x": x})
    assert errs["x"] < FD_TOL


@pytest.mark.parametrize("pairs", PAIRS)
def test_rope_keeps_norms_and_its_backward_is_the_inverse_rotation(be, rng, pairs):
    x = rng.standard_normal((2, 4, 7, 10))
    cos, sin = rope_angles(rng.integers(-50, 50, (7, 2)), (6, 4), pairs=pairs)
    y, cache = rope_forward(be(x), be(cos), be(sin), pairs=pairs)
    # each pair is turned, not stretched: ‖y‖ = ‖x‖ per pair, hence per token and head
    np.testing.assert_allclose(np.abs(as_complex(np_(y), pairs)), np.abs(as_complex(x, pairs)), rtol=1e-13)
    # the backward of a rotation is the rotation back: backward(forward(x)) = x ...
    np.testing.assert_allclose(np_(rope_backward(y, cache)["x"]), x, rtol=1e-13, atol=1e-14)
    # ... which is the rotation by −φ
    back, _ = rope_forward(be(x), be(cos), be(-sin), pairs=pairs)
    np.testing.assert_allclose(np_(rope_backward(be(x), cache)["x"]), np_(back), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("pairs", PAIRS)
def test_rotated_dot_products_depend_on_the_offset_only(rng, pairs):
    """q_m · k_n after RoPE is a function of p_m − p_n: shifting every position changes no logit."""
    q, k = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 6, 8))
    positions = rng.integers(0, 30, (6, 2))

    def logits(shift):
        cos, sin = rope_angles(positions + shift, (4, 4), pairs=pairs)
        return rope_forward(q, cos, sin, pairs=pairs)[0] @ rope_forward(k, cos, sin, pairs=pairs)[0].swapaxes(-1, -2)

    np.testing.assert_allclose(logits(np.array([17, -5])), logits(np.array([0, 0])), rtol=1e-11, atol=1e-12)
    assert not np.allclose(rope_forward(q, *rope_angles(positions, (4, 4), pairs=pairs), pairs=pairs)[0], q)


def test_rope_float16_is_computed_in_float32(rng):
    x = rng.standard_normal((3, 8)).astype(np.float16)
    cos, sin = rope_angles(np.arange(3.0), (8,), dtype="float32")
    y, cache = rope_forward(x, cos, sin)
    assert y.dtype == np.float16
    want = rope_forward(x.astype(np.float32), cos, sin)[0].astype(np.float16)
    np.testing.assert_array_equal(y, want)
    assert rope_backward(np.ones_like(x), cache)["x"].dtype == np.float16


@needs_torch
@pytest.mark.parametrize("pairs", PAIRS)
def test_rope_backward_equals_torch_autograd_through_the_same_code(rng, pairs):
    """The forward run on torch tensors, differentiated by torch's autograd, against the analytic backward."""
    import torch

    x, dy = rng.standard_normal((2, 3, 5, 8)), rng.standard_normal((2, 3, 5, 8))
    cos, sin = rope_angles(rng.integers(0, 40, (5, 2)), (4, 4), pairs=pairs)
    x_t = torch.tensor(x, requires_grad=True)
    y_t, _ = rope_forward(x_t, torch.from_numpy(cos), torch.from_numpy(sin), pairs=pairs)
    y_t.backward(torch.from_numpy(dy))
    _, cache = rope_forward(x, cos, sin, pairs=pairs)
    assert rel_error(rope_backward(dy, cache)["x"], x_t.grad.numpy()) < 1e-15


@needs_diffusers
@pytest.mark.parametrize(("pairs", "unbind"), [("interleaved", -1), ("halves", -2)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rope_equals_diffusers_apply_rotary_emb_with_autograd(rng, pairs, unbind, dtype):
    """diffusers' apply_rotary_emb computes in float32 whatever x's dtype: compute_dtype="float32" is it,
    output and gradient, bit for bit (float32 tables, as FluxPosEmbed gives them)."""
    import torch
    from diffusers.models.embeddings import apply_rotary_emb

    x, dy = rng.standard_normal((2, 3, 6, 8)).astype(dtype), rng.standard_normal((2, 3, 6, 8)).astype(dtype)
    cos, sin = rope_angles(rng.integers(0, 64, (6, 2)), (4, 4), pairs=pairs, dtype="float32")
    x_t = torch.tensor(x, requires_grad=True)
    y_t = apply_rotary_emb(x_t, (torch.from_numpy(cos), torch.from_numpy(sin)), use_real_unbind_dim=unbind)
    y_t.backward(torch.from_numpy(dy))
    y, cache = rope_forward(x, cos, sin, pairs=pairs, compute_dtype="float32")
    np.testing.assert_array_equal(y, y_t.detach().numpy())
    np.testing.assert_array_equal(rope_backward(dy, cache)["x"], x_t.grad.numpy())
    if dtype == "float64":  # in its own dtype the reference is float64-exact; diffusers is float32-exact
        exact, _ = rope_forward(x, cos.astype(np.float64), sin.astype(np.float64), pairs=pairs)
        assert 1e-12 < rel_error(exact, y_t.detach().numpy()) < 1e-6


def test_rope_on_backends_equals_numpy(be, rng):
    x = rng.standard_normal((2, 5, 6))
    cos, sin = rope_angles(np.arange(5), (6,))
    y, cache = rope_forward(be(x), be(cos), be(sin))
    np.testing.assert_allclose(np_(y), rope_forward(x, cos, sin)[0], rtol=1e-15, atol=1e-15)
    dx = rope_backward(be(np.ones_like(x)), cache)["x"]
    assert be.is_native(dx)
    np.testing.assert_allclose(np_(dx), rope_backward(np.ones_like(x), rope_forward(x, cos, sin)[1])["x"], rtol=1e-15)


def test_rope_refuses_bad_input(rng):
    x = rng.standard_normal((2, 5, 6))
    cos, sin = rope_angles(np.arange(5), (6,))
    with pytest.raises(ValueError, match="even d"):
        rope_forward(rng.standard_normal((5, 7)), rng.standard_normal((5, 7)), rng.standard_normal((5, 7)))
    with pytest.raises(ValueError, match=r"\(N, d\) = \(4, 6\)"):
        rope_forward(x[:, :4], cos, sin)
    with pytest.raises(ValueError, match="differ"):
        rope_forward(x, cos, sin[:, :4])
    with pytest.raises(ValueError, match="do not broadcast"):
        rope_forward(x, np.stack([cos] * 3), np.stack([sin] * 3))
    with pytest.raises(ValueError, match="pairs"):
        rope_forward(x, cos, sin, pairs="rotate_half")
    with pytest.raises(ValueError, match="compute_dtype"):
        rope_forward(x, cos, sin, compute_dtype=np.float32)
    with pytest.raises(TypeError, match="floating"):
        rope_forward(x.astype(np.int64), cos, sin)
    _, cache = rope_forward(x, cos, sin)
    with pytest.raises(ValueError, match=r"dout of shape \(2, 5, 4\)"):
        rope_backward(np.ones((2, 5, 4)), cache)
    with pytest.raises(TypeError, match=r"float32.*float64"):
        rope_backward(np.ones((2, 5, 6), dtype=np.float32), cache)
    with pytest.raises(ValueError, match=r"axes_dims\[1\] = 3 is odd"):
        rope_angles(np.zeros((3, 2)), (4, 3))
    with pytest.raises(ValueError, match="one column per axis"):
        rope_angles(np.zeros((3, 2)), (4, 4, 4))
    with pytest.raises(ValueError, match="theta"):
        rope_angles(np.zeros((3, 1)), (4,), 0.0)
    with pytest.raises(TypeError, match="integer or real"):
        rope_angles(np.zeros((3, 1), dtype=bool), (4,))


@pytest.mark.parametrize(
    ("axes_dims", "error", "message"),
    [
        (None, TypeError, r"rope_angles: axes_dims must be a sequence of ints \(channels per axis\), got None"),
        (4, TypeError, r"axes_dims must be a sequence of ints .*got 4"),
        ("42", TypeError, r"axes_dims must be a sequence of ints .*got '42'"),
        (np.array(4), TypeError, r"axes_dims must be a sequence of ints .*got array\(4\)"),
        ((4.0, 2), TypeError, r"rope_angles: axes_dims\[0\] must be an int, got float 4.0"),
        ((True, 2), TypeError, r"rope_angles: axes_dims\[0\] must be an int, got bool True"),
        ((4, -2), ValueError, r"rope_angles: axes_dims\[1\] must be at least 1, got -2"),
        ((4, 0), ValueError, r"axes_dims\[1\] must be at least 1, got 0"),
        ((3, 1), ValueError, r"axes_dims\[0\] = 3 is odd; each axis rotates pairs of channels"),
        ((), ValueError, r"axes_dims must name at least one axis"),
    ],
)
def test_rope_angles_names_bad_axes_dims(axes_dims, error, message):
    with pytest.raises(error, match=message):
        rope_angles(np.zeros((3, 2)), axes_dims)
    # any sequence of ints is a valid axes_dims: a list, a NumPy array, NumPy integers
    want = rope_angles(np.ones((3, 2)), (4, 2))[0]
    for valid in ([4, 2], np.array([4, 2]), (np.int64(4), 2)):
        np.testing.assert_array_equal(rope_angles(np.ones((3, 2)), valid)[0], want)


@pytest.mark.parametrize(
    ("theta", "error", "message"),
    [
        (0.0, ValueError, r"rope_angles: theta must be positive \(the frequencies are powers of 1/theta\), got 0.0"),
        (-1, ValueError, r"theta must be positive .*got -1.0"),
        (float("nan"), ValueError, r"rope_angles: theta must be finite, got nan"),
        (float("inf"), ValueError, r"theta must be finite, got inf"),
        ("1e4", TypeError, r"rope_angles: theta must be a real number, got str '1e4'"),
        (True, TypeError, r"theta must be a real number, got bool True"),
    ],
)
def test_rope_angles_names_a_bad_theta(theta, error, message):
    with pytest.raises(error, match=message):
        rope_angles(np.zeros((3, 2)), (4, 2), theta)


def test_rope_angles_take_integer_or_real_positions_only():
    positions = np.array([[0, 1], [2, 3], [4, 5]])
    want = rope_angles(positions.astype(float), (4, 2))
    for dtype in (np.int64, np.int32, np.uint8, np.float16, np.float32):
        for table, expected in zip(rope_angles(positions.astype(dtype), (4, 2)), want, strict=True):
            np.testing.assert_array_equal(table, expected)
    for bad, name in ((None, "NoneType"), (positions.tolist(), "list"), (2.0, "float")):
        with pytest.raises(TypeError, match=rf"rope_angles: positions must be an array .*got {name}"):
            rope_angles(bad, (4, 2))
    with pytest.raises(ValueError, match=r"dtype must be one of .*got 'bfloat16'"):
        rope_angles(positions, (4, 2), dtype="bfloat16")
    for bad in (positions > 0, positions.astype(complex)):
        with pytest.raises(TypeError, match=r"positions must be integer or real floating .*got (bool|complex128)"):
            rope_angles(bad, (4, 2))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match=r"rope_angles: positions must be integer or real floating .*got bfloat16"):
        rope_angles(positions.astype(ml_dtypes.bfloat16), (4, 2))


def test_rope_names_a_table_or_input_that_is_not_an_array(rng):
    x = rng.standard_normal((2, 5, 6))
    cos, sin = rope_angles(np.arange(5), (6,))
    for args, name in (((None, cos, sin), "x"), ((x, None, sin), "cos"), ((x, cos, sin.tolist()), "sin")):
        with pytest.raises(TypeError, match=rf"^rope_forward: {name} must be an array"):
            rope_forward(*args)
    with pytest.raises(TypeError, match=r"^rope_forward: cos must be an array .*got float"):
        rope_forward(x, 1.0, sin)
    _, cache = rope_forward(x, cos, sin)
    with pytest.raises(TypeError, match=r"rope_backward needs the RopeCache its forward returned, got a NoneType"):
        rope_backward(np.ones_like(x), None)


@pytest.mark.parametrize("pairs", ["interleaved", "halves"])
def test_rope_of_no_tokens_or_an_empty_batch_is_empty(pairs):
    cos, sin = rope_angles(np.arange(3), (4,), pairs=pairs)
    for shape in ((0, 3, 4), (2, 0, 3, 4)):
        y, cache = rope_forward(np.zeros(shape), cos, sin, pairs=pairs)
        assert y.shape == shape
        assert rope_backward(np.zeros(shape), cache)["x"].shape == shape
    y, cache = rope_forward(np.zeros((0, 4)), cos[:0], sin[:0], pairs=pairs)  # N = 0 tokens
    assert y.shape == (0, 4) and rope_backward(np.zeros((0, 4)), cache)["x"].shape == (0, 4)
