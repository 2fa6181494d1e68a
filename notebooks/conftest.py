"""How ``make notebooks`` (``pytest --nbmake notebooks``) runs these notebooks: not a notebook itself.

A notebook that imports one of the optional cross-check peers (torch, diffusers, transformers) at the top
level of a cell cannot run without them: where they are not installed it is skipped, and pytest's summary
says which ones are missing and that ``make peers`` installs them. An import inside ``try``/``if`` is the
notebook's own way of doing without (notebooks 02 and 06 do that), so those notebooks always run.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

# the optional peers, installed together by `make peers` (torch pinned there) or the `oracle` extra
PEERS = ("torch", "diffusers", "transformers")


def peers_needed(notebook: Path) -> set[str]:
    """The peers imported at the top level of a code cell; a notebook needing one needs all (they go together)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    imported: set[str] = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)  # IPython magics
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in tree.body:  # top-level statements only
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    return set(PEERS) if imported & set(PEERS) else set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path))
        if path.suffix != ".ipynb":
            continue
        missing = sorted(p for p in peers_needed(path) if importlib.util.find_spec(p) is None)
        if missing:
            reason = f"needs {', '.join(missing)}: not installed here (`make peers` installs the optional peers)"
            item.add_marker(pytest.mark.skip(reason=reason))
