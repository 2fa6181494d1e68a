r"""A small text-conditioned diffusion U-Net on channels-last maps, forward and backward.

The layout of Stable Diffusion's ``UNet2DConditionModel``, shrunk to 16×16 RGB
scenes and one layer per stage, written only with the library's
``*_forward``/``*_backward`` pairs. For ``channels = (C₀, C₁)`` (two
resolutions, 16×16 and 8×8) and ``x_t (B, 16, 16, 3)``::

    temb  = W₂ SiLU(W₁ e(t) + b₁) + b₂                         (B, D_t)        time MLP on the sinusoidal e(t)
    h     = conv_in(x_t)                                        (B, 16, 16, C₀)
    down.0: h = Res(h, temb);  [h = ST(h, text)]   → skip₀      (B, 16, 16, C₀)
            h = AvgPool₂(h)                                     (B, 8, 8, C₀)
    down.1: h = Res(h, temb);  [h = ST(h, text)]   → skip₁      (B, 8, 8, C₁)
    mid:    h = Res(ST(Res(h, temb), text), temb)               (B, 8, 8, C₁)
    up.1:   h = Res([h, skip₁], temb); [h = ST(h, text)]        (B, 8, 8, C₁)
            h = conv(Upsample₂(h))                              (B, 16, 16, C₁)
    up.0:   h = Res([h, skip₀], temb); [h = ST(h, text)]        (B, 16, 16, C₀)
    ε̂     = conv_out(SiLU(GroupNorm(h)))                        (B, 16, 16, 3)

``[a, b]`` joins along channels; ``ST`` is the spatial transformer
(:func:`attention_ref.spatial_transformer_forward`: GroupNorm, proj_in, self-attention,
cross-attention to the prompt, GEGLU feed-forward, proj_out, residual), present at the
stages where ``config.down_attention`` / ``config.up_attention`` say so and always in the middle. ``Res`` is the
residual block of DDPM / diffusers' ``ResnetBlock2D`` (:func:`attention_ref.blocks.res_block_forward`: group norm,
SiLU, 3×3 convolution, the time term added at every pixel, again, and a skip), its group norms' epsilon 1e-6.
Any number of levels works the same way (``len(channels)``).

Backward is the forward read bottom-up, every step through its op's own backward:

* a value used twice gets the sum of both gradients: the time embedding (every
  residual block reads it), the prompt (every transformer reads it), and each
  level's output (it feeds the next level *and* its skip connection);
* ``[h, skip]`` splits the gradient along channels, ``y = x + f(x)`` passes it
  straight through and into ``f``;
* inside each residual block, its own backward (:func:`attention_ref.blocks.res_block_backward`).

:func:`unet_backward` returns the gradient of every parameter, of ``x_t``, of the
context and of ``t``; the tests compare all of them with PyTorch autograd on the same
model and with finite differences.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...backend import Array, namespace
from ...blocks import (
    ResBlockCache,
    SpatialTransformerCache,
    init_res_block,
    init_spatial_transformer,
    res_block_backward,
    res_block_forward,
    spatial_transformer_backward,
    spatial_transformer_forward,
)
from ...blocks.params import add_grads, init_conv, init_linear, init_norm, prefixed, sub_params
from ...ops import (
    conv2d_backward,
    conv2d_forward,
    group_norm_backward,
    group_norm_forward,
    linear_backward,
    linear_forward,
)
from ...ops.conv2d import Conv2dCache
from ...ops.group_norm import GroupNormCache
from ...ops.linear import LinearCache
from ...ops.resample import (
    ResampleCache,
    avg_pool_backward,
    avg_pool_forward,
    upsample_nearest_backward,
    upsample_nearest_forward,
)
from ...ops.silu import SiluCache, silu_backward, silu_forward
from ...ops.timestep_embedding import TimestepEmbeddingCache, timestep_embedding_backward, timestep_embedding_forward

__all__ = ["UNetCache", "UNetConfig", "init_unet", "unet_backward", "unet_forward"]

NORM_EPS = 1e-6  # the residual blocks' and the output's group norms (diffusers' ResnetBlock2D default)


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's sizes.

    channels: width of each level, finest first; the map is halved between levels.
    down_attention, up_attention: per level, whether that down / up stage ends in a spatial
        transformer (the middle always has one).
    head_dim: channels per attention head (a level of width ``C`` has ``C / head_dim`` heads).
    groups: group-norm groups everywhere (must divide every width).
    time_dim: width of the time MLP (its input is the sinusoidal embedding of width ``channels[0]``).
    context_dim: width of a prompt token.
    ff_mult: the transformers' GEGLU hidden width is ``ff_mult × width``.
    image_channels: channels of the image (3, RGB).
    """

    channels: tuple[int, ...] = (32, 48)
    down_attention: tuple[bool, ...] = (False, True)
    up_attention: tuple[bool, ...] = (True, True)
    head_dim: int = 16
    groups: int = 8
    time_dim: int = 64
    context_dim: int = 32
    ff_mult: int = 2
    image_channels: int = 3

    def __post_init__(self) -> None:
        names = ("head_dim", "groups", "time_dim", "context_dim", "ff_mult", "image_channels")
        sizes = {name: getattr(self, name) for name in names} | {"channels": min(self.channels, default=0)}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"UNetConfig: sizes must be positive, got {bad}")
        L = len(self.channels)
        if L < 1 or len(self.down_attention) != L or len(self.up_attention) != L:
            raise ValueError(
                f"UNetConfig: {L} levels but {len(self.down_attention)} down and {len(self.up_attention)} up "
                "attention flags"
            )
        for c in self.channels:
            if c % self.groups or c % self.head_dim:
                raise ValueError(
                    f"UNetConfig: width {c} is not divisible by groups={self.groups} and head_dim={self.head_dim}"
                )
        if self.channels[0] % 2:
            raise ValueError(f"UNetConfig: channels[0]={self.channels[0]} must be even (the sinusoidal embedding)")

    def heads(self, level: int) -> int:
        """Attention heads at a level."""
        return self.channels[level] // self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def transformer_names(self) -> list[tuple[str, int]]:
        """``(prefix, level)`` of every spatial transformer, in the order the forward pass runs them."""
        L = len(self.channels)
        names = [(f"down.{i}.attn", i) for i in range(L) if self.down_attention[i]]
        names.append(("mid.attn", L - 1))
        names += [(f"up.{i}.attn", i) for i in reversed(range(L)) if self.up_attention[i]]
        return names


# ------------------------------------------------------------------ initialisation


def _init_res(params: dict, name: str, c_in: int, c_out: int, time_dim: int, rng, dtype) -> None:
    params.update(prefixed(init_res_block(c_in, c_out, time_dim, rng=rng, dtype=dtype), f"{name}."))


def _init_transformer(params: dict, name: str, c: int, config: UNetConfig, rng, dtype) -> None:
    p = init_spatial_transformer(
        c,
        config.context_dim,
        heads=c // config.head_dim,
        groups=config.groups,
        ff_mult=config.ff_mult,
        rng=rng,
        dtype=dtype,
    )
    # zero proj_out: a fresh transformer adds nothing, as in OpenAI's and CompVis's U-Nets
    p["proj_out.weight"][...] = 0.0
    p["proj_out.bias"][...] = 0.0
    params.update(prefixed(p, f"{name}."))


def init_unet(config: UNetConfig, *, rng: np.random.Generator | int | None = None, dtype: Any = "float64") -> dict:
    """Random parameters for :func:`unet_forward`, as a flat dict of NumPy arrays.

    Linear and convolution weights are ``U(±1/√fan_in)``; norms start at ``γ = 1, β = 0``; the
    last convolution of every residual block, every transformer's ``proj_out`` and
    ``out.conv`` start at zero (each block starts as the identity, the net predicts ε̂ = 0),
    as in OpenAI's guided-diffusion U-Net. Keys: ``"time.{0,1}.*"``, ``"conv_in.*"``,
    ``"down.i.res.*"``, ``"down.i.attn.*"``, ``"mid.res{1,2}.*"``, ``"mid.attn.*"``,
    ``"up.i.res.*"``, ``"up.i.attn.*"``, ``"up.i.upsample.*"``, ``"out.norm.*"``, ``"out.conv.*"``.
    Convolution weights are ``(k, k, C_in, C_out)``, linear weights ``(in, out)``.
    """
    rng = np.random.default_rng(rng)
    dt = np.dtype(dtype)
    ch, L = config.channels, len(config.channels)
    params: dict[str, np.ndarray] = {}
    init_linear(params, "time.0", ch[0], config.time_dim, bias=True, rng=rng, dtype=dt)
    init_linear(params, "time.1", config.time_dim, config.time_dim, bias=True, rng=rng, dtype=dt)
    init_conv(params, "conv_in", 3, config.image_channels, ch[0], rng=rng, dtype=dt)
    c = ch[0]
    for i in range(L):
        _init_res(params, f"down.{i}.res", c, ch[i], config.time_dim, rng, dt)
        c = ch[i]
        if config.down_attention[i]:
            _init_transformer(params, f"down.{i}.attn", c, config, rng, dt)
    _init_res(params, "mid.res1", c, c, config.time_dim, rng, dt)
    _init_transformer(params, "mid.attn", c, config, rng, dt)
    _init_res(params, "mid.res2", c, c, config.time_dim, rng, dt)
    for i in reversed(range(L)):
        _init_res(params, f"up.{i}.res", c + ch[i], ch[i], config.time_dim, rng, dt)
        c = ch[i]
        if config.up_attention[i]:
            _init_transformer(params, f"up.{i}.attn", c, config, rng, dt)
        if i > 0:
            init_conv(params, f"up.{i}.upsample", 3, c, c, rng=rng, dtype=dt)
    init_norm(params, "out.norm", c, dtype=dt)
    init_conv(params, "out.conv", 3, c, config.image_channels, rng=rng, dtype=dt, zero=True)
    return params


# ------------------------------------------------------------------ the U-Net


@dataclass
class UNetCache:
    """What :func:`unet_backward` needs, and the transformers' attention weights for plotting.

    ``transformers`` maps each spatial transformer's name (``"down.1.attn"``, ``"mid.attn"``, …,
    in forward order) to its :class:`~attention_ref.blocks.SpatialTransformerCache`, whose
    ``blocks[0].attn1.weights`` ``(B, heads, h·w, h·w)`` and ``blocks[0].attn2.weights``
    ``(B, heads, h·w, M)`` are the self- and cross-attention weights of that layer.
    """

    config: UNetConfig
    temb: tuple[TimestepEmbeddingCache, LinearCache, SiluCache, LinearCache]  # e(t), time.0, SiLU, time.1
    conv_in: Conv2dCache
    # per level: (res, transformer or None, pool or None)
    down: list[tuple[ResBlockCache, SpatialTransformerCache | None, ResampleCache | None]] = field(default_factory=list)
    mid: tuple[ResBlockCache, SpatialTransformerCache, ResBlockCache] | None = None  # (res1, transformer, res2)
    # level → (channels of h before the skip joins, res, transformer or None, upsample or None, conv or None)
    up: dict[
        int, tuple[int, ResBlockCache, SpatialTransformerCache | None, ResampleCache | None, Conv2dCache | None]
    ] = field(default_factory=dict)
    out: tuple[GroupNormCache, SiluCache, Conv2dCache] | None = None  # (norm, SiLU, conv)
    transformers: dict[str, SpatialTransformerCache] = field(default_factory=dict)
    context_shape: tuple[int, ...] = ()


def _transformer(h: Array, context: Array, params: Mapping, name: str, level: int, config: UNetConfig, mask, cache):
    y, c = spatial_transformer_forward(
        h, context, sub_params(params, f"{name}."), heads=config.heads(level), groups=config.groups, context_mask=mask
    )
    cache.transformers[name] = c
    return y, c


def unet_forward(
    params: Mapping[str, Array],
    x: Array,
    t: Array,
    context: Array,
    context_mask: Array | None = None,
    *,
    config: UNetConfig,
) -> tuple[Array, UNetCache]:
    """The noise prediction ``ε̂(x_t, t, prompt)``.

    Inputs:
        params: from :func:`init_unet` (x's dtype and backend).
        x: ``(B, H, W, 3)`` the noisy images; ``H`` and ``W`` divisible by ``2^(levels − 1)``.
        t: ``(B,)`` diffusion steps in x's dtype (cast integer steps first, as ``DiffusionModel.eps`` does).
        context: ``(B, M, D)`` prompt token embeddings.
        context_mask: ``(B, M)`` bool, True for real tokens (padding gets no attention), or ``None``.
        config: the :class:`UNetConfig` the parameters were made for.

    Returns:
        eps: ``(B, H, W, 3)`` the predicted noise.
        cache: :class:`UNetCache` (the attention weights of every transformer inside).
    """
    xp = namespace(x, t, context)
    if x.ndim != 4 or x.shape[-1] != config.image_channels:
        raise ValueError(f"unet: x must be (B, H, W, {config.image_channels}), got shape {tuple(x.shape)}")
    B, H, W, _ = x.shape
    scale = 2 ** (len(config.channels) - 1)
    if H % scale or W % scale:
        raise ValueError(f"unet: a {H}×{W} map cannot be halved {len(config.channels) - 1} times")
    if tuple(t.shape) != (B,):
        raise ValueError(f"unet: t must be ({B},) for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != config.context_dim:
        raise ValueError(f"unet: context must be ({B}, M, {config.context_dim}), got {tuple(context.shape)}")
    dtypes = {"x": x.dtype, "t": t.dtype, "context": context.dtype, "params": params["conv_in.weight"].dtype}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"unet: x, t, context and the parameters must share one dtype, got {dtypes}")
    ch, L, g = config.channels, len(config.channels), config.groups

    # temb = W₂ SiLU(W₁ e(t) + b₁) + b₂   (B, D_t)
    e, c_emb = timestep_embedding_forward(t, ch[0])
    u, c_t0 = linear_forward(e, params["time.0.weight"], params["time.0.bias"])
    u, c_ts = silu_forward(u)
    temb, c_t1 = linear_forward(u, params["time.1.weight"], params["time.1.bias"])
    h, c_in = conv2d_forward(x, params["conv_in.weight"], params["conv_in.bias"], padding="same")  # (B, H, W, C₀)
    cache = UNetCache(config=config, temb=(c_emb, c_t0, c_ts, c_t1), conv_in=c_in, context_shape=tuple(context.shape))

    skips = []
    for i in range(L):
        h, c_res = res_block_forward(h, temb, sub_params(params, f"down.{i}.res."), groups=g, eps=NORM_EPS)
        c_st = None
        if config.down_attention[i]:
            h, c_st = _transformer(h, context, params, f"down.{i}.attn", i, config, context_mask, cache)
        skips.append(h)  # (B, H/2^i, W/2^i, C_i)
        c_pool = None
        if i < L - 1:
            h, c_pool = avg_pool_forward(h, 2)  # (B, H/2^(i+1), W/2^(i+1), C_i)
        cache.down.append((c_res, c_st, c_pool))

    h, c_m1 = res_block_forward(h, temb, sub_params(params, "mid.res1."), groups=g, eps=NORM_EPS)
    h, c_mst = _transformer(h, context, params, "mid.attn", L - 1, config, context_mask, cache)
    h, c_m2 = res_block_forward(h, temb, sub_params(params, "mid.res2."), groups=g, eps=NORM_EPS)
    cache.mid = (c_m1, c_mst, c_m2)

    for i in reversed(range(L)):
        split = h.shape[-1]
        h = xp.concat([h, skips[i]], axis=-1)  # [h, skip_i]   (B, ·, ·, C + C_i)
        h, c_res = res_block_forward(h, temb, sub_params(params, f"up.{i}.res."), groups=g, eps=NORM_EPS)
        c_st = c_up = c_conv = None
        if config.up_attention[i]:
            h, c_st = _transformer(h, context, params, f"up.{i}.attn", i, config, context_mask, cache)
        if i > 0:
            h, c_up = upsample_nearest_forward(h, 2)  # (B, 2·, 2·, C_i)
            h, c_conv = conv2d_forward(h, params[f"up.{i}.upsample.weight"], params[f"up.{i}.upsample.bias"], padding=1)
        cache.up[i] = (split, c_res, c_st, c_up, c_conv)

    # ε̂ = conv_out(SiLU(GN(h)))   (B, H, W, 3)
    n, c_on = group_norm_forward(h, params["out.norm.weight"], params["out.norm.bias"], groups=g, eps=NORM_EPS)
    s, c_os = silu_forward(n)
    eps, c_oc = conv2d_forward(s, params["out.conv.weight"], params["out.conv.bias"], padding="same")
    cache.out = (c_on, c_os, c_oc)
    return eps, cache


def unet_backward(deps: Array, cache: UNetCache) -> dict[str, Array]:
    """Gradients of :func:`unet_forward` from ``∂L/∂ε̂`` ``(B, H, W, 3)``.

    Returns:
        one entry per key of ``params`` (same shapes), plus ``"x"`` ``(B, H, W, 3)``,
        ``"t"`` ``(B,)`` and ``"context"`` ``(B, M, D)``.
    """
    xp = namespace(deps)
    config = cache.config
    L = len(config.channels)
    grads: dict[str, Array] = {}
    dtemb = None
    dcontext = None

    def add_temb(d: Array) -> None:
        # every residual block reads temb: dtemb = Σ over blocks
        nonlocal dtemb
        dtemb = d if dtemb is None else dtemb + d

    def res_back(dh: Array, c: ResBlockCache, name: str) -> Array:
        g = res_block_backward(dh, c)
        add_temb(g.pop("temb"))
        dx = g.pop("x")
        grads.update(prefixed(g, f"{name}."))
        return dx

    def st_back(dh: Array, c: SpatialTransformerCache, name: str) -> Array:
        # every transformer reads the prompt: dcontext = Σ over transformers
        nonlocal dcontext
        g = spatial_transformer_backward(dh, c)
        dc = g.pop("context")
        dcontext = dc if dcontext is None else dcontext + dc
        dx = g.pop("x")
        grads.update(prefixed(g, f"{name}."))
        return dx

    c_on, c_os, c_oc = cache.out
    ds = add_grads(grads, "out.conv", conv2d_backward(deps, c_oc))
    dn = silu_backward(ds, c_os)["x"]
    dh = add_grads(grads, "out.norm", group_norm_backward(dn, c_on))

    dskips: dict[int, Array] = {}
    for i in range(L):  # the up path in reverse: level 0 first
        split, c_res, c_st, c_up, c_conv = cache.up[i]
        if i > 0:
            dh = add_grads(grads, f"up.{i}.upsample", conv2d_backward(dh, c_conv))
            dh = upsample_nearest_backward(dh, c_up)["x"]
        if c_st is not None:
            dh = st_back(dh, c_st, f"up.{i}.attn")
        dcat = res_back(dh, c_res, f"up.{i}.res")
        # [h, skip_i] ⇒ split the gradient along channels
        dh, dskips[i] = dcat[..., :split], dcat[..., split:]

    c_m1, c_mst, c_m2 = cache.mid
    dh = res_back(dh, c_m2, "mid.res2")
    dh = st_back(dh, c_mst, "mid.attn")
    dh = res_back(dh, c_m1, "mid.res1")

    for i in reversed(range(L)):  # the down path in reverse
        c_res, c_st, c_pool = cache.down[i]
        if c_pool is not None:
            dh = avg_pool_backward(dh, c_pool)["x"]
        # the level's output fed the next level and the skip connection
        dh = dh + dskips[i]
        if c_st is not None:
            dh = st_back(dh, c_st, f"down.{i}.attn")
        dh = res_back(dh, c_res, f"down.{i}.res")

    grads["x"] = add_grads(grads, "conv_in", conv2d_backward(dh, cache.conv_in))
    c_emb, c_t0, c_ts, c_t1 = cache.temb
    du = add_grads(grads, "time.1", linear_backward(dtemb, c_t1))
    du = silu_backward(du, c_ts)["x"]
    de = add_grads(grads, "time.0", linear_backward(du, c_t0))
    grads["t"] = timestep_embedding_backward(de, c_emb)["t"]
    grads["context"] = dcontext if dcontext is not None else xp.zeros(cache.context_shape, dtype=deps.dtype)
    return grads
