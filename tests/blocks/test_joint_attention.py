"""Joint attention (SD3, SD3.5, Flux): against diffusers' modules with autograd (output and every gradient),
finite differences, torch autograd through the reference's own code, identities (one softmax over both streams,
permutations, stream order, one stream = the attention layer, two streams of equal weights = one stream),
and backends (the inputs it refuses: test_joint_attention_errors.py)."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
from conftest import HAS_TORCH, np_
from dit_helpers import (
    DiffusersCase,
    build_module,
    errors,
    float64_rms_norms,
    flux_ids,
    our_gradients,
    our_params,
    rotate_in_dtype,
    two_streams,
    weighted_loss,
)

from attention_ref.blocks import (
    attention_layer_forward,
    init_joint_attention,
    joint_attention_backward,
    joint_attention_forward,
)
from attention_ref.gradcheck import check_backward
from attention_ref.ops import rope_angles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FD_TOL = 1e-7
EXACT = 1e-12  # float64 against diffusers, output and every gradient (normwise relative)
HAS_DIFFUSERS = HAS_TORCH and importlib.util.find_spec("diffusers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="torch and diffusers are not installed")

# ---------------------------------------------------------------- against diffusers


SD3_CASES = [
    pytest.param(DiffusersCase("sd3", heads=2, head_dim=4, N=6, M=5), id="SD3, no qk norm"),
    pytest.param(DiffusersCase("sd3", heads=3, head_dim=4, N=4, M=7, qk_norm="rms_norm"), id="SD3.5, rms qk norm"),
    pytest.param(
        DiffusersCase("sd3", heads=2, head_dim=6, N=5, M=3, qk_norm="rms_norm", context_pre_only=True),
        id="SD3.5 last block, context_pre_only",
    ),
    pytest.param(DiffusersCase("sd3", heads=1, head_dim=8, N=9, M=2, context_pre_only=True), id="SD3 last block"),
    pytest.param(
        DiffusersCase("sd3", heads=3, head_dim=5, N=6, M=4, context_dim=7, qk_norm="layer_norm", B=1),
        id="layer-norm qk, text width 7",
    ),
    pytest.param(DiffusersCase("sd35_attn2", heads=2, head_dim=4, N=7, M=0, qk_norm="rms_norm"), id="SD3.5 attn2"),
    pytest.param(DiffusersCase("sd35_attn2", heads=4, head_dim=2, N=5, M=0), id="SD3.5 attn2, no qk norm"),
]
FLUX_CASES = [
    pytest.param(
        DiffusersCase("flux", heads=2, head_dim=8, M=3, qk_norm="rms_norm", axes_dims=(2, 2, 4), grid=(2, 3)),
        id="Flux, d 8",
    ),
    pytest.param(
        DiffusersCase(
            "flux", heads=3, head_dim=12, M=5, qk_norm="rms_norm", axes_dims=(4, 4, 4), grid=(3, 2), key_padding=True
        ),
        id="Flux, d 12, text padding mask",
    ),
    pytest.param(
        DiffusersCase("flux", heads=1, head_dim=16, M=2, qk_norm="rms_norm", axes_dims=(2, 6, 8), grid=(2, 2), B=1),
        id="Flux, 1 head",
    ),
    pytest.param(
        DiffusersCase("flux_single", heads=2, head_dim=8, M=3, qk_norm="rms_norm", axes_dims=(2, 2, 4)),
        id="Flux single, d 8",
    ),
    pytest.param(
        DiffusersCase("flux_single", heads=3, head_dim=12, M=4, qk_norm="rms_norm", axes_dims=(4, 4, 4), grid=(2, 2)),
        id="Flux single, d 12",
    ),
]


def run_both(case: DiffusersCase, rng: np.random.Generator, *, exact_norms: bool, rope_dtype: str | None, tables: str):
    """Run the case through diffusers (autograd) and the reference; return their outputs and gradients.

    tables: "float32" gives both sides FluxPosEmbed's float32 tables (as the model uses them), "float64" the same
    numbers in float64.
    """
    import torch

    module = build_module(case, rng)
    if exact_norms:
        float64_rms_norms(module)
    flux = case.family.startswith("flux")
    N = case.grid[0] * case.grid[1] if flux else case.N
    M = case.M
    two_streams = case.family in ("sd3", "flux")
    width = case.dim
    x = rng.standard_normal((case.B, N + (M if case.family == "flux_single" else 0), width))
    context = rng.standard_normal((case.B, M, case.context_dim or width)) if two_streams else None
    x_t = torch.tensor(x, requires_grad=True)
    context_t = None if context is None else torch.tensor(context, requires_grad=True)
    kwargs, ours_kwargs = {}, {}
    if flux:
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed

        cos32, sin32 = FluxPosEmbed(theta=10000, axes_dim=list(case.axes_dims))(
            torch.from_numpy(flux_ids(M, *case.grid))
        )
        cos, sin = (cos32, sin32) if tables == "float32" else (cos32.double(), sin32.double())
        kwargs["image_rotary_emb"] = (cos, sin)
        ours_kwargs["rope"] = (cos.numpy(), sin.numpy())
        ours_kwargs["rope_dtype"] = rope_dtype
        if case.key_padding:
            keep = rng.random((case.B, 1, 1, M + N)) < 0.6
            keep[..., :1] = keep[..., M:] = True  # one text token kept; every image token kept
            kwargs["attention_mask"] = torch.from_numpy(keep)
            ours_kwargs["mask"] = keep
    if two_streams:
        y_t, y_context_t = module(x_t, context_t, **kwargs)
    else:
        y_t, y_context_t = module(x_t, **kwargs), None
    loss, dy, dy_context = weighted_loss(rng, y_t, y_context_t)
    loss.backward()
    theirs = {"y": y_t.detach().numpy(), "x": x_t.grad.numpy(), **our_gradients(module)}
    if context is not None:
        theirs["y_context"] = y_context_t.detach().numpy()
        theirs["context"] = context_t.grad.numpy()

    order = "image_first" if case.family.startswith("sd3") else "text_first"
    (y, y_context), cache = joint_attention_forward(
        x, context, our_params(module), heads=case.heads, order=order, qk_norm=case.qk_norm, eps=1e-6, **ours_kwargs
    )
    ours = {"y": y, **joint_attention_backward((dy, dy_context), cache)}
    if context is not None:
        ours["y_context"] = y_context
    L = N + M
    assert cache.weights.shape == (case.B, case.heads, L, L)
    assert (cache.N, cache.M) == ((N, M) if two_streams else (L, 0))
    return ours, theirs


@needs_diffusers
@pytest.mark.parametrize("case", SD3_CASES)
def test_sd3_joint_attention_equals_diffusers_output_and_every_gradient(case):
    """JointAttnProcessor2_0 in float64, its RMSNorm computing in float64 (torch.nn.RMSNorm: see the next test)."""
    ours, theirs = run_both(case, np.random.default_rng(5), exact_norms=True, rope_dtype=None, tables="float64")
    errs = errors(ours, theirs)
    assert max(errs.values()) <= EXACT, errs


@needs_diffusers
def test_sd3_with_diffusers_own_rms_norm_agrees_to_float32_statistics():
    """Unchanged, diffusers' RMSNorm takes its mean square in float32: the model differs from any float64
    computation by about 1e-7 (the reference's is exact; the swap above shows everything else is)."""
    case = DiffusersCase("sd3", heads=2, head_dim=8, N=6, M=4, qk_norm="rms_norm")
    ours, theirs = run_both(case, np.random.default_rng(5), exact_norms=False, rope_dtype=None, tables="float64")
    worst = max(errors(ours, theirs).values())
    assert 1e-12 < worst < 1e-5, worst


@needs_diffusers
@pytest.mark.parametrize("case", FLUX_CASES)
def test_flux_attention_equals_diffusers_output_and_every_gradient(case):
    """FluxAttention, unchanged, with FluxPosEmbed's tables: diffusers rotates in float32 (its apply_rotary_emb
    casts), which rope_dtype='float32' reproduces; everything else is float64."""
    ours, theirs = run_both(case, np.random.default_rng(6), exact_norms=False, rope_dtype="float32", tables="float32")
    errs = errors(ours, theirs)
    assert max(errs.values()) <= EXACT, errs


@needs_diffusers
@pytest.mark.parametrize("case", FLUX_CASES[:1] + FLUX_CASES[3:4])
def test_flux_attention_in_float64_throughout_equals_the_reference(case, monkeypatch):
    """With the rotation computed in float64 on both sides (diffusers' apply_rotary_emb without its float32
    cast), the reference's default float64 path equals FluxAttention to float64's precision."""
    from diffusers.models.transformers import transformer_flux

    monkeypatch.setattr(transformer_flux, "apply_rotary_emb", rotate_in_dtype)
    ours, theirs = run_both(case, np.random.default_rng(7), exact_norms=False, rope_dtype=None, tables="float64")
    errs = errors(ours, theirs)
    assert max(errs.values()) <= EXACT, errs


@needs_diffusers
def test_flux_rotates_in_float32_so_the_float64_reference_differs_by_float32_rounding():
    case = DiffusersCase("flux", heads=2, head_dim=8, M=3, qk_norm="rms_norm", axes_dims=(2, 2, 4))
    ours, theirs = run_both(case, np.random.default_rng(6), exact_norms=False, rope_dtype=None, tables="float32")
    worst = max(errors(ours, theirs).values())
    assert 1e-12 < worst < 1e-5, worst


# ---------------------------------------------------------------- finite differences, autograd


def fd_case(kind: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """Small inputs and options of four shapes of the block."""
    B, N, M, C, D, heads, d = 2, 3, 2, 5, 4, 2, 4
    rope = rope_angles(rng.integers(0, 6, (N + M, 2)), (2, 2))
    if kind == "image first, rms":
        params = init_joint_attention(C, D, heads=heads, head_dim=d, qk_norm="rms_norm", rng=1)
        options = dict(heads=heads, order="image_first", qk_norm="rms_norm")
    elif kind == "text first, layer norm, RoPE, mask":
        params = init_joint_attention(C, D, heads=heads, head_dim=d, qk_norm="layer_norm", out_dim=3, rng=2)
        keep = rng.random((B, 1, N + M, N + M)) < 0.7
        keep[..., 0] = True
        options = dict(heads=heads, order="text_first", qk_norm="layer_norm", rope=rope, mask=keep, scale=0.7)
    elif kind == "context_pre_only, halves RoPE":
        params = init_joint_attention(C, D, heads=heads, head_dim=d, context_pre_only=True, rng=3)
        rope = rope_angles(rng.integers(0, 6, (N + M, 2)), (2, 2), pairs="halves")
        options = dict(heads=heads, order="image_first", rope=rope, rope_pairs="halves")
    else:  # one stream, pre_only: Flux's single blocks
        params = init_joint_attention(C, heads=heads, head_dim=d, qk_norm="rms_norm", pre_only=True, rng=4)
        rope = rope_angles(rng.integers(0, 6, (N, 2)), (2, 2))
        options = dict(heads=heads, qk_norm="rms_norm", rope=rope)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    inputs = {"x": rng.standard_normal((B, N, C)), **params}
    if "add_q.weight" in params:
        inputs["context"] = rng.standard_normal((B, M, D))
    return inputs, options


FD_KINDS = ["image first, rms", "text first, layer norm, RoPE, mask", "context_pre_only, halves RoPE", "one stream"]


def _forward(options: dict, x, context=None, **params):
    """``joint_attention_forward`` with both outputs as one array, for the finite differences."""
    (y, y_context), cache = joint_attention_forward(x, context, params, **options)
    out = y.reshape(-1) if y_context is None else np.concatenate([y.reshape(-1), y_context.reshape(-1)])
    return out, (cache, y.shape)


def _backward(dout, packed):
    cache, y_shape = packed
    n = int(np.prod(y_shape))
    dy_context = None if cache.text is None else dout[n:].reshape(cache.context_shape[0], cache.M, -1)
    return joint_attention_backward((dout[:n].reshape(y_shape), dy_context), cache)


@pytest.mark.parametrize("kind", FD_KINDS)
def test_joint_attention_backward_matches_finite_differences(rng, kind):
    inputs, options = fd_case(kind, rng)
    errs = check_backward(functools.partial(_forward, options), _backward, inputs)
    assert set(errs) == set(inputs)
    assert max(errs.values()) < FD_TOL, errs


@needs_torch
@pytest.mark.parametrize("kind", FD_KINDS)
def test_joint_attention_backward_equals_torch_autograd_through_the_same_code(rng, kind, monkeypatch):
    """The forward run on torch tensors (the readable attention path: the fast one writes in place, which autograd
    cannot follow), differentiated by torch's autograd, against the analytic backward."""
    import torch

    from attention_ref.attention import exact

    monkeypatch.setattr(exact, "FAST", False)
    inputs, options = fd_case(kind, rng)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    t_options = {k: tuple(torch.from_numpy(t) for t in v) if k == "rope" else v for k, v in options.items()}
    if "mask" in t_options:
        t_options["mask"] = torch.from_numpy(options["mask"])
    x_t, context_t = leaves["x"], leaves.get("context")
    params_t = {k: v for k, v in leaves.items() if k not in ("x", "context")}
    (y_t, y_context_t), _ = joint_attention_forward(x_t, context_t, params_t, **t_options)
    loss, dy, dy_context = weighted_loss(rng, y_t, y_context_t)
    loss.backward()
    params = {k: v for k, v in inputs.items() if k not in ("x", "context")}
    _, cache = joint_attention_forward(inputs["x"], inputs.get("context"), params, **options)
    grads = joint_attention_backward((dy, dy_context), cache)
    errs = errors(grads, {k: v.grad.numpy() for k, v in leaves.items()})
    assert max(errs.values()) < 1e-13, errs


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("order", ["image_first", "text_first"])
def test_one_softmax_over_both_streams(be, rng, order):
    x, context, params = two_streams(rng)
    (y, y_context), cache = joint_attention_forward(
        be(x), be(context), {k: be(v) for k, v in params.items()}, heads=2, order=order, qk_norm="rms_norm"
    )
    assert be.is_native(y) and be.is_native(y_context) and be.is_native(cache.weights)
    P = np_(cache.weights)
    assert P.shape == (2, 2, 8, 8) and cache.order == order and (cache.N, cache.M) == (5, 3)
    # every row — image or text query — sums to 1 over the image and the text keys together
    np.testing.assert_allclose(P.sum(axis=-1), 1.0, rtol=1e-14)
    image, text = cache.image_tokens, cache.text_tokens
    assert (image, text) == ((slice(0, 5), slice(5, 8)) if order == "image_first" else (slice(3, 8), slice(0, 3)))
    share = P[..., image, text].sum(axis=-1)  # (B, heads, N): how much of each image row is read from the text
    assert np.all((share > 0) & (share < 1))
    # and on every backend the same numbers as NumPy's
    (y_np, y_context_np), _ = joint_attention_forward(x, context, params, heads=2, order=order, qk_norm="rms_norm")
    np.testing.assert_allclose(np_(y), y_np, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np_(y_context), y_context_np, rtol=1e-13, atol=1e-14)


def test_stream_order_moves_the_weights_but_changes_no_output(rng):
    """Without RoPE attention treats its keys as a set: SD3's and Flux's orders give the same outputs, and the
    weights are the same matrix with the streams' blocks swapped."""
    x, context, params = two_streams(rng)
    (y1, c1), cache1 = joint_attention_forward(x, context, params, heads=2, order="image_first", qk_norm="rms_norm")
    (y2, c2), cache2 = joint_attention_forward(x, context, params, heads=2, order="text_first", qk_norm="rms_norm")
    np.testing.assert_allclose(y1, y2, rtol=1e-13)
    np.testing.assert_allclose(c1, c2, rtol=1e-13)
    to_text_first = np.r_[5:8, 0:5]
    np.testing.assert_allclose(cache1.weights[..., to_text_first, :][..., to_text_first], cache2.weights, rtol=1e-13)


def test_permuting_tokens_permutes_their_stream_only(rng):
    x, context, params = two_streams(rng, qk_norm="layer_norm")
    (y, y_context), _ = joint_attention_forward(x, context, params, heads=2, qk_norm="layer_norm")
    perm_x, perm_c = rng.permutation(5), rng.permutation(3)
    (y_px, y_context_px), _ = joint_attention_forward(x[:, perm_x], context, params, heads=2, qk_norm="layer_norm")
    np.testing.assert_allclose(y_px, y[:, perm_x], rtol=1e-13)
    np.testing.assert_allclose(y_context_px, y_context, rtol=1e-13)
    (y_pc, y_context_pc), _ = joint_attention_forward(x, context[:, perm_c], params, heads=2, qk_norm="layer_norm")
    np.testing.assert_allclose(y_pc, y, rtol=1e-13)
    np.testing.assert_allclose(y_context_pc, y_context[:, perm_c], rtol=1e-13)


def test_one_stream_without_norms_is_the_attention_layer(rng):
    """context=None, no q/k norm, no RoPE: diffusers' plain self-attention, which attention_layer_forward computes."""
    params = init_joint_attention(6, heads=3, head_dim=2, rng=0)
    x = rng.standard_normal((2, 7, 6))
    (y, y_context), cache = joint_attention_forward(x, None, params, heads=3)
    y_layer, layer_cache = attention_layer_forward(x, params, heads=3)
    assert y_context is None and cache.text_tokens is None and cache.M == 0
    np.testing.assert_allclose(y, y_layer, rtol=1e-14)
    np.testing.assert_allclose(cache.weights, layer_cache.weights, rtol=1e-14)


def test_two_streams_of_equal_weights_are_one_stream_on_the_joined_tokens(rng):
    """Flux's single-stream blocks are the joint computation on text and image tokens joined beforehand:
    with the text projections equal to the image's, two streams give one stream's numbers, gradients included."""
    C, heads, d, N, M = 8, 2, 4, 5, 3
    single = init_joint_attention(C, heads=heads, head_dim=d, qk_norm="rms_norm", rng=0)
    single = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in single.items()}
    double = dict(single)
    for ours, theirs in (("add_q", "q"), ("add_k", "k"), ("add_v", "v"), ("add_out", "out")):
        for kind in ("weight", "bias"):
            double[f"{ours}.{kind}"] = single[f"{theirs}.{kind}"]
    double["norm_added_q.weight"], double["norm_added_k.weight"] = single["norm_q.weight"], single["norm_k.weight"]
    x, context = rng.standard_normal((2, N, C)), rng.standard_normal((2, M, C))
    rope = rope_angles(flux_ids(M, 1, N)[:, 1:], (2, 2))  # text at (0, 0), image at (0, col): (L, d)
    (y, y_context), cache = joint_attention_forward(
        x, context, double, heads=heads, order="text_first", qk_norm="rms_norm", rope=rope
    )
    (y_joined, _), joined_cache = joint_attention_forward(
        np.concatenate([context, x], axis=1), None, single, heads=heads, qk_norm="rms_norm", rope=rope
    )
    np.testing.assert_allclose(np.concatenate([y_context, y], axis=1), y_joined, rtol=1e-13)
    np.testing.assert_allclose(cache.weights, joined_cache.weights, rtol=1e-13)
    dy, dy_context = rng.standard_normal(y.shape), rng.standard_normal(y_context.shape)
    grads = joint_attention_backward((dy, dy_context), cache)
    joined_grads = joint_attention_backward((np.concatenate([dy_context, dy], axis=1), None), joined_cache)
    np.testing.assert_allclose(np.concatenate([grads["context"], grads["x"]], axis=1), joined_grads["x"], rtol=1e-12)
    np.testing.assert_allclose(grads["q.weight"] + grads["add_q.weight"], joined_grads["q.weight"], rtol=1e-12)


def test_a_missing_output_gradient_is_zero(rng):
    x, context, params = two_streams(rng)
    (y, y_context), cache = joint_attention_forward(x, context, params, heads=2, qk_norm="rms_norm")
    dy = rng.standard_normal(y.shape)
    with_none = joint_attention_backward((dy, None), cache)
    with_zero = joint_attention_backward((dy, np.zeros_like(y_context)), cache)
    assert set(with_none) == set(with_zero)
    for name in with_none:
        np.testing.assert_array_equal(with_none[name], with_zero[name])
    assert np.all(with_none["add_out.weight"] == 0)


def test_joint_attention_backward_on_backends(be, rng):
    inputs, options = fd_case("text first, layer norm, RoPE, mask", rng)
    params = {k: v for k, v in inputs.items() if k not in ("x", "context")}
    options_be = {**options, "rope": tuple(be(t) for t in options["rope"]), "mask": be(options["mask"])}
    (y, y_context), cache = joint_attention_forward(
        be(inputs["x"]), be(inputs["context"]), {k: be(v) for k, v in params.items()}, **options_be
    )
    dy, dy_context = rng.standard_normal(tuple(y.shape)), rng.standard_normal(tuple(y_context.shape))
    grads = joint_attention_backward((be(dy), be(dy_context)), cache)
    _, np_cache = joint_attention_forward(inputs["x"], inputs["context"], params, **options)
    want = joint_attention_backward((dy, dy_context), np_cache)
    assert set(grads) == set(want)
    for name in grads:
        assert be.is_native(grads[name])
        np.testing.assert_allclose(np_(grads[name]), want[name], rtol=1e-12, atol=1e-14)
