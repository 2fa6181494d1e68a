"""The README and the docs: every relative link leads to a file, and the README's learner example runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target up to a space, a closing parenthesis or a #fragment
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def relative_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold code, not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    links = relative_links(page)
    missing = [t for t in links if not (page.parent / t).exists()]
    assert missing == [], f"{page.name} links to missing files: {missing}"


def test_the_link_pattern_finds_links_and_leaves_urls():
    page = ROOT / "README.md"
    links = relative_links(page)
    assert "docs/oracle.md" in links and "figures/diffusion_denoising.png" in links
    assert not any(t.startswith("http") for t in links)


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    # every notebook and every figure of the gallery is on it
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.name}" in text, notebook.name
    for png in sorted((ROOT / "figures").glob("*.png")):
        assert f"figures/{png.name}" in text, png.name


def test_readme_learner_example_runs_as_written():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## For learners", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's own example, as a reader would run it
    assert scope["y"].shape == (2, 16, 24, 64) and scope["cache"].weights.shape == (2, 4, 384, 384)
    np.testing.assert_allclose(scope["cache"].weights.sum(axis=-1), 1.0, rtol=1e-12)
    assert set(scope["grads"]) == {"x", *scope["params"]}


def _peers_missing() -> list[str]:
    import importlib.util

    return [name for name in ("torch", "diffusers", "transformers") if importlib.util.find_spec(name) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_peers_missing()), reason=f"the README's researcher example needs {_peers_missing()}")
def test_readme_researcher_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## For researchers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "toy_pipeline" in code and "pipe = " in code and "prompt = " in code  # defines what it uses
    monkeypatch.chdir(tmp_path)  # it writes trace.html where it runs
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    maps, image = scope["maps"], scope["image"]
    assert maps.shape == (2, 2, image.size[1], image.size[0])  # (B, words, h, w): CFG's two halves, two words
    assert np.isfinite(maps).all() and (maps >= 0).all()
    assert (tmp_path / "trace.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_the_extras_the_readme_names_are_the_package_extras():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    extras = set(config["options.extras_require"])
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"'\.\[([a-z0-9-]+)\]'", text))
    assert named == extras, f"README names {sorted(named)}, setup.cfg has {sorted(extras)}"
    # the oracle extra asks for a range of torch: the pin is `make peers`' alone
    assert re.search(r"torch>=\d", config["options.extras_require"]["oracle"])
    assert "torch==" not in config["options.extras_require"]["oracle"]
    assert "torch==" in (ROOT / "Makefile").read_text(encoding="utf-8")


def test_docs_cli_lists_every_exit_status():
    from attention_ref.cli.common import EXIT_STATUSES

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for status, meaning in EXIT_STATUSES.items():
        assert f"| {status} | {meaning} |" in text, status
