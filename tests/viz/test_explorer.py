"""The explorer's data model, explore() and its .npz file, without a browser.

The page and the explore command: test_explorer_page.py; the page in a real browser: test_explorer_browser.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from explorer_helpers import TOKENS, C, H, W, decoded, page_json

from attention_ref import (
    init_self_attention,
    init_spatial_transformer,
    self_attention_forward,
    spatial_transformer_forward,
)
from attention_ref.viz import Explorer, ExplorerLayer, explore, load_explorer, pixels_of_positions
from attention_ref.viz import explorer as explorer_module


def uniform(S: int, heads: int, Q: int, K: int) -> np.ndarray:
    return np.full((S, heads, Q, K), 1.0 / K)


# ---------------------------------------------------------------- the data model
def test_layer_keeps_float32_weights_and_its_axes():
    w = np.random.default_rng(0).dirichlet(np.ones(H * W), size=(3, 2, H * W))  # (3, 2, N, N)
    layer = ExplorerLayer("l", "self", (H, W), w)
    assert layer.weights.dtype == np.float32 and layer.weights.shape == (3, 2, H * W, H * W)
    assert (layer.steps, layer.keys, layer.grid) == (3, H * W, (H, W))
    np.testing.assert_allclose(layer.weights, w, rtol=1e-7)
    assert layer.query_pixels is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "both"}, "kind must be one of"),
        ({"weights": uniform(1, 1, H * W, H * W)[0]}, r"must be \(steps, heads, queries, keys\)"),
        ({"weights": uniform(1, 1, H * W, 5)}, "self-attention keys are the 4×6=24 pixels"),
        ({"weights": uniform(1, 1, 10, H * W)}, "give query_pixels"),
        ({"grid": (0, 3)}, "grid must be positive"),
        ({"grid": "4x6"}, r"grid must be \(H, W\)"),
        ({"weights": uniform(1, 2, H * W, H * W), "head_mean": True}, "head_mean=True needs one entry"),
        ({"weights": uniform(1, 1, H * W, H * W) * 30}, r"softmax weights in \[0, 1\] \(not logits\)"),
        ({"weights": -uniform(1, 1, H * W, H * W)}, "not logits"),
        ({"weights": uniform(1, 1, H * W, H * W) * np.nan}, "NaN or inf"),
        ({"weights": uniform(1, 1, 2, H * W), "query_pixels": np.array([[0, 0]])}, r"must be \(2, 2\) integers"),
        ({"weights": uniform(1, 1, 1, H * W), "query_pixels": np.array([[0.5, 0.5]])}, "integers"),
        ({"weights": uniform(1, 1, 2, H * W), "query_pixels": np.array([[0, 0], [4, 0]])}, r"\[\[4, 0\]\] lie outside"),
        (
            {"kind": "cross", "weights": uniform(1, 1, H * W, 3), "query_pixels": np.array([[0, 0]])},
            "query_pixels are for self-attention",
        ),
    ],
)
def test_layer_refuses_bad_input(kwargs, message):
    args = {"name": "l", "kind": "self", "grid": (H, W), "weights": uniform(1, 1, H * W, H * W)} | kwargs
    with pytest.raises(ValueError, match=message):
        ExplorerLayer(**args)


def test_page_checks_its_layers_tokens_and_steps():
    self_layer = ExplorerLayer("s", "self", (H, W), uniform(2, 1, H * W, H * W))
    cross_layer = ExplorerLayer("c", "cross", (H, W), uniform(2, 1, H * W, len(TOKENS)))
    page = Explorer((self_layer, cross_layer), tokens=TOKENS)
    assert page.steps == ("0", "1")  # numbered when not named
    assert page.tokens == tuple(TOKENS)
    with pytest.raises(ValueError, match="names must be unique"):
        Explorer((self_layer, self_layer))
    with pytest.raises(ValueError, match="same number of steps"):
        Explorer((self_layer, ExplorerLayer("t", "self", (H, W), uniform(1, 1, H * W, H * W))))
    with pytest.raises(ValueError, match="3 step labels for weights with 2 steps"):
        Explorer((self_layer,), steps=["a", "b", "c"])
    with pytest.raises(ValueError, match="has 5 keys, and the page has no tokens"):
        Explorer((cross_layer,))
    with pytest.raises(ValueError, match="has 5 keys, and the page has 4 tokens"):
        Explorer((cross_layer,), tokens=TOKENS[:4])
    with pytest.raises(TypeError, match="not one string"):
        Explorer((cross_layer,), tokens="a red cat")
    with pytest.raises(TypeError, match="sequence of ExplorerLayer"):
        Explorer(())
    with pytest.raises(ValueError, match="start_query"):
        Explorer((self_layer,), start_query=(0.5, 1.5))


def test_first_view_is_a_cross_layer_at_the_last_step_on_the_first_word():
    self_layer = ExplorerLayer("s", "self", (H, W), uniform(3, 1, H * W, H * W))
    cross_a = ExplorerLayer("c1", "cross", (H, W), uniform(3, 2, H * W, len(TOKENS)))
    cross_b = ExplorerLayer("c2", "cross", (2, 3), uniform(3, 1, 6, len(TOKENS)))
    page = Explorer((self_layer, cross_a, cross_b), tokens=TOKENS)
    # "a", the first token that is not <sot>; step 2, the last; the scale that keeps a flat map flat
    assert page.start_view() == {"layer": 1, "step": 2, "word": 1, "scale": "shared"}
    assert page_json(page)["start"] == page.start_view()
    assert next(iter(explorer_module.SCALES)) == "shared"
    chosen = Explorer((self_layer, cross_a, cross_b), tokens=TOKENS, start_layer="c2", start_step=0)
    assert chosen.start_view() == {"layer": 2, "step": 0, "word": 1, "scale": "shared"}
    # without a cross layer: the first layer; with special tokens only: the first token
    assert Explorer((self_layer,)).start_view()["layer"] == 0
    only_special = ExplorerLayer("c", "cross", (1, 1), np.full((1, 1, 1, 2), 0.5))
    assert Explorer((only_special,), tokens=["<sot>", "<eot>"]).start_view()["word"] == 0
    with pytest.raises(ValueError, match=r"start_layer 'c3' is not one of the layers \['s', 'c1', 'c2'\]"):
        Explorer((self_layer, cross_a, cross_b), tokens=TOKENS, start_layer="c3")
    with pytest.raises(ValueError, match="start_step 3 is outside the 3 steps"):
        Explorer((self_layer,), start_step=3)
    with pytest.raises(TypeError):
        Explorer((self_layer,), start_step=1.5)


def test_step_images_are_one_rgb_image_per_step():
    layer = ExplorerLayer("s", "self", (2, 2), uniform(3, 1, 4, 4))
    grey = np.linspace(0, 1, 3 * 5 * 6).reshape(3, 5, 6)
    page = Explorer((layer,), step_images=grey, step_images_label="x̂₀")
    assert page.step_images.shape == (3, 5, 6, 3) and page.step_images.dtype == np.uint8
    np.testing.assert_array_equal(page.step_images[2, :, :, 1], np.round(grey[2] * 255))
    data = page_json(page)["stepImages"]
    assert (data["steps"], data["height"], data["width"], data["label"]) == (3, 5, 6, "x̂₀")
    np.testing.assert_array_equal(decoded(data["rgb"], "u1").reshape(3, 5, 6, 3), page.step_images)
    assert page_json(Explorer((layer,)))["stepImages"] is None
    with pytest.raises(ValueError, match="with S = 3 steps"):
        Explorer((layer,), step_images=grey[:2])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        Explorer((layer,), step_images=grey * 2)


def test_page_refuses_weights_a_browser_cannot_hold(monkeypatch):
    monkeypatch.setattr(explorer_module, "MAX_PAGE_BYTES", 1000)
    with pytest.raises(ValueError, match="more than a page can carry"):
        Explorer((ExplorerLayer("s", "self", (H, W), uniform(1, 1, H * W, H * W)),))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.array([[0.0, 1.0]]), [[[0, 0, 0], [255, 255, 255]]]),  # grey float
        (np.array([[[1.0, 0.5, 0.0]]]), [[[255, 128, 0]]]),  # RGB float
        (np.array([[[3, 2, 1]]], dtype=np.uint8), [[[3, 2, 1]]]),  # RGB bytes as they are
    ],
)
def test_image_becomes_rgb_bytes(image, expected):
    page = Explorer((ExplorerLayer("s", "self", (1, 1), np.ones((1, 1, 1, 1))),), image=image)
    np.testing.assert_array_equal(page.image, np.array(expected, dtype=np.uint8))


def test_image_may_be_a_pil_image_as_pipelines_return():
    from PIL import Image  # matplotlib's own dependency

    rgb = np.array([[[3, 2, 1], [250, 128, 0]]], dtype=np.uint8)
    page = Explorer((ExplorerLayer("s", "self", (1, 1), np.ones((1, 1, 1, 1))),), image=Image.fromarray(rgb))
    np.testing.assert_array_equal(page.image, rgb)


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.zeros((4, 4, 2)), ValueError, r"\(h, w\) grey or \(h, w, 3\) RGB"),
        (np.zeros(4), ValueError, "grey or"),
        (np.full((4, 4), 2.0), ValueError, r"must lie in \[0, 1\].*\(x \+ 1\) / 2"),
        (np.zeros((4, 4), dtype=np.int64), TypeError, "float in"),
    ],
)
def test_image_refuses_what_it_cannot_draw(image, error, message):
    with pytest.raises(error, match=message):
        Explorer((ExplorerLayer("s", "self", (1, 1), np.ones((1, 1, 1, 1))),), image=image)


def test_pixels_of_positions():
    positions = [(0.0, 0.0), (0.99, 0.5), (1.0, 1.0), (0.5 / 4, 5.5 / 6)]
    np.testing.assert_array_equal(pixels_of_positions(positions, (4, 6)), [[0, 0], [3, 3], [3, 5], [0, 5]])
    # a position at a pixel's centre lands on the pixel containing it at every grid
    np.testing.assert_array_equal(pixels_of_positions([(0.3, 0.7)], (20, 10)), [[6, 7]])
    np.testing.assert_array_equal(pixels_of_positions([(0.3, 0.7)], (5, 5)), [[1, 3]])
    with pytest.raises(ValueError, match=r"\(Q, 2\)"):
        pixels_of_positions([0.5, 0.5], (4, 6))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        pixels_of_positions([(0.5, 1.2)], (4, 6))


# ---------------------------------------------------------------- explore(): caches and arrays
def test_explore_takes_a_block_cache_and_one_sample(self_cache, cross_cache):
    page = explore({"self": self_cache, "cross": cross_cache}, tokens=TOKENS, batch=1)
    s, c = page.layers
    assert (s.name, s.kind, s.grid, c.kind) == ("self", "self", (H, W), "cross")
    np.testing.assert_allclose(s.weights[0], np.asarray(self_cache.weights)[1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(c.weights[0], np.asarray(cross_cache.weights)[1], rtol=1e-6, atol=1e-9)
    assert s.weights.shape == (1, 2, H * W, H * W) and c.weights.shape == (1, 2, H * W, len(TOKENS))
    with pytest.raises(ValueError, match="batch 2 is outside the 2 samples"):
        explore(self_cache, batch=2)


def test_explore_numbers_the_tokens_when_none_are_given(cross_cache):
    assert explore(cross_cache).tokens == ("#0", "#1", "#2", "#3", "#4")


def test_explore_opens_a_spatial_transformer(rng):
    x, context = rng.standard_normal((1, H, W, C)), rng.standard_normal((1, 3, 5))
    params = init_spatial_transformer(C, 5, heads=2, depth=2, groups=4, rng=0)
    _, cache = spatial_transformer_forward(x, context, params, heads=2, groups=4)
    page = explore({"mid": cache}, tokens=["<sot>", "dog", "<eot>"])
    assert [(L.name, L.kind) for L in page.layers] == [
        ("mid.blocks.0.attn1", "self"),
        ("mid.blocks.0.attn2", "cross"),
        ("mid.blocks.1.attn1", "self"),
        ("mid.blocks.1.attn2", "cross"),
    ]
    np.testing.assert_allclose(page.layers[3].weights[0], np.asarray(cache.blocks[1].attn2.weights)[0], rtol=1e-6)


def test_explore_recomputes_rows_of_attention_that_stores_none(rng):
    x = rng.standard_normal((1, H, W, C))
    params = init_self_attention(C, heads=2, groups=4, rng=0)
    _, exact = self_attention_forward(x, params, heads=2, groups=4)
    _, chunked = self_attention_forward(x, params, heads=2, groups=4, attention="chunked")
    assert chunked.weights is None
    np.testing.assert_allclose(explore(chunked).layers[0].weights[0], exact.weights[0], rtol=1e-6, atol=1e-9)
    _, linear = self_attention_forward(x, params, heads=2, groups=4, attention="linear")
    with pytest.raises(ValueError, match="weight matrix"):
        explore(linear)


def test_explore_checks_the_page_size_before_recomputing_rows(rng, monkeypatch):
    # a 96×96 map's dense rows are 1.39 GiB in float64 and take seconds: refused before any is computed
    x = rng.standard_normal((1, H, W, C))
    _, chunked = self_attention_forward(
        x, init_self_attention(C, heads=2, groups=4, rng=0), heads=2, groups=4, attention="chunked"
    )
    calls = []
    original = type(chunked.layer).weight_rows

    def counted(cache, start, stop):
        calls.append((start, stop))
        return original(cache, start, stop)

    monkeypatch.setattr(type(chunked.layer), "weight_rows", counted)
    monkeypatch.setattr(explorer_module, "MAX_PAGE_BYTES", 4 * 2 * (H * W) ** 2 - 1)  # one byte short of the layer
    with pytest.raises(ValueError, match="more than a page can carry"):
        explore(chunked)
    assert calls == []
    # the page's other layers count too
    monkeypatch.setattr(explorer_module, "MAX_PAGE_BYTES", 4 * 2 * (H * W) ** 2 + 50)
    small = ExplorerLayer("rows", "self", (H, W), uniform(1, 1, 1, H * W), query_pixels=np.array([[0, 0]]))
    with pytest.raises(ValueError, match="more than a page can carry"):
        explore({"rows": small, "chunked": chunked})
    assert calls == []
    # within the limit, the rows come a band at a time and equal the exact weights
    monkeypatch.setattr(explorer_module, "ROWS_AT_ONCE", 5)
    _, exact = self_attention_forward(x, init_self_attention(C, heads=2, groups=4, rng=0), heads=2, groups=4)
    np.testing.assert_allclose(explore(chunked).layers[0].weights[0], exact.weights[0], rtol=1e-6, atol=1e-9)
    assert calls == [(s, min(s + 5, H * W)) for s in range(0, H * W, 5)]


def test_explore_keeps_only_the_asked_query_rows(self_cache):
    positions = [(0.1, 0.1), (0.9, 0.5)]
    layer = explore(self_cache, query_positions=positions).layers[0]
    np.testing.assert_array_equal(layer.query_pixels, [[0, 0], [3, 3]])
    rows = np.asarray(self_cache.weights)[0][:, [0, 3 * W + 3]]  # (heads, 2, N)
    np.testing.assert_allclose(layer.weights[0], rows, rtol=1e-6, atol=1e-9)
    # the same rows from an array
    from_array = explore(np.asarray(self_cache.weights), grid=(H, W), query_positions=positions).layers[0]
    np.testing.assert_array_equal(from_array.weights, layer.weights)


def test_explore_reads_arrays_and_infers_what_it_can(self_cache, cross_cache):
    w_self, w_cross = np.asarray(self_cache.weights), np.asarray(cross_cache.weights)
    square = np.random.default_rng(0).dirichlet(np.ones(25), size=(1, 1, 25))  # (1, 1, 25, 25)
    assert explore(square).layers[0].grid == (5, 5)
    assert explore(square).layers[0].kind == "self"
    assert explore(w_cross, grid=(H, W), tokens=TOKENS).layers[0].kind == "cross"
    with pytest.raises(ValueError, match="not a square map; give grid"):
        explore(w_self)
    with pytest.raises(ValueError, match="say kind='self' or 'cross'"):
        explore(square, tokens=[str(t) for t in range(25)])
    assert explore(square, kind="cross", tokens=[str(t) for t in range(25)]).layers[0].kind == "cross"
    with pytest.raises(ValueError, match=r"must be \(B, heads, N, M\)"):
        explore(w_self[0], grid=(H, W))


def test_explore_returns_a_page_as_it_is(self_cache):
    page = explore(self_cache)
    assert explore(page) is page
    with pytest.raises(ValueError, match=r"\['image'\] cannot be applied"):
        explore(page, image=np.zeros((4, 4)))


def test_explore_saves_when_asked(self_cache, tmp_path):
    page = explore(self_cache, out=tmp_path / "page.html")
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == page.html()


# ---------------------------------------------------------------- the .npz file
def test_npz_round_trip_keeps_everything(tmp_path):
    rng = np.random.default_rng(3)
    rows = np.array([[0, 1], [3, 5]])
    layers = (
        ExplorerLayer("self rows", "self", (H, W), rng.dirichlet(np.ones(H * W), (2, 3, 2)), query_pixels=rows),
        ExplorerLayer("cross", "cross", (2, 3), rng.dirichlet(np.ones(5), (2, 1, 6)), head_mean=True),
    )
    page = Explorer(
        layers,
        image=rng.uniform(size=(7, 9, 3)),
        tokens=TOKENS,
        steps=["t=999", "t=500"],
        title="τ <round> & trip",
        notes="notes",
        start_query=(0.25, 0.75),
        step_images=rng.uniform(size=(2, 3, 4, 3)),
        step_images_label="x̂₀ per step",
        start_layer="self rows",
        start_step=0,
    )
    path = page.save_npz(tmp_path / "page")  # no suffix: written exactly there, not at page.npz
    assert path == tmp_path / "page" and path.is_file()
    back = load_explorer(path)
    for a, b in zip(page.layers, back.layers, strict=True):
        assert (a.name, a.kind, a.grid, a.head_mean) == (b.name, b.kind, b.grid, b.head_mean)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert (a.query_pixels is None) == (b.query_pixels is None)
    np.testing.assert_array_equal(back.layers[0].query_pixels, rows)
    np.testing.assert_array_equal(back.image, page.image)
    assert (back.tokens, back.steps, back.title, back.notes, back.start_query) == (
        page.tokens,
        page.steps,
        page.title,
        page.notes,
        page.start_query,
    )
    np.testing.assert_array_equal(back.step_images, page.step_images)
    assert (back.step_images_label, back.start_layer, back.start_step) == ("x̂₀ per step", "self rows", 0)
    assert back.start_view() == page.start_view() == {"layer": 0, "step": 0, "word": 1, "scale": "shared"}
    assert back.html() == page.html()


def test_npz_without_image_tokens_or_steps(tmp_path):
    page = Explorer((ExplorerLayer("s", "self", (2, 2), uniform(1, 1, 4, 4)),))
    back = load_explorer(page.save_npz(tmp_path / "p.npz"))
    assert (back.image, back.tokens, back.steps, back.step_images) == (None, None, None, None)
    assert (back.start_layer, back.start_step) == (None, None)


def test_npz_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not an explorer file"):
        load_explorer(tmp_path / "other.npz")
    page = Explorer((ExplorerLayer("s", "self", (2, 2), uniform(1, 1, 4, 4)),))
    arrays = dict(np.load(page.save_npz(tmp_path / "p.npz")))
    np.savez(tmp_path / "extra.npz", **arrays, **{"layer0.wieghts": np.zeros(2)})
    with pytest.raises(ValueError, match=r"unknown entries \['layer0.wieghts'\]"):
        load_explorer(tmp_path / "extra.npz")
    del arrays["layer0.grid"]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(ValueError, match=r"lacks \['layer0.grid'\]"):
        load_explorer(tmp_path / "short.npz")
