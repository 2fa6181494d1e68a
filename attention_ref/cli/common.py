"""What every command shares: its exit statuses, one-line errors, text safe for a terminal, and outputs
written whole or not at all.

A command raises :class:`CommandError` (a message and an exit status) for a failure it can explain;
:func:`attention_ref.cli.main` prints it as one line on stderr. Inputs are read inside :func:`reading`, which
turns the errors of a bad file into ``EXIT_INPUT``; outputs are checked before the work starts
(:func:`check_output_file`, :func:`check_output_dir`) and written by :func:`write_all`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_FAILED",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_STATUSES",
    "EXIT_USAGE",
    "CommandError",
    "Parser",
    "check_output_dir",
    "check_output_file",
    "non_negative_int",
    "one_line",
    "positive_int",
    "printable",
    "reading",
    "write_all",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 130

# status -> what it means: printed by --help and written in docs/cli.md
EXIT_STATUSES = {
    EXIT_OK: "done",
    EXIT_FAILED: "check: the implementation failed a check; any command: the work failed (out of memory, a file error)",
    EXIT_USAGE: "a bad command line: an unknown option, a value out of range (--steps 0, --seed -1)",
    EXIT_INPUT: "an input file cannot be read: missing, not a .npz, not the data expected, too large",
    EXIT_OUTPUT: "an output cannot be written: an empty name, a directory, a folder that does not exist, no permission",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


# errors that a bad input file raises while it is read (zipfile.BadZipFile is not an OSError)
READ_ERRORS = (ValueError, TypeError, OSError, MemoryError, EOFError, KeyError, zipfile.BadZipFile)


class CommandError(Exception):
    """A failure the command explains in one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def printable(text: object) -> str:
    """``text`` safe to print on a terminal: control and format characters shown as escapes.

    A name read from a file may carry escape sequences (``"\\x1b]0;…\\x07\\x1b[2J"`` retitles a terminal and
    clears it), bidirectional overrides that reorder what is shown, or lone surrogates that cannot be
    printed at all. Each becomes its Python escape (``\\x1b``, ``\\u202e``, ``\\ud800``); a backslash
    stays as it is. Newlines and tabs are escaped too: callers print one line.
    """

    def shown(ch: str) -> str:
        if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            return ch
        n = ord(ch)
        return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"

    return "".join(shown(ch) for ch in str(text))


def one_line(text: object) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), :func:`printable`."""
    return printable(" ".join(str(text).split()))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``PROG: error: …; see PROG --help``), status 2.

    The sub-command parsers are of this class too (argparse makes them of their parent's class).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Errors of reading ``path`` (a bad file, or too large for memory) become ``CommandError(EXIT_INPUT)``."""
    try:
        yield
    except READ_ERRORS as err:
        if not Path(path).is_file():
            raise CommandError(f"cannot read {path}: no such file", EXIT_INPUT) from err
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        reason = reason.removeprefix(f"{path}: ")  # the message names the file already
        if not zipfile.is_zipfile(path) and str(path).endswith(".npz"):
            reason = "not a .npz file (a .npz is a zip archive of .npy files)"
        elif isinstance(err, MemoryError):
            reason = f"not enough memory to load it ({reason})"
        elif isinstance(err, zipfile.BadZipFile):
            reason = f"not a .npz file ({reason})"
        raise CommandError(f"cannot read {path}: {reason}", EXIT_INPUT) from err


def _refuse(option: str, path: str, why: str) -> NoReturn:
    raise CommandError(f"cannot write {option} {path!r}: {why}", EXIT_OUTPUT)


def _check_folder(option: str, path: str, folder: Path) -> None:
    if not folder.exists():
        _refuse(option, path, f"the folder {str(folder)!r} does not exist (create it first)")
    if not folder.is_dir():
        _refuse(option, path, f"{str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        _refuse(option, path, f"no permission to write in {str(folder)!r}")


def check_output_file(option: str, path: str) -> Path:
    """``path`` as a file to write, checked before the work starts; ``CommandError(EXIT_OUTPUT)`` otherwise.

    Refused: an empty name, a directory, a folder that does not exist (it is not created), a folder or a
    file without write permission.
    """
    if not path.strip():
        _refuse(option, path, "the name is empty")
    target = Path(path)
    if target.is_dir():
        _refuse(option, path, "it is a directory")
    _check_folder(option, path, target.parent)
    if target.exists() and not os.access(target, os.W_OK):
        _refuse(option, path, "no permission to overwrite it")
    return target


def check_output_dir(option: str, path: str) -> Path:
    """``path`` as a directory to write into (it may not exist yet; its parent must)."""
    if not path.strip():
        _refuse(option, path, "the name is empty")
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            _refuse(option, path, "it is a file, not a directory")
        _check_folder(option, path, target)
    else:
        _check_folder(option, path, target.parent)
    return target


def write_all(outputs: Sequence[tuple[str, Path, Callable[[Path], object]]]) -> None:
    """Write every output or none: ``(option, target, write)`` where ``write(path)`` writes one file.

    Each output is written to a temporary file beside its target; only when every one of them has been
    written are they renamed into place, so a failure (or Ctrl-C) leaves the targets as they were.
    A write that fails is ``CommandError(EXIT_OUTPUT)`` naming the option and the file.
    """
    done: list[tuple[Path, Path]] = []
    try:
        for option, target, write in outputs:
            try:
                fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
                os.close(fd)
                done.append((Path(name), target))
                write(Path(name))
            except (OSError, ValueError, MemoryError) as err:
                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                raise CommandError(f"cannot write {option} {str(target)!r}: {reason}", EXIT_OUTPUT) from err
        mode = 0o666 & ~_umask()  # mkstemp makes a private file: give each the mode of a new file
        for temporary, target in done:
            try:
                os.chmod(temporary, mode)
                os.replace(temporary, target)
            except OSError as err:
                raise CommandError(f"cannot write {str(target)!r}: {err.strerror or err}", EXIT_OUTPUT) from err
    finally:
        for temporary, _ in done:
            temporary.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
