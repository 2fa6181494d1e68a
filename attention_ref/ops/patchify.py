r"""Patchify and unpatchify: between a ``(B, H, W, C)`` map and the tokens of a diffusion transformer.

A diffusion transformer (DiT, PixArt, SD3, Flux) cuts its latent map into ``p_h × p_w`` patches and makes
each patch one token. With ``H = h·p_h`` and ``W = w·p_w``, pixel ``(row, col)`` lies in patch
``(i, j) = (row // p_h, col // p_w)`` at offset ``(u, v) = (row % p_h, col % p_w)``, and

.. math::
    \text{tokens}[b,\ i\,w + j,\ \text{channel}(u, v, c)] = x[b,\ i\,p_h + u,\ j\,p_w + v,\ c]

* **tokens** are row-major over the ``h × w`` patch grid (token ``i·w + j``), as every diffusion code
  base flattens a map; the grid ``(h, w)`` is the attention map's shape;
* **channels inside a patch** (``D = p_h·p_w·C`` of them) are ordered ``(u, v, c)`` — ``channel =
  (u·p_w + v)·C + c`` — with ``channel_order="pqc"``, the order of DiT's and SD3's ``unpatchify``
  (``einsum("nhwpqc->nchpwq")``); Flux's pipeline packs its latents ``(c, u, v)`` — ``channel =
  (c·p_h + u)·p_w + v`` —, ``channel_order="cpq"``.

Unpatchify is the inverse. Both only move entries — each output entry is one input entry — so each
one's backward is the other: ``dx = unpatchify(d tokens)`` and ``d tokens = patchify(dx)``. (DiT's patch
embedding, a ``p × p`` convolution of stride ``p``, is this patchify followed by a linear layer whose
``(p·p·C, out)`` matrix is the convolution's ``(out, C, p, p)`` weight permuted to ``(p, p, C, out)``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._checks import array_namespace, check_cache, check_positive_int, require_array, require_dout, require_floating
from ..backend import Array, namespace

__all__ = [
    "CHANNEL_ORDERS",
    "PatchGeometry",
    "PatchifyCache",
    "UnpatchifyCache",
    "patchify_backward",
    "patchify_forward",
    "unpatchify_backward",
    "unpatchify_forward",
]

#: ``"pqc"``: a patch's channels ordered (row in patch, column in patch, channel) — DiT, PixArt, SD3;
#: ``"cpq"``: (channel, row in patch, column in patch) — Flux's packed latents.
CHANNEL_ORDERS = ("pqc", "cpq")


@dataclass(frozen=True)
class PatchGeometry:
    """The geometry of a patchify or unpatchify, which is all either backward needs."""

    batch: int  # B
    grid: tuple[int, int]  # (h, w), patches per column and per row
    patch: tuple[int, int]  # (p_h, p_w)
    channels: int  # C, the map's channels
    channel_order: str
    dtype: Any  # the forward's input dtype

    @property
    def map_shape(self) -> tuple[int, int, int, int]:
        """``(B, H, W, C)``."""
        return (self.batch, self.grid[0] * self.patch[0], self.grid[1] * self.patch[1], self.channels)

    @property
    def tokens_shape(self) -> tuple[int, int, int]:
        """``(B, h·w, p_h·p_w·C)``."""
        return (self.batch, self.grid[0] * self.grid[1], self.patch[0] * self.patch[1] * self.channels)


class PatchifyCache(PatchGeometry):
    """The cache of :func:`patchify_forward`."""

    backward_names: ClassVar[tuple[str, ...]] = ("patchify_backward",)  # the backward that takes it

class UnpatchifyCache(PatchGeometry):
    """The cache of :func:`unpatchify_forward`."""

    backward_names: ClassVar[tuple[str, ...]] = ("unpatchify_backward",)  # the backward that takes it

def _check_pair(name: str, value: Any, where: str, *, square: bool) -> tuple[int, int]:
    """``value`` as two positive ints: a pair ``(a, b)`` (a tuple or a list), or, when ``square``, one int for
    both. ``TypeError`` for anything else (``2.0``, ``True``, ``None``, a string, ``(2, 2.0)``), ``ValueError``
    for a pair of another length or a size below 1."""
    if not isinstance(value, (tuple, list)):
        if square:
            n = check_positive_int(name, value, where)
            return n, n
        raise TypeError(f"{where}: {name} must be a pair of ints, got {type(value).__name__} {value!r}")
    if len(value) != 2:
        raise ValueError(f"{where}: {name} must be a pair of ints, got {len(value)} of them: {tuple(value)!r}")
    return check_positive_int(f"{name}[0]", value[0], where), check_positive_int(f"{name}[1]", value[1], where)


def _check_patch(patch: Any, where: str) -> tuple[int, int]:
    """``patch`` as ``(p_h, p_w)``: one positive int for square patches, or a pair."""
    return _check_pair("patch", patch, where, square=True)


def _check_order(channel_order: Any, where: str) -> str:
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"{where}: channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
    return channel_order


def _check_input(where: str, name: str, a: Array, patch: Any, channel_order: Any) -> tuple[int, int]:
    """``(p_h, p_w)``, after checking what both directions check first: the floating array ``name`` (``TypeError``),
    the patch size and the channel order (``ValueError``)."""
    require_array(f"{where}: {name}", a)
    require_floating(array_namespace(**{name: a}), name, a)
    p_h, p_w = _check_patch(patch, where)
    _check_order(channel_order, where)
    return p_h, p_w


def _to_tokens(x: Array, cache: PatchGeometry) -> Array:
    """The move itself: ``(B, H, W, C)`` → ``(B, h·w, p_h·p_w·C)``."""
    xp = namespace(x)
    (h, w), (p_h, p_w), C = cache.grid, cache.patch, cache.channels
    B = x.shape[0]
    x = xp.reshape(x, (B, h, p_h, w, p_w, C))  # (B, h, p_h, w, p_w, C): row = i·p_h + u, col = j·p_w + v
    if cache.channel_order == "pqc":
        x = xp.permute_dims(x, (0, 1, 3, 2, 4, 5))  # (B, h, w, p_h, p_w, C)
    else:
        x = xp.permute_dims(x, (0, 1, 3, 5, 2, 4))  # (B, h, w, C, p_h, p_w)
    return xp.reshape(x, (B, h * w, p_h * p_w * C))  # (B, h·w, D): token i·w + j


def _to_map(tokens: Array, cache: PatchGeometry) -> Array:
    """The inverse move: ``(B, h·w, p_h·p_w·C)`` → ``(B, H, W, C)``."""
    xp = namespace(tokens)
    (h, w), (p_h, p_w), C = cache.grid, cache.patch, cache.channels
    B = tokens.shape[0]
    if cache.channel_order == "pqc":
        t = xp.reshape(tokens, (B, h, w, p_h, p_w, C))  # (B, h, w, p_h, p_w, C)
        t = xp.permute_dims(t, (0, 1, 3, 2, 4, 5))  # (B, h, p_h, w, p_w, C)
    else:
        t = xp.reshape(tokens, (B, h, w, C, p_h, p_w))  # (B, h, w, C, p_h, p_w)
        t = xp.permute_dims(t, (0, 1, 4, 2, 5, 3))  # (B, h, p_h, w, p_w, C)
    return xp.reshape(t, (B, h * p_h, w * p_w, C))  # (B, H, W, C)


def patchify_forward(
    x: Array, patch: int | tuple[int, int], *, channel_order: str = "pqc"
) -> tuple[Array, PatchifyCache]:
    """Cut a map into patch tokens.

    Inputs:
        x: ``(B, H, W, C)``, channels last, ``H`` divisible by ``p_h`` and ``W`` by ``p_w``.
        patch: ``p`` (square patches) or ``(p_h, p_w)``.
        channel_order: ``"pqc"`` (DiT, PixArt, SD3) or ``"cpq"`` (Flux's packing).

    Returns:
        tokens: ``(B, h·w, p_h·p_w·C)`` with ``(h, w) = (H/p_h, W/p_w)``, token ``i·w + j`` the patch at
            grid row ``i``, column ``j``; cache: :class:`PatchifyCache` (``cache.grid`` is ``(h, w)``).
    """
    where = "patchify_forward"
    p_h, p_w = _check_input(where, "x", x, patch, channel_order)
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be a (B, H, W, C) map, got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    if H % p_h or W % p_w:
        raise ValueError(
            f"{where}: x of shape {tuple(x.shape)}: a {H}×{W} map is not divisible into {p_h}×{p_w} patches "
            f"(H % {p_h} = {H % p_h}, W % {p_w} = {W % p_w}); crop or pad it to a multiple of the patch size"
        )
    cache = PatchifyCache(
        batch=B, grid=(H // p_h, W // p_w), patch=(p_h, p_w), channels=C, channel_order=channel_order, dtype=x.dtype
    )
    return _to_tokens(x, cache), cache


def patchify_backward(dout: Array, cache: PatchifyCache) -> dict[str, Array]:
    """``{"x": unpatchify(dout)}`` ``(B, H, W, C)``: patchify only moves entries, so its backward moves them back."""
    check_cache(cache, PatchifyCache, "patchify_backward")
    require_dout(dout, cache.tokens_shape, cache.dtype, where="patchify_backward")
    return {"x": _to_map(dout, cache)}


def unpatchify_forward(
    tokens: Array, grid: tuple[int, int], patch: int | tuple[int, int], *, channel_order: str = "pqc"
) -> tuple[Array, UnpatchifyCache]:
    """Put patch tokens back together into a map: the inverse of :func:`patchify_forward`.

    Inputs:
        tokens: ``(B, h·w, p_h·p_w·C)``, token ``i·w + j`` the patch at grid row ``i``, column ``j``.
        grid: ``(h, w)``, the patch grid.
        patch: ``p`` or ``(p_h, p_w)``.
        channel_order: ``"pqc"`` (DiT's unpatchify ``einsum("nhwpqc->nchpwq")``) or ``"cpq"`` (Flux's unpacking).

    Returns:
        x: ``(B, h·p_h, w·p_w, C)``; cache: :class:`UnpatchifyCache`.
    """
    where = "unpatchify_forward"
    p_h, p_w = _check_input(where, "tokens", tokens, patch, channel_order)
    h, w = _check_pair("grid", grid, where, square=False)
    if tokens.ndim != 3:
        raise ValueError(f"{where}: tokens must be (B, h·w, p_h·p_w·C), got shape {tuple(tokens.shape)}")
    B, N, D = tokens.shape
    if N != h * w:
        raise ValueError(f"{where}: grid {(h, w)} has {h * w} patches but there are {N} tokens")
    if D % (p_h * p_w):
        raise ValueError(
            f"{where}: tokens of shape {tuple(tokens.shape)}: a token of {D} channels is not {p_h}·{p_w}·C "
            f"channels of a {p_h}×{p_w} patch"
        )
    C = D // (p_h * p_w)
    cache = UnpatchifyCache(
        batch=B, grid=(h, w), patch=(p_h, p_w), channels=C, channel_order=channel_order, dtype=tokens.dtype
    )
    return _to_map(tokens, cache), cache


def unpatchify_backward(dout: Array, cache: UnpatchifyCache) -> dict[str, Array]:
    """``{"tokens": patchify(dout)}`` ``(B, h·w, p_h·p_w·C)``: the entries moved back."""
    check_cache(cache, UnpatchifyCache, "unpatchify_backward")
    require_dout(dout, cache.map_shape, cache.dtype, where="unpatchify_backward")
    return {"tokens": _to_tokens(dout, cache)}
