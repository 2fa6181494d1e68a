"""Loading checkpoints' attention blocks: torch restatements of CompVis's AttnBlock and OpenAI's AttentionBlock
(legacy and new q/k/v order), from their state dicts; and the dtype every loader returns.

Every block runs in float64 with all weights randomised; forward and every gradient must agree to 1e-9 relative.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from block_helpers import grad_errors
from interop_helpers import TOL, channels_last, leaf, randomise

import attention_ref as ar
from attention_ref.gradcheck import rel_error
from attention_ref.interop import from_guided_diffusion, from_ldm_attnblock

torch = pytest.importorskip("torch", reason="torch is not installed")
nn = torch.nn

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


def _params_and_errors(block, params, options, x_shape, rng, expected_names, layout=lambda grads: grads):
    """The block and the reference forward and backward on one input; {output/gradient: rel error}.

    ``expected_names(block)``: the block's weight gradients under the names ``layout(grads)`` gives ours.
    """
    x = leaf(rng, x_shape)
    y = block(x)
    dy = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(dy))
    ours, cache = ar.self_attention_forward(channels_last(x), params, **options)
    grads = ar.self_attention_backward(dy.transpose(0, 2, 3, 1), cache)
    expected = {"x": x.grad.permute(0, 2, 3, 1).numpy(), **expected_names(block)}
    errors = {"y": rel_error(ours, channels_last(y))}
    errors.update(grad_errors(layout(grads), expected))
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
        g = {"norm.weight": b.norm.weight.grad.numpy(), "norm.bias": b.norm.bias.grad.numpy()}
        g["out.weight"], g["out.bias"] = b.proj_out.weight.grad[:, :, 0].numpy().T, b.proj_out.bias.grad.numpy()
        g["qkv.weight"], g["qkv.bias"] = b.qkv.weight.grad[:, :, 0].numpy().T, b.qkv.bias.grad.numpy()  # (C, 3C)
        return g

    def fused(grads):  # the q/k/v gradients compared in the fused layout: ours fused the same way
        qkv = {f"qkv.{kind}": fuse_qkv(grads[f"q.{kind}"], grads[f"k.{kind}"], grads[f"v.{kind}"], heads, order)
               for kind in ("weight", "bias")}  # fmt: skip
        return {n: g for n, g in grads.items() if n.split(".")[0] not in ("q", "k", "v")} | qkv

    return _params_and_errors(block, params, options, (B, C, H, W), rng, names, fused)


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


@pytest.mark.parametrize(("heads", "error", "message"), [
    (True, TypeError, "heads must be an int, got bool True"),
    (2.0, TypeError, "heads must be an int, got float 2.0"),
    (0, ValueError, "heads must be at least 1, got 0"),
])  # fmt: skip
def test_guided_diffusion_heads_checked_by_name(heads, error, message):
    """``heads`` goes through the one check of a count (a bool or a float is not taken for a number of heads)."""
    block = OpenAIAttentionBlock(32, 2, "legacy")
    with pytest.raises(error, match=f"from_guided_diffusion: {message}"):
        from_guided_diffusion(block.state_dict(), heads)


# ---------------------------------------------------------------- the dtype every loader returns


def _loaders():
    """(name, loader(dtype)) for every loader of attention_ref.interop (those of diffusers when it is installed)."""
    ldm = LdmAttnBlock(32).state_dict()
    openai = OpenAIAttentionBlock(32, 2, "legacy").state_dict()
    loaders = [
        ("from_ldm_attnblock", lambda dtype: from_ldm_attnblock(ldm, dtype=dtype)),
        ("from_guided_diffusion", lambda dtype: from_guided_diffusion(openai, 2, dtype=dtype)),
    ]
    if importlib.util.find_spec("diffusers") is not None:
        from diffusers.models import Transformer2DModel
        from diffusers.models.attention_processor import Attention
        from diffusers.models.transformers.transformer_wan import WanAttention

        from attention_ref.interop import from_diffusers, from_diffusers_joint, from_diffusers_transformer2d
        from attention_ref.interop.trace.families.wan import from_wan_attention

        attn = Attention(8, heads=2, dim_head=4)
        model = Transformer2DModel(num_attention_heads=1, attention_head_dim=4, in_channels=4, norm_num_groups=2,
                                   cross_attention_dim=3)  # fmt: skip
        wan = WanAttention(8, heads=2, dim_head=4)
        loaders += [
            ("from_diffusers", lambda dtype: from_diffusers(attn, dtype=dtype)),
            ("from_diffusers_transformer2d", lambda dtype: from_diffusers_transformer2d(model, dtype=dtype)),
            ("from_diffusers_joint", lambda dtype: from_diffusers_joint(attn, dtype=dtype)),
            ("from_wan_attention", lambda dtype: from_wan_attention(wan, dtype=dtype)),
        ]
    return loaders


@pytest.mark.parametrize("dtype", ["int64", bool, "complex128", "bfloat16", "float128", "x"])
def test_every_loader_refuses_a_dtype_that_would_truncate_the_weights(dtype):
    # from_diffusers and the checkpoint loaders used to cast every weight to int64, bool or complex without a word
    floats = r"\('float16', 'float32', 'float64'\)"
    for name, load in _loaders():
        with pytest.raises(TypeError, match=rf"{name}: dtype must be None or one of {floats}"):
            load(dtype)


def test_every_loader_returns_the_float_dtype_asked_for():
    for name, load in _loaders():
        for dtype, want in (("float16", np.float16), (np.float32, np.float32), ("float64", np.float64)):
            params, _ = load(dtype)
            assert all(p.dtype == want for p in params.values()), (name, dtype)
