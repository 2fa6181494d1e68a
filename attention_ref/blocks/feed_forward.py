r"""The GEGLU feed-forward layer of a transformer block (diffusers' ``FeedForward(activation_fn="geglu")``).

.. math::
    u = x W_p + b_p \;(\dots, 2F), \qquad g = \operatorname{geglu}(u) = u_{:F}\cdot\operatorname{gelu}(u_{F:})
    \;(\dots, F), \qquad y = g W_o + b_o \;(\dots, C_{out}).

``F`` is the hidden width (4·C in Stable Diffusion). Backward: the two linear
layers' and GEGLU's own backward passes, in reverse order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._checks import check_cache, require_array, require_finite, require_floating
from ..backend import Array, namespace
from ..ops.gelu import GegluCache, geglu_backward, geglu_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from .params import add_grads, check_keys, check_param_dtypes, check_params

__all__ = ["GegluFeedForwardCache", "geglu_ff_backward", "geglu_ff_forward"]


@dataclass(frozen=True)
class GegluFeedForwardCache:
    backward_names: ClassVar[tuple[str, ...]] = ("geglu_ff_backward",)  # the backward that takes it

    proj: LinearCache
    geglu: GegluCache
    out: LinearCache


def geglu_ff_forward(x: Array, params: Mapping[str, Array]) -> tuple[Array, GegluFeedForwardCache]:
    """Linear → GEGLU → linear.

    Inputs:
        x: ``(..., C)``.
        params: ``"proj.weight"`` ``(C, 2F)``, ``"out.weight"`` ``(F, C_out)``; optional
            ``"proj.bias"`` ``(2F,)``, ``"out.bias"`` ``(C_out,)``.

    Returns:
        y: ``(..., C_out)``; cache: :class:`GegluFeedForwardCache`.
    """
    check_params(params, "feed-forward")
    require_array("feed-forward: x", x)
    xp = namespace(x, *params.values())
    require_floating(xp, "x", x)
    check_keys(params, required=("proj.weight", "out.weight"), optional=("proj.bias", "out.bias"), where="feed-forward")
    check_param_dtypes(x, params, "feed-forward")
    require_finite(xp, "x", x, "feed-forward")  # as every block: an infinite input is refused, NaN propagates
    Wp, Wo = params["proj.weight"], params["out.weight"]
    if Wp.ndim != 2 or Wo.ndim != 2 or Wp.shape[1] != 2 * Wo.shape[0]:
        raise ValueError(
            f"feed-forward: proj.weight of shape {tuple(Wp.shape)} must give twice the {Wo.shape[0]} inputs "
            f"of out.weight of shape {tuple(Wo.shape)} (value and gate halves)"
        )
    # u = x W_p + b_p   (..., 2F)
    u, proj_cache = linear_forward(x, Wp, params.get("proj.bias"))
    # g = u[:F] · gelu(u[F:])   (..., F)
    g, geglu_cache = geglu_forward(u)
    # y = g W_o + b_o   (..., C_out)
    y, out_cache = linear_forward(g, Wo, params.get("out.bias"))
    return y, GegluFeedForwardCache(proj=proj_cache, geglu=geglu_cache, out=out_cache)


def geglu_ff_backward(dy: Array, cache: GegluFeedForwardCache) -> dict[str, Array]:
    """Gradients of :func:`geglu_ff_forward`.

    Inputs:
        dy: ``(..., C)``, the gradient of the loss with respect to the output.
        cache: :class:`GegluFeedForwardCache` from :func:`geglu_ff_forward`.

    Returns:
        ``{"x": (..., C), "proj.weight": (C, 2F), "proj.bias": (2F,), "out.weight": (F, C),
        "out.bias": (C,)}`` (bias keys only when the forward had them).
    """
    check_cache(cache, GegluFeedForwardCache, "geglu_ff_backward")
    grads: dict[str, Array] = {}
    # y = g W_o + b_o
    dg = add_grads(grads, "out", linear_backward(dy, cache.out))
    # g = geglu(u)
    du = geglu_backward(dg, cache.geglu)["x"]
    # u = x W_p + b_p
    grads["x"] = add_grads(grads, "proj", linear_backward(du, cache.proj))
    return grads
