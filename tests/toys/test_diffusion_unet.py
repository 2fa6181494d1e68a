"""The diffusion U-Net's backward: against PyTorch autograd on the same model, by finite differences, identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import HAS_TORCH

from attention_ref.backend import to_numpy
from attention_ref.gradcheck import check_backward, rel_error
from attention_ref.toys.diffusion.unet import UNetConfig, init_unet, unet_backward, unet_forward

TINY = UNetConfig(channels=(4, 8), head_dim=4, groups=2, time_dim=8, context_dim=5, ff_mult=2)
SMALL = UNetConfig(channels=(8, 16), head_dim=4, groups=2, time_dim=16, context_dim=6, ff_mult=2)


def _case(config: UNetConfig, size: int, rng: np.random.Generator, batch: int = 2, tokens: int = 4):
    """Parameters moved off their init (zero convs, unit norms) and inputs with one padded token."""
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in init_unet(config, rng=rng).items()}
    x = rng.standard_normal((batch, size, size, config.image_channels))
    t = rng.uniform(0, 999, size=batch)
    context = rng.standard_normal((batch, tokens, config.context_dim))
    mask = np.ones((batch, tokens), dtype=bool)
    mask[0, -1] = False
    return params, x, t, context, mask


# ---------------------------------------------------------------- the twin in PyTorch


def _torch_unet(P, x, t, context, mask, config):
    """The same U-Net written directly with torch ops, channels-last like ours (NCHW only inside conv/norm)."""
    import torch
    import torch.nn.functional as F

    def conv(h, name, pad=1):
        w = P[f"{name}.weight"].permute(3, 2, 0, 1)  # (k, k, C_in, C_out) → (C_out, C_in, k, k)
        return F.conv2d(h.permute(0, 3, 1, 2), w, P[f"{name}.bias"], padding=pad).permute(0, 2, 3, 1)

    def gn(h, name, eps):
        y = F.group_norm(h.permute(0, 3, 1, 2), config.groups, P[f"{name}.weight"], P[f"{name}.bias"], eps)
        return y.permute(0, 2, 3, 1)

    def lin(h, name):
        y = h @ P[f"{name}.weight"]
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    def res(h, temb, name):
        a = conv(F.silu(gn(h, f"{name}.norm1", 1e-6)), f"{name}.conv1")
        a = a + lin(F.silu(temb), f"{name}.time")[:, None, None, :]
        r = conv(F.silu(gn(a, f"{name}.norm2", 1e-6)), f"{name}.conv2")
        return (lin(h, f"{name}.skip") if f"{name}.skip.weight" in P else h) + r

    def attend(q_in, kv_in, name, heads, key_mask):
        q, k, v = lin(q_in, f"{name}.q"), lin(kv_in, f"{name}.k"), lin(kv_in, f"{name}.v")
        B, N, inner = q.shape
        d = inner // heads
        qh, kh, vh = (a.reshape(B, a.shape[1], heads, d).transpose(1, 2) for a in (q, k, v))
        logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        o = (torch.softmax(logits, dim=-1) @ vh).transpose(1, 2).reshape(B, N, inner)
        return lin(o, f"{name}.out")

    def transformer(h, name, heads):
        B, H, W, C = h.shape
        z = lin(gn(h, f"{name}.norm", 1e-6).reshape(B, H * W, C), f"{name}.proj_in")
        b = f"{name}.blocks.0"

        def ln(a, n):
            return F.layer_norm(a, (a.shape[-1],), P[f"{b}.{n}.weight"], P[f"{b}.{n}.bias"], 1e-5)

        n1 = ln(z, "norm1")
        z = z + attend(n1, n1, f"{b}.attn1", heads, None)
        z = z + attend(ln(z, "norm2"), ctx, f"{b}.attn2", heads, key_mask)
        value, gate = lin(ln(z, "norm3"), f"{b}.ff.proj").chunk(2, dim=-1)
        z = z + lin(value * F.gelu(gate), f"{b}.ff.out")
        return h + lin(z, f"{name}.proj_out").reshape(B, H, W, C)

    ctx, key_mask = context, torch.as_tensor(mask)
    half = config.channels[0] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype) / half)
    e = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    temb = lin(F.silu(lin(e, "time.0")), "time.1")
    L = len(config.channels)
    h = conv(x, "conv_in")
    skips = []
    for i in range(L):
        h = res(h, temb, f"down.{i}.res")
        if config.down_attention[i]:
            h = transformer(h, f"down.{i}.attn", config.heads(i))
        skips.append(h)
        if i < L - 1:
            h = F.avg_pool2d(h.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    h = res(h, temb, "mid.res1")
    h = transformer(h, "mid.attn", config.heads(L - 1))
    h = res(h, temb, "mid.res2")
    for i in reversed(range(L)):
        h = res(torch.cat([h, skips[i]], dim=-1), temb, f"up.{i}.res")
        if config.up_attention[i]:
            h = transformer(h, f"up.{i}.attn", config.heads(i))
        if i > 0:
            h = F.interpolate(h.permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
            h = conv(h, f"up.{i}.upsample")
    return conv(F.silu(gn(h, "out.norm", 1e-6)), "out.conv")


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        UNetConfig(
            channels=(8, 8, 16),
            down_attention=(True, False, True),
            up_attention=(False, True, True),
            head_dim=8,
            groups=4,
            time_dim=8,
            context_dim=6,
        ),
    ],
    ids=["two levels", "three levels, mixed attention"],
)
def test_whole_unet_forward_and_backward_match_torch_autograd_to_1e_10(config, rng):
    import torch

    params, x, t, context, mask = _case(config, 8, rng)
    eps, cache = unet_forward(params, x, t, context, mask, config=config)
    deps = rng.standard_normal(eps.shape)
    ours = unet_backward(deps, cache)

    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    inputs = {k: torch.tensor(v, requires_grad=True) for k, v in (("x", x), ("t", t), ("context", context))}
    theirs = _torch_unet(P, inputs["x"], inputs["t"], inputs["context"], mask, config)
    theirs.backward(torch.tensor(deps))

    assert rel_error(eps, theirs.detach().numpy()) < 1e-12
    assert set(ours) == set(params) | {"x", "t", "context"}
    errors = {k: rel_error(ours[k], P[k].grad.numpy()) for k in params}
    errors.update({k: rel_error(ours[k], inputs[k].grad.numpy()) for k in inputs})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    # padding gets no gradient
    assert np.all(ours["context"][0, -1] == 0.0)


# ---------------------------------------------------------------- finite differences


def test_unet_input_gradients_match_finite_differences(rng):
    params, x, t, context, mask = _case(TINY, 4, rng)

    def forward(x, t, context):
        return unet_forward(params, x, t, context, mask, config=TINY)

    errors = check_backward(forward, unet_backward, {"x": x, "t": t, "context": context})
    assert max(errors.values()) < 1e-7, errors


def test_every_parameter_gradient_matches_finite_differences(rng):
    """Three entries of every parameter, and the derivative along a random direction of each whole tensor."""
    params, x, t, context, mask = _case(TINY, 4, rng)
    eps, cache = unet_forward(params, x, t, context, mask, config=TINY)
    deps = rng.standard_normal(eps.shape)
    grads = unet_backward(deps, cache)
    h = 1e-6

    def loss(name, value):
        out, _ = unet_forward({**params, name: value}, x, t, context, mask, config=TINY)
        return float(np.sum(out * deps))

    worst = 0.0
    for name, p in params.items():
        scale = float(np.max(np.abs(grads[name])))
        flat = [int(i) for i in rng.choice(p.size, size=min(3, p.size), replace=False)]
        for i in flat:
            step = np.zeros(p.size)
            step[i] = h
            step = step.reshape(p.shape)
            numeric = (loss(name, p + step) - loss(name, p - step)) / (2 * h)
            worst = max(worst, abs(numeric - grads[name].reshape(-1)[i]) / max(scale, 1e-8))
        v = rng.standard_normal(p.shape)
        numeric = (loss(name, p + h * v) - loss(name, p - h * v)) / (2 * h)
        # |⟨g, v⟩| ≤ ‖g‖ ‖v‖: the error relative to that bound
        bound = np.linalg.norm(grads[name]) * np.linalg.norm(v)
        worst = max(worst, abs(numeric - float(np.sum(grads[name] * v))) / max(bound, 1e-8))
    assert worst < 1e-6, worst


# ---------------------------------------------------------------- identities and shapes


def test_a_fresh_unet_predicts_zero_noise_and_each_sample_is_independent(rng):
    params = init_unet(TINY, rng=0)
    x = rng.standard_normal((3, 4, 4, 3))
    t = np.array([1.0, 500.0, 999.0])
    context = rng.standard_normal((3, 4, 5))
    mask = np.ones((3, 4), dtype=bool)
    eps, _ = unet_forward(params, x, t, context, mask, config=TINY)
    assert np.all(eps == 0.0)  # the output convolution starts at zero
    params, *_ = _case(TINY, 4, rng)
    eps, _ = unet_forward(params, x, t, context, mask, config=TINY)
    alone, _ = unet_forward(params, x[1:2], t[1:2], context[1:2], mask[1:2], config=TINY)
    # group norms are per sample: a sample's prediction does not depend on its batch
    np.testing.assert_allclose(alone[0], eps[1], rtol=1e-12, atol=1e-14)


def test_padded_tokens_change_nothing(rng):
    params, x, t, context, mask = _case(TINY, 4, rng)
    eps, _ = unet_forward(params, x, t, context, mask, config=TINY)
    other = context.copy()
    other[0, -1] = 100.0 * rng.standard_normal(TINY.context_dim)  # the padded token of sample 0
    eps2, _ = unet_forward(params, x, t, other, mask, config=TINY)
    np.testing.assert_array_equal(eps, eps2)


def test_the_cache_holds_every_transformers_weights_with_rows_summing_to_one(rng):
    params, x, t, context, mask = _case(SMALL, 8, rng)
    _, cache = unet_forward(params, x, t, context, mask, config=SMALL)
    assert list(cache.transformers) == [name for name, _ in SMALL.transformer_names()]
    assert list(cache.transformers) == ["down.1.attn", "mid.attn", "up.1.attn", "up.0.attn"]
    for name, st in cache.transformers.items():
        level = 0 if name.startswith("up.0") else 1
        n = (8 // 2**level) ** 2
        cross, own = np.asarray(st.blocks[0].attn2.weights), np.asarray(st.blocks[0].attn1.weights)
        assert cross.shape == (2, SMALL.heads(level), n, 4) and own.shape == (2, SMALL.heads(level), n, n)
        np.testing.assert_allclose(cross.sum(-1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(own.sum(-1), 1.0, rtol=1e-12)
        assert np.all(cross[0, ..., -1] == 0.0)  # the padded token


def test_the_whole_unet_runs_on_every_backend_and_equals_numpy(be, rng):
    params, x, t, context, mask = _case(TINY, 4, rng)
    eps, cache = unet_forward(params, x, t, context, mask, config=TINY)
    grads = unet_backward(np.ones_like(eps), cache)
    theirs = {k: be(v) for k, v in params.items()}
    eps_b, cache_b = unet_forward(theirs, be(x), be(t), be(context), be(mask), config=TINY)
    grads_b = unet_backward(be(np.ones_like(eps)), cache_b)
    assert be.is_native(eps_b) and all(be.is_native(g) for g in grads_b.values())
    np.testing.assert_allclose(to_numpy(eps_b), eps, rtol=1e-12, atol=1e-12)
    assert set(grads_b) == set(grads)
    for k, g in grads.items():
        assert rel_error(to_numpy(grads_b[k]), g) < 1e-10, k


def test_bad_inputs_are_named(rng):
    params, x, t, context, mask = _case(TINY, 4, rng)
    with pytest.raises(ValueError, match=r"cannot be halved"):
        unet_forward(params, np.zeros((2, 5, 5, 3)), t, context, mask, config=TINY)
    with pytest.raises(ValueError, match=r"t must be \(2,\)"):
        unet_forward(params, x, t[:1], context, mask, config=TINY)
    with pytest.raises(ValueError, match=r"context must be \(2, M, 5\)"):
        unet_forward(params, x, t, context[..., :4], mask, config=TINY)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 3\)"):
        unet_forward(params, x[0], t, context, mask, config=TINY)
    with pytest.raises(ValueError, match="not divisible by groups"):
        UNetConfig(channels=(6, 8), groups=4, head_dim=2)
    with pytest.raises(ValueError, match="attention flags"):
        UNetConfig(channels=(8, 16), down_attention=(True,))
    with pytest.raises(ValueError, match=r"sizes must be positive, got \{'head_dim': 0\}"):
        UNetConfig(channels=(8, 8), head_dim=0)
    with pytest.raises(TypeError, match="share one dtype"):
        unet_forward(params, x.astype(np.float32), t, context, mask, config=TINY)
