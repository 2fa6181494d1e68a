"""attention_ref.viz: the numbers behind the plots, every backend's arrays, and figures that are not blank."""

from __future__ import annotations

import io
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.figure import Figure

from attention_ref import (
    cross_attention_forward,
    init_cross_attention,
    init_self_attention,
    self_attention_backward,
    self_attention_forward,
    viz,
)

H, W = 5, 6


def pixels(fig: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    buffer.seek(0)
    return mpimg.imread(buffer)


def assert_not_blank(fig: Figure) -> None:
    img = pixels(fig)[..., :3]
    assert img.std() > 0.05, "the figure is (nearly) one colour"
    assert len(np.unique(img.reshape(-1, 3).round(2), axis=0)) > 20, "the figure has almost no distinct colours"


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


def test_diagram_shapes_come_from_the_blocks():
    s = viz.self_attention_shapes(4, 6, 16, heads=2, groups=8)
    assert s["weights"] == (1, 2, 24, 24) and s["heads"] == (1, 2, 24, 8) and s["y"] == (1, 4, 6, 16)
    c = viz.cross_attention_shapes(4, 6, 16, 7, 12, heads=4, groups=8)
    assert c["weights"] == (1, 4, 24, 7) and c["kv"] == (1, 7, 16) and c["q"] == (1, 24, 16)


REPORT = {
    "schema": "attention_ref.complexity/1",
    "config": {"dim": 8},
    "results": [
        {
            "variant": v,
            "side": s,
            "tokens": s * s,
            "forward_s": t * (s * s) ** e,
            "backward_s": t * (s * s) ** e,
            "peak_bytes": int(100 * (s * s) ** e),
            "theory_bytes": int(80 * (s * s) ** e),
            "skipped": None,
        }
        for v, e, t in (("exact", 2, 1e-8), ("linear", 1, 1e-6))
        for s in (8, 16, 32)
    ]
    + [
        {
            "variant": "exact",
            "side": 64,
            "tokens": 4096,
            "forward_s": None,
            "backward_s": None,
            "peak_bytes": None,
            "theory_bytes": 1,
            "skipped": "too big",
        }
    ],
}


def test_complexity_exponents_and_schema(tmp_path):
    exps = viz.scaling_exponents(REPORT)
    assert exps["exact"] == pytest.approx(2.0, abs=1e-3) and exps["linear"] == pytest.approx(1.0, abs=1e-3)
    path = tmp_path / "c.json"
    import json

    path.write_text(json.dumps(REPORT))
    assert viz.scaling_exponents(path, "time")["exact"] == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="schema"):
        viz.load_complexity({"schema": "something else", "results": []})


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


def test_receptive_field_and_influence_plots_are_not_blank(be, self_weights):
    x, w = self_weights
    field = viz.conv_stack_receptive_field(1, (H, W), (2, 2), channels=2, draws=1)
    assert_not_blank(viz.plot_receptive_fields({"conv": be(field), "same": field}, (2, 2), image=x[0]))
    assert_not_blank(viz.plot_weights_vs_influence(be(viz.query_map(w, (2, 2), (H, W))), be(field), (2, 2)))
    with pytest.raises(ValueError, match="one shape"):
        viz.plot_weights_vs_influence(np.ones((2, 2)), np.ones((3, 3)), (0, 0))


def test_complexity_and_diagrams_are_not_blank():
    assert_not_blank(viz.plot_complexity(REPORT))
    assert_not_blank(viz.draw_self_attention_block(8, 8, 32, heads=2, groups=8))
    assert_not_blank(viz.draw_cross_attention(8, 8, 32, 6, 16, heads=2, groups=8))


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
