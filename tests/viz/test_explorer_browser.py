"""The explorer's page in a real browser: Debian's headless Chromium, driven by selenium through chromedriver.

Each test loads a page, waits for the page's own signal that it has drawn (``window.explorerReady``,
set after the first drawing), acts on it as a person would (a click on a pixel, on a word, a menu, the
step slider), reads back what the page shows — the values it keeps in the map canvas's
``data-values`` and the canvas's pixels — and compares them with the library's weights.
The console must stay free of errors.

Skipped, with the reason, where ``chromium``, ``chromedriver`` or selenium is missing
(``.ci/run`` installs Chromium; selenium is in the ``test`` extra). Selenium is given the
driver's path, so Selenium Manager never runs, and nothing is downloaded (browser_helpers.py).

Here: clicks on pixels and words, menus, steps, the Jupyter view. The first view, the help and the toys'
pages (with screenshots): test_explorer_browser_views.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from browser_helpers import (
    IMAGE,
    TOKENS,
    WHY_NO_BROWSER,
    C,
    H,
    Page,
    W,
    assert_colours,
    make_cross_cache,
    make_self_cache,
)

from attention_ref import init_self_attention, self_attention_forward
from attention_ref.viz import Explorer, ExplorerLayer, explore

pytestmark = pytest.mark.skipif(WHY_NO_BROWSER is not None, reason=str(WHY_NO_BROWSER))


@pytest.fixture
def self_cache():
    return make_self_cache()


@pytest.fixture
def cross_cache():
    return make_cross_cache()


def test_page_loads_without_errors_and_fetches_nothing(driver, self_cache, cross_cache, tmp_path):
    page = Page(
        driver, explore({"self": self_cache, "cross": cross_cache}, image=IMAGE, tokens=TOKENS), tmp_path / "p.html"
    )
    assert page.errors() == []
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert driver.title == "Attention explorer"
    assert len(driver.find_elements("css selector", "#layer option")) == 2
    assert [b.text.split("\n")[0] for b in driver.find_elements("css selector", ".word")] == TOKENS
    # the first view: the cross-attention layer, on "a", the first word that is not a special token
    assert page.element("readout").text.startswith("Cross-attention of the word “a” (token 1)")
    page.choose("layer", "0")
    assert page.element("readout").text.startswith("Self-attention of query pixel (2, 3)")  # the centre


def test_a_clicked_pixel_shows_its_row_of_the_library_weights(driver, self_cache, tmp_path):
    page = Page(driver, explore(self_cache, image=IMAGE, batch=1), tmp_path / "p.html")
    weights = np.asarray(self_cache.weights)[1]  # (heads, N, N)
    page.point("image", (1, 4), (H, W), click=True)
    shown = page.shown()
    assert shown["pixel"] == (1, 4) and shown["grid"] == (H, W)
    np.testing.assert_allclose(shown["values"], weights[:, 1 * W + 4].mean(axis=0), rtol=1e-6, atol=1e-9)
    assert shown["range"] == pytest.approx([0.0, weights[:, 1 * W + 4].mean(axis=0).max()], rel=1e-6)

    # anywhere inside a pixel picks that pixel
    for at in ((0.1, 0.1), (0.9, 0.9), (0.1, 0.9)):
        page.point("image", (2, 3), (H, W), click=True, at=at)
        assert page.shown()["pixel"] == (2, 3), f"clicked at {at} inside pixel (2, 3)"
    page.point("image", (1, 4), (H, W), click=True)

    # pinned: moving the pointer over the image leaves the query where it was
    page.point("image", (3, 0), (H, W), click=False)
    assert page.shown()["pixel"] == (1, 4)

    page.choose("head", "1")
    row = weights[1, 1 * W + 4]
    np.testing.assert_allclose(page.shown()["values"], row, rtol=1e-6, atol=1e-9)
    page.slide("opacity", 1)  # the map alone, not blended with the image
    assert_colours(page, row.reshape(H, W), 0.0, row.max())

    page.choose("scale", "minmax")
    assert page.shown()["range"] == pytest.approx([row.min(), row.max()], rel=1e-6)
    assert_colours(page, row.reshape(H, W), row.min(), row.max())
    ticks = [float(t.text) for t in driver.find_elements("css selector", "#ticks span")]
    assert ticks == pytest.approx(np.linspace(row.min(), row.max(), 5), rel=5e-3)

    # the value under the pointer, as the page prints it (3 significant digits)
    page.point("map", (2, 5), (H, W), click=False)
    text = page.element("hover").text
    assert text.startswith("Under the pointer: pixel (2, 5), weight ")
    assert float(text.rsplit(" ", 1)[1].rstrip(".")) == pytest.approx(row[2 * W + 5], rel=5e-3)

    # clicking the pinned pixel again lets the query follow the pointer
    page.point("image", (1, 4), (H, W), click=True)
    page.point("image", (3, 0), (H, W), click=False)
    assert page.shown()["pixel"] == (3, 0)
    assert page.errors() == []


def test_a_clicked_word_shows_its_column_of_the_library_weights(driver, self_cache, cross_cache, tmp_path):
    explorer = explore({"self": self_cache, "cross": cross_cache}, image=IMAGE, tokens=TOKENS)
    page = Page(driver, explorer, tmp_path / "p.html")
    weights = np.asarray(cross_cache.weights)[0].mean(axis=0)  # (N, M), the mean of the heads
    page.choose("layer", "0")  # the self-attention layer
    page.point("image", (3, 1), (H, W), click=True)
    words = driver.find_elements("css selector", ".word")
    words[2].click()  # "red": from the self-attention layer to the cross-attention layer at the same grid
    shown = page.shown()
    assert page.element("layer").get_attribute("value") == "1" and shown["word"] == "2"
    np.testing.assert_allclose(shown["values"], weights[:, 2], rtol=1e-6, atol=1e-9)
    assert page.element("readout").text.startswith("Cross-attention of the word “red” (token 2)")

    # under the words: the query pixel's weights over the tokens, which sum to 1
    under = [float(w.find_element("tag name", "small").text) for w in words]
    assert under == pytest.approx(weights[3 * W + 1], rel=5e-3)
    assert math.isclose(sum(under), 1.0, rel_tol=1e-2)

    page.slide("opacity", 1)
    assert_colours(page, weights[:, 2].reshape(H, W), 0.0, weights[:, 2].max())
    page.choose("scale", "words")  # 0 to the largest weight of any word, so that words compare
    assert page.shown()["range"] == pytest.approx([0.0, weights.max()], rel=1e-6)
    assert_colours(page, weights[:, 2].reshape(H, W), 0.0, weights.max())
    page.choose("scale", "unit")
    assert_colours(page, weights[:, 2].reshape(H, W), 0.0, 1.0)

    # back on the self-attention layer, the "words" scale is not offered
    page.choose("layer", "0")
    assert page.element("scale").find_element("css selector", 'option[value="words"]').get_attribute("disabled")
    assert page.errors() == []


def test_a_layer_of_some_query_rows_offers_only_those_pixels(driver, tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 8, 8, C))
    _, cache = self_attention_forward(x, init_self_attention(C, heads=2, groups=4, rng=0), heads=2, groups=4)
    weights = np.asarray(cache.weights)[0].mean(axis=0)  # (64, 64)
    explorer = explore(cache, query_positions=[(0.1, 0.1), (0.8, 0.7)])  # pixels (0, 0) and (6, 5)
    page = Page(driver, explorer, tmp_path / "p.html")
    for clicked, nearest in (((7, 7), (6, 5)), ((2, 1), (0, 0)), ((5, 4), (6, 5))):
        page.point("image", clicked, (8, 8), click=True)
        shown = page.shown()
        assert shown["pixel"] == nearest, f"clicked {clicked}"
        np.testing.assert_allclose(shown["values"], weights[nearest[0] * 8 + nearest[1]], rtol=1e-6, atol=1e-9)
    assert "keeps the rows of 2 query pixels" in page.element("readout").text
    assert page.errors() == []


def test_steps_heads_and_layers_at_different_grids(driver, tmp_path):
    rng = np.random.default_rng(5)
    self_w = rng.dirichlet(np.ones(16), size=(3, 2, 16))  # (steps, heads, 4·4, 4·4)
    cross_w = rng.dirichlet(np.ones(3), size=(3, 1, 4))  # (steps, mean of heads, 2·2, 3 tokens)
    explorer = Explorer(
        (
            ExplorerLayer("down.attn1", "self", (4, 4), self_w),
            ExplorerLayer("mid.attn2", "cross", (2, 2), cross_w, head_mean=True),
        ),
        image=np.zeros((50, 50)),
        tokens=["<sot>", "dog", "<eot>"],
        steps=["t=900", "t=500", "t=100"],
        start_query=(0.9, 0.1),
    )
    page = Page(driver, explorer, tmp_path / "p.html")
    # it opens on the cross-attention layer at the last step, on "dog"
    shown = page.shown()
    assert (shown["layer"], shown["step"], shown["word"], shown["pixel"]) == (1, 2, "1", (1, 0))
    assert page.element("step-label").text == "step 3/3 (t=100)"
    page.choose("layer", "0")
    page.slide("step", 0)
    assert page.element("step-label").text == "step 1/3 (t=900)"
    assert page.shown()["pixel"] == (3, 0)
    np.testing.assert_allclose(page.shown()["values"], self_w[0, :, 12].mean(axis=0), rtol=1e-6)
    page.slide("step", 2)
    assert page.element("step-label").text == "step 3/3 (t=100)"
    np.testing.assert_allclose(page.shown()["values"], self_w[2, :, 12].mean(axis=0), rtol=1e-6)
    page.choose("head", "0")
    np.testing.assert_allclose(page.shown()["values"], self_w[2, 0, 12], rtol=1e-6)

    page.choose("layer", "1")  # the same place, at the coarser grid; a layer of head means offers only the mean
    assert [o.text for o in page.element("head").find_elements("tag name", "option")] == ["mean of heads (as stored)"]
    shown = page.shown()
    assert shown["grid"] == (2, 2) and shown["pixel"] == (1, 0) and shown["word"] == "1"  # "dog", the first word
    np.testing.assert_allclose(shown["values"], cross_w[2, 0, :, 1], rtol=1e-6)
    assert page.errors() == []


def test_the_jupyter_view_is_the_same_working_page(driver, self_cache, tmp_path):
    explorer = explore(self_cache, image=IMAGE)
    notebook_output = tmp_path / "cell.html"
    notebook_output.write_text(f"<!DOCTYPE html><html><body>{explorer._repr_html_()}</body></html>", encoding="utf-8")
    driver.get(notebook_output.as_uri())
    driver.switch_to.frame(driver.find_element("tag name", "iframe"))
    try:
        page = Page(driver)
        page.point("image", (0, 5), (H, W), click=True)
        np.testing.assert_allclose(
            page.shown()["values"], np.asarray(self_cache.weights)[0, :, 5].mean(axis=0), rtol=1e-6, atol=1e-9
        )
        assert page.errors() == []
    finally:
        driver.switch_to.default_content()
