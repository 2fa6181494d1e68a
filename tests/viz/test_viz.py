"""attention_ref.viz: the numbers behind the plots, every backend's arrays, and figures that are not blank: attention
maps, tokens, distances, receptive fields, the viewer. The diagrams, cost curves and denoising plots:
test_viz_diagrams_costs.py."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from viz_helpers import H, W, assert_not_blank, pixels

from attention_ref import (
    cross_attention_forward,
    init_cross_attention,
    init_self_attention,
    self_attention_backward,
    self_attention_forward,
    viz,
)


@pytest.fixture
def self_weights(rng):
    params = init_self_attention(8, heads=2, groups=4, rng=0)
    x = rng.standard_normal((2, H, W, 8)) * 2
    y, cache = self_attention_forward(x, params, heads=2, groups=4)
    return x, np.asarray(cache.weights)  # (2, 2, 30, 30)


@pytest.fixture
def cross_weights(rng):
    params = init_cross_attention(8, 5, heads=2, groups=4, rng=0)
    x, context = rng.standard_normal((1, H, W, 8)) * 3, rng.standard_normal((1, 4, 5)) * 3
    y, cache = cross_attention_forward(x, context, params, heads=2, groups=4)
    return x, np.asarray(cache.weights)  # (1, 2, 30, 4)


TOKENS = ["<sot>", "red", "disk", "<eot>"]


# ---------------------------------------------------------------- the numbers


def test_query_map_is_the_weights_row_laid_out_row_major(be, self_weights):
    _, w = self_weights
    got = viz.query_map(be(w), (3, 4), (H, W), batch=1, head=0)
    np.testing.assert_array_equal(got, w[1, 0, 3 * W + 4].reshape(H, W))
    np.testing.assert_allclose(viz.query_map(be(w), 3 * W + 4, (H, W), batch=1), w[1, :, 22].mean(0).reshape(H, W))
    with pytest.raises(ValueError, match="outside"):
        viz.query_map(w, (H, 0), (H, W))
    with pytest.raises(ValueError, match="not 6×6"):
        viz.query_map(w, (0, 0), (6, 6))


def test_token_map_normalisations(be, cross_weights):
    _, w = cross_weights
    special = [True, False, False, True]
    raw = viz.token_maps(be(w), (H, W), head=1, normalization="raw")
    np.testing.assert_array_equal(raw, w[0, 1].T.reshape(4, H, W))
    np.testing.assert_allclose(raw.sum(axis=0), 1.0, atol=1e-14)  # every pixel's weights sum to 1
    top = viz.token_maps(w, (H, W), normalization="token_max")
    np.testing.assert_allclose(top.max(axis=(1, 2)), 1.0)
    mm = viz.token_maps(w, (H, W), normalization="minmax")
    np.testing.assert_allclose(mm.min(axis=(1, 2)), 0.0, atol=1e-15)
    np.testing.assert_allclose(mm.max(axis=(1, 2)), 1.0)
    ns = viz.token_maps(w, (H, W), normalization="no_special", special=special)
    assert np.all(ns[[0, 3]] == 0)
    np.testing.assert_allclose(ns[1] + ns[2], 1.0, atol=1e-14)
    P = w[0].mean(0)
    np.testing.assert_allclose(ns[1].ravel(), P[:, 1] / (P[:, 1] + P[:, 2]))
    with pytest.raises(ValueError, match="needs special"):
        viz.token_maps(w, (H, W), normalization="no_special")
    with pytest.raises(ValueError, match="normalization must be"):
        viz.token_maps(w, (H, W), normalization="softmax")


def test_token_segmentation_picks_the_highest_normalised_map():
    w = np.zeros((4, 3))  # 2×2 map, 3 tokens
    w[:, 0] = [0.9, 0.9, 0.9, 0.9]
    w[:, 1] = [0.1, 0.0, 0.05, 0.0]
    w[:, 2] = [0.0, 0.1, 0.05, 0.0]
    seg = viz.token_segmentation(w, (2, 2), [1, 2])
    np.testing.assert_array_equal(seg, [[1, 2], [1, -1]])  # pixel 2 ties at 0.5 of each max: first wins


def test_attention_distance(be):
    shape = (3, 4)
    N = 12
    eye = np.eye(N)
    assert np.all(viz.attention_distance(be(eye), shape) == 0)
    uniform = np.full((N, N), 1 / N)
    np.testing.assert_allclose(viz.mean_attention_distance(be(uniform), shape), [viz.uniform_distance(shape)])
    w = np.zeros((N, N))
    w[:, 11] = 1.0  # everyone looks at pixel (2, 3)
    d = viz.attention_distance(w, shape)[0, 0]
    assert d[0] == pytest.approx(np.hypot(2, 3)) and d[11] == 0 and d[3] == pytest.approx(2)


def test_conv_stack_receptive_field_reaches_exactly_as_far_as_it_has_layers():
    field = viz.conv_stack_receptive_field(2, (9, 9), (4, 4), channels=3, draws=2)
    rows, cols = np.nonzero(field > 1e-12)
    assert rows.min() == 2 and rows.max() == 6 and cols.min() == 2 and cols.max() == 6


def test_input_gradient_of_an_attention_block_equals_finite_differences(rng):
    from attention_ref.gradcheck import numerical_gradient

    params = init_self_attention(4, heads=1, groups=2, rng=1)
    x = rng.standard_normal((1, 3, 3, 4))

    def forward(t):
        return self_attention_forward(t, params, heads=1, groups=2)

    got = viz.input_gradient(forward, self_attention_backward, x, (1, 2))
    dy = np.zeros((1, 3, 3, 4))
    dy[0, 1, 2] = 1
    numeric = numerical_gradient(lambda t: forward(t)[0], x.copy(), dy)
    np.testing.assert_allclose(got, np.abs(numeric[0]).sum(-1), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- the figures


def test_self_attention_plots_take_every_backend_and_are_not_blank(be, self_weights):
    x, w = self_weights
    assert_not_blank(viz.plot_query_attention(be(w), (2, 3), (H, W), image=be(x[0]), head=1))
    assert_not_blank(viz.plot_attention_grid(be(w), [(0, 0), (2, 3), 29], (H, W), image=be(x[1]), batch=1))
    assert_not_blank(viz.plot_attention_distance({"a": be(w), "b": be(w[:, ::-1].copy())}, (H, W)))


def test_cross_attention_plots_take_every_backend_and_are_not_blank(be, cross_weights):
    x, w = cross_weights
    assert_not_blank(viz.plot_token_maps(be(w), TOKENS, (H, W), image=be(x[0]), normalization="minmax"))
    assert_not_blank(viz.plot_token_normalizations(be(w), TOKENS, (H, W), image=be(x[0])))
    assert_not_blank(
        viz.plot_token_segmentation(
            be(w), TOKENS, (H, W), [1, 2], image=np.abs(x[0, ..., :3]), truth=np.full((H, W), 1)
        )
    )


def test_weights_and_influence_are_on_log_scales_that_show_small_values(self_weights):
    from matplotlib.colors import LogNorm

    _, w = self_weights
    field = viz.conv_stack_receptive_field(1, (H, W), (2, 2), channels=2, draws=1) + 1e-9
    fig = viz.plot_weights_vs_influence(viz.query_map(w, (2, 2), (H, W)), field, (2, 2))
    left, right = (ax for ax in fig.axes if ax.images)
    for ax, values in ((left, viz.query_map(w, (2, 2), (H, W))), (right, field)):
        norm = ax.images[-1].norm
        assert isinstance(norm, LogNorm)
        assert norm.vmax == pytest.approx(values.max()) and norm.vmin == pytest.approx(values.max() * 1e-4)
    assert "$P_{qj}$" in left.get_title() and r"\partial y_q" in right.get_title()  # mathtext, not raw P_qj
    assert "P_qj" not in left.get_title().replace("$P_{qj}$", "")
    linear = viz.plot_weights_vs_influence(field, field, (2, 2), log=False)
    assert not isinstance(next(ax for ax in linear.axes if ax.images).images[-1].norm, LogNorm)


def test_token_maps_can_show_the_scene_itself_first(cross_weights, rng):
    _, w = cross_weights
    scene = rng.uniform(size=(H, W, 3))
    fig = viz.plot_token_maps(w, TOKENS, (H, W), image=scene, scene=True)
    panels = [ax for ax in fig.axes if ax.images]
    assert panels[0].get_xlabel() == "scene (RGB)" and panels[0].images[0].get_array().shape == (H, W, 3)
    assert [ax.get_xlabel() for ax in panels[1:]] == TOKENS
    with pytest.raises(ValueError, match="scene=True needs image"):
        viz.plot_token_maps(w, TOKENS, (H, W), scene=True)


def test_word_maps_say_what_their_colours_are():
    image = np.zeros((4, 4, 3))
    maps = np.random.default_rng(0).uniform(size=(2, 2, 2))
    fig = viz.plot_word_maps(image, maps, ["a", "b"], label="each map stretched to [0, 1]")
    assert fig.axes[-1].get_ylabel() == "each map stretched to [0, 1]"
    assert viz.plot_word_maps(image, maps, ["a", "b"]).axes[-1].get_ylabel() == "attention weight"


def test_receptive_field_and_influence_plots_are_not_blank(be, self_weights):
    x, w = self_weights
    field = viz.conv_stack_receptive_field(1, (H, W), (2, 2), channels=2, draws=1)
    assert_not_blank(viz.plot_receptive_fields({"conv": be(field), "same": field}, (2, 2), image=x[0]))
    assert_not_blank(viz.plot_weights_vs_influence(be(viz.query_map(w, (2, 2), (H, W))), be(field), (2, 2)))
    with pytest.raises(ValueError, match="one shape"):
        viz.plot_weights_vs_influence(np.ones((2, 2)), np.ones((3, 3)), (0, 0))


def test_viewer_falls_back_to_a_static_figure_outside_jupyter(self_weights, cross_weights):
    assert not viz.widgets_available()
    x, w = self_weights
    fig = viz.attention_viewer(w, (H, W), image=x[0])
    assert isinstance(fig, Figure)
    assert_not_blank(fig)
    _, wc = cross_weights
    assert_not_blank(viz.attention_viewer(wc, (H, W), tokens=TOKENS, static=True))


def test_save_figure_writes_png_without_a_software_tag(tmp_path, self_weights):
    _, w = self_weights
    path = viz.save_figure(viz.plot_query_attention(w, 0, (H, W)), tmp_path / "sub" / "q.png", dpi=30)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and b"Software" not in data and b"matplotlib" not in data


def test_matplotlib_is_imported_only_by_viz():
    code = "import sys, attention_ref, attention_ref.toys, attention_ref.blocks; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_viewer_widgets_build_and_redraw_when_asked_for(self_weights, cross_weights):
    pytest.importorskip("ipywidgets")
    _, w = self_weights
    box = viz.attention_viewer(w, (H, W), static=False)
    row, col, head = box.children[0].children
    assert (row.max, col.max) == (H - 1, W - 1) and len(head.options) == 3
    row.value, head.value = 1, 1  # each change redraws without error
    _, wc = cross_weights
    box = viz.attention_viewer(wc, (H, W), tokens=TOKENS, static=False)
    token, head, norm = box.children[0].children
    assert [label for label, _ in token.options] == [f"{i}: {t}" for i, t in enumerate(TOKENS)]
    token.value, norm.value = 2, "minmax"


# ---------------------------------------------------------------- readability of the gallery's figures


def test_token_maps_refuse_a_label_count_that_is_not_the_token_count(cross_weights):
    _, w = cross_weights  # 4 tokens
    for plot in (viz.plot_token_maps, viz.plot_token_normalizations):
        with pytest.raises(ValueError, match=r"3 token labels for weights of shape .* with 4 tokens"):
            plot(w, TOKENS[:3], (H, W))
    with pytest.raises(ValueError, match="3 token labels"):
        viz.plot_token_segmentation(w, TOKENS[:3], (H, W), [1])
    with pytest.raises(ValueError, match="outside the 4 tokens"):
        viz.plot_token_maps(w, TOKENS, (H, W), show=[0, 4])


def test_long_prompts_wrap_onto_rows_of_at_most_six_maps(rng):
    from attention_ref.viz.tokens import _grid_shape

    assert [_grid_shape(n) for n in (1, 5, 6, 7, 10, 77)] == [(1, 1), (1, 5), (1, 6), (2, 4), (2, 5), (13, 6)]
    w = rng.random((1, 1, H * W, 77))
    w /= w.sum(-1, keepdims=True)
    fig = viz.plot_token_maps(w, [f"t{i}" for i in range(77)], (H, W))
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 77
    assert len({round(ax.get_position().y0, 3) for ax in maps}) == 13  # 13 rows
    assert fig.get_size_inches()[0] < 13  # not one 124-inch row
    ten = viz.plot_token_maps(w[..., :10] / w[..., :10].sum(-1, keepdims=True), [f"t{i}" for i in range(10)], (H, W))
    assert len({round(ax.get_position().y0, 3) for ax in ten.axes if ax.images}) == 2  # two rows of five


def test_token_normalisations_label_their_rows_and_leave_out_a_row_equal_to_another(cross_weights):
    _, w = cross_weights
    # minmax equals token_max when every map's minimum is 0: make it so
    w = w.copy()
    w[..., 0, :] = [0.0, 0.0, 0.0, 1.0]
    w[..., 1, :] = [1.0, 0.0, 0.0, 0.0]
    w[..., 2, :] = [0.0, 0.5, 0.5, 0.0]
    fig = viz.plot_token_normalizations(w, TOKENS, (H, W))
    rows = sorted({round(ax.get_position().y0, 3) for ax in fig.axes if ax.images})
    assert len(rows) == 3  # raw, ÷ max, no special: min–max left out
    maps = [ax for ax in fig.axes if ax.images or ax.texts]
    labels = [ax.get_ylabel() for ax in maps if ax.get_ylabel()]
    assert labels == [viz.tokens.ROW_LABELS[n] for n in ("raw", "token_max", "no_special")]
    assert "each token's min–max is not drawn" in fig._supxlabel.get_text()
    everything = viz.plot_token_normalizations(w, TOKENS, (H, W), same_within=0.0)
    assert len({round(ax.get_position().y0, 3) for ax in everything.axes if ax.images or ax.texts}) == 4
    # every row's colour bar says what its numbers are, without running into its tick labels
    bars = [ax for ax in fig.axes if ax not in maps]
    assert [ax.get_ylabel() for ax in bars] == [viz.tokens.BAR_LABELS[n] for n in ("raw", "token_max", "no_special")]
    _assert_no_overlap(fig, [[ax.yaxis.label, *ax.get_yticklabels()] for ax in bars])


def _assert_no_overlap(fig: Figure, groups: list[list[Any]]) -> None:
    """Within each group, no two drawn texts overlap on the rendered figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for texts in groups:
        boxes = [t.get_window_extent(renderer) for t in texts if t.get_text() and t.get_visible()]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"{a} overlaps {b}"


TRICKY_TOKENS = ["$x^$", "costs $5 and $6", "<eot>", "$"]


def test_tokens_with_dollar_signs_are_drawn_as_text_not_math(rng):
    """A ``$`` in a token reached matplotlib as mathtext: ``$x^$`` raised a ValueError when the figure was
    saved, and "costs $5 and $6" was set as math."""
    from matplotlib import cbook
    from matplotlib.text import Text

    w = rng.dirichlet(np.ones(4), size=(1, 1, H * W))  # (1, 1, 30, 4)
    image = rng.uniform(size=(H, W, 3))
    figures = [
        viz.plot_token_maps(w, TRICKY_TOKENS, (H, W), image=image, scene=True),
        viz.plot_token_normalizations(w, TRICKY_TOKENS, (H, W)),
        viz.plot_token_segmentation(w, TRICKY_TOKENS, (H, W), [0, 1]),
        viz.plot_word_maps(image, w[0, 0].T.reshape(4, H, W), TRICKY_TOKENS),
        viz.plot_denoising_steps(np.stack([image] * 2), np.stack([w[0, 0].reshape(H, W, 4)] * 2), TRICKY_TOKENS),
        viz.attention_viewer(w, (H, W), tokens=TRICKY_TOKENS, static=True),
        viz.plot_maps_by_layer_and_head({"$x^$": np.ones((1, 1, 2, 2))}, [0]),
    ]
    for fig in figures:
        pixels(fig)  # saving draws every text: a mathtext parse error would raise here
        texts = [t.get_text() for t in fig.findobj(Text) if "$" in t.get_text()]
        assert texts, "no token with a $ was drawn"
        assert not any(cbook.is_math_text(t) for t in texts), texts  # drawn as it is, not as math
        shown = {t.replace(r"\$", "$") for t in texts}  # what matplotlib draws for a text that is not math
        assert any(t.split("\n")[0] in {"$x^$", "costs $5 and $6", "where '$x^$' is read from"} for t in shown), shown
    assert not cbook.is_math_text(viz._common.plain_text("costs $5 and $6"))
    assert viz._common.plain_text("a $b$ c") == r"a \$b\$ c"


def test_weight_within_accumulates_each_querys_weights_by_distance(be, self_weights):
    _, w = self_weights  # (2, 2, 30, 30) on a 5×6 map
    radii, within = viz.weight_within(be(w), (H, W))
    rows, cols = np.divmod(np.arange(H * W), W)
    D = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
    np.testing.assert_allclose(radii, np.unique(np.round(D, 9)))
    for r_index in (0, 3, len(radii) - 1):
        expected = np.sum(w * (D <= radii[r_index] + 1e-9), axis=-1)
        np.testing.assert_allclose(within[..., r_index], expected, atol=1e-14)
    np.testing.assert_allclose(within[..., -1], 1.0, atol=1e-14)  # every row sums to 1
    assert np.all(np.diff(within, axis=-1) >= -1e-15)  # and only grows with r
    np.testing.assert_array_equal(viz.weight_within(np.eye(H * W), (H, W))[1][..., 0], 1.0)


def test_field_distance_is_the_mean_distance_of_an_influence_map():
    field = np.zeros((5, 5))
    field[2, 2], field[2, 4], field[0, 2] = 2.0, 1.0, 1.0  # half on the pixel, a quarter 2 px away twice
    assert viz.field_distance(field, (2, 2)) == pytest.approx(1.0)
    conv = viz.conv_stack_receptive_field(2, (9, 9), (4, 4), channels=3, draws=2)
    assert 0.5 < viz.field_distance(conv, (4, 4)) < 2 * np.sqrt(2)  # inside the 5×5 it can reach
    with pytest.raises(ValueError, match="non-negative"):
        viz.field_distance(-field, (2, 2))


def test_attention_distance_plot_shows_targets_fields_and_mean_distances(self_weights):
    x, w = self_weights
    target = np.full((2, H, W), 3.0)
    field = viz.conv_stack_receptive_field(1, (H, W), (2, 2), channels=2, draws=1)
    fig = viz.plot_attention_distance(
        {"a": w, "b": w[:, ::-1].copy()},
        (H, W),
        queries=np.abs(x[..., 0]) > 0.5,
        target=target,
        target_label="all on the target",
        fields={"conv": (field, (2, 2))},
    )
    assert_not_blank(fig)
    weights_ax, fields_ax = fig.axes
    entries = [t.get_text() for t in weights_ax.get_legend().get_texts()]
    chosen = np.abs(x[..., 0]).reshape(2, -1) > 0.5
    assert entries[:4] == [
        f"{name}, head {h}: mean distance {viz.attention_distance(ws, (H, W))[:, h][chosen].mean():.1f} px"
        for name, ws in (("a", w), ("b", w[:, ::-1]))
        for h in range(2)
    ]
    assert "all on the target: mean distance 3.0 px" in entries
    # an influence map is not a share of the weight: it has an axis of its own, labelled as a gradient
    assert fields_ax.get_legend().get_texts()[0].get_text().startswith("conv: mean distance")
    assert "attention weight" in weights_ax.get_ylabel() and "∂y" in fields_ax.get_ylabel()
    assert "weight" not in fields_ax.get_ylabel()
    # the legends sit inside their axes: no empty canvas around them
    assert not fig.legends
    assert len(viz.plot_attention_distance(w, (H, W)).axes) == 1
    with pytest.raises(ValueError, match="queries must be"):
        viz.plot_attention_distance(w, (H, W), queries=np.ones((3, H * W), dtype=bool))


def test_attention_grid_on_a_log_scale_keeps_near_uniform_weights_visible(self_weights):
    from matplotlib.colors import LogNorm

    _, w = self_weights
    near_uniform = np.full_like(w, 1.0 / (H * W))
    sharp = np.zeros_like(w)
    sharp[..., 0] = 1.0
    both = np.concatenate([near_uniform[:, :1], sharp[:, :1]], axis=1)
    linear = viz.plot_attention_grid(both, [(1, 1)], (H, W), row_labels=["uniform", "sharp"])
    log = viz.plot_attention_grid(both, [(1, 1)], (H, W), row_labels=["uniform", "sharp"], log=True)
    uniform_panel = next(ax for ax in log.axes if ax.get_ylabel() == "uniform")
    norm = uniform_panel.images[-1].norm
    assert isinstance(norm, LogNorm) and norm.vmin <= 0.1 / (H * W) and norm.vmax == 1.0
    # on the linear scale the uniform row is the colour of 0; on the log scale it is well above it
    lin_norm = next(ax for ax in linear.axes if ax.get_ylabel() == "uniform").images[-1].norm
    assert lin_norm(1.0 / (H * W)) < 0.05 < 0.3 < norm(1.0 / (H * W))
    assert "log scale" in log.axes[-1].get_ylabel()
    # the query's × and the uniform line on the colour bar are told apart by colour; titles say row and col
    bar = log.axes[-1]
    assert {line.get_color() for line in bar.lines} <= {"white", "black"}
    crosses = [c for ax in log.axes[:-1] for c in ax.collections]
    assert crosses and all(tuple(c.get_facecolor()[0][:3]) == (0.0, 1.0, 1.0) for c in crosses)
    assert [ax.get_title() for ax in log.axes[:1]] == ["query: row 1, col 1"]
    with pytest.raises(ValueError, match="1 row labels for 2 heads"):
        viz.plot_attention_grid(both, [(1, 1)], (H, W), row_labels=["one"])


def test_maps_over_an_image_say_what_the_grey_backdrop_is(self_weights, cross_weights):
    x, w = self_weights
    _, wc = cross_weights
    field = viz.conv_stack_receptive_field(1, (H, W), (2, 2), channels=2, draws=1)
    with_image = [
        viz.plot_attention_grid(w, [(1, 1)], (H, W), image=x[0]),
        viz.plot_receptive_fields({"conv": field}, (2, 2), image=x[0]),
        viz.plot_weights_vs_influence(field, field, (2, 2), image=x[0]),
        viz.plot_token_maps(wc, TOKENS, (H, W), image=x[0]),
        viz.plot_token_normalizations(wc, TOKENS, (H, W), image=x[0]),
    ]
    for fig in with_image:
        assert "grey underneath the colours: the input map" in fig._supxlabel.get_text()
    custom = viz.plot_receptive_fields({"conv": field}, (2, 2), image=x[0], backdrop_note="grey: the scene")
    assert custom._supxlabel.get_text() == "grey: the scene"
    assert viz.plot_attention_grid(w, [(1, 1)], (H, W))._supxlabel is None  # no image, no backdrop, no note
