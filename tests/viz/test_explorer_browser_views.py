"""The explorer's page in a real browser, continued: the first view and its colour scale, the help that opens
on a first visit, and the pages of the toys (screenshots). How the browser is driven: test_explorer_browser.py
and browser_helpers.py.

Screenshots go to pytest's temporary directory, ``<basetemp>/explorer-screenshots0/``
(by default ``/tmp/pytest-of-<user>/pytest-<n>/``; pytest keeps the last three runs).
"""

from __future__ import annotations

import numpy as np
import pytest
from browser_helpers import (
    IMAGE,
    READY_SECONDS,
    TABLE,
    TOKENS,
    WHY_NO_BROWSER,
    H,
    Page,
    W,
    assert_colours,
)

from attention_ref.viz import Explorer, ExplorerLayer

pytestmark = pytest.mark.skipif(WHY_NO_BROWSER is not None, reason=str(WHY_NO_BROWSER))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return tmp_path_factory.mktemp("explorer-screenshots")


def _flat_and_sharp(rng) -> Explorer:
    """A self layer, then a near-uniform cross layer (as at initialisation), then a sharp one; 2 steps, 2 heads."""
    M = len(TOKENS)
    flat = np.full((2, 2, H * W, M), 1.0 / M) + rng.uniform(-0.02, 0.02, (2, 2, H * W, M))
    flat /= flat.sum(-1, keepdims=True)  # every weight within about 0.03 of 1/5
    sharp = rng.dirichlet(np.full(M, 0.2), size=(2, 2, H * W))  # most of a pixel's weight on one token
    sharp[:, :, :3] = [0.01, 0.96, 0.01, 0.01, 0.01]  # three pixels that read "a" (token 1) in every head
    return Explorer(
        (
            ExplorerLayer("self", "self", (H, W), rng.dirichlet(np.ones(H * W), size=(2, 1, H * W))),
            ExplorerLayer("at initialisation", "cross", (H, W), flat),
            ExplorerLayer("trained", "cross", (H, W), sharp),
        ),
        image=IMAGE,
        tokens=TOKENS,
        steps=["t = 999", "t = 0"],
    )


def test_the_first_view_is_a_cross_attention_map_on_a_scale_that_keeps_a_flat_map_flat(driver, tmp_path):
    explorer = _flat_and_sharp(np.random.default_rng(11))
    flat, sharp = (L.weights.astype(np.float64) for L in explorer.layers[1:])
    page = Page(driver, explorer, tmp_path / "p.html")
    shown = page.shown()
    # the first cross-attention layer, the last step, "a" (the first word that is not <sot>), the shared scale
    assert (shown["layer"], shown["step"], shown["word"], shown["scale"]) == (1, 1, "1", "shared")
    assert page.element("scale").get_attribute("value") == "shared"
    np.testing.assert_allclose(shown["values"], flat[1, :, :, 1].mean(axis=0), rtol=1e-6)
    # the top of the scale: the word's largest weight at any step in any cross layer (mean of the heads)
    top = max(w[:, :, :, 1].mean(axis=1).max() for w in (flat, sharp))
    assert shown["range"] == pytest.approx([0.0, top], rel=1e-6)
    assert_colours(page, flat[1, :, :, 1].mean(axis=0).reshape(H, W), 0.0, top)

    # the flat map looks flat and dark: its cells span a few entries of the colour table, all in its lower part
    def entries() -> np.ndarray:
        return np.array([np.flatnonzero((TABLE == c).all(axis=1))[0] for c in page.cell_colours().reshape(-1, 3)])

    flat_entries = entries()
    assert flat_entries.max() < 0.3 * 256 and np.ptp(flat_entries) < 0.1 * 256, flat_entries
    # uniform attention, 1/M, is marked on the colour bar where it lies on the scale
    label = page.element("scale-label")
    assert float(label.get_attribute("data-uniform")) == pytest.approx(1 / len(TOKENS))
    assert "uniform attention, 1/5 = 0.200" in label.text and "any of the 2 cross-attention layers" in label.text
    mark = page.element("uniform-mark")
    assert mark.is_displayed()
    assert float(mark.value_of_css_property("left").removesuffix("px")) == pytest.approx(256 * 0.2 / top, abs=1)
    # what the old default, "0 to this map's max", did: the same flat map glows in the top of the colour table
    page.choose("scale", "max")
    assert page.shown()["range"] == pytest.approx([0.0, flat[1, :, :, 1].mean(axis=0).max()], rel=1e-6)
    assert entries().min() > 0.8 * 256
    # one head: the scale is that head's, over the layers that have it
    page.choose("scale", "shared")
    page.choose("head", "1")
    top_head = max(w[:, 1, :, 1].max() for w in (flat, sharp))
    assert page.shown()["range"] == pytest.approx([0.0, top_head], rel=1e-6)
    # self-attention: the query pixel's rows at every step
    page.choose("head", "-1")
    page.choose("layer", "0")
    rows = explorer.layers[0].weights.astype(np.float64)[:, 0, 2 * W + 3]  # (steps, N): the centre's rows
    assert page.shown()["range"] == pytest.approx([0.0, rows.max()], rel=1e-6)
    assert page.errors() == []


def test_how_to_read_this_page_opens_on_the_first_visit_only(driver, tmp_path):
    """Without the page's note in localStorage, "How to read this page" opens and the note is left; with it, the
    section stays closed. Each visit's storage is set by a script that runs in the visit's own document before the
    page's: a write made by one page and read by the next, reloaded, page may be in different renderer processes,
    whose storage messages Chromium does not order (clearing, then reloading, failed 2 runs in 25 that way)."""
    from selenium.webdriver.support.ui import WebDriverWait

    seen = "attention_ref.explorer.help-seen"
    page = Page(driver, _flat_and_sharp(np.random.default_rng(3)), tmp_path / "p.html")
    for visit, note, opened in ((1, None, True), (2, "1", False), (3, "1", False)):
        before = f"localStorage.removeItem('{seen}')" if note is None else f"localStorage.setItem('{seen}', '{note}')"
        script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": before})["identifier"]
        try:
            driver.refresh()
            WebDriverWait(driver, READY_SECONDS).until(
                lambda d: d.execute_script("return window.explorerReady === true")
            )
        finally:
            driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})
        assert (page.element("help").get_attribute("open") is not None) is opened, f"visit {visit}"
        assert driver.execute_script(f"return window.localStorage.getItem('{seen}')") == "1", f"visit {visit}"
    assert page.errors() == []


def test_screenshots_of_the_toys_pages(driver, screenshots):
    from attention_ref.cli.explore import diffusion_explorer, grounding_explorer, long_range_explorer

    long_range = Page(driver, long_range_explorer(steps=60, progress_bar=False), screenshots / "long-range.html")
    assert long_range.errors() == []
    assert long_range.shown()["layer"] == 0  # self-attention only: the first layer, "trained"
    driver.save_screenshot(str(screenshots / "long-range.png"))

    explorer = grounding_explorer(steps=60, progress_bar=False)
    grounding = Page(driver, explorer, screenshots / "grounding.html")
    shown = grounding.shown()
    assert (shown["layer"], shown["word"], shown["scale"]) == (0, "1", "shared")  # "trained", the first word
    trained, initial = (L.weights[0].astype(np.float64).mean(axis=0)[:, 1] for L in explorer.layers)
    assert shown["range"] == pytest.approx([0.0, max(trained.max(), initial.max())], rel=1e-6)
    driver.save_screenshot(str(screenshots / "grounding.png"))
    grounding.choose("layer", "1")  # at initialisation: on the scale of the trained layer too
    assert grounding.shown()["range"] == pytest.approx(shown["range"], rel=1e-6)
    driver.save_screenshot(str(screenshots / "grounding-initial.png"))
    assert grounding.errors() == []

    explorer = diffusion_explorer()
    diffusion = Page(driver, explorer, screenshots / "diffusion.html")
    shown = diffusion.shown()
    layer = explorer.layers[shown["layer"]]
    assert layer.kind == "cross" and layer.name == "mid.attn.blocks.0.attn2"
    assert (shown["step"], explorer.tokens[int(shown["word"])], shown["scale"]) == (24, "red", "shared")
    assert diffusion.element("step-label").text == "step 25/25 (t = 0)"
    tops = [L.weights[:, :, :, 1].astype(np.float64).mean(axis=1).max() for L in explorer.layers if L.kind == "cross"]
    assert shown["range"] == pytest.approx([0.0, max(tops)], rel=1e-6)
    driver.save_screenshot(str(screenshots / "diffusion.png"))
    # the left panel: the x̂₀ of the step on show, at its 16×16 pixels
    for step in (24, 0):
        diffusion.slide("step", step)
        np.testing.assert_array_equal(diffusion.cell_colours("image", (16, 16)), explorer.step_images[step])
    driver.save_screenshot(str(screenshots / "diffusion-step-1.png"))
    driver.find_elements("css selector", ".word")[2].click()  # "circle"
    assert diffusion.shown()["word"] == "2"
    assert diffusion.errors() == []
    for name in ("long-range.png", "grounding.png", "grounding-initial.png", "diffusion.png", "diffusion-step-1.png"):
        png = (screenshots / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
