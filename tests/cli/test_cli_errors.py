"""The command line's failures: one line on stderr, a documented exit status, nothing half written, and
names from a file shown escaped (``python -m attention_ref --help`` lists the statuses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from attention_ref import cli
from attention_ref.cli import explore as explore_command
from attention_ref.cli.common import (
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT,
    EXIT_STATUSES,
    EXIT_USAGE,
    one_line,
    printable,
)
from attention_ref.viz import Explorer, ExplorerLayer

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "\x1b]0;pwned\x07\x1b[2Jlayer"  # retitles a terminal, then clears it


def small_page(name: str = "layer 1") -> Explorer:
    weights = np.full((1, 1, 4, 4), 0.25)  # (steps, heads, queries, keys): uniform over a 2×2 map
    return Explorer(layers=(ExplorerLayer(name, "self", (2, 2), weights),), title="small")


@pytest.fixture
def page_npz(tmp_path: Path) -> Path:
    return small_page().save_npz(tmp_path / "page.npz")


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: its status (argparse's SystemExit included), stdout and stderr."""
    try:
        status = cli.main(list(argv))
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(err: str, command: str = "explore") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m attention_ref {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------- input files


def _not_a_zip(path: Path) -> None:
    path.write_bytes(b"hello, not a zip")


def _empty_zip(path: Path) -> None:
    zipfile.ZipFile(path, "w").close()


def _object_array(path: Path) -> None:
    np.savez(path, layers=np.array([{"a": 1}], dtype=object))


def _not_an_explorer_file(path: Path) -> None:
    np.savez(path, x=np.zeros(3))


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (_not_a_zip, "not a .npz file"),
        (_empty_zip, "not an explorer file"),
        (_object_array, "holds Python objects (a pickle)"),
        (_not_an_explorer_file, "not an explorer file"),
        (None, "no such file"),
    ],
    ids=["not a zip", "empty .npz", "object array", "other arrays", "missing"],
)
def test_a_file_that_cannot_be_read_is_one_line_and_status_3(capsys, tmp_path, make, said):
    source = tmp_path / "bad.npz"
    if make is not None:
        make(source)
    out = tmp_path / "page.html"
    status, stdout, err = run_main(capsys, "explore", "--source", str(source), "--out", str(out))
    line = one_error_line(err)
    assert status == EXIT_INPUT == 3
    assert f"cannot read {source}: " in line and said in line
    assert not out.exists() and stdout == ""


# ---------------------------------------------------------------- outputs


def test_an_output_that_cannot_be_written_is_refused_before_the_work(capsys, tmp_path, page_npz):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {
        "": "the name is empty",
        str(tmp_path): "it is a directory",
        str(tmp_path / "no" / "such" / "dir" / "x.html"): "does not exist",
        str(a_file / "x.html"): "is not a folder",
    }
    for out, said in cases.items():
        status, stdout, err = run_main(capsys, "explore", "--source", str(page_npz), "--out", out)
        assert status == EXIT_OUTPUT == 4
        assert said in one_error_line(err) and stdout == ""
    assert not (tmp_path / "no").exists()  # the missing folders were not created


def test_out_in_a_folder_that_does_not_exist_creates_nothing(capsys, tmp_path, page_npz):
    missing = tmp_path / "nonexistent" / "dir"
    status, _, err = run_main(capsys, "explore", "--source", str(page_npz), "--out", str(missing / "x.html"))
    assert status == EXIT_OUTPUT and "create it first" in one_error_line(err)
    assert not missing.parent.exists()


def test_an_unwritable_folder_is_one_line_and_status_4(capsys, tmp_path, page_npz):
    if os.geteuid() == 0:  # root writes into any folder of a normal file system; sysfs refuses it
        folder = Path("/sys")
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
    status, _, err = run_main(capsys, "explore", "--source", str(page_npz), "--out", str(folder / "x.html"))
    assert status == EXIT_OUTPUT
    assert f"cannot write --out {str(folder / 'x.html')!r}" in one_error_line(err)
    assert not (folder / "x.html").exists()


def test_a_failing_npz_leaves_no_page_written(capsys, tmp_path, page_npz, monkeypatch):
    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Explorer, "save_npz", disk_full)
    out, npz = tmp_path / "page.html", tmp_path / "data.npz"
    status, stdout, err = run_main(capsys, "explore", "--source", str(page_npz), "--out", str(out), "--npz", str(npz))
    assert status == EXIT_OUTPUT
    assert "cannot write --npz" in one_error_line(err) and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.npz"]  # no page, no temporary file
    assert stdout == ""


def test_the_page_and_its_npz_are_written_together(capsys, tmp_path, page_npz):
    out, npz = tmp_path / "page.html", tmp_path / "again.npz"
    status, stdout, _ = run_main(capsys, "explore", "--source", str(page_npz), "--out", str(out), "--npz", str(npz))
    assert status == 0 and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert explore_command.SOURCES and npz.exists() and f"{out}: " in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "page.html", "page.npz"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # a new file's mode, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "argv",
    [
        ["--seed", "-1"],
        ["--steps", "0"],
        ["--steps", "-3"],
        ["--steps", "-5"],
        ["--steps", "ten"],
        ["--source", "nowhere"],
        ["--source", "diffusion", "--steps", "5"],
    ],
    ids=" ".join,
)
def test_a_value_out_of_range_is_one_line_and_status_2(capsys, tmp_path, argv):
    out = tmp_path / "page.html"
    status, stdout, err = run_main(capsys, "explore", *argv, "--out", str(out))
    assert status == EXIT_USAGE == 2
    line = one_error_line(err)
    assert argv[0] in line or "--steps" in line
    assert not out.exists() and stdout == ""


def test_an_unknown_command_is_one_line_and_status_2(capsys):
    status, _, err = run_main(capsys, "explroe")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("python -m attention_ref: error: ") and "explore" in err


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_status_130(capsys, tmp_path, monkeypatch):
    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setitem(explore_command.SOURCES, "long-range", ("interrupted", interrupted))
    out = tmp_path / "page.html"
    status, _, err = run_main(capsys, "explore", "--out", str(out))
    assert status == EXIT_INTERRUPTED == 130
    assert err == "python -m attention_ref explore: interrupted\n"
    assert not out.exists()


def test_a_real_sigint_while_training_is_one_line_and_status_130(tmp_path):
    out = tmp_path / "page.html"
    code = (
        "import sys\n"
        "from attention_ref import cli\n"
        "print('ready', flush=True)\n"
        f"sys.exit(cli.main(['explore', '--source', 'grounding', '--out', {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(1.0)  # into the training (half a minute)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "python -m attention_ref explore: interrupted\n"
    assert not out.exists()


# ---------------------------------------------------------------- names from a file


def test_names_from_a_file_reach_the_terminal_escaped(capsys, tmp_path):
    source = small_page(HOSTILE + "\u202e").save_npz(tmp_path / "hostile.npz")
    status, stdout, _ = run_main(capsys, "explore", "--source", str(source), "--out", str(tmp_path / "p.html"))
    assert status == 0
    assert "\x1b" not in stdout and "\x07" not in stdout and "\u202e" not in stdout
    assert "\\x1b]0;pwned\\x07\\x1b[2Jlayer\\u202e" in stdout


def test_printable_escapes_controls_and_keeps_text():
    assert printable("α × β — 日本 ✓ C:\\dir") == "α × β — 日本 ✓ C:\\dir"
    assert printable("a\x1b[2Jb\x07\x9b\u200f\u2028\ud800") == "a\\x1b[2Jb\\x07\\x9b\\u200f\\u2028\\ud800"
    assert one_line("first\nsecond\t third\x1b") == "first second third\\x1b"


# ---------------------------------------------------------------- --help


def _help(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "attention_ref", *argv, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"},
    )
    return result.stdout


COMMANDS = ["demo", "explore", "check", "vectors", "figures", "complexity", "bench"]


def test_help_lists_every_command_with_examples_and_the_exit_statuses():
    text = _help()
    assert "``" not in text and "`" not in text  # written for users, not in reStructuredText
    for command in COMMANDS:
        assert f"    {command}" in text
    assert "examples:" in text and "python -m attention_ref explore --out explorer.html" in text
    for status in EXIT_STATUSES:
        assert f"\n  {status:<5}" in text
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_every_option_a_help(command):
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert sub.description and "``" not in sub.description
    missing = [a.dest for a in sub._actions if not a.help]
    assert missing == [], f"{command}: options without help: {missing}"
    text = _help(command)
    assert "``" not in text
    if command not in ("check", "vectors"):  # the oracle's two name their usage in their description
        assert "example" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["complexity", "--sizes", "0", "--out", "c.json"],
        ["complexity", "--quick", "--dim", "-4", "--out", "c.json"],
        ["figures", "--dpi", "0"],
    ],
    ids=" ".join,
)
def test_other_commands_refuse_values_out_of_range_in_one_line(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    status, stdout, err = run_main(capsys, *argv)
    assert status == EXIT_USAGE and "must be a positive integer" in one_error_line(err, argv[0])
    assert list(tmp_path.iterdir()) == [] and stdout == ""


def test_a_complexity_report_that_cannot_be_read_is_refused_before_training(capsys, tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    start = time.perf_counter()
    status, _, err = run_main(capsys, "figures", "--complexity", str(bad), "--out", str(tmp_path / "figs"))
    assert status == EXIT_INPUT and f"cannot read {bad}" in one_error_line(err, "figures")
    assert time.perf_counter() - start < 60 and not (tmp_path / "figs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["vectors", "--out", "/nonexistent/dir/vectors"],
        ["figures", "--out", "/nonexistent/dir/figures"],
        ["complexity", "--quick", "--out", "/nonexistent/dir/c.json"],
        ["bench", "--quick", "--json", ""],
    ],
    ids=lambda argv: argv[0],
)
def test_every_command_refuses_an_output_it_cannot_write_before_working(capsys, argv):
    start = time.perf_counter()
    status, stdout, err = run_main(capsys, *argv)
    assert status == EXIT_OUTPUT and "cannot write" in one_error_line(err, argv[0]) and stdout == ""
    assert time.perf_counter() - start < 30  # refused at once, not after the work
    assert not Path("/nonexistent").exists()
