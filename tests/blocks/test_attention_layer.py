"""The attention layer on (B, N, C) token sequences: diffusers' Attention (output and every gradient, through
torch autograd), finite differences, identities, backends, and the inputs it refuses."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import numpy as np
import pytest
from block_helpers import OTHER_BACKENDS, fd_errors, grad_errors, jitter
from conftest import np_

import attention_ref as ar
from attention_ref.gradcheck import rel_error

FD_TOL = 1e-7
HAS_DIFFUSERS = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="torch and diffusers are not installed")


@dataclass(frozen=True)
class LayerCase:
    """One configuration of the layer and of the diffusers ``Attention`` that computes the same thing."""

    B: int = 2
    N: int = 6
    C: int = 8
    heads: int = 2
    head_dim: int | None = None  # default C / heads
    context: tuple[int, int] | None = None  # (M, D) for cross-attention
    groups: int | None = None  # the group norm's groups; None: no group norm
    eps: float = 1e-5
    cross_norm: str | None = None
    cross_norm_groups: int = 32
    bias: bool = False
    out_bias: bool = True
    residual: bool = False
    rescale: float = 1.0
    scale_one: bool = False  # diffusers' scale_qk=False: scale 1 instead of 1/sqrt(d)
    key_padding: bool = False  # a (B, M) padding mask: context_mask for cross, mask[:, None, None, :] for self
    query_mask: bool = False  # a (B, N, M) mask, diffusers' 3-D attention_mask (no row fully masked)
    options: dict = field(default_factory=dict)

    @property
    def M(self) -> int:
        return self.N if self.context is None else self.context[0]


LAYER_CASES = [
    pytest.param(LayerCase(), id="self, plain"),
    pytest.param(LayerCase(groups=4, eps=1e-6, residual=True, rescale=1.7, bias=True), id="self, norm, residual"),
    pytest.param(LayerCase(key_padding=True, bias=True), id="self, key padding mask"),
    pytest.param(LayerCase(query_mask=True, groups=2), id="self, per-query mask"),
    pytest.param(LayerCase(scale_one=True, heads=4), id="self, scale 1"),
    pytest.param(LayerCase(context=(5, 6)), id="cross, plain"),
    pytest.param(LayerCase(context=(5, 6), key_padding=True, bias=True, groups=2), id="cross, padding, bias, norm"),
    pytest.param(LayerCase(context=(5, 6), query_mask=True, residual=True), id="cross, per-query mask, residual"),
    pytest.param(LayerCase(context=(5, 6), cross_norm="layer_norm"), id="cross, layer-normed context"),
    pytest.param(LayerCase(context=(5, 6), cross_norm="group_norm", cross_norm_groups=3), id="cross, group-normed ctx"),
    pytest.param(
        LayerCase(context=(4, 3), heads=3, head_dim=5, out_bias=False, groups=2, residual=True, rescale=0.5),
        id="cross, inner != C, no out bias",
    ),
]


def case_params(case: LayerCase, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random parameters, every one moved off its init so that no gradient is special."""
    params = ar.init_attention_layer(
        case.C,
        None if case.context is None else case.context[1],
        heads=case.heads,
        head_dim=case.head_dim,
        groups=case.groups,
        cross_norm=case.cross_norm,
        bias=case.bias,
        out_bias=case.out_bias,
        rng=7,
    )
    return jitter(params, rng)


def case_inputs(case: LayerCase, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    """``h``, ``context``, the boolean ``keep`` (B, M) and ``allow`` (B, N, M) masks of a case (or None)."""
    h = rng.standard_normal((case.B, case.N, case.C))
    context = None if case.context is None else rng.standard_normal((case.B, *case.context))
    keep = allow = None
    if case.key_padding:
        keep = rng.random((case.B, case.M)) < 0.6
        keep[:, 0] = True  # at least one real token per sample
    if case.query_mask:
        allow = rng.random((case.B, case.N, case.M)) < 0.6
        allow[..., 0] = True  # no fully masked row: compared with diffusers, which has no rule for them
    return {"h": h, "context": context, "keep": keep, "allow": allow}


def our_options(case: LayerCase, keep: np.ndarray | None, allow: np.ndarray | None) -> dict:
    mask = None
    if allow is not None:
        mask = allow[:, None]  # (B, 1, N, M): the same for every head
    if keep is not None and case.context is None:
        mask = keep[:, None, None, :]  # self-attention: padded tokens are keys for no query
    return dict(
        heads=case.heads,
        groups=case.groups or 32,
        eps=case.eps,
        cross_norm=case.cross_norm,
        cross_norm_groups=case.cross_norm_groups,
        residual=case.residual,
        rescale=case.rescale,
        scale=1.0 if case.scale_one else None,
        mask=mask,
        context_mask=keep if case.context is not None else None,
    )


# ---------------------------------------------------------------- against diffusers' Attention


def diffusers_attention(case: LayerCase, params: dict[str, np.ndarray]):
    """A float64 diffusers ``Attention`` holding ``params`` (our (in, out) weights transposed)."""
    import torch
    from diffusers.models.attention_processor import Attention

    inner = params["q.weight"].shape[1]
    attn = Attention(
        case.C,
        cross_attention_dim=None if case.context is None else case.context[1],
        heads=case.heads,
        dim_head=inner // case.heads,
        bias=case.bias,
        out_bias=case.out_bias,
        norm_num_groups=case.groups,
        eps=case.eps,
        cross_attention_norm=case.cross_norm,
        cross_attention_norm_num_groups=case.cross_norm_groups,
        residual_connection=case.residual,
        rescale_output_factor=case.rescale,
        scale_qk=not case.scale_one,
    ).double()
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0", "norm": "group_norm", "norm_cross": "norm_cross"}
    state = {}
    for key, value in params.items():
        layer, kind = key.rsplit(".", 1)
        state[f"{names[layer]}.{kind}"] = torch.from_numpy(value.T.copy() if value.ndim == 2 else value.copy())
    attn.load_state_dict(state, strict=True)
    return attn.eval(), {f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": k for k in params}


@needs_diffusers
@pytest.mark.parametrize("case", LAYER_CASES)
def test_equals_diffusers_attention_output_and_every_gradient(case, rng):
    import torch

    params = case_params(case, rng)
    inputs = case_inputs(case, rng)
    h, context, keep, allow = inputs["h"], inputs["context"], inputs["keep"], inputs["allow"]
    dy = rng.standard_normal((case.B, case.N, case.C))

    y, cache = ar.attention_layer_forward(h, params, context=context, **our_options(case, keep, allow))
    grads = ar.attention_layer_backward(dy, cache)

    attn, ours_of = diffusers_attention(case, params)
    h_t = torch.tensor(h, requires_grad=True)
    context_t = None if context is None else torch.tensor(context, requires_grad=True)
    attention_mask = None
    if allow is not None:
        attention_mask = torch.from_numpy(allow)  # (B, N, M), True = may attend
    if keep is not None:
        attention_mask = torch.from_numpy(keep[:, None, :])  # (B, 1, M)
    y_t = attn(h_t, encoder_hidden_states=context_t, attention_mask=attention_mask)
    y_t.backward(torch.from_numpy(dy))
    theirs = {"h": h_t.grad.numpy()}
    if context is not None:
        theirs["context"] = context_t.grad.numpy()
    for name, p in attn.named_parameters():
        g = p.grad.numpy()
        theirs[ours_of[name]] = g.T if g.ndim == 2 else g

    assert y.shape == (case.B, case.N, case.C) and cache.weights.shape == (case.B, case.heads, case.N, case.M)
    # measured over 5 seeds of every case (AMD EPYC, torch 2.13 CPU): output ≤ 6.0e-16, gradients ≤ 2.4e-15;
    # the bounds leave about 15× and 20× for other summation orders (another BLAS, another CPU)
    assert rel_error(y, y_t.detach().numpy()) <= 1e-14
    errors = grad_errors(grads, theirs)
    assert max(errors.values()) <= 5e-14, errors


@needs_diffusers
def test_interop_options_of_a_diffusers_attention_run_the_layer_on_tokens(rng):
    """from_diffusers gives the parameters and options; the layer then reproduces the module on (B, N, C)."""
    import torch
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = (
        Attention(
            16,
            cross_attention_dim=12,
            heads=4,
            dim_head=8,
            norm_num_groups=4,
            residual_connection=True,
            rescale_output_factor=2.0,
            bias=True,
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    params, options = ar.interop.from_diffusers(attn)
    h, context = rng.standard_normal((2, 10, 16)), rng.standard_normal((2, 7, 12))
    y, _ = ar.attention_layer_forward(h, params, context=context, **options)
    with torch.no_grad():
        y_t = attn(torch.from_numpy(h), encoder_hidden_states=torch.from_numpy(context)).numpy()
    assert rel_error(y, y_t) <= 1e-14


# ---------------------------------------------------------------- finite differences


@pytest.mark.parametrize("case", LAYER_CASES)
def test_matches_finite_differences(case, rng):
    params = case_params(case, rng)
    inputs = case_inputs(case, rng)
    options = our_options(case, inputs["keep"], inputs["allow"])
    arrays = {"h": inputs["h"], **params}
    if inputs["context"] is not None:
        arrays["context"] = inputs["context"]

    def forward(h, context=None, **p):
        return ar.attention_layer_forward(h, p, context=context, **options)

    # k.bias has an exactly-zero gradient in softmax attention: compared in absolute terms (see fd_errors)
    errs = fd_errors(forward, ar.attention_layer_backward, arrays)
    assert set(errs) == set(arrays)
    assert max(errs.values()) < FD_TOL, errs


def test_mask_and_context_mask_together_match_finite_differences(rng):
    params = jitter(ar.init_attention_layer(4, 3, heads=2, bias=True, rng=1), rng)
    keep = np.array([[True, True, False, True], [True, False, True, True]])
    allow = rng.random((2, 1, 5, 4)) < 0.7

    def forward(h, context, **p):
        return ar.attention_layer_forward(h, p, heads=2, context=context, context_mask=keep, mask=allow)

    inputs = {"h": rng.standard_normal((2, 5, 4)), "context": rng.standard_normal((2, 4, 3)), **params}
    assert max(fd_errors(forward, ar.attention_layer_backward, inputs).values()) < FD_TOL
    _, cache = forward(**inputs)
    # a key passes both masks or gets no weight
    assert np.all(cache.weights[~np.broadcast_to(allow & keep[:, None, None, :], cache.weights.shape)] == 0)


# ---------------------------------------------------------------- identities


def test_weights_rows_sum_to_one_and_permuting_tokens_permutes_the_output(rng):
    params = jitter(ar.init_attention_layer(8, heads=2, groups=4, bias=True, rng=2), rng)
    h = rng.standard_normal((2, 7, 8))
    y, cache = ar.attention_layer_forward(h, params, heads=2, groups=4, residual=True)
    np.testing.assert_allclose(cache.weights.sum(-1), 1.0, atol=1e-14)
    perm = rng.permutation(7)
    y_p, cache_p = ar.attention_layer_forward(h[:, perm], params, heads=2, groups=4, residual=True)
    np.testing.assert_allclose(y_p, y[:, perm], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(cache_p.weights, cache.weights[:, :, perm][..., perm], rtol=1e-13, atol=1e-15)


def test_cross_attention_ignores_the_order_of_context_tokens_and_the_padded_ones(rng):
    params = jitter(ar.init_attention_layer(4, 3, heads=2, cross_norm="layer_norm", rng=3), rng)
    h, context = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 6, 3))
    keep = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=bool)
    options = dict(heads=2, context_mask=keep, cross_norm="layer_norm")
    y, cache = ar.attention_layer_forward(h, params, context=context, **options)
    perm = rng.permutation(6)
    y_p, _ = ar.attention_layer_forward(
        h, params, heads=2, context=context[:, perm], context_mask=keep[:, perm], cross_norm="layer_norm"
    )
    np.testing.assert_allclose(y_p, y, rtol=1e-13)
    other = np.where(keep[..., None], context, 100 * rng.standard_normal(context.shape))
    np.testing.assert_array_equal(ar.attention_layer_forward(h, params, context=other, **options)[0], y)
    g = ar.attention_layer_backward(rng.standard_normal(y.shape), cache)
    assert np.all(g["context"][~keep] == 0) and np.all(g["context"][keep] != 0)


def test_samples_are_independent_and_never_mixed(rng):
    """The token batch that the map blocks used to read as one map: each sample only sees itself."""
    params = jitter(ar.init_attention_layer(16, heads=4, groups=4, rng=4), rng)
    h = rng.standard_normal((2, 48, 16))
    y, cache = ar.attention_layer_forward(h, params, heads=4, groups=4)
    assert cache.weights.shape == (2, 4, 48, 48)
    for b in range(2):
        y_b, _ = ar.attention_layer_forward(h[b : b + 1], params, heads=4, groups=4)
        np.testing.assert_allclose(y_b[0], y[b], rtol=1e-13, atol=1e-14)


def test_a_fully_masked_query_row_gets_zero_attention_without_nan(rng):
    params = jitter(ar.init_attention_layer(4, heads=1, rng=5), rng)
    h = rng.standard_normal((1, 3, 4))
    allow = np.ones((1, 1, 3, 3), bool)
    allow[0, 0, 1] = False
    y, cache = ar.attention_layer_forward(h, params, heads=1, mask=allow)
    assert np.all(cache.weights[0, 0, 1] == 0)
    np.testing.assert_array_equal(y[0, 1], params["out.bias"])
    assert all(np.all(np.isfinite(g)) for g in ar.attention_layer_backward(np.ones_like(y), cache).values())


@needs_diffusers
def test_diffusers_keeps_the_unmasked_weights_of_a_fully_padded_sample_unless_its_logits_are_half(rng):
    """What docs/blocks.md says of a sample whose every context token carries diffusers' −10000: the bias cancels
    in the softmax, so in float32 and float64 the sample reads its tokens with their unmasked weights; only the eager
    processor's half-precision logits (spacing 8 near 10000) all round to −10000 and read every token evenly."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    x, c = torch.randn(1, 5, 8, dtype=torch.float64), 3 * torch.randn(1, 7, 6, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-3), (torch.float16, None)):
        attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4, processor=AttnProcessor()).to(dtype)
        padded = torch.full((1, 1, 7), -10000.0, dtype=dtype)
        with torch.no_grad():
            unmasked = attn(x.to(dtype), c.to(dtype)).double()
            masked = attn(x.to(dtype), c.to(dtype), attention_mask=padded).double()
            even = attn.to_out[0](attn.to_v(c.to(dtype)).mean(1, keepdim=True).expand(1, 5, 8)).double()
        if tol is not None:
            assert (masked - unmasked).abs().max() <= tol
            assert (masked - even).abs().max() > 0.1
        else:
            assert (masked - even).abs().max() <= 2e-3
            assert (masked - unmasked).abs().max() > 0.1


def test_variants_run_in_the_layer_and_window_needs_the_grid(rng):
    params = jitter(ar.init_attention_layer(4, heads=2, groups=2, rng=6), rng)
    h = rng.standard_normal((2, 12, 4))
    y, _ = ar.attention_layer_forward(h, params, heads=2, groups=2, mask=ar.attention.window_mask(4, 3, (2, 3), 1))
    y_w, cache = ar.attention_layer_forward(
        h, params, heads=2, groups=2, attention="window", attention_options={"window": (2, 3), "shift": 1}, grid=(4, 3)
    )
    assert rel_error(y_w, y) <= 1e-14 and cache.weights is None and "window" in cache.weights_note
    with pytest.raises(
        ValueError,
        match=r"attention layer: window attention needs the tokens' place on the map: "
        r"pass grid=\(H, W\)",
    ):
        ar.attention_layer_forward(h, params, heads=2, groups=2, attention="window", attention_options={"window": 2})
    with pytest.raises(ValueError, match=r"attention layer: grid \(3, 3\) has 9 pixels but the input has 12 tokens"):
        ar.attention_layer_forward(h, params, heads=2, groups=2, grid=(3, 3))
    y_c, cache_c = ar.attention_layer_forward(h, params, heads=2, groups=2, attention="chunked")
    y_e, cache_e = ar.attention_layer_forward(h, params, heads=2, groups=2)
    assert rel_error(y_c, y_e) <= 1e-14 and rel_error(cache_c.weight_rows(0, 12), cache_e.weights) <= 1e-14


# ---------------------------------------------------------------- backends


@pytest.mark.parametrize("be", OTHER_BACKENDS, indirect=True)
def test_agrees_across_backends(be, rng):
    case = LayerCase(
        context=(5, 6),
        key_padding=True,
        groups=2,
        bias=True,
        cross_norm="group_norm",
        cross_norm_groups=3,
        residual=True,
    )
    params, inputs = case_params(case, rng), case_inputs(case, rng)
    options = our_options(case, inputs["keep"], None)
    y_np, cache_np = ar.attention_layer_forward(inputs["h"], params, context=inputs["context"], **options)
    dy = rng.standard_normal(y_np.shape)
    g_np = ar.attention_layer_backward(dy, cache_np)
    options["context_mask"] = be(options["context_mask"])
    y, cache = ar.attention_layer_forward(
        be(inputs["h"]), {k: be(v) for k, v in params.items()}, context=be(inputs["context"]), **options
    )
    g = ar.attention_layer_backward(be(dy), cache)
    assert be.is_native(y) and all(be.is_native(v) for v in g.values()) and be.is_native(cache.weights)
    assert rel_error(np_(y), y_np) <= 1e-13 and rel_error(np_(cache.weights), cache_np.weights) <= 1e-13
    assert max(grad_errors(g, g_np).values()) <= 1e-12


def test_init_attention_layer_gives_diffusers_defaults():
    p = ar.init_attention_layer(8, rng=0)
    assert set(p) == {"q.weight", "k.weight", "v.weight", "out.weight", "out.bias"}  # no q/k/v bias, no norm
    p = ar.init_attention_layer(8, 6, heads=3, head_dim=5, groups=4, cross_norm="group_norm", bias=True, rng=0)
    assert p["q.weight"].shape == (8, 15) and p["k.weight"].shape == (6, 15) and p["out.weight"].shape == (15, 8)
    assert p["norm.weight"].shape == (8,) and p["norm_cross.bias"].shape == (6,) and p["v.bias"].shape == (15,)
    with pytest.raises(ValueError, match="8 channels are not divisible into 3 heads; give head_dim"):
        ar.init_attention_layer(8, heads=3)
    with pytest.raises(ValueError, match="cross_norm must be one of"):
        ar.init_attention_layer(8, cross_norm="layer_norm")
