"""Seeing attention: plots of attention weights, receptive fields, costs and block diagrams (matplotlib),
and the explorer, a self-contained web page to click through attention weights (:func:`explore`).

Every function takes arrays from any backend (they are brought to NumPy with
:func:`attention_ref.backend.to_numpy`). The plotting functions return a
:class:`matplotlib.figure.Figure` — shown when it is a Jupyter cell's value,
saved with :func:`save_figure`. Figures are made outside pyplot, so nothing
accumulates in pyplot's global state. :func:`explore` returns an
:class:`Explorer` — shown inline when it is a Jupyter cell's value, saved with
``.save(path)`` as one HTML file (docs/explorer.md).

matplotlib is imported here and nowhere else in attention_ref.

Where viz stands: above the core (backend, ops, attention, blocks) and above the toys, which it may
import to draw what they compute (:func:`sample_explorer` reads a diffusion toy's sample). Nothing
below imports viz: the toys leave their pictures to it, so that they load without matplotlib.
"""

from ._common import save_figure
from .cost_curves import load_complexity, plot_complexity, scaling_exponents
from .denoising import plot_denoising_steps, plot_maps_by_layer_and_head
from .diagrams import cross_attention_shapes, draw_cross_attention, draw_self_attention_block, self_attention_shapes
from .distance import (
    attention_distance,
    field_distance,
    mean_attention_distance,
    plot_attention_distance,
    uniform_distance,
    weight_within,
)
from .explorer import Explorer, ExplorerLayer, explore, load_explorer, pixels_of_positions
from .maps import as_weights, plot_attention_grid, plot_query_attention, query_map
from .receptive_field import (
    conv_stack_backward,
    conv_stack_forward,
    conv_stack_receptive_field,
    input_gradient,
    plot_receptive_fields,
    plot_weights_vs_influence,
)
from .sample_explorer import sample_explorer
from .tokens import (
    NORMALIZATIONS,
    plot_token_maps,
    plot_token_normalizations,
    plot_token_segmentation,
    token_maps,
    token_segmentation,
)
from .viewer import attention_viewer, widgets_available
from .word_overlay import plot_word_maps

__all__ = [
    "save_figure",
    # self-attention maps
    "as_weights",
    "query_map",
    "plot_query_attention",
    "plot_attention_grid",
    # cross-attention maps
    "NORMALIZATIONS",
    "token_maps",
    "plot_token_maps",
    "plot_token_normalizations",
    "token_segmentation",
    "plot_token_segmentation",
    "plot_word_maps",
    # diffusion: maps during denoising
    "plot_denoising_steps",
    "plot_maps_by_layer_and_head",
    # distance
    "attention_distance",
    "mean_attention_distance",
    "uniform_distance",
    "field_distance",
    "weight_within",
    "plot_attention_distance",
    # receptive fields
    "input_gradient",
    "conv_stack_forward",
    "conv_stack_backward",
    "conv_stack_receptive_field",
    "plot_receptive_fields",
    "plot_weights_vs_influence",
    # costs
    "load_complexity",
    "scaling_exponents",
    "plot_complexity",
    # diagrams
    "self_attention_shapes",
    "cross_attention_shapes",
    "draw_self_attention_block",
    "draw_cross_attention",
    # Jupyter
    "attention_viewer",
    "widgets_available",
    # the explorer: one HTML page, in any browser or inline in Jupyter
    "explore",
    "Explorer",
    "ExplorerLayer",
    "load_explorer",
    "pixels_of_positions",
    "sample_explorer",
]
