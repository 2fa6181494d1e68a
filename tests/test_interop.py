"""Loading real attention blocks: diffusers Attention and Transformer2DModel, and torch restatements of
CompVis's AttnBlock and OpenAI's AttentionBlock (legacy and new q/k/v order).

Every peer runs in float64 with all weights randomised (the originals zero-initialise their output
projections, which would hide half the gradients); forward and every gradient — x, context and
each weight — must agree to 1e-9 relative (they agree to ~1e-15).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from block_helpers import grad_errors

import attention_ref as ar
from attention_ref.gradcheck import rel_error
from attention_ref.interop import (
    from_diffusers,
    from_diffusers_transformer2d,
    from_guided_diffusion,
    from_ldm_attnblock,
    to_diffusers,
)

torch = pytest.importorskip("torch", reason="torch is not installed")
nn = torch.nn
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")

TOL = 1e-9


def randomise(module, seed, std=0.4):
    """Every parameter of ``module`` drawn from N(0, std²), norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def channels_last(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def leaf(rng, shape):
    return torch.tensor(rng.standard_normal(shape), requires_grad=True)


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


def run_diffusers_attention(case, seed=0):
    """Forward and backward of one case in diffusers and in attention_ref; {output/grad name: rel error}."""
    _, cross, groups, bias, out_bias, residual, rescale, heads, dim_head, C, (H, W), B, proc, masked = case
    rng = np.random.default_rng(seed)
    attn = Attention(
        C,
        cross_attention_dim=cross,
        heads=heads,
        dim_head=dim_head,
        bias=bias,
        out_bias=out_bias,
        norm_num_groups=groups,
        residual_connection=residual,
        rescale_output_factor=rescale,
        processor=PROCESSORS[proc](),
    ).double()
    randomise(attn, seed)
    params, options = from_diffusers(attn)
    x = leaf(rng, (B, C, H, W))
    context = leaf(rng, (B, 4, cross)) if cross else None
    mask = None
    kwargs = {}
    if masked:
        mask = rng.random((B, 4)) > 0.4
        mask[:, 0] = True
        # diffusers' Attention takes an additive mask (B, 1, M): 0 keeps a token, -10000 drops it
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
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0", "norm": "group_norm"}
    theirs = {n: p.grad for n, p in attn.named_parameters()}
    expected = {"x": x.grad.permute(0, 2, 3, 1).numpy()}
    if cross:
        expected["context"] = context.grad.numpy()
    for key in params:
        layer, kind = key.rsplit(".", 1)
        g = theirs[f"{names[layer]}.{kind}"].numpy()
        expected[key] = g.T if g.ndim == 2 else g
    errors = {"y": rel_error(ours, channels_last(y))}
    errors.update(grad_errors(grads, expected))
    assert cache.weights.shape == (B, heads, H * W, 4 if cross else H * W)
    return errors


@needs_diffusers
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_matches_diffusers_attention(case):
    errors = run_diffusers_attention(case)
    assert max(errors.values()) <= TOL, errors


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


def run_transformer2d(case, seed=0):
    _, linear, heads, head_dim, C, groups, D, layers, attn_bias, affine, (H, W), B, masked = case
    from diffusers.models import Transformer2DModel

    rng = np.random.default_rng(seed)
    model = Transformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=C,
        num_layers=layers,
        norm_num_groups=groups,
        cross_attention_dim=D,
        attention_bias=attn_bias,
        use_linear_projection=linear,
        norm_elementwise_affine=affine,
    ).double()
    randomise(model, seed, std=0.3)
    params, options = from_diffusers_transformer2d(model)
    x, context = leaf(rng, (B, C, H, W)), leaf(rng, (B, 5, D))
    mask = None
    kwargs = {}
    if masked:
        mask = rng.random((B, 5)) > 0.4
        mask[:, 1] = True
        kwargs["encoder_attention_mask"] = torch.tensor(mask)
    (y,) = model(x, encoder_hidden_states=context, return_dict=False, **kwargs)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))
    ours, cache = ar.spatial_transformer_forward(
        channels_last(x), context.detach().numpy(), params, context_mask=mask, **options
    )
    grads = ar.spatial_transformer_backward(dy.transpose(0, 2, 3, 1), cache)
    # map the module's gradients onto reference names through to_diffusers' naming (tested by the round trip)
    names = dict(zip(params, to_diffusers(params), strict=True))
    module_grads = {n: p.grad for n, p in model.named_parameters()}
    expected = {"x": x.grad.permute(0, 2, 3, 1).numpy(), "context": context.grad.numpy()}
    for ours_name, theirs_name in names.items():
        g = module_grads[theirs_name].numpy()
        expected[ours_name] = g.reshape(g.shape[0], g.shape[1]).T if g.ndim >= 2 else g
    errors = {"y": rel_error(ours, channels_last(y))}
    errors.update(grad_errors(grads, expected))
    assert cache.blocks[0].attn1.weights.shape == (B, heads, H * W, H * W)
    assert cache.blocks[0].attn2.weights.shape == (B, heads, H * W, 5)
    return errors


@needs_diffusers
@pytest.mark.parametrize("case", TRANSFORMER_CASES, ids=[c[0] for c in TRANSFORMER_CASES])
def test_matches_diffusers_transformer2d(case):
    errors = run_transformer2d(case)
    assert max(errors.values()) <= TOL, errors


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


# ---------------------------------------------------------------- CompVis AttnBlock, restated


class LdmAttnBlock(nn.Module):
    """CompVis's VAE ``AttnBlock`` restated from ldm/modules/diffusionmodules/model.py.

    GroupNorm(32 groups, eps 1e-6, affine) → q, k, v 1×1 convolutions → one head of attention
    over the H·W pixels with logits scaled by C^(-1/2) → 1×1 convolution proj_out → + input.
    """

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).reshape(B, C, H * W) for layer in (self.q, self.k, self.v))  # (B, C, N) each
        logits = torch.bmm(q.transpose(1, 2), k) / math.sqrt(C)  # (B, N queries, N keys)
        weights = torch.softmax(logits, dim=2)
        attended = torch.bmm(v, weights.transpose(1, 2))  # (B, C, N queries)
        return x + self.proj_out(attended.reshape(B, C, H, W))


def _params_and_errors(block, params, options, x_shape, rng, expected_names):
    x = leaf(rng, x_shape)
    y = block(x)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))
    ours, cache = ar.self_attention_forward(channels_last(x), params, **options)
    grads = ar.self_attention_backward(dy.transpose(0, 2, 3, 1), cache)
    expected = {"x": x.grad.permute(0, 2, 3, 1).numpy(), **expected_names(block)}
    errors = {"y": rel_error(ours, channels_last(y))}
    errors.update(grad_errors(grads, expected))
    return errors


def run_ldm(C, H, W, B, seed=0, numpy_state=False):
    rng = np.random.default_rng(seed)
    block = randomise(LdmAttnBlock(C).double(), seed)
    state = block.state_dict()
    if numpy_state:
        state = {k: v.numpy() for k, v in state.items()}
    params, options = from_ldm_attnblock(state)

    def names(b):
        g = {"norm.weight": b.norm.weight.grad.numpy(), "norm.bias": b.norm.bias.grad.numpy()}
        for ours, layer in (("q", b.q), ("k", b.k), ("v", b.v), ("out", b.proj_out)):
            g[f"{ours}.weight"] = layer.weight.grad[:, :, 0, 0].numpy().T
            g[f"{ours}.bias"] = layer.bias.grad.numpy()
        return g

    return _params_and_errors(block, params, options, (B, C, H, W), rng, names)


@pytest.mark.parametrize(("C", "H", "W", "B", "numpy_state"), [(32, 3, 5, 2, False), (64, 5, 3, 3, True)])
def test_matches_compvis_attnblock(C, H, W, B, numpy_state):
    errors = run_ldm(C, H, W, B, numpy_state=numpy_state)
    assert max(errors.values()) <= TOL, errors


def test_from_ldm_attnblock_prefix_and_missing_keys():
    state = {f"mid.attn_1.{k}": v for k, v in LdmAttnBlock(32).state_dict().items()}
    params, options = from_ldm_attnblock(state, prefix="mid.attn_1.")
    assert options == {"heads": 1, "groups": 32, "eps": 1e-6, "residual": True, "rescale": 1.0, "scale": None}
    assert params["out.weight"].shape == (32, 32)
    with pytest.raises(KeyError, match="lacks"):
        from_ldm_attnblock(state)


# ---------------------------------------------------------------- OpenAI AttentionBlock, restated


class OpenAIAttentionBlock(nn.Module):
    """OpenAI's ``AttentionBlock`` restated from guided_diffusion/unet.py (2-D maps).

    GroupNorm(32, eps 1e-5) on the flattened map → fused 1×1 Conv1d ``qkv`` (C → 3C) → attention
    with q and k each scaled by ch^(-1/4) → 1×1 Conv1d ``proj_out`` → + input. ``QKVAttentionLegacy``
    reads the 3C channels as (heads, q/k/v, ch); ``QKVAttention`` (the "new" order) as (q/k/v, heads, ch).
    (The original's GroupNorm32 computes in float32; this restatement stays in float64.)
    """

    def __init__(self, channels, heads, order):
        super().__init__()
        self.heads, self.order = heads, order
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def attention(self, qkv):
        B, three_c, N = qkv.shape
        ch = three_c // (3 * self.heads)
        if self.order == "legacy":
            q, k, v = qkv.reshape(B * self.heads, 3 * ch, N).split(ch, dim=1)  # heads first, then q/k/v
        else:
            q, k, v = (t.reshape(B * self.heads, ch, N) for t in qkv.chunk(3, dim=1))  # q/k/v first, then heads
        s = ch**-0.25
        weights = torch.softmax(torch.bmm((q * s).transpose(1, 2), k * s), dim=-1)  # (B·heads, N, N)
        return torch.bmm(v, weights.transpose(1, 2)).reshape(B, -1, N)  # (B, C, N)

    def forward(self, x):
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        out = self.proj_out(self.attention(self.qkv(self.norm(flat))))
        return (flat + out).reshape(B, C, H, W)


def fuse_qkv(q, k, v, heads, order):
    """The inverse of the q/k/v split: three (..., C) arrays into the fused (..., 3C) layout."""
    *lead, C = q.shape
    ch = C // heads
    parts = [a.reshape(*lead, heads, ch) for a in (q, k, v)]
    stacked = np.stack(parts, axis=-2) if order == "legacy" else np.stack(parts, axis=-3)
    return stacked.reshape(*lead, 3 * C)


def run_openai(C, heads, order, H, W, B, seed=0):
    rng = np.random.default_rng(seed)
    block = randomise(OpenAIAttentionBlock(C, heads, order).double(), seed)
    params, options = from_guided_diffusion(block.state_dict(), heads, order=order)
    # the split must be the inverse of the fused layout
    np.testing.assert_array_equal(
        fuse_qkv(params["q.weight"], params["k.weight"], params["v.weight"], heads, order),
        block.qkv.weight.detach()[:, :, 0].numpy().T,
    )

    def names(b):
        gw, gb = b.qkv.weight.grad[:, :, 0].numpy().T, b.qkv.bias.grad.numpy()  # (C, 3C), (3C,)
        g = {"norm.weight": b.norm.weight.grad.numpy(), "norm.bias": b.norm.bias.grad.numpy()}
        g["out.weight"], g["out.bias"] = b.proj_out.weight.grad[:, :, 0].numpy().T, b.proj_out.bias.grad.numpy()
        return g, gw, gb

    # compare q/k/v gradients in the fused layout: fuse ours the same way
    x = leaf(rng, (B, C, H, W))
    y = block(x)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))
    ours, cache = ar.self_attention_forward(channels_last(x), params, **options)
    grads = ar.self_attention_backward(dy.transpose(0, 2, 3, 1), cache)
    g, gw, gb = names(block)
    result = {"y": rel_error(ours, channels_last(y))}
    fused = {
        "x": grads["x"],
        "qkv.weight": fuse_qkv(grads["q.weight"], grads["k.weight"], grads["v.weight"], heads, order),
        "qkv.bias": fuse_qkv(grads["q.bias"], grads["k.bias"], grads["v.bias"], heads, order),
        **{k: grads[k] for k in g},
    }
    result.update(grad_errors(fused, {"x": x.grad.permute(0, 2, 3, 1).numpy(), "qkv.weight": gw, "qkv.bias": gb, **g}))
    return result


@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize(("C", "heads", "H", "W", "B"), [(32, 1, 3, 5, 2), (32, 2, 5, 3, 2), (64, 4, 3, 3, 3)])
def test_matches_openai_attention_block(order, C, heads, H, W, B):
    errors = run_openai(C, heads, order, H, W, B)
    assert max(errors.values()) <= TOL, errors


def test_legacy_and_new_orders_differ():
    """The two layouts are really different: loading one as the other gives another block."""
    block = randomise(OpenAIAttentionBlock(32, 2, "legacy").double(), 1)
    legacy, _ = from_guided_diffusion(block.state_dict(), 2, order="legacy")
    new, _ = from_guided_diffusion(block.state_dict(), 2, order="new")
    assert not np.allclose(legacy["k.weight"], new["k.weight"])
    with pytest.raises(ValueError, match="order must be 'legacy' or 'new'"):
        from_guided_diffusion(block.state_dict(), 2, order="old")
    with pytest.raises(ValueError, match="32 channels are not divisible into 3 heads"):
        from_guided_diffusion(block.state_dict(), 3)
