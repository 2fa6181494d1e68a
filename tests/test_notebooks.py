"""The committed notebooks as a reader meets them: markdown without control characters, formulas that
typeset, saved outputs without progress-bar noise, and a picture beside every live widget.

Why a checker of our own for the formulas. Jupyter and GitHub typeset ``$…$`` with MathJax, which is
JavaScript; the Python candidates fail both ways. matplotlib's mathtext knows a subset of TeX: it refuses
valid formulas these notebooks use (``\\tfrac``, ``\\textstyle``, ``\\big(``, ``\\frac rn``), and it accepts
the garbled ones this test exists for — in ``W^<TAB>op`` (a JSON file written from a Python string that
turned ``\\t`` of ``\\top`` into a tab) the tab is whitespace to it and ``op`` two letters. So
:func:`tex_math_errors` reads TeX math the way TeX does, on a small scale: it splits a formula into tokens
(``\\name``, ``\\`` + one symbol, a character), and checks that every command is one MathJax knows
(:data:`KNOWN`: extend it when a notebook uses another), that a command gets its arguments (``\\frac`` two,
``\\hat`` one, …), that a sizing command (``\\big``, ``\\left``) is followed by a delimiter and ``\\left``
meets its ``\\right``, that braces balance, that ``^`` and ``_`` have an argument and are not doubled,
and that no control character is there at all. It rejects every garbled formula found in notebook 02 and
accepts every formula the notebooks hold, MathJax's short forms (``\\frac1n``, ``\\mathbb R``) included.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# C0 controls but the newline, DEL, C1 controls: none belongs in a notebook's prose
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")

_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi varpi rho "
    "varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi "
    "Psi Omega"
)
_SYMBOLS = (
    "sum prod int oint partial nabla infty ell hbar forall exists neg emptyset top bot perp prime circ bullet "
    "cdot cdots ldots dots vdots ddots times div pm mp odot otimes oplus ominus ast star setminus cup cap wedge vee "
    "in notin ni subset subseteq supset supseteq le leq ge geq ne neq approx sim simeq equiv propto ll gg mid "
    "parallel to gets rightarrow leftarrow Rightarrow Leftarrow leftrightarrow Leftrightarrow mapsto implies iff "
    "uparrow downarrow langle rangle lvert rvert lVert rVert vert Vert lfloor rfloor lceil rceil "
    "log ln exp sin cos tan tanh max min arg sup inf lim det dim ker Pr "
    "quad qquad displaystyle textstyle scriptstyle scriptscriptstyle limits nolimits"
)
# name -> how many arguments it takes
ARITY = {
    **{name: 0 for name in (_GREEK + " " + _SYMBOLS).split()},
    **dict.fromkeys("frac tfrac dfrac binom".split(), 2),
    **dict.fromkeys(
        "sqrt text textrm textbf textit mathrm mathbf mathit mathbb mathcal mathsf mathtt boldsymbol operatorname "
        "hat widehat bar overline underline tilde widetilde vec dot ddot check breve".split(),
        1,
    ),
}
SIZERS = frozenset("big Big bigg Bigg bigl bigr Bigl Bigr biggl biggr Biggl Biggr left right middle".split())
KNOWN = frozenset(ARITY) | SIZERS
# what may follow a sizing command: a delimiter character or a delimiter command
DELIMITERS = frozenset("()[]|./") | {
    "\\" + name for name in "{ } | langle rangle lvert rvert lVert rVert vert Vert lfloor rfloor lceil rceil".split()
}
# the braced argument of these is text, not math: its content is not parsed as math
TEXT_ARGUMENT = frozenset("text textrm textbf textit operatorname".split())

_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|\\$|\s+|.", re.S)


def tex_math_errors(formula: str) -> list[str]:
    """What is wrong with the TeX math ``formula`` (the text between the dollars): [] when it typesets."""
    if bad := CONTROL.findall(formula):
        return [f"control characters {sorted(set(bad))!r} (a backslash escape eaten on the way?)"]
    tokens = [t for t in _TOKEN.findall(formula) if not t.isspace()]
    errors: list[str] = []
    pos = 0

    def argument(what: str) -> None:
        """One argument: a {group} or a single token (TeX's rule: \\frac1n is \\frac{1}{n})."""
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] in ("}", "^", "_", "&"):
            errors.append(f"{what} has no argument")
            return
        if tokens[pos] == "{":
            group(what)
        else:
            atom()

    def group(what: str, text: bool = False) -> None:
        """A {…} group starting at tokens[pos]; ``text``: its content is text, only braces must balance."""
        nonlocal pos
        pos += 1  # the {
        if text:
            depth = 1
            while pos < len(tokens) and depth:
                depth += {"{": 1, "}": -1}.get(tokens[pos], 0)
                pos += 1
            if depth:
                errors.append(f"unclosed {{ after {what}")
            return
        sequence(closing="}")
        if pos >= len(tokens):
            errors.append(f"unclosed {{ after {what}")
        else:
            pos += 1  # the }

    def atom() -> None:
        """One token with what it takes: a command's arguments, a sizing command's delimiter, a {group}."""
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "{":
            pos -= 1
            group("{")
        elif t == "\\":
            errors.append("a lone backslash at the end")
        elif t.startswith("\\") and t[1:].isalpha():
            name = t[1:]
            if name not in KNOWN:
                errors.append(f"unknown command {t}")
            elif name in SIZERS:
                if pos >= len(tokens) or tokens[pos] not in DELIMITERS:
                    errors.append(f"{t} is not followed by a delimiter")
                else:
                    pos += 1
            else:
                if name == "sqrt" and pos < len(tokens) and tokens[pos] == "[":  # \sqrt[n]{x}
                    while pos < len(tokens) and tokens[pos] != "]":
                        pos += 1
                    pos += 1
                for _ in range(ARITY[name]):
                    if name in TEXT_ARGUMENT and pos < len(tokens) and tokens[pos] == "{":
                        group(t, text=True)
                    else:
                        argument(t)
        elif t in ("&", "#"):
            errors.append(f"{t} outside an environment")

    def sequence(closing: str | None) -> None:
        """Atoms with their scripts up to ``closing`` (or the end); \\left…\\right pairs inside."""
        nonlocal pos
        scripts: set[str] = set()
        lefts = 0
        while pos < len(tokens) and tokens[pos] != closing:
            t = tokens[pos]
            if t == "}":
                errors.append("a } without its {")
                pos += 1
                continue
            if t in ("^", "_"):
                if t in scripts:
                    errors.append(f"double {'superscript' if t == '^' else 'subscript'}")
                scripts.add(t)
                pos += 1
                argument(t)
                continue
            lefts += {"\\left": 1, "\\right": -1}.get(t, 0)
            if lefts < 0:
                errors.append("\\right without \\left")
                lefts = 0
            scripts = set()
            atom()
        if lefts:
            errors.append("\\left without \\right")

    sequence(closing=None)
    return errors


def markdown_math(text: str) -> list[str]:
    """The ``$$…$$`` and ``$…$`` formulas of a markdown text, outside code; a lone ``$`` comes back whole."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # fenced code
    text = re.sub(r"`[^`]*`", "", text)  # inline code
    text = text.replace("\\$", "")  # an escaped dollar is a dollar sign
    found = []
    for m in re.finditer(r"\$\$(.+?)\$\$|\$([^$]+?)\$|\$", text, re.S):
        found.append(m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None else "$")
    return found


def markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def code_outputs(path: Path) -> list[tuple[int, list[dict]]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, c.get("outputs", [])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_control_character_in_the_markdown(notebook):
    found = [
        (i, repr(text[max(0, m.start() - 12) : m.end() + 12]))
        for i, text in markdown_cells(notebook)
        for m in CONTROL.finditer(text)
    ]
    assert found == [], f"{notebook.name}: control characters in markdown cells (cell, context): {found}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_formula_typesets(notebook):
    bad = []
    for i, text in markdown_cells(notebook):
        for formula in markdown_math(text):
            errors = ["a $ without its pair"] if formula == "$" else tex_math_errors(formula)
            if errors:
                bad.append((i, formula[:60], errors))
    assert bad == [], f"{notebook.name}: formulas that would not typeset (cell, formula, why): {bad}"


# the three formulas of notebook 02 as they were garbled (a JSON file written from a Python string)
GARBLED = [
    "dX = dY\\, W^\top, \\qquad dW = \\sum_{\text{tokens } n} X_n^\top\\, dY_n",
    "y_i = \\gamma_c \\hat x_i + \x08eta_c .",
    "\x0crac{\\partial \\hat x_i}{\\partial x_j} = r\\,\\delta_{ij} - \x0crac rn",
    "O = \\text{merge}\x08ig(\\text{attention}(Q)\x08ig)",
]
BROKEN = {
    "\\fracc{1}{n}": "unknown command",
    "\\frac{1}": "no argument",
    "x^": "no argument",
    "x^{2": "unclosed",
    "x^2}": "without its {",
    "x^a^b": "double superscript",
    "\\big a": "not followed by a delimiter",
    "\\left( x": "\\left without \\right",
    "x \\right)": "\\right without \\left",
    "a & b": "outside an environment",
    "x\\": "lone backslash",
}
VALID = [
    "\\mu = \\tfrac1n \\textstyle\\sum_i x_i",
    "\\frac rn + \\frac{r^3 (x_i-\\mu)}{n}",
    "r\\Big(\\delta_{ij} - \\frac1n\\Big) + \\big(a\\big) + \\left\\{ x \\right.",
    "S = \\frac{Q K^\\top}{\\sqrt d} \\in \\mathbb R^{N\\times N}",
    "\\text{tokens } n \\text{(a {braced} text)} + x_i^2 + x^{a}_{b} + \\sqrt[3]{x} + \\overline{g\\,\\hat x}",
]


@pytest.mark.parametrize("formula", GARBLED)
def test_the_formula_check_rejects_the_garbled_formulas(formula):
    assert any("control characters" in e for e in tex_math_errors(formula))


@pytest.mark.parametrize("formula", list(BROKEN))
def test_the_formula_check_names_what_is_broken(formula):
    errors = tex_math_errors(formula)
    assert any(BROKEN[formula] in e for e in errors), errors


@pytest.mark.parametrize("formula", VALID)
def test_the_formula_check_accepts_valid_tex(formula):
    assert tex_math_errors(formula) == []


def test_formulas_are_found_outside_code_and_lone_dollars_are_reported():
    text = "a `$x$` b\n```\n$y$\n```\n$$z^2$$ and $w$ cost \\$5; then $ alone"
    assert markdown_math(text) == ["z^2", "w", "$"]


# ---------------------------------------------------------------- saved outputs

BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # tqdm's "43%|████▎     | 257/600 ["


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_saved_output_is_a_stderr_block(notebook):
    """Progress bars and logs are saved as plain output: a red stderr block reads as an error."""
    found = [
        (i, "".join(o["text"])[:80])
        for i, outputs in code_outputs(notebook)
        for o in outputs
        if o["output_type"] == "stream" and o["name"] == "stderr"
    ]
    assert found == [], f"{notebook.name}: stderr saved in cells {found}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_saved_widget_has_a_picture_beside_it(notebook):
    """A widget needs a live kernel: saved, it shows only ``VBox(children=…``. The next code cell draws it."""
    cells = code_outputs(notebook)
    for n, (i, outputs) in enumerate(cells):
        if any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs):
            following = cells[n + 1][1] if n + 1 < len(cells) else []
            assert any("image/png" in o.get("data", {}) for o in following), (
                f"{notebook.name}: the widget of cell {i} has no static picture in the next code cell"
            )


def test_a_progress_bar_in_a_kernel_is_one_plain_output_redrawn_in_place(tmp_path):
    """Run in a real kernel, a toy's bar is one display output (its last state), no stderr stream."""
    nbformat = pytest.importorskip("nbformat")  # nbmake's dependencies: in the test extra
    pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import time\n"
            "from attention_ref.toys._progress import progress\n"
            "for _ in progress(range(4), total=4, desc='toy', enabled=None):\n"
            "    time.sleep(0.3)\n"
            "print('done')"
        )
    )
    path = tmp_path / "bar.ipynb"
    nbformat.write(nb, path)
    # in a process of its own (starting a kernel imports ipykernel, which would make this process look like
    # one), from the checkout, so that the kernel imports this attention_ref
    run = (
        "import sys, nbformat, nbclient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbclient.NotebookClient(nb, timeout=120, kernel_name='python3', resources={'metadata': {'path': sys.argv[2]}})"
        ".execute()\n"
        "nbformat.write(nb, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", run, str(path), str(ROOT)], check=True, capture_output=True, timeout=300)
    nb = nbformat.read(path, as_version=4)
    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ["display_data", "stream"], outputs
    assert BAR.search(outputs[0].data["text/plain"]) and "100%" in outputs[0].data["text/plain"]
    assert outputs[0].data["text/plain"].startswith("toy: ")
    assert outputs[1].name == "stdout" and outputs[1].text == "done\n"


# ---------------------------------------------------------------- notebooks/conftest.py: peers


def _notebooks_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebooks_conftest", ROOT / "notebooks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook(tmp_path: Path, name: str, *sources: str) -> Path:
    cells = [{"cell_type": "code", "source": s, "metadata": {}, "outputs": []} for s in sources]
    path = tmp_path / name
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_the_notebooks_that_need_the_peers_are_found_from_their_imports(tmp_path):
    conftest = _notebooks_conftest()
    needing = {p.name for p in NOTEBOOKS if conftest.peers_needed(p)}
    assert needing == {"07_diffusers_trace.ipynb", "09_joint_attention.ipynb"}
    assert conftest.peers_needed(_notebook(tmp_path, "a.ipynb", "%matplotlib inline\nimport torch.nn as nn")) == {
        "torch",
        "diffusers",
        "transformers",
    }
    optional = "try:\n    import torch\nexcept ImportError:\n    torch = None"
    assert conftest.peers_needed(_notebook(tmp_path, "b.ipynb", optional, "import numpy")) == set()


def test_a_notebook_whose_peers_are_missing_is_skipped_saying_which(tmp_path, monkeypatch):
    conftest = _notebooks_conftest()
    real_find_spec = conftest.importlib.util.find_spec
    monkeypatch.setattr(
        conftest.importlib.util, "find_spec", lambda name: None if name == "diffusers" else real_find_spec(name)
    )

    class Item:
        def __init__(self, path: Path) -> None:
            self.path, self.markers = path, []

        def add_marker(self, marker) -> None:
            self.markers.append(marker)

    needs = Item(_notebook(tmp_path, "needs.ipynb", "from diffusers import UNet2DModel"))
    plain = Item(_notebook(tmp_path, "plain.ipynb", "import numpy"))
    conftest.pytest_collection_modifyitems(None, [needs, plain])
    assert plain.markers == []
    (skip,) = needs.markers
    assert skip.name == "skip"
    assert re.match(r"needs (\w+, )*diffusers(, \w+)*: not installed here", skip.kwargs["reason"])
    assert "make peers" in skip.kwargs["reason"]
