"""Loading diffusers' attention: Attention and Transformer2DModel against the modules themselves.

Every peer runs in float64 with all weights randomised (the originals zero-initialise their output
projections, which would hide half the gradients); forward and every gradient — x, context and
each weight — must agree to 1e-9 relative (they agree to ~1e-15). CompVis's and OpenAI's blocks:
tests/interop/test_interop_checkpoints.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from block_helpers import grad_errors
from interop_helpers import TOL, channels_last, leaf, randomise

import attention_ref as ar
from attention_ref.gradcheck import rel_error
from attention_ref.interop import from_diffusers, from_diffusers_transformer2d, to_diffusers

torch = pytest.importorskip("torch", reason="torch is not installed")
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")

# ---------------------------------------------------------------- diffusers Attention

if HAS_DIFFUSERS:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    PROCESSORS = {"plain": AttnProcessor, "sdpa": AttnProcessor2_0, "sliced": lambda: SlicedAttnProcessor(slice_size=1)}

# (id, cross dim or None, norm groups or None, qkv bias, out bias, residual, rescale, heads, dim_head, C, map, B,
#  processor, masked context)
ATTENTION_CASES = [
    ("self plain 1 head", None, None, False, True, False, 1.0, 1, 6, 6, (3, 5), 2, "sdpa", False),
    ("self norm bias residual rescale", None, 4, True, True, True, 2.5, 2, 4, 8, (5, 3), 3, "plain", False),
    ("self 3 heads inner 12 != C 6, no out bias", None, 2, True, False, True, 0.7, 3, 4, 6, (3, 7), 2, "sliced", False),
    ("self 4 heads norm no residual", None, 2, False, True, False, 1.0, 4, 2, 8, (5, 5), 2, "sdpa", False),
    ("cross plain 2 heads", 5, None, False, True, False, 1.0, 2, 3, 6, (3, 5), 2, "plain", False),
    ("cross norm bias residual rescale", 7, 4, True, True, True, 1.3, 4, 2, 8, (5, 7), 3, "sdpa", False),
    ("cross 3 heads masked", 4, None, True, True, False, 1.0, 3, 2, 6, (3, 3), 2, "plain", True),
    ("cross 1 head masked sliced", 3, 3, False, True, True, 3.0, 1, 5, 6, (1, 7), 2, "sliced", True),
]


def module_gradients(module, params):
    """The module's parameter gradients under the reference's names (to_diffusers' naming, tested by the round
    trips), weights as ``(in, out)`` matrices (a 1×1 convolution's too)."""
    grads = {n: p.grad for n, p in module.named_parameters()}
    expected = {}
    for ours, theirs in zip(params, to_diffusers(params), strict=True):
        g = grads[theirs].numpy()
        expected[ours] = g.reshape(g.shape[0], g.shape[1]).T if g.ndim >= 2 else g
    return expected


def random_context_mask(rng, B, M, always):
    """A random ``(B, M)`` context mask (True keeps a token) that keeps token ``always`` of every sample."""
    mask = rng.random((B, M)) > 0.4
    mask[:, always] = True
    return mask


def assert_matches_module(ours, grads, y, module, params, *, x, context):
    """Our output ``ours`` and gradients ``grads`` agree to :data:`TOL` (relative) with the module's output ``y``
    (B, C, H, W) and the gradients torch left in ``x``, ``context`` (None for self-attention) and the module."""
    expected = {"x": x.grad.permute(0, 2, 3, 1).numpy(), **module_gradients(module, params)}
    if context is not None:
        expected["context"] = context.grad.numpy()
    errors = {"y": rel_error(ours, channels_last(y))}
    errors.update(grad_errors(grads, expected))
    assert max(errors.values()) <= TOL, errors


@needs_diffusers
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_matches_diffusers_attention(case):
    """Forward and backward of one case in diffusers and in attention_ref: the output and every gradient."""
    _, cross, groups, bias, out_bias, residual, rescale, heads, dim_head, C, (H, W), B, proc, masked = case
    seed = 0
    rng = np.random.default_rng(seed)
    attn = Attention(
        C, cross_attention_dim=cross, heads=heads, dim_head=dim_head, bias=bias, out_bias=out_bias,
        norm_num_groups=groups, residual_connection=residual, rescale_output_factor=rescale,
        processor=PROCESSORS[proc](),
    ).double()  # fmt: skip
    randomise(attn, seed)
    params, options = from_diffusers(attn)
    x = leaf(rng, (B, C, H, W))
    context = leaf(rng, (B, 4, cross)) if cross else None
    mask = random_context_mask(rng, B, 4, always=0) if masked else None
    kwargs = {}
    if masked:  # diffusers' Attention takes an additive mask (B, 1, M): 0 keeps a token, -10000 drops it
        kwargs["attention_mask"] = torch.tensor(np.where(mask, 0.0, -10000.0)[:, None, :])
    y = attn(x, encoder_hidden_states=context, **kwargs)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))

    dy_ours = dy.transpose(0, 2, 3, 1)
    if cross:
        ours, cache = ar.cross_attention_forward(
            channels_last(x), context.detach().numpy(), params, context_mask=mask, **options
        )
        grads = ar.cross_attention_backward(dy_ours, cache)
    else:
        ours, cache = ar.self_attention_forward(channels_last(x), params, **options)
        grads = ar.self_attention_backward(dy_ours, cache)
    assert_matches_module(ours, grads, y, attn, params, x=x, context=context)
    assert cache.weights.shape == (B, heads, H * W, 4 if cross else H * W)


@needs_diffusers
def test_from_diffusers_options_and_keys():
    attn = Attention(8, heads=2, dim_head=4, norm_num_groups=4, eps=1e-6, bias=False, out_bias=False)
    params, options = from_diffusers(attn)
    assert set(params) == {"norm.weight", "norm.bias", "q.weight", "k.weight", "v.weight", "out.weight"}
    assert params["q.weight"].dtype == np.float64 and params["q.weight"].shape == (8, 8)
    assert options == {"heads": 2, "residual": False, "rescale": 1.0, "scale": 0.5, "groups": 4, "eps": 1e-6}
    params32, _ = from_diffusers(attn, dtype=None)
    assert params32["q.weight"].dtype == np.float32
    np.testing.assert_array_equal(params32["q.weight"], attn.to_q.weight.detach().numpy().T)


@needs_diffusers
@pytest.mark.parametrize(
    ("kwargs", "setup", "named"),
    [
        ({"spatial_norm_dim": 4}, None, "spatial_norm"),
        ({"added_kv_proj_dim": 4}, None, "added_kv_proj_dim"),
        ({"cross_attention_dim": 4, "cross_attention_norm": "layer_norm"}, None, "cross_attention_norm"),
        ({"qk_norm": "layer_norm"}, None, "qk_norm"),
        ({"kv_heads": 1}, None, "kv_heads"),
        ({"dropout": 0.1}, "train", "dropout p=0.1 in training mode"),
        ({"scale_qk": False}, "sdpa", "ignores attn.scale"),
    ],
)
def test_from_diffusers_names_what_it_cannot_express(kwargs, setup, named):
    attn = Attention(32, heads=2, dim_head=16, **kwargs)
    if setup == "train":
        attn.train()
    elif setup == "sdpa":
        attn.set_processor(AttnProcessor2_0())
    with pytest.raises(NotImplementedError, match=named):
        from_diffusers(attn)


@needs_diffusers
def test_dropout_is_fine_in_eval_mode_and_scale_qk_false_with_plain_processor():
    rng = np.random.default_rng(3)
    attn = randomise(Attention(6, heads=3, dim_head=2, dropout=0.5, scale_qk=False).double().eval(), 3)
    params, options = from_diffusers(attn)
    assert options["scale"] == 1.0
    x = torch.tensor(rng.standard_normal((2, 6, 3, 5)))
    y, _ = ar.self_attention_forward(x.permute(0, 2, 3, 1).numpy(), params, **options)
    assert rel_error(y, channels_last(attn(x))) <= TOL


@needs_diffusers
@pytest.mark.parametrize("cross", [None, 5])
def test_to_diffusers_round_trip(cross):
    """Reference weights pushed into a fresh module make it compute what the reference computes."""
    rng = np.random.default_rng(4)
    if cross:
        params = ar.init_cross_attention(8, cross, heads=2, groups=4, bias=False, rng=4)
    else:
        params = ar.init_self_attention(8, heads=2, groups=4, rng=4)
    params = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()}
    attn = Attention(8, cross_attention_dim=cross, heads=2, dim_head=4, norm_num_groups=4, eps=1e-6, bias=not cross,
                     residual_connection=True).double()  # fmt: skip
    state = to_diffusers(params, attn)
    assert state["to_q.weight"].shape == (8, 8) and "to_out.0.bias" in state and "group_norm.weight" in state
    x = rng.standard_normal((2, 3, 5, 8))
    context = rng.standard_normal((2, 4, cross)) if cross else None
    theirs = attn(
        torch.tensor(x.transpose(0, 3, 1, 2)), encoder_hidden_states=None if cross is None else torch.tensor(context)
    )
    _, options = from_diffusers(attn)
    if cross:
        ours, _ = ar.cross_attention_forward(x, context, params, **options)
    else:
        ours, _ = ar.self_attention_forward(x, params, **options)
    assert rel_error(ours, channels_last(theirs)) <= TOL
    back, _ = from_diffusers(attn)
    assert all(np.array_equal(back[k], params[k]) for k in params) and set(back) == set(params)


# ---------------------------------------------------------------- diffusers Transformer2DModel

# (id, linear projection, heads, head_dim, C, groups, D, layers, attention_bias, affine LN, map, B, masked)
TRANSFORMER_CASES = [
    ("conv 2 heads masked", False, 2, 4, 8, 4, 6, 1, False, True, (3, 5), 2, True),
    ("linear 4 heads 2 layers attention bias", True, 4, 2, 8, 2, 5, 2, True, True, (5, 3), 3, False),
    ("conv 1 head inner 6 != C 4", False, 1, 6, 4, 2, 3, 1, False, True, (3, 3), 2, False),
    ("linear 3 heads no LN affine masked", True, 3, 2, 6, 3, 4, 1, False, False, (1, 7), 2, True),
]


@needs_diffusers
@pytest.mark.parametrize("case", TRANSFORMER_CASES, ids=[c[0] for c in TRANSFORMER_CASES])
def test_matches_diffusers_transformer2d(case):
    _, linear, heads, head_dim, C, groups, D, layers, attn_bias, affine, (H, W), B, masked = case
    from diffusers.models import Transformer2DModel

    seed = 0
    rng = np.random.default_rng(seed)
    model = Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=C, num_layers=layers,
        norm_num_groups=groups, cross_attention_dim=D, attention_bias=attn_bias, use_linear_projection=linear,
        norm_elementwise_affine=affine,
    ).double()  # fmt: skip
    randomise(model, seed, std=0.3)
    params, options = from_diffusers_transformer2d(model)
    x, context = leaf(rng, (B, C, H, W)), leaf(rng, (B, 5, D))
    mask = random_context_mask(rng, B, 5, always=1) if masked else None
    kwargs = {} if mask is None else {"encoder_attention_mask": torch.tensor(mask)}
    (y,) = model(x, encoder_hidden_states=context, return_dict=False, **kwargs)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))
    ours, cache = ar.spatial_transformer_forward(
        channels_last(x), context.detach().numpy(), params, context_mask=mask, **options
    )
    grads = ar.spatial_transformer_backward(dy.transpose(0, 2, 3, 1), cache)
    assert_matches_module(ours, grads, y, model, params, x=x, context=context)
    assert cache.blocks[0].attn1.weights.shape == (B, heads, H * W, H * W)
    assert cache.blocks[0].attn2.weights.shape == (B, heads, H * W, 5)


@needs_diffusers
@pytest.mark.parametrize("linear", [False, True])
def test_transformer2d_round_trip(linear):
    from diffusers.models import Transformer2DModel

    params = ar.init_spatial_transformer(8, 6, heads=2, groups=4, rng=5)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4,
                               cross_attention_dim=6, use_linear_projection=linear).double()  # fmt: skip
    state = to_diffusers(params, model)
    assert state["proj_in.weight"].ndim == (2 if linear else 4)
    back, options = from_diffusers_transformer2d(model)
    assert set(back) == set(params) and all(np.array_equal(back[k], params[k]) for k in params)
    assert options == {"heads": 2, "groups": 4, "eps": 1e-6, "norm_eps": 1e-5, "scale": 0.5}


@needs_diffusers
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"activation_fn": "gelu"}, "activation_fn='gelu'"),
        ({"double_self_attention": True}, "double_self_attention"),
        ({"cross_attention_dim": None}, "no cross_attention_dim"),
        ({"norm_type": "ada_norm", "num_embeds_ada_norm": 10}, "norm_type='ada_norm'"),
    ],
)
def test_from_diffusers_transformer2d_names_what_it_cannot_express(kwargs, named):
    from diffusers.models import Transformer2DModel

    config = dict(num_attention_heads=1, attention_head_dim=4, in_channels=4, norm_num_groups=2, cross_attention_dim=3)
    model = Transformer2DModel(**{**config, **kwargs})
    with pytest.raises(NotImplementedError, match=named):
        from_diffusers_transformer2d(model)
