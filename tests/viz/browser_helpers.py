"""What the explorer's browser tests share: Debian's headless Chromium driven by selenium (:func:`open_browser`),
an open page and what a test does to it and reads from it (:class:`Page`), the colour check
(:func:`assert_colours`), and the small blocks whose weights the pages show.

``WHY_NO_BROWSER`` says why those tests skip where ``chromium``, ``chromedriver`` or selenium is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np

from attention_ref import (
    cross_attention_forward,
    init_cross_attention,
    init_self_attention,
    self_attention_forward,
)
from attention_ref.viz import Explorer
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

H, W, C = 4, 6, 8
TOKENS = ["<sot>", "a", "red", "cat", "<eot>"]
TABLE = colour_table().astype(int)
READY_SECONDS = 60  # a loaded machine can take a while to decode and draw a page of several MB


def open_browser(tmp_path_factory: Any) -> Iterator[Any]:
    """Headless Chromium through chromedriver, with a profile of its own; quit when the generator is closed."""
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


def make_self_cache() -> Any:
    """A self-attention block's cache on two random 4×6 maps of 8 channels, 2 heads."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, H, W, C)) * 2
    _, cache = self_attention_forward(x, init_self_attention(C, heads=2, groups=4, rng=0), heads=2, groups=4)
    return cache


def make_cross_cache() -> Any:
    """A cross-attention block's cache: two random 4×6 maps read the 5 :data:`TOKENS`, 2 heads."""
    rng = np.random.default_rng(8)
    x, context = rng.standard_normal((2, H, W, C)) * 2, rng.standard_normal((2, len(TOKENS), 7)) * 2
    _, cache = cross_attention_forward(
        x, context, init_cross_attention(C, 7, heads=2, groups=4, rng=1), heads=2, groups=4
    )
    return cache


IMAGE = np.random.default_rng(0).uniform(size=(40, 60, 3))  # the maps' 4×6 shape, 10 times larger
