"""attention_ref.viz, continued: the block diagrams (shapes from the blocks, readable boxes), the cost curves of
the complexity report, and the denoising plots. The maps, tokens, distances and receptive fields: test_viz.py."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from viz_helpers import H, W, assert_not_blank

from attention_ref import viz


# ---------------------------------------------------------------- the diagrams
def test_diagram_shapes_come_from_the_blocks():
    s = viz.self_attention_shapes(4, 6, 16, heads=2, groups=8)
    assert s["weights"] == (1, 2, 24, 24) and s["heads"] == (1, 2, 24, 8) and s["y"] == (1, 4, 6, 16)
    c = viz.cross_attention_shapes(4, 6, 16, 7, 12, heads=4, groups=8)
    assert c["weights"] == (1, 4, 24, 7) and c["kv"] == (1, 7, 16) and c["q"] == (1, 24, 16)


def _box_texts(fig: Figure) -> list[tuple[Any, Any]]:
    """(text, box) pairs of a diagram: each text drawn inside a rounded box."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import FancyBboxPatch

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    pairs = []
    for text in ax.texts:
        x, y = text.get_position()
        inside = [
            b
            for b in boxes
            if b.get_x() <= x <= b.get_x() + b.get_width() and b.get_y() <= y <= b.get_y() + b.get_height()
        ]
        if inside:
            pairs.append((text.get_window_extent(renderer), inside[0].get_window_extent(renderer), text))
    return pairs


@pytest.mark.parametrize(
    "draw",
    [
        lambda: viz.draw_self_attention_block(),
        lambda: viz.draw_self_attention_block(8, 8, 32, heads=2, groups=8),
        lambda: viz.draw_cross_attention(),
        lambda: viz.draw_cross_attention(16, 16, 320, 77, 768, heads=8, groups=32),
    ],
)
def test_diagram_texts_are_readable_and_fit_their_boxes(draw):
    fig = draw()
    pairs = _box_texts(fig)
    assert len(pairs) >= 10
    for text_box, box, text in pairs:
        assert text.get_fontsize() >= 9, text.get_text()
        assert box.x0 <= text_box.x0 and text_box.x1 <= box.x1, f"{text.get_text()!r} overflows its box"
        assert box.y0 <= text_box.y0 and text_box.y1 <= box.y1, f"{text.get_text()!r} overflows its box"
    assert all(t.get_fontsize() >= 8 for t in fig.axes[0].texts)


def test_diagrams_draw_the_heads_the_resblock_shapes_and_the_number_under_the_root():
    texts = [t.get_text() for t in viz.draw_self_attention_block(16, 16, 64, heads=4, groups=32).axes[0].texts]
    assert sum("conv 3×3   (1, 16, 16, 64)" in t for t in texts) == 2  # both ResBlock rows carry their shape
    assert any("4 heads of d = 64 / 4 = 16" in t for t in texts)
    assert any(t.startswith("head 0:") for t in texts) and any(t.startswith("head 3:") for t in texts)
    assert any("2 more" in t for t in texts)  # heads 1 and 2 stand behind the ellipsis
    assert any("/ √16)" in t and "(1, 256, 256)" in t for t in texts)
    assert any("√d" in t for t in texts) is False
    texts = [t.get_text() for t in viz.draw_cross_attention(8, 8, 32, 6, 16, heads=2, groups=8).axes[0].texts]
    assert any("/ √16)" in t and "(1, 64, 6)" in t for t in texts)
    assert any(t.startswith("head 1:") for t in texts) and not any("more" in t for t in texts)
    assert viz.diagrams.resblock_shapes(4, 6, 16, 8) == {
        "conv1": (1, 4, 6, 16),
        "time_embedding": (1, 64),  # 4·C, as in Stable Diffusion
        "time": (1, 16),
        "plus_time": (1, 4, 6, 16),
        "conv2": (1, 4, 6, 16),
        "sum": (1, 4, 6, 16),
    }


def test_the_stage_diagram_names_every_tensor_and_adds_the_timestep_embedding():
    texts = [t.get_text() for t in viz.draw_self_attention_block(16, 16, 64, heads=4, groups=32).axes[0].texts]
    first = {name: next(i for i, t in enumerate(texts) if t.startswith(name)) for name in ("x,", "r =", "h =", "y =")}
    assert first["x,"] < first["r ="] < first["h ="] < first["y ="]  # each defined before it is used
    assert texts[first["r ="]].startswith("r = x + …") and texts[first["h ="]].startswith("h = GroupNorm(r)")
    assert texts[first["y ="]].startswith("y = r + …")  # the block adds its own input, not the stage's x
    assert not any(t.startswith("y = x") for t in texts)
    assert any("timestep embedding (1, 256) → (1, 64)" in t and "every pixel" in t for t in texts)
    assert any(t.startswith("flatten h:") for t in texts)


@pytest.mark.parametrize("bias", [True, False])
def test_both_diagrams_draw_the_projection_biases_the_block_has(bias):
    self_texts = [t.get_text() for t in viz.draw_self_attention_block(bias=bias).axes[0].texts]
    cross_texts = [t.get_text() for t in viz.draw_cross_attention(bias=bias).axes[0].texts]
    for texts, (q, k, v) in ((self_texts, "hhh"), (cross_texts, "hcc")):
        for name, source in zip("QKV", (q, k, v), strict=True):
            box = next(t for t in texts if t.startswith(f"{name} = {source} W_{name.lower()}"))
            assert (f"+ b_{name.lower()}" in box) is bias, box
        assert any("diffusers' Attention has none" in t for t in texts) is bias
    assert any(t.startswith("h = GroupNorm(32)(x)") for t in cross_texts)  # h is defined here too
    shapes = viz.self_attention_shapes(4, 4, 8, heads=2, groups=4, bias=bias)
    assert shapes["qkv"] == (1, 16, 8)


# ---------------------------------------------------------------- the denoising plots
def test_denoising_maps_are_drawn_alone_with_outlines_and_the_uniform_weight_on_the_colour_bar(rng):
    from matplotlib.collections import LineCollection

    S, M = 4, 3
    images = rng.uniform(size=(S, H, W, 3))
    maps = rng.dirichlet(np.ones(M), size=(S, H, W))  # (S, H, W, M)
    circle = np.zeros((H, W), dtype=bool)
    circle[1:3, 2:5] = True
    fig = viz.plot_denoising_steps(images, maps, ["<sot>", "red", "<eot>"], outlines={"red circle": circle})
    map_axes = [ax for ax in fig.axes if ax.images and ax.get_images()[0].get_array().ndim == 2]
    assert len(map_axes) == S * M  # no mean column: every column is one step, its image above it
    for ax in map_axes:
        assert len(ax.images) == 1  # the map alone: no grey image blended under it
        (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert len(lines.get_segments()) == 2 * (2 + 3)  # the 2×3 rectangle's perimeter, one segment a pixel edge
    bar = fig.axes[-1]
    assert "1/3: uniform" in [t.get_text() for t in bar.get_yticklabels()]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["red circle"]
    with_mean = viz.plot_denoising_steps(images, maps, ["<sot>", "red", "<eot>"], mean_column=True)
    assert any("mean of the maps" in ax.get_title() and not ax.axison for ax in with_mean.axes)
    with pytest.raises(ValueError, match="outline 'x' has shape"):
        viz.plot_denoising_steps(images, maps, ["a", "b", "c"], outlines={"x": np.zeros((2, 2), dtype=bool)})


def test_draw_outline_follows_the_pixel_edges_of_a_mask():
    from matplotlib.figure import Figure as MplFigure

    ax = MplFigure().add_subplot()
    mask = np.array([[True, False], [True, True]])
    segments = {tuple(map(tuple, s)) for s in viz.denoising.draw_outline(ax, mask).get_segments()}
    assert len(segments) == 8  # an L of three pixels has a perimeter of 8 pixel edges
    assert ((0.5, -0.5), (0.5, 0.5)) in segments  # between pixel (0, 0) and (0, 1)
    assert ((0.5, 0.5), (1.5, 0.5)) in segments  # between pixel (0, 1) and (1, 1)


# ---------------------------------------------------------------- the cost curves
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


def test_complexity_and_diagrams_are_not_blank():
    assert_not_blank(viz.plot_complexity(REPORT))
    assert_not_blank(viz.draw_self_attention_block(8, 8, 32, heads=2, groups=8))
    assert_not_blank(viz.draw_cross_attention(8, 8, 32, 6, 16, heads=2, groups=8))


def _report_v2(sides=(16, 32, 48, 64), disturbed=()):
    """A schema-2 report: exact ∝ N², linear ∝ N plus a fixed overhead; ``disturbed`` (variant, side) are 3× slower."""
    rows = []
    for variant, power, per, overhead in (("exact", 2, 1e-9, 0.0), ("linear", 1, 1e-6, 2e-4)):
        for s in sides:
            n = s * s
            t = per * n**power + overhead
            slow = (variant, s) in disturbed
            rows.append(
                {
                    "variant": variant,
                    "side": s,
                    "tokens": n,
                    "forward_s": t * (6 if slow else 1),
                    "backward_s": t * (6 if slow else 1),
                    "forward_cpu_s": t * (3 if slow else 1),
                    "backward_cpu_s": t * (3 if slow else 1),
                    "runs": 3,
                    "cpu_share": 0.5 if slow else 1.0,
                    "disturbed": slow,
                    "peak_bytes": int(8 * n**power),
                    "flops_forward": 2 * n**power,
                    "flops_backward": 4 * n**power,
                    "theory_bytes": int(8 * n**power),
                    "skipped": None,
                }
            )
    return {
        "schema": "attention_ref.complexity/2",
        "config": {"dim": 8, "repeats": 3},
        "machine": {"cpu": "a test CPU"},
        "results": rows,
    }


def test_time_slopes_are_fitted_over_the_largest_sizes_and_leave_out_disturbed_runs():
    report = _report_v2(sides=(8, 16, 32, 48, 64))
    # linear attention's fixed overhead bends its curve at small maps: 0.9 over the three largest, 0.7 over all
    assert viz.scaling_exponents(report, "time")["linear"] == pytest.approx(0.9, abs=0.05)
    assert viz.scaling_exponents(report, "time", points=5)["linear"] < 0.8
    assert viz.scaling_exponents(report, "flops") == pytest.approx({"exact": 2.0, "linear": 1.0})
    slow = _report_v2(sides=(8, 16, 32, 48, 64), disturbed={("exact", 64)})
    assert viz.scaling_exponents(slow, "time")["exact"] == pytest.approx(2.0, abs=1e-9)  # 64² left out
    assert viz.scaling_exponents(slow, "peak_bytes")["exact"] == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 points"):
        viz.scaling_exponents(report, points=1)


def test_complexity_plot_title_names_each_power_once_and_its_ticks_do_not_collide():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = viz.plot_complexity(_report_v2(disturbed={("linear", 32)}))
    title = fig._suptitle.get_text()
    assert title == (
        "The work grows as $N^{2}$ for exact; $N$ for linear;\npeak memory as $N^{2.0}$ for exact; $N^{1.0}$ for linear"
    )
    assert "hollow" in fig._supxlabel.get_text() and "a test CPU" in fig._supxlabel.get_text()
    # a range only when the ends differ: never "N^1.0–N^1.0"
    from attention_ref.viz.cost_curves import _power_range

    assert _power_range([1.02, 0.98]) == "$N^{1.0}$" and _power_range([0.9, 1.1]) == "$N^{0.9}$–$N^{1.1}$"
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True) if t.get_text()]
        assert [t.get_text() for t in labels] == ["16²", "32²", "64²"]
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes))


def test_complexity_memory_panel_names_the_theory_and_how_far_the_measurement_is_above_it():
    report = _report_v2(sides=(16, 32, 48, 64))
    for row in report["results"]:
        row["theory_bytes"] = row["peak_bytes"] // 2  # measured peaks at 2× the theory, as the backward does
    fig = viz.plot_complexity(report)
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend[:2] == ["exact (slope 2.0, 2.0× theory)", "linear (slope 1.0, 2.0× theory)"]
    assert any(e.startswith("dashed: theory") for e in legend)
    assert "2.0–2.0× that" in fig._supxlabel.get_text() and "dP = dO Vᵀ" in fig._supxlabel.get_text()


def test_complexity_time_panel_draws_operation_counts_through_the_measured_times():
    fig = viz.plot_complexity(_report_v2(sides=(16, 32, 48, 64)))
    ax_time = fig.axes[0]
    exact = next(line for line in ax_time.get_lines() if line.get_linestyle() == "-" and line.get_color() == "#d95f02")
    n, t = np.asarray(exact.get_xdata(), float), np.asarray(exact.get_ydata(), float)
    np.testing.assert_allclose(np.diff(np.log(t)) / np.diff(np.log(n)), 2.0)  # the operation count's slope
    np.testing.assert_allclose(t, 2e-9 * n**2)  # scaled to the measured times (here exactly ∝ N²)
    legend = [x.get_text() for x in ax_time.get_legend().get_texts()]
    assert legend[0] == "exact: work ∝ N², measured slope 2.0" and legend[1].startswith("linear: work ∝ N, measured")
