"""Patchify / unpatchify: the index formula, each the other's inverse, against DiT's patch embedding, SD3's
unpatchify and Flux's latent packing, finite differences, backends, and the inputs they refuse."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import HAS_TORCH, np_

from attention_ref.gradcheck import check_backward
from attention_ref.ops import patchify_backward, patchify_forward, unpatchify_backward, unpatchify_forward

HAS_DIFFUSERS = HAS_TORCH and importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="torch and diffusers are not installed")
ORDERS = ["pqc", "cpq"]


@pytest.mark.parametrize("patch", [1, 2, (2, 3)], ids=["p=1", "p=2", "2×3"])
def test_patchify_puts_every_pixel_where_the_formula_says(be, rng, patch):
    p_h, p_w = (patch, patch) if isinstance(patch, int) else patch
    B, h, w, C = 2, 3, 2, 4
    x = rng.standard_normal((B, h * p_h, w * p_w, C))
    tokens, cache = patchify_forward(be(x), patch)
    tokens_cpq, _ = patchify_forward(be(x), patch, channel_order="cpq")
    assert be.is_native(tokens) and tokens.shape == (B, h * w, p_h * p_w * C) and cache.grid == (h, w)
    tokens, tokens_cpq = np_(tokens), np_(tokens_cpq)
    for i in range(h):
        for j in range(w):
            for u in range(p_h):
                for v in range(p_w):
                    pixel = x[:, i * p_h + u, j * p_w + v, :]  # (B, C)
                    # token i·w + j (row-major over the grid); channel (u·p_w + v)·C + c, or (c·p_h + u)·p_w + v
                    np.testing.assert_array_equal(tokens[:, i * w + j, (u * p_w + v) * C + np.arange(C)], pixel)
                    np.testing.assert_array_equal(tokens_cpq[:, i * w + j, (np.arange(C) * p_h + u) * p_w + v], pixel)


@pytest.mark.parametrize("order", ORDERS)
def test_unpatchify_inverts_patchify_both_ways(be, rng, order):
    x = rng.standard_normal((2, 6, 4, 3))
    tokens, cache = patchify_forward(be(x), 2, channel_order=order)
    back, _ = unpatchify_forward(tokens, cache.grid, 2, channel_order=order)
    assert be.is_native(back)
    np.testing.assert_array_equal(np_(back), x)
    t = rng.standard_normal((2, 6, 12))
    again, _ = patchify_forward(unpatchify_forward(be(t), (3, 2), 2, channel_order=order)[0], 2, channel_order=order)
    np.testing.assert_array_equal(np_(again), t)


@pytest.mark.parametrize("order", ORDERS)
def test_patchify_backwards_match_finite_differences(rng, order):
    def patchify(x):
        return patchify_forward(x, (2, 1), channel_order=order)

    def unpatchify(tokens):
        return unpatchify_forward(tokens, (2, 3), (1, 2), channel_order=order)

    assert check_backward(patchify, patchify_backward, {"x": rng.standard_normal((2, 4, 3, 2))})["x"] < 1e-9
    assert check_backward(unpatchify, unpatchify_backward, {"tokens": rng.standard_normal((2, 6, 4))})["tokens"] < 1e-9


def test_each_backward_is_the_other_forward(be, rng):
    x = rng.standard_normal((1, 4, 6, 2))
    tokens, cache = patchify_forward(be(x), 2)
    dt = rng.standard_normal(tuple(tokens.shape))
    dx = patchify_backward(be(dt), cache)["x"]
    assert be.is_native(dx)
    np.testing.assert_array_equal(np_(dx), np_(unpatchify_forward(be(dt), (2, 3), 2)[0]))
    _, ucache = unpatchify_forward(tokens, (2, 3), 2)
    np.testing.assert_array_equal(np_(unpatchify_backward(be(x), ucache)["tokens"]), np_(tokens))


@needs_diffusers
def test_patchify_then_linear_is_dits_patch_embedding(rng):
    """DiT/PixArt/SD3's PatchEmbed is a p×p convolution of stride p: patchify, then a linear layer whose matrix
    is the convolution's (out, C, p, p) weight permuted to (p, p, C) × out."""
    import torch
    from diffusers.models.embeddings import PatchEmbed

    embed = PatchEmbed(height=6, width=8, patch_size=2, in_channels=3, embed_dim=5, pos_embed_type=None).double()
    x = rng.standard_normal((2, 6, 8, 3))
    theirs = embed(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()  # (B, N, 5)
    W = embed.proj.weight.detach().numpy()  # (out, C, p, p)
    tokens, cache = patchify_forward(x, 2)
    ours = tokens @ W.transpose(2, 3, 1, 0).reshape(12, 5) + embed.proj.bias.detach().numpy()
    assert cache.grid == (3, 4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=1e-14)


@needs_diffusers
def test_unpatchify_is_sd3s_and_flux_packing_is_cpq(rng):
    import torch
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    # SD3 (and DiT, PixArt): reshape to (B, h, w, p, p, C), then einsum "nhwpqc->nchpwq", then (B, C, H, W)
    tokens = rng.standard_normal((2, 12, 4 * 5))
    t = torch.from_numpy(tokens).reshape(2, 3, 4, 2, 2, 5)
    theirs = torch.einsum("nhwpqc->nchpwq", t).reshape(2, 5, 6, 8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(unpatchify_forward(tokens, (3, 4), 2)[0], theirs)
    # Flux's pipeline packs its (B, C, H, W) latents into 2×2 patches channel-first
    x = rng.standard_normal((2, 6, 8, 5))
    packed = FluxPipeline._pack_latents(torch.from_numpy(x).permute(0, 3, 1, 2), 2, 5, 6, 8).numpy()
    np.testing.assert_array_equal(patchify_forward(x, 2, channel_order="cpq")[0], packed)
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(packed), 6 * 8, 8 * 8, 8)  # vae_scale_factor 8
    np.testing.assert_array_equal(
        unpatchify_forward(packed, (3, 4), 2, channel_order="cpq")[0], unpacked.permute(0, 2, 3, 1).numpy()
    )


def test_patchify_refuses_bad_input(rng):
    with pytest.raises(ValueError, match=r"5×8 map is not divisible into 2×2 patches \(H % 2 = 1, W % 2 = 0\)"):
        patchify_forward(rng.standard_normal((1, 5, 8, 3)), 2)
    with pytest.raises(ValueError, match=r"6×7 map is not divisible into 2×2"):
        patchify_forward(rng.standard_normal((1, 6, 7, 3)), 2)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        patchify_forward(rng.standard_normal((6, 8, 3)), 2)
    with pytest.raises(ValueError, match="patch must be"):
        patchify_forward(rng.standard_normal((1, 6, 8, 3)), 0)
    with pytest.raises(ValueError, match="channel_order"):
        patchify_forward(rng.standard_normal((1, 6, 8, 3)), 2, channel_order="cqp")
    with pytest.raises(ValueError, match=r"grid \(3, 3\) has 9 patches but there are 12 tokens"):
        unpatchify_forward(rng.standard_normal((1, 12, 8)), (3, 3), 2)
    with pytest.raises(ValueError, match="not 2·2·C"):
        unpatchify_forward(rng.standard_normal((1, 12, 6)), (3, 4), 2)
    with pytest.raises(TypeError, match="grid must be a pair of ints, got int 12"):
        unpatchify_forward(rng.standard_normal((1, 12, 8)), 12, 2)
    tokens, cache = patchify_forward(rng.standard_normal((1, 6, 8, 3)), 2)
    with pytest.raises(ValueError, match=r"dout of shape \(1, 12, 6\)"):
        patchify_backward(np.ones((1, 12, 6)), cache)
    with pytest.raises(TypeError, match=r"float32.*float64"):
        patchify_backward(np.ones((1, 12, 12), dtype=np.float32), cache)
    with pytest.raises(TypeError, match="UnpatchifyCache"):
        unpatchify_backward(np.ones((1, 6, 8, 3)), cache)


@pytest.mark.parametrize(
    ("patch", "error", "message"),
    [
        (2.0, TypeError, r"patchify_forward: patch must be an int, got float 2.0"),
        (True, TypeError, r"patchify_forward: patch must be an int, got bool True"),
        (None, TypeError, r"patch must be an int, got NoneType None"),
        ("2", TypeError, r"patch must be an int, got str '2'"),
        ((2, 2.0), TypeError, r"patchify_forward: patch\[1\] must be an int, got float 2.0"),
        ((2,), ValueError, r"patchify_forward: patch must be a pair of ints, got 1 of them: \(2,\)"),
        ((2, 2, 2), ValueError, r"patch must be a pair of ints, got 3 of them"),
        ((2, 0), ValueError, r"patchify_forward: patch\[1\] must be at least 1, got 0"),
        (-1, ValueError, r"patch must be at least 1, got -1"),
    ],
)
def test_a_patch_that_is_not_one_or_two_positive_ints_is_named(rng, patch, error, message):
    with pytest.raises(error, match=message):
        patchify_forward(rng.standard_normal((1, 4, 6, 2)), patch)
    with pytest.raises(error, match=message.replace("patchify_forward", "unpatchify_forward")):
        unpatchify_forward(rng.standard_normal((1, 6, 8)), (2, 3), patch)


@pytest.mark.parametrize(
    ("grid", "error", "message"),
    [
        ((2.0, 3), TypeError, r"unpatchify_forward: grid\[0\] must be an int, got float 2.0"),
        ((True, 3), TypeError, r"grid\[0\] must be an int, got bool True"),
        ((0, 6), ValueError, r"grid\[0\] must be at least 1, got 0"),
        (None, TypeError, r"unpatchify_forward: grid must be a pair of ints, got NoneType None"),
        ("23", TypeError, r"grid must be a pair of ints, got str '23'"),
        ((2, 3, 1), ValueError, r"grid must be a pair of ints, got 3 of them"),
    ],
)
def test_a_grid_that_is_not_two_positive_ints_is_named(rng, grid, error, message):
    with pytest.raises(error, match=message):
        unpatchify_forward(rng.standard_normal((1, 6, 8)), grid, 2)


def test_patchify_names_the_array_that_does_not_fit(rng):
    with pytest.raises(TypeError, match=r"^patchify_forward: x must be an array .*got NoneType"):
        patchify_forward(None, 2)
    with pytest.raises(TypeError, match=r"^unpatchify_forward: tokens must be an array .*got list"):
        unpatchify_forward([[[0.0] * 8] * 6], (2, 3), 2)
    with pytest.raises(ValueError, match=r"x of shape \(1, 5, 6, 2\): a 5×6 map is not divisible into 2×2 patches"):
        patchify_forward(rng.standard_normal((1, 5, 6, 2)), 2)
    with pytest.raises(ValueError, match=r"tokens of shape \(1, 6, 9\): a token of 9 channels is not 2·2·C"):
        unpatchify_forward(rng.standard_normal((1, 6, 9)), (2, 3), 2)
    _, cache = unpatchify_forward(rng.standard_normal((1, 6, 8)), (2, 3), 2)
    with pytest.raises(TypeError, match=r"patchify_backward needs the PatchifyCache its forward returned, got a "
                       r"UnpatchifyCache"):
        patchify_backward(np.ones((1, 6, 8)), cache)
