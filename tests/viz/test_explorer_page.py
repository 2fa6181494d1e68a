"""The explorer's page (one file, its data, its text escaped) and the explore command, without a browser.

The data model and the .npz file: test_explorer.py; the page in a real browser: test_explorer_browser.py.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from explorer_helpers import TOKENS, H, W, decoded, page_json

from attention_ref.cli import main as cli_main
from attention_ref.viz import Explorer, ExplorerLayer, explore, load_explorer, sample_explorer
from attention_ref.viz import explorer as explorer_module


# ---------------------------------------------------------------- the page
def test_page_is_one_file_that_fetches_nothing(self_cache, cross_cache):
    page = explore({"s": self_cache, "c": cross_cache}, tokens=TOKENS, image=np.zeros((5, 5)))
    text = page.html()
    assert (
        "http:" not in text and "https:" not in text and "//" not in re.sub(r"//[^\n]*", "", text.split("<script>")[0])
    )
    assert not re.search(r"""\b(src|href)=["'](?!data:)""", text), "the page links to a file"
    assert "__DATA__" not in text and "__SCRIPT__" not in text and "__TITLE__" not in text


def test_page_data_decodes_to_the_weights(self_cache):
    rows = [(0.1, 0.2)]
    page = explore(
        {"full": self_cache, "rows": explore(self_cache, query_positions=rows).layers[0]},
        image=np.full((3, 4), 0.5),
    )
    data = page_json(page)
    assert data["format"] == explorer_module.FORMAT
    full, kept = data["layers"]
    assert (full["grid"], full["heads"], full["queries"], full["keys"], full["queryPixels"]) == (
        [H, W],
        2,
        H * W,
        H * W,
        None,
    )
    np.testing.assert_array_equal(
        decoded(full["weights"]).reshape(page.layers[0].weights.shape), page.layers[0].weights
    )
    assert kept["queryPixels"] == [[0, 1]] and kept["queries"] == 1
    assert data["image"]["height"] == 3 and data["image"]["width"] == 4
    np.testing.assert_array_equal(decoded(data["image"]["rgb"], "u1"), np.full(36, 128))
    np.testing.assert_array_equal(decoded(data["colours"], "u1").reshape(256, 3), explorer_module.colour_table())


def test_page_text_cannot_break_out_of_its_elements(cross_cache):
    tokens = ["</script><script>alert(1)</script>", "a", "b", "c", "d"]
    page = explore(cross_cache, tokens=tokens, title="<b>bold</b>", notes="x </p> y")
    text = page.html()
    assert text.count("</script>") == 2  # the data's and the script's own
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert page_json(page)["tokens"][0] == tokens[0]  # and the script reads the token back as it was
    # the per-step images' label and the first layer's name travel in the data too
    evil = "</script><img src=x onerror=alert(1)>"
    layer = ExplorerLayer(evil, "self", (1, 1), np.ones((2, 1, 1, 1)))
    page = Explorer((layer,), step_images=np.zeros((2, 2, 2)), step_images_label=evil, start_layer=evil)
    text = page.html()
    assert text.count("</script>") == 2 and "<img" not in text
    assert page_json(page)["stepImages"]["label"] == evil and page_json(page)["layers"][0]["name"] == evil


def test_colour_table_is_the_figures_colour_map():
    from matplotlib import colormaps

    table = explorer_module.colour_table()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    np.testing.assert_array_equal(table[[0, 255]], np.round(np.array(colormaps["magma"]([0.0, 1.0]))[:, :3] * 255))


def test_jupyter_shows_the_page_in_an_iframe(self_cache):
    page = explore(self_cache)
    shown = page._repr_html_()
    found = re.fullmatch(r'<iframe srcdoc="([^"]*)" style="[^"]*" title="attention explorer"></iframe>', shown)
    assert found and html.unescape(found.group(1)) == page.html()


# ---------------------------------------------------------------- the command
def test_explore_command_writes_the_page_and_its_data(tmp_path, capsys):
    out, npz = tmp_path / "lr.html", tmp_path / "lr.npz"
    assert cli_main(["explore", "--out", str(out), "--steps", "3", "--npz", str(npz)]) == 0
    assert "lr.html" in capsys.readouterr().out
    page = load_explorer(npz)
    assert [(L.name, L.kind, L.grid) for L in page.layers] == [
        ("trained", "self", (10, 10)),
        ("at initialisation", "self", (10, 10)),
    ]
    assert page.image.shape == (10, 10, 3)
    # the page written from the .npz is the same page
    again = tmp_path / "again.html"
    assert cli_main(["explore", "--source", str(npz), "--out", str(again)]) == 0
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


def test_explore_command_grounding_keeps_the_real_tokens(tmp_path):
    npz = tmp_path / "g.npz"
    assert (
        cli_main(
            ["explore", "--source", "grounding", "--steps", "2", "--out", str(tmp_path / "g.html"), "--npz", str(npz)]
        )
        == 0
    )
    page = load_explorer(npz)
    assert "<pad>" not in page.tokens and page.tokens[0] == "<sot>" and page.tokens[-1] == "<eot>"
    assert all(L.kind == "cross" and L.keys == len(page.tokens) for L in page.layers)
    # the real tokens take all of every pixel's weight: the padding had none
    np.testing.assert_allclose(page.layers[0].weights.sum(axis=-1), 1.0, rtol=1e-5)


def test_explore_command_diffusion_shows_every_layer_at_every_step(tmp_path, capsys):
    npz = tmp_path / "d.npz"
    assert cli_main(["explore", "--source", "diffusion", "--out", str(tmp_path / "d.html"), "--npz", str(npz)]) == 0
    page = load_explorer(npz)
    assert [(L.kind, L.grid) for L in page.layers] == [("self", (8, 8)), ("cross", (8, 8))] * 3 + [
        ("self", (16, 16)),
        ("cross", (16, 16)),
    ]
    assert page.tokens == ("<sot>", "red", "circle", "and", "blue", "triangle", "<eot>")
    assert len(page.steps) == 25 and page.steps[0] == "t = 999" and page.steps[-1] == "t = 0"
    for L in page.layers:
        np.testing.assert_allclose(L.weights.sum(axis=-1), 1.0, rtol=1e-5)  # the padding had no weight
    assert "IoU" in page.notes
    # the training steps of a toy do not apply to shipped weights
    assert cli_main(["explore", "--source", "diffusion", "--steps", "3", "--out", str(tmp_path / "x.html")]) == 2
    assert "loads its weights" in capsys.readouterr().err


def test_diffusion_trace_page_holds_the_trace():
    from attention_ref.toys.diffusion import sample

    # (2, 2) and (3, 3) fall in one cell of the 8×8 layers: that row is kept once there
    result = sample(
        ["green square", "red circle and blue triangle"], seed=1, steps=3, queries=[(2, 2), (3, 3), (9, 12)]
    )
    page = sample_explorer(result, 1)
    # the left panel's image at each step: the clean image x̂₀ that step predicts, from [−1, 1] to bytes
    np.testing.assert_array_equal(page.step_images, np.round(np.clip((result.x0_pred[1] + 1) / 2, 0, 1) * 255))
    assert page.step_images.shape == (3, 16, 16, 3) and "x̂₀" in page.step_images_label
    # it opens on the mid block's cross-attention, at the last step, on "red"
    view = page.start_view()
    assert page.layers[view["layer"]].name == "mid.attn.blocks.0.attn2" and page.layers[view["layer"]].kind == "cross"
    assert (view["step"], page.tokens[view["word"]], view["scale"]) == (2, "red", "shared")
    assert sample_explorer(result, 1, start_layer="up.0.attn.blocks.0.attn2").start_view()["layer"] == 7
    assert page.steps == tuple(f"t = {t}" for t in result.timesteps)
    assert page.tokens == tuple(result.tokens[1]) and np.array_equal(page.image, np.round(result.images[1] * 255))
    for layer, shown in zip(result.layers, page.layers, strict=True):
        assert (shown.name, shown.kind, shown.grid) == (layer.name, layer.kind, layer.grid)
        h, w = layer.grid
        if layer.kind == "cross":
            expected = layer.maps[1].reshape(3, layer.heads, h * w, -1)[..., : len(page.tokens)]
        else:
            cells = [0, 2] if h == 8 else [0, 1, 2]
            np.testing.assert_array_equal(shown.query_pixels, layer.queries[cells])
            expected = layer.maps[1].reshape(3, layer.heads, -1, h * w)[:, :, cells]
        np.testing.assert_allclose(shown.weights, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="outside the 2 prompts"):
        sample_explorer(result, 2)


def test_explore_command_refuses_unknown_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["explore", "--source", "diffusion-xl"])
    assert "is neither one of" in capsys.readouterr().err
    assert cli_main(["explore", "--source", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x.html")]) == 3
    assert "no such file" in capsys.readouterr().err
