"""Reading ``.npz`` files that may be hostile, and writing files so that a failure leaves the old one whole.

Every loader of the package (:func:`attention_ref.viz.load_explorer`,
:meth:`attention_ref.toys.diffusion.DiffusionModel.load`, :func:`attention_ref.toys.diffusion.load_trace`,
:func:`attention_ref.testing.load_vectors`, and through them ``explore --source FILE.npz``) reads with
:func:`load_npz`, and every writer writes with :func:`atomic_write`.

Reading. An ``.npz`` is a zip of ``.npy`` files, and a zip member compresses about 1000:1 when it holds
zeros: a 1.5 MB file can unpack to 1.5 GiB. ``numpy.load`` unpacks a member before anything looks at its
size. :func:`load_npz` looks first, using only what the file *declares*, and unpacks nothing until every
check has passed:

* the zip's central directory: at most ``max_members`` members, each a plain ``.npy`` (stored or deflated,
  not encrypted, no two with one name), whose declared unpacked sizes, each and summed, are at most
  ``max_bytes``;
* each member's ``.npy`` header (a few hundred bytes, read through a capped stream): no Python objects
  (nothing is ever unpickled), and a shape whose ``prod(shape) · itemsize`` is exactly the data the zip
  declares for the member.

Then each array is allocated at its checked size and filled from the decompressing stream, which stops at
the declared size: a header that understates its data (a "lying" member) gives a short read or a CRC
error, never more memory. So a file is refused before it allocates more than ``max_bytes``; the peak of
a load is ``max_bytes`` plus a few small buffers.

Every failure is one exception whose one-line message names the file and the member or field:
``ValueError`` for a file that is not what it should be or is over the limit, ``OSError`` (from the
operating system) for a file that cannot be opened.

Writing. :func:`atomic_write` writes to a temporary file in the target's folder and renames it over the
target only when everything was written: a failure half way (a full disk, an exception while
serialising) leaves the target as it was, never empty or truncated.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_MEMBERS", "atomic_write", "load_npz", "read_json_object", "read_text"]

#: The most a load may unpack, all members together, unless the caller passes ``max_bytes``: 1 GiB, over
#: 600 times the shipped diffusion model (1.6 MiB unpacked) and 16 times an explorer page's weights.
DEFAULT_MAX_BYTES = 2**30
#: The most members an ``.npz`` may hold (the shipped model has 183): each costs a little memory to list.
DEFAULT_MAX_MEMBERS = 10_000
#: The longest ``.npy`` header read (numpy's own default limit).
_MAX_HEADER = 10_000
#: The most central-directory bytes a member may take (its name included).
_MAX_ENTRY = 1024
#: Bytes read from a member per call while filling an array.
_CHUNK = 1 << 22


def _fail(path: Path, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _size(n: int) -> str:
    """``n`` bytes in words: 1.5 GiB, 12 MiB, 300 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _members(z: zipfile.ZipFile, path: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The central directory's members, checked (names, methods, declared sizes) without unpacking any."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise _fail(path, f"the zip holds two members named {twice[0]!r}: which one is meant is not guessed")
    total = 0
    for info in infos:
        name = info.filename
        if not name.endswith(".npy") or info.is_dir():
            raise _fail(path, f"member {name!r} is not an .npy array: not an .npz file written by numpy")
        if info.flag_bits & 0x1:
            raise _fail(path, f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(path, f"member {name!r} is compressed with method {info.compress_type}, not stored or deflated")
        if info.file_size > max_bytes:
            raise _fail(
                path,
                f"member {name[:-4]!r} unpacks to {_size(info.file_size)}, more than the limit of {_size(max_bytes)} "
                "(max_bytes=)",
            )
        total += info.file_size
    if total > max_bytes:
        limit = f"more than the limit of {_size(max_bytes)} (max_bytes=)"
        raise _fail(path, f"its {len(infos)} members unpack to {_size(total)}, {limit}")
    return infos


def _header(f: IO[bytes], path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header length)`` of the ``.npy`` stream ``f``, read through a capped stream."""
    try:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        elif (major, minor) in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy version {major}.{minor}")
    except zipfile.BadZipFile as err:  # a CRC error, a broken deflate stream
        raise _fail(path, f"member {name!r} is damaged ({err})") from None
    except (ValueError, OSError, EOFError) as err:
        raise _fail(path, f"member {name!r} is not a valid .npy array ({err})") from None
    if dtype.hasobject:
        raise _fail(path, f"member {name!r} holds Python objects (a pickle), which are never loaded")
    return tuple(shape), bool(fortran), dtype, f.tell()


def _read_array(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One member, its declared sizes checked against its header before its data is unpacked."""
    name = info.filename[:-4]
    with z.open(info) as f:
        shape, fortran, dtype, offset = _header(f, path, name)
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if count > info.file_size + 1:  # entries of size 0 (a dtype like "V0") cost loops, if not memory
            raise _fail(path, f"member {name!r} declares {count} entries of {dtype.itemsize} bytes")
        if offset + nbytes != info.file_size:
            raise _fail(
                path,
                f"member {name!r} declares {_size(info.file_size - offset)} of data in the zip but shape {shape} of "
                f"{dtype} needs {_size(nbytes)}",
            )
        flat = np.empty(count, dtype=dtype)  # at most max_bytes: file_size was checked
        view = memoryview(flat.view(np.uint8)) if nbytes else memoryview(b"")
        filled = 0
        try:
            while filled < nbytes:
                got = f.readinto(view[filled : filled + _CHUNK])
                if not got:
                    raise _fail(path, f"member {name!r} ends after {filled} of its {nbytes} bytes (truncated)")
                filled += got
            if f.read(1):  # the stream stops at the declared size; anything more is a broken member
                raise _fail(path, f"member {name!r} holds more data than its header declares")
        except (zipfile.BadZipFile, EOFError, OSError) as err:  # a CRC error, a broken deflate stream
            raise _fail(path, f"member {name!r} is damaged ({err})") from None
    if fortran:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def load_npz(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS
) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, by name, after checking the file against the limits.

    ``max_bytes``: the most the arrays may take, together, unpacked (default :data:`DEFAULT_MAX_BYTES`);
    ``max_members``: the most arrays. ``ValueError`` naming the file and the member for anything that is
    not a numpy ``.npz`` of plain arrays within the limits (see the module's docstring); ``OSError`` when
    the file cannot be read.
    """
    path = Path(path)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise TypeError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    with path.open("rb") as fp:
        count, directory = _declared_directory(fp)
        if count > max_members:
            raise _fail(path, f"the zip declares {count} members, more than the limit of {max_members} (max_members=)")
        if directory > max_members * _MAX_ENTRY:
            raise _fail(path, f"the zip's directory declares {_size(directory)}, more than {max_members} members need")
        try:
            z = zipfile.ZipFile(fp)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
            raise _fail(path, f"not an .npz (zip) file ({err})") from None
        with z:
            infos = _members(z, path, max_bytes)
            if len(infos) > max_members:
                raise _fail(path, f"the zip holds {len(infos)} members, more than the limit of {max_members}")
            return {info.filename[:-4]: _read_array(z, info, path) for info in infos}


def _declared_directory(fp: IO[bytes]) -> tuple[int, int]:
    """``(members, bytes)`` of the central directory as the zip's end record declares them, read before the
    directory itself is parsed; ``(0, 0)`` when there is no end record (``zipfile`` then refuses the file)."""
    end_record = getattr(zipfile, "_EndRecData", None)  # a few dozen bytes at the end of the file
    try:
        record = end_record(fp) if end_record is not None else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        record = None
    finally:
        fp.seek(0)
    if not record:
        return 0, 0
    return int(record[zipfile._ECD_ENTRIES_TOTAL]), int(record[zipfile._ECD_SIZE])


def read_text(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The UTF-8 text of ``path``, refused (``ValueError`` naming the file) when it is longer than ``max_bytes``."""
    path = Path(path)
    chunks, size = [], 0
    with path.open("rb") as f:
        while chunk := f.read(min(1 << 16, max_bytes + 1 - size)):  # read(n) would reserve n bytes at once
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise _fail(path, f"longer than the limit of {_size(max_bytes)} (max_bytes=)")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json_object(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, what: str | None = None
) -> dict[str, Any]:
    """The JSON object (a ``dict``) in the text file ``path``, read by :func:`read_text`.

    ``ValueError`` naming the file when it is not JSON or holds another JSON value (``what``, e.g.
    ``"the training log"``, names the object in that message).
    """
    try:
        value = json.loads(read_text(path, max_bytes=max_bytes))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(value, dict):
        subject = "" if what is None else f"{what} "
        raise ValueError(f"{path}: {subject}must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- writing


def _default_mode() -> int:
    """The permissions a new file gets from ``open``: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _default_mode()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object to write ``path`` through: the target is replaced only when the ``with`` block succeeds.

    The data goes to a temporary file beside ``path`` (same folder, so the final rename is atomic on
    one file system), which is flushed to disk and renamed over ``path``; on any exception it is removed
    and ``path`` keeps its old content (or stays absent). A new file gets the permissions ``open`` would
    give it; a replaced file keeps its own.
    """
    path = Path(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
