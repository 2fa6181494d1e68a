r"""Rotary position embedding (RoPE; Su et al., 2021) over one or several position axes, with its backward.

**Angles.** Token ``n`` has a position on each of ``A`` axes, ``p_{n,a}`` (Flux: text tokens ``(0, 0, 0)``,
image tokens ``(0, row, col)``; Wan: ``(frame, row, col)``). Axis ``a`` owns ``D_a`` of a head's ``d``
channels (``Σ_a D_a = d``; Flux's ``axes_dims_rope``), that is ``D_a / 2`` rotation pairs, with the
frequencies and angles

.. math::
    \omega_{a,i} = \frac{1}{\theta^{\,2i/D_a}}, \quad i = 0 \dots D_a/2 - 1, \qquad
    \varphi_{n,a,i} = p_{n,a}\, \omega_{a,i} .

The axes' angles are concatenated, axis 0 first, into ``d/2`` angles per token, and each angle serves
the two channels of its pair. Which two, is the pair layout:

* ``"interleaved"`` (Flux, Wan, HunyuanDiT, CogVideoX; diffusers' ``use_real_unbind_dim=-1``): pair ``i``
  is channels ``(2i, 2i+1)``, and the ``(N, d)`` tables repeat each angle twice in a row:
  ``cos = [cos φ_0, cos φ_0, cos φ_1, cos φ_1, …]``;
* ``"halves"`` (CogView4, Cosmos, OmniGen, Stable Audio; ``use_real_unbind_dim=-2``, the "rotate-half" of
  GPT-NeoX and LLaMA): pair ``i`` is channels ``(i, i + d/2)``, and the tables repeat the whole list:
  ``cos = [cos φ_0, …, cos φ_{d/2−1}, cos φ_0, …, cos φ_{d/2−1}]``.

**Rotation.** Each pair ``(a, b)`` of a query or key is turned by its angle:
``(a, b) ↦ (a cos φ − b sin φ, a sin φ + b cos φ)``. With ``R`` the linear map that sends every pair
``(a, b)`` to ``(−b, a)`` (a quarter turn), all pairs at once are

.. math:: y = x \odot \cos + R(x) \odot \sin .

A rotation keeps each pair's length, so ``‖y‖ = ‖x‖``; and ``q_m · k_n`` after rotation depends on the
positions only through ``p_m − p_n``, which is what makes attention see offsets rather than places.

**Backward.** ``y = C x + S R x`` with ``C = diag(cos)``, ``S = diag(sin)``, so

.. math:: dx = C\, dy + R^\top S\, dy = dy \odot \cos + R^\top(dy \odot \sin), \qquad R^\top(a, b) = (b, -a).

With tables from :func:`rope_angles` (equal cos and sin within each pair) ``S`` commutes with ``R`` and
``C + S R`` is the block-diagonal rotation by ``φ``; its transpose ``C − S R`` is the rotation by ``−φ``:
the backward of a rotation is the inverse rotation.

**Precision.** The rotation runs in x's working dtype (float32 for float16, as diffusers computes it),
or in ``compute_dtype`` when given; the tables are cast to it and the result is rounded to x's dtype.
diffusers' ``apply_rotary_emb`` (Flux) computes in float32 for *every* input dtype, float64 included,
with float32 tables (``FluxPosEmbed`` rounds them): ``compute_dtype="float32"`` reproduces that bit for bit,
forward and backward (the backward rounds each of its two terms to x's dtype before adding them, which
is the chain rule through the casts, and what torch's autograd computes there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from .._checks import (
    FLOAT_DTYPES,
    array_namespace,
    as_dtype,
    check_cache,
    check_positive_int,
    check_real,
    dtype_name,
    require_array,
    require_broadcastable_to,
    require_dout,
    require_floating,
    working_dtype,
)
from ..backend import Array, device_of

__all__ = ["PAIR_LAYOUTS", "RopeCache", "rope_angles", "rope_backward", "rope_forward"]

#: The two ways diffusers' models pair a head's channels for rotation (see the module's docstring).
PAIR_LAYOUTS = ("interleaved", "halves")
#: The dtypes positions may have besides the floating ones: their values are exact in float64 (below 2⁵³).
_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _check_pairs(pairs: Any, where: str) -> str:
    if pairs not in PAIR_LAYOUTS:
        raise ValueError(f"{where}: pairs must be one of {PAIR_LAYOUTS}, got {pairs!r}")
    return pairs


def float_dtype_named(xp: ModuleType, name: Any, what: str, where: str) -> Any:
    """The namespace's dtype called ``name`` (``"float16"``, ``"float32"``, ``"float64"``); ``ValueError``
    naming the option ``what`` for anything else (joint attention's ``rope_dtype`` is checked here too)."""
    if not isinstance(name, str) or name not in FLOAT_DTYPES or not hasattr(xp, name):
        raise ValueError(f"{where}: {what} must be one of {FLOAT_DTYPES} (as a string), got {name!r}")
    return getattr(xp, name)


def check_axes_dims(axes_dims: Any, where: str, name: str = "axes_dims") -> tuple[int, ...]:
    """``axes_dims`` as a tuple of positive even ints, one per position axis.

    ``TypeError`` for anything but a sequence of ints (``None``, ``4``, a string, ``4.0`` or ``True`` in it),
    ``ValueError`` for no axes, an axis of 0 or fewer channels, or an odd number of them (each axis rotates
    pairs of channels). ``flux_rope_tables`` checks its ``axes_dims_rope`` here too.
    """
    try:
        if isinstance(axes_dims, (str, bytes)):
            raise TypeError
        dims = tuple(axes_dims)
    except TypeError:  # None, an int, a 0-d array: not a sequence
        raise TypeError(f"{where}: {name} must be a sequence of ints (channels per axis), got {axes_dims!r}") from None
    if not dims:
        raise ValueError(f"{where}: {name} must name at least one axis, got {dims}")
    for a, D in enumerate(dims):
        D = check_positive_int(f"{name}[{a}]", D, where)
        if D % 2:
            raise ValueError(
                f"{where}: {name}[{a}] = {D} is odd; each axis rotates pairs of channels, so each D_a must be even "
                f"(got {name} = {dims})"
            )
    return tuple(int(D) for D in dims)


# ---------------------------------------------------------------- the angles


def rope_angles(
    positions: Array,
    axes_dims: Sequence[int],
    theta: float = 10000.0,
    *,
    pairs: str = "interleaved",
    dtype: str = "float64",
) -> tuple[Array, Array]:
    """The ``(cos, sin)`` tables of rotary position embedding for tokens at ``positions``.

    Inputs:
        positions: ``(N, A)``, one position per token and axis (integer or real; ``(N,)`` when ``A = 1``).
            Flux: its ``ids``, text ``(0, 0, 0)`` and image ``(0, row, col)``; Wan: ``(frame, row, col)``.
        axes_dims: ``(D_0, …, D_{A−1})``, positive even numbers: the channels of a head each axis owns,
            summing to the head width ``d`` (Flux's ``axes_dims_rope``, e.g. ``(16, 56, 56)``).
        theta: the base of the frequencies (10000 in Flux and Wan).
        pairs: ``"interleaved"`` or ``"halves"``, the table layout of the rotation that will use them.
        dtype: of the tables; they are computed in float64 and rounded to it.

    Returns:
        cos, sin: ``(N, d)`` each, of positions' backend: ``cos φ`` and ``sin φ`` of every channel's angle,
        in the layout of ``pairs``. With ``dtype="float32"`` they equal diffusers' ``FluxPosEmbed`` /
        ``get_1d_rotary_pos_embed(..., use_real=True)`` output (which computes in float64 and rounds).
    """
    where = "rope_angles"
    require_array(f"{where}: positions", positions)
    xp = array_namespace(positions=positions)
    if dtype_name(positions.dtype) not in _INTEGER_DTYPES + FLOAT_DTYPES:
        raise TypeError(
            f"{where}: positions must be integer or real floating (float16, float32 or float64), "
            f"got {dtype_name(positions.dtype)}"
        )
    _check_pairs(pairs, where)
    out_dtype = float_dtype_named(xp, dtype, "dtype", where)
    dims = check_axes_dims(axes_dims, where)
    theta = check_real("theta", theta, where)
    if theta <= 0:
        raise ValueError(f"{where}: theta must be positive (the frequencies are powers of 1/theta), got {theta}")
    if positions.ndim == 1 and len(dims) == 1:
        positions = xp.reshape(positions, (-1, 1))  # (N, 1)
    if positions.ndim != 2 or positions.shape[1] != len(dims):
        raise ValueError(
            f"{where}: positions must be (N, A) with one column per axis, A = len(axes_dims) = {len(dims)}; "
            f"got shape {tuple(positions.shape)}"
        )
    # integer and float32 positions are exact in float64
    pos = xp.astype(positions, xp.float64)  # (N, A)
    per_axis = []
    for a, D in enumerate(dims):
        # ω_i = 1 / θ^(2i/D_a), i = 0 … D_a/2 − 1   (D_a/2,)
        exponents = xp.arange(0, D, 2, dtype=xp.float64, device=device_of(positions)) / D
        omega = 1.0 / (theta**exponents)
        # φ_{n,i} = p_{n,a} ω_i, an outer product   (N, D_a/2)
        per_axis.append(pos[:, a : a + 1] * omega)
    angles = xp.concat(per_axis, axis=-1)  # (N, d/2), axis 0's angles first
    cos_half, sin_half = xp.cos(angles), xp.sin(angles)  # (N, d/2)
    cos, sin = _spread(xp, cos_half, pairs), _spread(xp, sin_half, pairs)  # (N, d)
    return xp.astype(cos, out_dtype), xp.astype(sin, out_dtype)


def _spread(xp: ModuleType, half: Array, pairs: str) -> Array:
    """``(N, d/2)`` values of the pairs → ``(N, d)`` values of the channels, in the layout of ``pairs``."""
    N, n_pairs = half.shape
    if pairs == "interleaved":
        # [v_0, v_0, v_1, v_1, …]: pair i is channels (2i, 2i+1)
        return xp.reshape(xp.stack([half, half], axis=-1), (N, 2 * n_pairs))  # (N, d/2, 2) → (N, d)
    # [v_0, …, v_{d/2−1}, v_0, …, v_{d/2−1}]: pair i is channels (i, i + d/2)
    return xp.concat([half, half], axis=-1)  # (N, d)


# ---------------------------------------------------------------- the rotation


def _rotate(xp: ModuleType, x: Array, pairs: str) -> Array:
    """``R x``: every pair ``(a, b)`` of the last axis becomes ``(−b, a)``, a quarter turn.   (..., d)"""
    if pairs == "interleaved":
        pair = xp.reshape(x, (*x.shape[:-1], x.shape[-1] // 2, 2))  # (..., d/2, 2)
        a, b = pair[..., 0], pair[..., 1]  # (..., d/2) each
        return xp.reshape(xp.stack([-b, a], axis=-1), tuple(x.shape))  # (..., d/2, 2) → (..., d)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]  # (..., d/2) each
    return xp.concat([-b, a], axis=-1)  # (..., d)


def _rotate_transpose(xp: ModuleType, u: Array, pairs: str) -> Array:
    """``Rᵀ u``: every pair ``(a, b)`` becomes ``(b, −a)``, the quarter turn back.   (..., d)"""
    if pairs == "interleaved":
        pair = xp.reshape(u, (*u.shape[:-1], u.shape[-1] // 2, 2))  # (..., d/2, 2)
        a, b = pair[..., 0], pair[..., 1]
        return xp.reshape(xp.stack([b, -a], axis=-1), tuple(u.shape))  # (..., d)
    half = u.shape[-1] // 2
    a, b = u[..., :half], u[..., half:]
    return xp.concat([b, -a], axis=-1)  # (..., d)


@dataclass(frozen=True)
class RopeCache:
    """What :func:`rope_backward` needs: the tables (in the compute dtype) and the layout."""

    backward_names: ClassVar[tuple[str, ...]] = ("rope_backward",)  # the backward that takes it

    cos: Array  # (..., N, d), broadcastable to x
    sin: Array  # (..., N, d)
    pairs: str
    shape: tuple[int, ...]  # x's shape (..., N, d)
    dtype: Any  # x's dtype (dout must have it; the gradient gets it)
    compute_dtype: Any  # the dtype the rotation ran in


def _check_rope_inputs(x: Array, cos: Array, sin: Array, pairs: str, where: str) -> ModuleType:
    for name, a in (("x", x), ("cos", cos), ("sin", sin)):
        require_array(f"{where}: {name}", a)
    xp = array_namespace(x=x, cos=cos, sin=sin)
    _check_pairs(pairs, where)
    require_floating(xp, "x", x)
    require_floating(xp, "cos", cos)
    require_floating(xp, "sin", sin)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"{where}: x must be (..., N, d) with an even d (pairs of channels), got {tuple(x.shape)}")
    if tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"{where}: cos of shape {tuple(cos.shape)} and sin of shape {tuple(sin.shape)} differ")
    if cos.ndim < 2 or tuple(cos.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(
            f"{where}: the tables must be (N, d) = {tuple(x.shape[-2:])} (one row per token of x, one column per "
            f"channel), got cos of shape {tuple(cos.shape)} for x of shape {tuple(x.shape)}"
        )
    try:
        require_broadcastable_to("cos", tuple(cos.shape), tuple(x.shape))
    except ValueError:
        raise ValueError(
            f"{where}: cos and sin of shape {tuple(cos.shape)} do not broadcast to x's shape {tuple(x.shape)}"
        ) from None
    return xp


def rope_forward(
    x: Array, cos: Array, sin: Array, *, pairs: str = "interleaved", compute_dtype: str | None = None
) -> tuple[Array, RopeCache]:
    """Rotate every channel pair of ``x`` by its angle: ``y = x ⊙ cos + R(x) ⊙ sin``.

    Inputs:
        x: ``(..., N, d)``, real floating, ``d`` even: queries or keys, e.g. ``(B, heads, N, d)``.
        cos, sin: ``(N, d)`` or any shape ``(..., N, d)`` that broadcasts to x's, real floating (any float
            dtype: they are cast to the compute dtype), from :func:`rope_angles` or a model.
        pairs: ``"interleaved"`` (Flux, Wan) or ``"halves"`` (rotate-half), the tables' layout.
        compute_dtype: ``None`` (x's working dtype: float32 for float16, else x's own) or ``"float16"``,
            ``"float32"``, ``"float64"``; ``"float32"`` reproduces diffusers' ``apply_rotary_emb`` on float64.

    Returns:
        y: x's shape and dtype; cache: :class:`RopeCache`.
    """
    where = "rope_forward"
    xp = _check_rope_inputs(x, cos, sin, pairs, where)
    work = (
        working_dtype(xp, x.dtype)
        if compute_dtype is None
        else float_dtype_named(xp, compute_dtype, "compute_dtype", where)
    )
    x_w, cos_w, sin_w = as_dtype(xp, x, work), as_dtype(xp, cos, work), as_dtype(xp, sin, work)
    # y = x ⊙ cos + R(x) ⊙ sin: each pair (a, b) ↦ (a cos φ − b sin φ, a sin φ + b cos φ)   (..., N, d)
    y = x_w * cos_w + _rotate(xp, x_w, pairs) * sin_w
    cache = RopeCache(cos=cos_w, sin=sin_w, pairs=pairs, shape=tuple(x.shape), dtype=x.dtype, compute_dtype=work)
    return as_dtype(xp, y, x.dtype), cache


def rope_backward(dout: Array, cache: RopeCache) -> dict[str, Array]:
    """Gradient of :func:`rope_forward`: ``{"x": dy ⊙ cos + Rᵀ(dy ⊙ sin)}``, the inverse rotation of ``dy``.

    Inputs:
        dout: ``(..., N, d)``, the forward's output shape and dtype.
        cache: from :func:`rope_forward`.

    Returns:
        ``{"x": (..., N, d)}`` in x's dtype. Each of the two terms is rounded to x's dtype before the sum
        (a no-op when the rotation ran in x's dtype).
    """
    check_cache(cache, RopeCache, "rope_backward")
    xp = require_dout(dout, cache.shape, cache.dtype, where="rope_backward")
    g = as_dtype(xp, dout, cache.compute_dtype)
    # through x ⊙ cos: dy ⊙ cos   (..., N, d)
    direct = as_dtype(xp, g * cache.cos, cache.dtype)
    # through R(x) ⊙ sin: Rᵀ(dy ⊙ sin), (a, b) ↦ (b, −a)   (..., N, d)
    turned = _rotate_transpose(xp, as_dtype(xp, g * cache.sin, cache.dtype), cache.pairs)
    # dx = dy ⊙ cos + Rᵀ(dy ⊙ sin)
    return {"x": direct + turned}
