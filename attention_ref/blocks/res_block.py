r"""The residual block of diffusion U-Nets with its time term (DDPM's ``ResnetBlock``, diffusers' ``ResnetBlock2D``).

On a channels-last map ``x`` ``(B, H, W, C_in)`` and the time embedding ``temb`` ``(B, D_t)``:

.. math::
    a &= \operatorname{conv}_1\big(\operatorname{SiLU}(\operatorname{GN}_1(x))\big)
         + W_t\,\operatorname{SiLU}(\text{temb}) + b_t \quad(\text{the time term added at every pixel}) \\
    y &= \operatorname{skip}(x) + \operatorname{conv}_2\big(\operatorname{SiLU}(\operatorname{GN}_2(a))\big),

with ``skip`` the identity, or a 1×1 convolution (a linear map of the channels) when the widths
differ; both convolutions are 3×3 with "same" padding.

Backward, every step through its op's own backward, in reverse:

* ``y = skip(x) + r``  ⇒  both branches get ``dy``;
* the time term ``τ = W_t SiLU(temb) + b_t`` was broadcast over the ``H×W`` pixels, so ``dτ`` is
  ``da`` summed over the pixels;
* ``x`` gets the sum of its two paths: through ``GN_1`` and through the skip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import (
    check_cache,
    check_eps,
    check_positive_int,
    require_divisible,
    require_dout,
    require_finite,
    require_floating_arrays,
)
from ..backend import Array, namespace
from ..ops.conv2d import Conv2dCache, conv2d_backward, conv2d_forward
from ..ops.group_norm import GroupNormCache, group_norm_backward, group_norm_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.silu import SiluCache, silu_backward, silu_forward
from .params import add_grads, check_keys, check_param_dtypes, check_params

__all__ = ["ResBlockCache", "res_block_backward", "res_block_forward"]

_WHERE = "res block"
_REQUIRED = tuple(f"{layer}.{p}" for layer in ("norm1", "conv1", "time", "norm2", "conv2") for p in ("weight", "bias"))
_OPTIONAL = ("skip.weight", "skip.bias")


@dataclass(frozen=True)
class ResBlockCache:
    """The caches of the residual block's layers, in forward order."""

    backward_names: ClassVar[tuple[str, ...]] = ("res_block_backward",)  # the backward that takes it

    norm1: GroupNormCache
    silu1: SiluCache
    conv1: Conv2dCache
    time_silu: SiluCache
    time: LinearCache
    norm2: GroupNormCache
    silu2: SiluCache
    conv2: Conv2dCache
    skip: LinearCache | None  # the 1×1 skip convolution, or None for the identity


def _check_inputs(x: Array, temb: Array, params: Mapping[str, Array], groups: Any, eps: Any) -> tuple[int, float]:
    """``(groups, eps)`` after checking every input (``ValueError`` / ``TypeError`` naming it)."""
    check_params(params, _WHERE)
    xp = require_floating_arrays(_WHERE, x=x, temb=temb)
    namespace(x, *params.values())  # the parameters from x's library too
    groups = check_positive_int("groups", groups, _WHERE)
    eps = check_eps("eps", eps, _WHERE)
    if x.ndim != 4:
        raise ValueError(f"{_WHERE}: x must be a channels-last map (B, H, W, C), got shape {tuple(x.shape)}")
    if temb.ndim != 2 or temb.shape[0] != x.shape[0]:
        raise ValueError(
            f"{_WHERE}: temb must be (B, D_t) = ({x.shape[0]}, D_t) for x of shape {tuple(x.shape)}, "
            f"got shape {tuple(temb.shape)}"
        )
    check_keys(params, required=_REQUIRED, optional=_OPTIONAL, where=_WHERE)
    check_param_dtypes(x, params, _WHERE, name="x")
    C_in = x.shape[-1]
    for name, axis in (("norm1.weight", 0), ("conv1.weight", 2)):
        p = params[name]
        if p.ndim <= axis or p.shape[axis] != C_in:
            raise ValueError(f"{_WHERE}: {name} of shape {tuple(p.shape)} does not fit x's {C_in} channels")
    if params["time.weight"].ndim != 2 or params["time.weight"].shape[0] != temb.shape[1]:
        shape = tuple(params["time.weight"].shape)
        raise ValueError(f"{_WHERE}: time.weight of shape {shape} does not fit temb's {temb.shape[1]} channels")
    C_out = params["conv2.weight"].shape[-1]
    require_divisible(C_in, groups, "channels", "groups", where=_WHERE)
    C_mid = params["conv1.weight"].shape[-1]  # GN₂ normalises conv₁'s output
    require_divisible(C_mid, groups, "output channels", "groups", where=_WHERE, whose="conv1's ")
    if "skip.weight" not in params and C_out != C_in:
        raise ValueError(
            f"{_WHERE}: conv2.weight returns {C_out} channels but x has {C_in}: without skip.weight (a 1×1 "
            "convolution) the residual needs them equal"
        )
    # an infinite pixel has no output (its group norm is inf − inf): refused, as in every block
    require_finite(xp, "x", x, _WHERE)
    require_finite(xp, "temb", temb, _WHERE)
    return groups, eps


def res_block_forward(
    x: Array, temb: Array, params: Mapping[str, Array], *, groups: int, eps: float = 1e-6
) -> tuple[Array, ResBlockCache]:
    """The residual block with its time term (see the module's docstring).

    Inputs:
        x: ``(B, H, W, C_in)``, real floating; temb: ``(B, D_t)``, the time embedding, x's dtype.
        params: ``"norm1.*"`` ``(C_in,)``, ``"conv1.*"`` ``(3, 3, C_in, C_out)``, ``"time.*"`` ``(D_t, C_out)``,
            ``"norm2.*"`` ``(C_out,)``, ``"conv2.*"`` ``(3, 3, C_out, C_out)``, optional ``"skip.*"``
            ``(C_in, C_out)`` (needed when ``C_in ≠ C_out``); :func:`attention_ref.blocks.init_res_block`.
        groups, eps: of both group norms (diffusers' ``ResnetBlock2D``: eps 1e-6).

    Returns:
        y: ``(B, H, W, C_out)``; cache: :class:`ResBlockCache`.
    """
    groups, eps = _check_inputs(x, temb, params, groups, eps)
    xp = namespace(x)
    B = x.shape[0]
    n1, norm1 = group_norm_forward(x, params["norm1.weight"], params["norm1.bias"], groups=groups, eps=eps)
    s1, silu1 = silu_forward(n1)
    # a = conv₁(SiLU(GN₁(x)))   (B, H, W, C_out)
    a, conv1 = conv2d_forward(s1, params["conv1.weight"], params["conv1.bias"], padding="same")
    st, time_silu = silu_forward(temb)
    # τ = W_t SiLU(temb) + b_t   (B, C_out)
    tau, time = linear_forward(st, params["time.weight"], params["time.bias"])
    # a ← a + τ at every pixel
    a = a + xp.reshape(tau, (B, 1, 1, tau.shape[-1]))
    n2, norm2 = group_norm_forward(a, params["norm2.weight"], params["norm2.bias"], groups=groups, eps=eps)
    s2, silu2 = silu_forward(n2)
    r, conv2 = conv2d_forward(s2, params["conv2.weight"], params["conv2.bias"], padding="same")
    skip = None
    s = x
    if "skip.weight" in params:
        # skip(x) = x W_s + b_s, a 1×1 convolution
        s, skip = linear_forward(x, params["skip.weight"], params.get("skip.bias"))
    # y = skip(x) + conv₂(SiLU(GN₂(a)))
    return s + r, ResBlockCache(norm1, silu1, conv1, time_silu, time, norm2, silu2, conv2, skip)


def res_block_backward(dy: Array, cache: ResBlockCache) -> dict[str, Array]:
    """Gradients of :func:`res_block_forward`.

    Inputs:
        dy: ``(B, H, W, C_out)``, the gradient of the loss with respect to the block's output.
        cache: :class:`ResBlockCache` from :func:`res_block_forward`.

    Returns:
        ``{"x": (B, H, W, C_in), "temb": (B, D_t)}`` plus one entry per key of ``params``, each in that
        parameter's shape.
    """
    check_cache(cache, ResBlockCache, "res_block_backward")
    # y has the shape of a, GN₂'s input (B, H, W, C_out), and the dtype of x and temb
    xp = require_dout(dy, cache.norm2.shape, cache.time.x.dtype, name="dy")
    grads: dict[str, Array] = {}
    # y = skip(x) + r: both branches get dy
    ds2 = add_grads(grads, "conv2", conv2d_backward(dy, cache.conv2))
    dn2 = silu_backward(ds2, cache.silu2)["x"]
    da = add_grads(grads, "norm2", group_norm_backward(dn2, cache.norm2))
    # a = conv₁(…) + τ broadcast over pixels   ⇒   dτ = Σ_pixels da
    dtau = xp.sum(da, axis=(1, 2))  # (B, C_out)
    dst = add_grads(grads, "time", linear_backward(dtau, cache.time))
    grads["temb"] = silu_backward(dst, cache.time_silu)["x"]
    ds1 = add_grads(grads, "conv1", conv2d_backward(da, cache.conv1))
    dn1 = silu_backward(ds1, cache.silu1)["x"]
    dx = add_grads(grads, "norm1", group_norm_backward(dn1, cache.norm1))
    # x reaches y through GN₁ and through the skip
    grads["x"] = dx + dy if cache.skip is None else dx + add_grads(grads, "skip", linear_backward(dy, cache.skip))
    return grads
