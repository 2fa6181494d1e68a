r"""Which input pixels move one output pixel: receptive fields from the backward pass.

The *effective receptive field* of output pixel ``q`` is the map

.. math:: R_q(j) = \sum_m \Big| \frac{\partial\, \sum_c y_{q,c}}{\partial x_{j,m}} \Big| ,

one backward pass with ``dy = 1`` on pixel ``q`` (every channel) and 0 elsewhere
(Luo et al. 2016). A stack of ``L`` 3×3 convolutions can only reach ``L`` pixels
away, and its influence falls off from the centre; a self-attention block
reaches every pixel it puts weight on, however far.

Everything here goes through the library's own backward passes
(:func:`attention_ref.ops.conv2d_backward`, the blocks' backward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..backend import from_numpy
from ..ops import conv2d_backward, conv2d_forward
from ._common import BACKDROP_NOTE, as_numpy, grey, mark_query, new_figure, note, pixel_of, show_map

__all__ = [
    "conv_stack_backward",
    "conv_stack_forward",
    "conv_stack_receptive_field",
    "input_gradient",
    "plot_receptive_fields",
    "plot_weights_vs_influence",
]


def input_gradient(
    forward: Callable[[Any], tuple[Any, Any]],
    backward: Callable[[Any, Any], Mapping[str, Any]],
    x: Any,
    pixel: tuple[int, int],
) -> np.ndarray:
    """``(H, W)``: ``Σ_m |∂(Σ_c y[pixel, c]) / ∂x[·, ·, m]|`` for a map ``x`` ``(1, H, W, C)``.

    Inputs:
        forward: ``forward(x) -> (y, cache)`` with ``y`` ``(1, H', W', C')``.
        backward: ``backward(dy, cache) -> {"x": ..., ...}``.
        x: the input map, batch of one, any backend.
        pixel: ``(row, col)`` of the output pixel.
    """
    y, cache = forward(x)
    y_np = as_numpy(y, "y")
    if y_np.ndim != 4 or y_np.shape[0] != 1:
        raise ValueError(f"input_gradient needs a batch of one map, got an output of shape {y_np.shape}")
    r, c = pixel_of(pixel, y_np.shape[1:3])
    dy = np.zeros_like(y_np)
    dy[0, r, c, :] = 1.0
    dx = as_numpy(backward(from_numpy(dy, like=y), cache)["x"], "dx")
    return np.abs(dx[0]).sum(axis=-1)


def conv_stack_forward(x: Any, kernels: Sequence[Any]) -> tuple[Any, list[Any]]:
    """``L`` linear 3×3 convolutions (``padding="same"``, no bias, no nonlinearity) in a row."""
    caches = []
    for kernel in kernels:
        x, cache = conv2d_forward(x, kernel, padding="same")
        caches.append(cache)
    return x, caches


def conv_stack_backward(dy: Any, caches: list[Any]) -> dict[str, Any]:
    """``{"x": ...}``: the conv stack's backward, last layer first."""
    for cache in reversed(caches):
        dy = conv2d_backward(dy, cache)["x"]
    return {"x": dy}


def conv_stack_receptive_field(
    layers: int,
    shape: tuple[int, int],
    pixel: tuple[int, int],
    *,
    channels: int = 8,
    draws: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """``(H, W)``: the effective receptive field of ``layers`` random 3×3 convolutions, averaged over ``draws``.

    Kernels are drawn with variance ``1/(9·channels)`` (so the signal keeps its scale);
    the stack is linear, so the map does not depend on the input.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((1, *shape, channels))
    total = np.zeros(shape)
    for _ in range(draws):
        kernels = [rng.standard_normal((3, 3, channels, channels)) / np.sqrt(9 * channels) for _ in range(layers)]
        total += input_gradient(lambda t, k=kernels: conv_stack_forward(t, k), conv_stack_backward, x, pixel)
    return total / draws


def plot_receptive_fields(
    fields: Mapping[str, Any],
    pixel: tuple[int, int],
    *,
    image: Any | None = None,
    backdrop_note: str | None = BACKDROP_NOTE,
    title: str | None = None,
) -> Figure:
    """Receptive-field maps side by side, each divided by its own maximum, one shared colour bar.

    Inputs:
        fields: name → ``(H, W)`` map (e.g. from :func:`input_gradient`), all of one size.
        pixel: the output pixel, marked ×; image: a backdrop or None.
        backdrop_note: the line under the figure saying what the grey backdrop is (with an ``image``).
    """
    maps = {name: as_numpy(m, name) for name, m in fields.items()}
    shape = next(iter(maps.values())).shape
    backdrop = grey(image, shape)
    fig = new_figure(2.2 * len(maps) + 0.9, 2.7, layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        top = m.max()
        im = show_map(ax, m / top if top > 0 else m, backdrop=backdrop, vmin=0.0, vmax=1.0)
        mark_query(ax, pixel_of(pixel, shape), size=50)
        ax.set_xlabel(name, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.85, label="|∂y_q/∂x| ÷ its max")
    if image is not None:
        note(fig, backdrop_note)
    fig.suptitle(title or "which input pixels move the marked output pixel", fontsize=11)
    return fig


def plot_weights_vs_influence(
    weights_map: Any,
    influence: Any,
    pixel: tuple[int, int],
    *,
    image: Any | None = None,
    log: bool = True,
    decades: float = 4.0,
    backdrop_note: str | None = BACKDROP_NOTE,
    title: str | None = None,
) -> Figure:
    """A query pixel's attention weights next to its true influence map ``|∂y_q/∂x|``.

    Inputs:
        weights_map: ``(H, W)``, e.g. :func:`attention_ref.viz.query_map`.
        influence: ``(H, W)``, e.g. :func:`input_gradient` of the block.
        pixel: the query; image: a backdrop or None.
        log: each panel on a logarithmic colour scale spanning ``decades`` powers of ten below its
            maximum (smaller values get its lowest colour), so that small weights and small influences
            stay visible beside the largest; ``log=False``: linear scales from 0.
        backdrop_note: the line under the figure saying what the grey backdrop is (with an ``image``).
    """
    w, g = as_numpy(weights_map, "weights_map"), as_numpy(influence, "influence")
    if w.shape != g.shape:
        raise ValueError(f"weights_map {w.shape} and influence {g.shape} must have one shape")
    backdrop = grey(image, w.shape)
    fig = new_figure(7.6, 3.6, layout="constrained")
    axes = fig.subplots(1, 2)
    scale = f"log scale, {decades:g} decades" if log else "linear scale"
    for ax, values, name in (
        (axes[0], w, "what it attends to:\nweights $P_{qj}$"),
        (axes[1], g, "what moves it (backward pass):\n" + r"$\sum_c\,|\partial y_q / \partial x_{j,c}|$"),
    ):
        top = max(float(values.max()), 1e-300)
        low = top * 10.0**-decades if log else 0.0
        im = show_map(ax, np.maximum(values, low), backdrop=backdrop, vmin=low, vmax=top, log=log)
        mark_query(ax, pixel_of(pixel, w.shape), size=50)
        fig.colorbar(im, ax=ax, shrink=0.85).set_label(scale, fontsize=9)
        ax.set_title(name, fontsize=10)
    if image is not None:
        note(fig, backdrop_note)
    fig.suptitle(title or "attention weights are not the whole influence", fontsize=11)
    return fig
