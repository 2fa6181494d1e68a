"""The package's floors: each room (a subpackage or a top-level module) imports only from the floors below it.

A room on a floor may use any room on a lower floor, never one on its own floor or above, so that the floors say
what uses what and there are no circles. An import inside a function (deferred until it runs) counts as much as
one at the top of a file: deferring an import does not remove the dependency, it only hides it. The one edge that
goes up is listed in ``UPWARD`` with its reason, and must stay deferred; docs/api.md shows the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attention_ref"

# lowest first; a room is a subpackage, or a module directly in attention_ref/ (named without ".py")
FLOORS: tuple[tuple[str, ...], ...] = (
    ("backend", "_files"),  # the array namespace and devices; checked file loading and atomic saving
    ("_checks", "gradcheck"),  # argument checks; finite differences
    ("ops",),  # softmax, linear, norms, heads, RoPE, ...
    ("attention",),  # exact attention and its variants
    ("blocks",),  # the attention layer and the blocks built on it
    ("toys",),  # the small models trained with the blocks
    ("viz",),  # plots and the explorer page
    ("interop",),  # weights from diffusers, CompVis, OpenAI; the trace of a model
    ("__init__",),  # the learner's top level (imports ops, attention, blocks, interop)
    ("testing", "bench"),  # the test oracle; timings
    ("cli",),  # the command line
    ("__main__",),
)

# (from, to): why an import goes up a floor; each one must be deferred (inside a function)
UPWARD = {
    ("interop", "testing"): "trace(verify=True) judges each call by check_model's judges (interop/trace/families/"
    "base.py, Family.verify), imported only when a trace is asked to verify",
}


def _room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _target(path: Path, node: ast.ImportFrom | ast.Import, name: str | None) -> str | None:
    """The room an import reaches, or None for one outside the package."""
    if isinstance(node, ast.Import):
        parts = name.split(".")
        if parts[0] != "attention_ref":
            return None
        return parts[1] if len(parts) > 1 else "__init__"
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "attention_ref":
            return None
        return parts[1] if len(parts) > 1 else (name if (PACKAGE / name).is_dir() else "__init__")
    here = list(path.relative_to(PACKAGE).parent.parts)  # the package the file is in, below attention_ref
    base = here[: len(here) - (node.level - 1)]
    rest = [p for p in (node.module or "").split(".") if p]
    parts = base + rest
    if parts:
        return parts[0].removesuffix(".py")
    # `from . import x` at the top of attention_ref: x is the room
    return name if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file() else "__init__"


def _imports() -> list[tuple[str, str, bool, str]]:
    """``(from room, to room, deferred, where)`` for every import of one room by another."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _room(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deferred_nodes = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for alias in node.names:
                target = _target(path, node, alias.name)
                if target is not None and target != source:
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    found.append((source, target, id(node) in deferred_nodes, where))
    return found


def _floor(room: str) -> int:
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise AssertionError(f"{room!r} is on no floor: add it to FLOORS (and docs/api.md)")


def test_every_room_is_on_a_floor():
    rooms = {_room(p) for p in PACKAGE.rglob("*.py")}
    assert rooms == {room for floor in FLOORS for room in floor}


def test_imports_go_down_the_floors():
    upward = [(s, t, where) for s, t, _, where in _imports() if _floor(t) >= _floor(s) and (s, t) not in UPWARD]
    assert not upward, f"imports on or above their own floor: {upward}"


@pytest.mark.parametrize("edge", sorted(UPWARD))
def test_the_listed_upward_edge_is_used_and_deferred(edge):
    uses = [(deferred, where) for s, t, deferred, where in _imports() if (s, t) == edge]
    assert uses, f"{edge} is no longer imported: take it out of UPWARD"
    assert all(deferred for deferred, _ in uses), f"{edge} must be imported inside a function: {uses}"
