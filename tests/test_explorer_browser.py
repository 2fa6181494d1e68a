"""The explorer's page in a real browser: Debian's headless Chromium, driven by selenium through chromedriver.

Each test loads a page, waits for the page's own signal that it has drawn (``window.explorerReady``,
set after the first drawing), acts on it as a person would (a click on a pixel, on a word, a menu, the
step slider), reads back what the page shows — the values it keeps in the map canvas's
``data-values`` and the canvas's pixels — and compares them with the library's weights.
The console must stay free of errors.

Skipped, with the reason, where ``chromium``, ``chromedriver`` or selenium is missing
(``.ci/run`` installs Chromium; selenium is in the ``test`` extra). Selenium is given the
driver's path, so Selenium Manager never runs, and nothing is downloaded.

Screenshots go to pytest's temporary directory, ``<basetemp>/explorer-screenshots0/``
(by default ``/tmp/pytest-of-<user>/pytest-<n>/``; pytest keeps the last three runs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest

from attention_ref import (
    cross_attention_forward,
    init_cross_attention,
    init_self_attention,
    self_attention_forward,
)
from attention_ref.viz import Explorer, ExplorerLayer, explore
from attention_ref.viz.explorer import colour_table

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# Without the background-networking flags Chromium keeps trying to reach its services.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1000",
]


def _why_no_browser() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "no browser driver: selenium is not installed (it is in the 'test' extra)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None)
        return f"no browser: {missing} not on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does)"
    return None


WHY_NO_BROWSER = _why_no_browser()
pytestmark = pytest.mark.skipif(WHY_NO_BROWSER is not None, reason=str(WHY_NO_BROWSER))

H, W, C = 4, 6, 8
TOKENS = ["<sot>", "a", "red", "cat", "<eot>"]
TABLE = colour_table().astype(int)
READY_SECONDS = 60  # a loaded machine can take a while to decode and draw a page of several MB


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return tmp_path_factory.mktemp("explorer-screenshots")


class Page:
    """One explorer page open in the browser, with what a test does to it and reads from it."""

    def __init__(self, driver, explorer: Explorer | None = None, path=None):
        """Open ``explorer``'s page, saved at ``path`` (without them: the page the browser shows now), and wait
        until it has drawn: the page sets ``window.explorerReady`` (and ``data-ready`` on ``<html>``) then."""
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        if explorer is not None:
            driver.get(explorer.save(path).as_uri())
        WebDriverWait(driver, READY_SECONDS).until(lambda d: d.execute_script("return window.explorerReady === true"))
        assert driver.find_element("tag name", "html").get_attribute("data-ready") == "true"

    def element(self, id_: str):
        return self.driver.find_element("id", id_)

    def errors(self) -> list[dict]:
        """The console's errors since the last call (an uncaught exception is one)."""
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def shown(self) -> dict:
        """What the map on show is: its values, the ends of its colour scale, its grid, query pixel and word."""
        data = self.element("map").get_attribute
        return {
            "values": np.array(json.loads(data("data-values"))),
            "range": json.loads(data("data-range")),
            "grid": tuple(json.loads(data("data-grid"))),
            "pixel": tuple(json.loads(data("data-pixel"))),
            "word": data("data-word"),
            "layer": int(data("data-layer")),
            "step": int(data("data-step")),
            "scale": data("data-scale"),
        }

    def point(
        self,
        canvas: str,
        pixel: tuple[int, int],
        grid: tuple[int, int],
        *,
        click: bool,
        at: tuple[float, float] = (0.5, 0.5),
    ) -> None:
        """Move the pointer onto ``pixel`` of a ``grid`` drawn on a canvas, and click there if asked.

        ``at``: where inside the pixel, as fractions of its height and width (the centre by default).
        """
        from selenium.webdriver.common.action_chains import ActionChains

        el = self.element(canvas)
        size = el.size
        # offsets from the element's centre
        dx = (pixel[1] + at[1]) / grid[1] * size["width"] - size["width"] / 2
        dy = (pixel[0] + at[0]) / grid[0] * size["height"] - size["height"] / 2
        actions = ActionChains(self.driver).move_to_element_with_offset(el, round(dx), round(dy))
        (actions.click() if click else actions).perform()

    def choose(self, select: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.element(select)).select_by_value(value)

    def slide(self, range_input: str, value: float) -> None:
        self.driver.execute_script(
            "const r = document.getElementById(arguments[0]); r.value = arguments[1];"
            "r.dispatchEvent(new Event('input'));",
            range_input,
            str(value),
        )

    def cell_colours(self, canvas: str = "map", grid: tuple[int, int] | None = None) -> np.ndarray:
        """``(H, W, 3)``: a canvas's colour at the centre of every cell of an ``H×W`` grid (default: the map's)."""
        grid = self.shown()["grid"] if grid is None else grid
        colours = self.driver.execute_script(
            """const c = document.getElementById(arguments[0]), ctx = c.getContext("2d");
            const [H, W] = arguments[1], out = [];
            for (let r = 0; r < H; r++) for (let k = 0; k < W; k++) {
              const x = Math.floor((k + 0.5) * c.width / W), y = Math.floor((r + 0.5) * c.height / H);
              out.push(Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
            }
            return out;""",
            canvas,
            list(grid),
        )
        return np.array(colours).reshape(*grid, 3)


def assert_colours(page: Page, expected: np.ndarray, lo: float, hi: float) -> None:
    """The map canvas shows ``expected`` (H, W) through the colour table between ``lo`` and ``hi``.

    Entry ``min(⌊256 t⌋, 255)`` for ``t = (v − lo)/(hi − lo)``; the entry below is accepted too
    where ``256 t`` lies within float32 rounding above an integer (the page holds float32 weights).
    """
    scaled = 256 * np.clip((expected - lo) / (hi - lo), 0.0, 1.0)
    index = np.minimum(np.floor(scaled), 255).astype(int)
    near = (scaled - np.floor(scaled) < 1e-4) & (index > 0)
    shown = page.cell_colours()
    for (r, c), i in np.ndenumerate(index):
        candidates = TABLE[[i, i - 1]] if near[r, c] else TABLE[[i]]
        assert (candidates == shown[r, c]).all(axis=1).any(), f"cell {(r, c)}: {shown[r, c]} is not entry {i}"


@pytest.fixture
def self_cache():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, H, W, C)) * 2
    _, cache = self_attention_forward(x, init_self_attention(C, heads=2, groups=4, rng=0), heads=2, groups=4)
    return cache


@pytest.fixture
def cross_cache():
    rng = np.random.default_rng(8)
    x, context = rng.standard_normal((2, H, W, C)) * 2, rng.standard_normal((2, len(TOKENS), 7)) * 2
    _, cache = cross_attention_forward(
        x, context, init_cross_attention(C, 7, heads=2, groups=4, rng=1), heads=2, groups=4
    )
    return cache


IMAGE = np.random.default_rng(0).uniform(size=(40, 60, 3))  # the maps' 4×6 shape, 10 times larger


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
    from selenium.webdriver.support.ui import WebDriverWait

    page = Page(driver, _flat_and_sharp(np.random.default_rng(3)), tmp_path / "p.html")
    driver.execute_script("window.localStorage.clear()")
    for visit, opened in ((1, True), (2, False), (3, False)):
        driver.refresh()
        WebDriverWait(driver, READY_SECONDS).until(lambda d: d.execute_script("return window.explorerReady === true"))
        assert (page.element("help").get_attribute("open") is not None) is opened, f"visit {visit}"
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
