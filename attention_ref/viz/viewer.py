"""An interactive attention viewer for Jupyter (ipywidgets), with a static figure as fallback.

* Self-attention (``tokens=None``): sliders pick the query pixel's row and column
  and a menu the head; the map redraws.
* Cross-attention (``tokens`` given): menus pick the token, the head and the
  normalisation.

Outside a Jupyter kernel, without ipywidgets, or with ``static=True``, the
viewer returns a static figure instead: a grid of a few query pixels (self-
attention) or every token's map (cross-attention).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from ._common import plain_text
from .maps import as_weights, plot_attention_grid, plot_query_attention
from .tokens import NORMALIZATIONS, plot_token_maps

__all__ = ["attention_viewer", "widgets_available"]


def widgets_available() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _static(weights: Any, shape: tuple[int, int], image: Any, tokens: Sequence[str] | None, batch: int) -> Figure:
    if tokens is not None:
        return plot_token_maps(weights, tokens, shape, image=image, batch=batch, normalization="minmax")
    H, W = shape
    queries = [(H // 4, W // 4), (H // 2, W // 2), (3 * H // 4, 3 * W // 4)]
    return plot_attention_grid(weights, queries, shape, image=image, batch=batch)


def attention_viewer(
    weights: Any,
    shape: tuple[int, int],
    *,
    image: Any | None = None,
    tokens: Sequence[str] | None = None,
    batch: int = 0,
    static: bool | None = None,
) -> Any:
    """An ipywidgets viewer of attention weights, or a static :class:`~matplotlib.figure.Figure`.

    Inputs:
        weights: ``(B, heads, H·W, M)`` (or without B / heads), any backend; ``M = H·W``
            for self-attention.
        shape: ``(H, W)``; image: a backdrop ``(H, W[, C])`` or None.
        tokens: the ``M`` token strings for cross-attention; None for self-attention.
        static: True forces the static figure; None uses widgets when available.

    Returns:
        An ``ipywidgets.VBox`` (display it as a cell's value) or a Figure.
    """
    w = as_weights(weights)
    if static or (static is None and not widgets_available()):
        return _static(w, shape, image, tokens, batch)

    import ipywidgets as widgets
    from IPython.display import Image, display

    H, W = shape
    head = widgets.Dropdown(
        options=[("mean of heads", -1)] + [(f"head {h}", h) for h in range(w.shape[1])], value=-1, description="head"
    )
    out = widgets.Output()
    if tokens is None:
        row = widgets.IntSlider(value=H // 2, min=0, max=H - 1, description="row")
        col = widgets.IntSlider(value=W // 2, min=0, max=W - 1, description="col")
        controls: list[Any] = [row, col, head]

        def figure() -> Figure:
            return plot_query_attention(
                w, (row.value, col.value), shape, image=image, batch=batch, head=None if head.value < 0 else head.value
            )
    else:
        token = widgets.Dropdown(options=[(f"{t}: {s}", t) for t, s in enumerate(tokens)], value=0, description="token")
        norm = widgets.Dropdown(
            options=[(v, k) for k, v in NORMALIZATIONS.items() if k != "no_special"], value="raw", description="scale"
        )
        controls = [token, head, norm]

        def figure() -> Figure:
            return plot_token_maps(
                w,
                tokens,
                shape,
                image=image,
                batch=batch,
                normalization=norm.value,
                head=None if head.value < 0 else head.value,
                show=[token.value],
                title=f"where {plain_text(repr(tokens[token.value]))} is read from",
            )

    def redraw(_: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            display(Image(data=_png(figure())))

    for c in controls:
        c.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(controls), out])
