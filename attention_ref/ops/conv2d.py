r"""2-D convolution on channels-last maps, stride 1, zero padding — forward and backward.

This is the small convolution the receptive-field figures and the toy models
need: ``x (B, H, W, C_in)``, kernel ``weight (kh, kw, C_in, C_out)`` (the
"HWIO" layout; PyTorch's ``Conv2d`` stores ``(C_out, C_in, kh, kw)``), optional
``bias (C_out,)``. Like every deep-learning "convolution" it is a
cross-correlation (the kernel is not flipped):

.. math::
    y_{b,i,j,o} = \sum_{a<k_h}\sum_{c<k_w}\sum_{m} \tilde x_{b,\,i+a,\,j+c,\,m}\, W_{a,c,m,o} + b_o ,
    \qquad \tilde x_{b,u,v,m} = x_{b,\,u-p_h,\,v-p_w,\,m}\ (0 \text{ outside the map}),

so ``y`` is ``(B, H + 2p_h − k_h + 1, W + 2p_w − k_w + 1, C_out)``.

Forward as one matrix product ("im2col"): the ``k_h·k_w`` shifted views
``x̃[:, a:a+H_out, c:c+W_out, :]`` are laid side by side along the channel axis
into ``cols (B, H_out, W_out, k_h·k_w·C_in)`` (block ``a·k_w + c``), and
``y = cols · reshape(W, (k_h·k_w·C_in, C_out)) + b``.

Backward, given ``dy = ∂L/∂y``:

* ``db_o = Σ_{b,i,j} dy_{b,i,j,o}``;
* ``dW = colsᵀ dy`` with ``cols`` and ``dy`` flattened to ``(B·H_out·W_out, ·)``,
  reshaped back to ``(k_h, k_w, C_in, C_out)`` — the linear layer's ``Xᵀ dY``;
* ``dx``: in one spatial axis (the other is identical), ``x_u`` enters ``y_i``
  with kernel tap ``a`` exactly when ``i + a − p = u``, so

  .. math:: \frac{\partial L}{\partial x_u} = \sum_a dy_{u+p-a}\, W_a^\top
            \qquad (dy = 0 \text{ outside } 0 \le i < H_{out}).

  Substituting ``a' = k − 1 − a`` gives ``Σ_{a'} dy_{u − (k−1−p) + a'} W_{k−1−a'}ᵀ``:
  the *forward* correlation of ``dy`` zero-padded by ``k − 1 − p`` with the
  kernel flipped in both spatial axes and its channel axes swapped,
  ``W'_{a,c,o,m} = W_{k_h−1−a,\,k_w−1−c,\,m,o}``. Its output has
  ``H_out + 2(k−1−p) − k + 1 = H`` rows, as it must. This needs ``0 ≤ p ≤ k − 1``,
  which the forward checks.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

from .._checks import check_cache, require_dout, require_floating_arrays
from ..backend import Array, device_of

__all__ = ["Conv2dCache", "conv2d_backward", "conv2d_forward"]

Padding = int | tuple[int, int] | str


@dataclass(frozen=True)
class Conv2dCache:
    backward_names: ClassVar[tuple[str, ...]] = ("conv2d_backward",)  # the backward that takes it

    cols: Array  # (B, H_out, W_out, kh·kw·C_in), the im2col matrix of the padded input
    weight: Array  # (kh, kw, C_in, C_out)
    padding: tuple[int, int]  # (p_h, p_w)
    has_bias: bool
    x_shape: tuple[int, int, int, int]  # (B, H, W, C_in)


def _resolve_padding(padding: Padding, kh: int, kw: int) -> tuple[int, int]:
    """``(p_h, p_w)`` from an int, a pair, or ``"same"`` (odd kernels: ``p = (k − 1)/2``)."""
    def is_int(p: object) -> bool:
        return isinstance(p, numbers.Integral) and not isinstance(p, bool)

    if not (isinstance(padding, (str, tuple, list)) or is_int(padding)):
        raise TypeError(f"conv2d: padding must be an int, a pair of ints or 'same', got {type(padding).__name__}")
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"conv2d: padding must be an int, a pair of ints or 'same', got {padding!r}")
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"conv2d: padding='same' needs an odd kernel, got {kh}×{kw}")
        return (kh - 1) // 2, (kw - 1) // 2
    pair = (padding, padding) if is_int(padding) else tuple(padding)
    if len(pair) != 2 or not all(is_int(p) for p in pair):
        raise ValueError(f"conv2d: padding must be an int, a pair of ints or 'same', got {padding!r}")
    ph, pw = int(pair[0]), int(pair[1])
    if not (0 <= ph <= kh - 1 and 0 <= pw <= kw - 1):
        raise ValueError(f"conv2d: padding {(ph, pw)} must lie between 0 and kernel−1 for a {kh}×{kw} kernel")
    return ph, pw


def _zero_pad(xp: ModuleType, x: Array, ph: int, pw: int) -> Array:
    """``x (B, H, W, C)`` with ``ph`` zero rows above and below and ``pw`` zero columns left and right."""
    B, H, W, C = x.shape
    if ph > 0:
        rows = xp.zeros((B, ph, W, C), dtype=x.dtype, device=device_of(x))
        x = xp.concat([rows, x, rows], axis=1)  # (B, H + 2ph, W, C)
    if pw > 0:
        cols = xp.zeros((B, H + 2 * ph, pw, C), dtype=x.dtype, device=device_of(x))
        x = xp.concat([cols, x, cols], axis=2)  # (B, H + 2ph, W + 2pw, C)
    return x


def _im2col(xp: ModuleType, xpad: Array, kh: int, kw: int) -> Array:
    """The ``kh·kw`` shifted views of a padded map side by side: ``(B, H_out, W_out, kh·kw·C)``."""
    _, Hp, Wp, _ = xpad.shape
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    views = [xpad[:, a : a + Ho, c : c + Wo, :] for a in range(kh) for c in range(kw)]  # block a·kw + c
    return xp.concat(views, axis=-1)


def conv2d_forward(
    x: Array, weight: Array, bias: Array | None = None, *, padding: Padding = 0
) -> tuple[Array, Conv2dCache]:
    """Channels-last 2-D convolution (cross-correlation), stride 1, zero padding.

    Inputs:
        x: ``(B, H, W, C_in)``.
        weight: ``(kh, kw, C_in, C_out)``.
        bias: ``(C_out,)`` or ``None``.
        padding: zeros added on each side — an int, a pair ``(p_h, p_w)``, or
            ``"same"`` (odd kernels; output the size of the input). ``0 ≤ p ≤ k − 1``.

    Returns:
        y: ``(B, H + 2p_h − kh + 1, W + 2p_w − kw + 1, C_out)``.
        cache: :class:`Conv2dCache`.
    """
    xp = require_floating_arrays("conv2d", optional=("bias",), x=x, weight=weight, bias=bias)
    if x.ndim != 4 or weight.ndim != 4 or x.shape[-1] != weight.shape[2]:
        raise ValueError(
            f"conv2d: x of shape {tuple(x.shape)} (want (B, H, W, C_in)) does not match "
            f"weight of shape {tuple(weight.shape)} (want (kh, kw, C_in, C_out))"
        )
    kh, kw, c_in, c_out = weight.shape
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"conv2d: bias of shape {tuple(bias.shape)} does not match {c_out} output channels")
    ph, pw = _resolve_padding(padding, kh, kw)
    B, H, W, _ = x.shape
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(f"conv2d: a {kh}×{kw} kernel does not fit a {H}×{W} map padded by {(ph, pw)}")
    # x̃: the zero-padded input   (B, H + 2p_h, W + 2p_w, C_in)
    xpad = _zero_pad(xp, x, ph, pw)
    # cols[b, i, j, (a·kw + c)·C_in + m] = x̃[b, i + a, j + c, m]   (B, H_out, W_out, kh·kw·C_in)
    cols = _im2col(xp, xpad, kh, kw)
    # y = cols · W + b   (B, H_out, W_out, C_out)
    y = cols @ xp.reshape(weight, (kh * kw * c_in, c_out))
    if bias is not None:
        y = y + bias
    cache = Conv2dCache(cols=cols, weight=weight, padding=(ph, pw), has_bias=bias is not None, x_shape=(B, H, W, c_in))
    return y, cache


def conv2d_backward(dout: Array, cache: Conv2dCache) -> dict[str, Array]:
    """Gradients ``{"x": (B, H, W, C_in), "weight": (kh, kw, C_in, C_out), "bias": (C_out,)}``.

    ``"bias"`` only when the forward had one. ``dx`` is the forward correlation
    of ``dy`` (zero-padded by ``k − 1 − p``) with the flipped, channel-swapped
    kernel, as derived in the module docstring.
    """
    check_cache(cache, Conv2dCache, "conv2d_backward")
    kh, kw, c_in, c_out = cache.weight.shape
    ph, pw = cache.padding
    B, Ho, Wo, _ = cache.cols.shape
    xp = require_dout(dout, (B, Ho, Wo, c_out), cache.cols.dtype, where="conv2d")
    cols2 = xp.reshape(cache.cols, (B * Ho * Wo, kh * kw * c_in))  # (n, kh·kw·C_in)
    dy2 = xp.reshape(dout, (B * Ho * Wo, c_out))  # (n, C_out)
    # dW = colsᵀ dy   (kh, kw, C_in, C_out)
    dW = xp.reshape(xp.matrix_transpose(cols2) @ dy2, (kh, kw, c_in, c_out))
    # W'[a, c, o, m] = W[kh−1−a, kw−1−c, m, o]: flipped in space, input and output channels swapped
    w_flip = xp.permute_dims(xp.flip(cache.weight, axis=(0, 1)), (0, 1, 3, 2))  # (kh, kw, C_out, C_in)
    # dx = correlate(dy zero-padded by k−1−p, W')   (B, H, W, C_in)
    dy_pad = _zero_pad(xp, dout, kh - 1 - ph, kw - 1 - pw)
    dx = _im2col(xp, dy_pad, kh, kw) @ xp.reshape(w_flip, (kh * kw * c_out, c_in))
    grads = {"x": dx, "weight": dW}
    if cache.has_bias:
        # db = Σ dy over batch and positions
        grads["bias"] = xp.sum(dy2, axis=0)
    return grads
