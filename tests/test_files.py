"""Untrusted files: every loader checks an .npz against its limits before unpacking, and every save is atomic."""

from __future__ import annotations

import json
import os
import stat
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from attention_ref._files import DEFAULT_MAX_BYTES, atomic_write, load_npz
from attention_ref.testing import load_vectors, write_vectors
from attention_ref.toys.diffusion.model import DiffusionModel
from attention_ref.toys.diffusion.sample import load_trace
from attention_ref.toys.diffusion.unet import UNetConfig
from attention_ref.viz import Explorer, ExplorerLayer, load_explorer
from attention_ref.viz.explorer import FORMAT

TINY = UNetConfig(channels=(8,), down_attention=(False,), up_attention=(False,), head_dim=4, groups=2, time_dim=8)


def _npy(a: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``a``."""
    import io

    f = io.BytesIO()
    np.lib.format.write_array(f, a, allow_pickle=False)
    return f.getvalue()


def _small_entries() -> dict[str, np.ndarray]:
    """The entries each loader reads before the large one, so that every loader reaches it."""
    return {
        "format": np.array(FORMAT),
        "layers": np.array(["a"]),
        "__config__": np.array(json.dumps(TINY.to_dict())),
        "meta": np.array("{}"),
    }


def _bomb(path: Path, mib: int) -> Path:
    """A deflated .npz holding the small entries and ``layer0.weights``: ``mib`` MiB of zeros (~1000:1)."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0))
    header["shape"] = (mib * 2**20 // 8,)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, a in _small_entries().items():
            z.writestr(name + ".npy", _npy(a))
        with z.open("layer0.weights.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(2**20)
            for _ in range(mib):
                f.write(zeros)
    return path


def _declaring(path: Path, member_bytes: int) -> Path:
    """A small .npz whose central directory declares ``layer0.weights`` to unpack to ``member_bytes``.

    Only the declared size is large (the member itself is tiny and its CRC will not match): a file that
    lies in its directory, as a cheap stand-in for a huge bomb.
    """
    data = _npy(np.zeros(4))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, a in _small_entries().items():
            z.writestr(name + ".npy", _npy(a))
        z.writestr("layer0.weights.npy", data)
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"PK\x01\x02")  # the last central-directory entry: layer0.weights
    assert raw[at + 46 : at + 46 + 18] == b"layer0.weights.npy"
    raw[at + 24 : at + 28] = struct.pack("<I", member_bytes)  # its uncompressed size
    path.write_bytes(bytes(raw))
    return path


def _vectors_dir(folder: Path, npz: Path) -> Path:
    """A vectors directory whose one case is ``npz``."""
    folder.mkdir()
    (folder / npz.name).write_bytes(npz.read_bytes())
    (folder / "index.json").write_text(
        json.dumps({"format": 1, "dtype": "float64", "cases": [{"name": "x", "file": npz.name}]})
    )
    return folder


LOADERS = {
    "load_explorer": lambda p, **kw: load_explorer(p, **kw),
    "DiffusionModel.load": lambda p, **kw: DiffusionModel.load(p, **kw),
    "load_trace": lambda p, **kw: load_trace(p, **kw),
    "load_vectors": lambda p, **kw: load_vectors(_vectors_dir(p.parent / "vectors", p), **kw),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_a_compressed_bomb_is_refused_before_it_is_unpacked(loader, tmp_path):
    bomb = _bomb(tmp_path / "bomb.npz", 48)  # 48 MiB of zeros in about 50 KiB
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb.npz: member 'layer0.weights' unpacks to 48.0 MiB, more than"):
            LOADERS[loader](bomb, max_bytes=2**23)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB allocated before refusing"


@pytest.mark.parametrize("loader", LOADERS)
def test_the_default_limit_refuses_the_issues_1_5_gib_member(loader, tmp_path):
    path = _declaring(tmp_path / "big.npz", 1536 * 2**20)
    with pytest.raises(ValueError, match=r"big.npz: member 'layer0.weights' unpacks to 1.5 GiB, more than the limit"):
        LOADERS[loader](path)
    assert DEFAULT_MAX_BYTES == 2**30


def test_members_are_also_limited_together(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros(2**17), b=np.zeros(2**17))  # 1 MiB each
    with pytest.raises(ValueError, match=r"its 2 members unpack to 2.0 MiB, more than the limit of 1.5 MiB"):
        load_npz(tmp_path / "two.npz", max_bytes=3 * 2**19)
    assert set(load_npz(tmp_path / "two.npz", max_bytes=2**22)) == {"a", "b"}


def test_a_member_whose_data_outgrows_its_declared_size_is_refused_without_unpacking_it(tmp_path):
    # the directory says 208 bytes (a header and 10 float64), the deflated stream holds 32 MiB
    header = _npy(np.zeros(10))
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("x.npy", header[:-80] + bytes(32 * 2**20))
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"PK\x01\x02")
    raw[at + 24 : at + 28] = struct.pack("<I", len(header))  # the central directory's uncompressed size
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"lying.npz: member 'x' is damaged"):
            load_npz(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_a_header_that_disagrees_with_the_zip_is_refused(tmp_path):
    data = bytearray(_npy(np.zeros(10)))
    data[: data.index(b"}") + 1] = data[: data.index(b"}") + 1].replace(b"(10,)", b"(99,)")
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as z:
        z.writestr("x.npy", bytes(data))
    with pytest.raises(ValueError, match=r"member 'x' declares 80 bytes of data in the zip but shape \(99,\)"):
        load_npz(tmp_path / "h.npz")


def test_pickles_and_other_files_are_refused_with_the_files_name(tmp_path):
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"objects.npz: member 'a' holds Python objects \(a pickle\)"):
        load_npz(tmp_path / "objects.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"text.npz: not an .npz \(zip\) file"):
        load_npz(tmp_path / "text.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.npz: not an .npz"):
        load_npz(tmp_path / "empty.npz")
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"member 'notes.txt' is not an .npy array"):
        load_npz(tmp_path / "other.npz")
    with pytest.raises(OSError):
        load_npz(tmp_path / "missing.npz")
    with pytest.raises(OSError):
        load_npz(tmp_path)


def test_many_members_are_refused_before_the_directory_is_read(tmp_path):
    np.savez(tmp_path / "many.npz", **{f"a{i}": np.zeros(1) for i in range(30)})
    with pytest.raises(ValueError, match=r"declares 30 members, more than the limit of 20"):
        load_npz(tmp_path / "many.npz", max_members=20)


def test_a_valid_file_loads_as_numpy_loads_it(tmp_path):
    arrays = {"c": np.arange(12.0).reshape(3, 4), "f": np.asfortranarray(np.arange(6).reshape(2, 3))}
    arrays["s"] = np.array("t")
    arrays["e"] = np.zeros((0, 3), np.float32)
    np.savez_compressed(tmp_path / "ok.npz", **arrays)
    back = load_npz(tmp_path / "ok.npz")
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a)
        assert back[name].dtype == a.dtype and back[name].shape == a.shape


# ---------------------------------------------------------------- malformed explorer files


def _page() -> Explorer:
    w = np.full((1, 1, 4, 4), 0.25)
    return Explorer((ExplorerLayer("s", "self", (2, 2), w),), tokens=("a", "b"), title="t")


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("layer0.grid", np.array([2.7, 2.2]), r"'layer0.grid' must be \(2,\) integers \(H, W\), got float64"),
        ("layer0.grid", np.array(4), r"'layer0.grid' must be \(2,\) integers"),
        ("layers", np.array("s"), r"'layers' must be a 1-d array of strings, got <U1 of shape \(\)"),
        ("layers", np.array([1, 2]), r"'layers' must be a 1-d array of strings"),
        ("layer0.kind", np.array(["self", "self"]), r"'layer0.kind' must be a string \(a 0-d unicode array\)"),
        ("layer0.weights", np.zeros((4, 4)), r"'layer0.weights' must be \(steps, heads, queries, keys\) floats"),
        ("layer0.weights", np.array("w"), r"'layer0.weights' must be"),
        ("layer0.head_mean", np.array([True, False]), r"'layer0.head_mean' must be a 0-d bool"),
        ("layer0.head_mean", np.array("yes"), r"'layer0.head_mean' must be a 0-d bool"),
        ("title", np.array(["a", "b"]), r"'title' must be a string"),
        ("tokens", np.array("ab"), r"'tokens' must be a 1-d array of strings"),
        ("start_query", np.array(0.5), r"'start_query' must be \(2,\) floats"),
        ("image", np.zeros((2, 2)), r"'image' must be \(h, w, 3\) uint8"),
        ("format", np.array([FORMAT]), r"'format' must be a string"),
        ("layer0.query_pixels", np.zeros((4, 2)), r"'layer0.query_pixels' must be \(Q, 2\) integers"),
        ("layer0.weights", np.full((1, 1, 4, 4), 2.0), r"layer 0: layer 's': weights must be softmax weights"),
    ],
)
def test_a_malformed_explorer_file_names_its_field(entry, value, message, tmp_path):
    arrays = load_npz(_page().save_npz(tmp_path / "good.npz"))
    arrays[entry] = value
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"bad.npz: .*" + message):
        load_explorer(tmp_path / "bad.npz")


def test_an_explorer_file_without_layers_says_so(tmp_path):
    arrays = load_npz(_page().save_npz(tmp_path / "good.npz"))
    del arrays["layers"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"lacks 'layers'"):
        load_explorer(tmp_path / "bad.npz")


# ---------------------------------------------------------------- the other loaders' fields


def test_a_model_file_names_what_is_wrong(tmp_path):
    path = DiffusionModel.fresh(TINY).save(tmp_path / "m.npz")
    arrays = load_npz(path)
    cases = {
        "no config": ({k: v for k, v in arrays.items() if k != "__config__"}, r"lacks '__config__'"),
        "config not json": ({**arrays, "__config__": np.array("{oops")}, r"'__config__' is not JSON"),
        "config list": ({**arrays, "__config__": np.array("[1]")}, r"'__config__' must be an object"),
        "config type": (
            {**arrays, "__config__": np.array(json.dumps({**TINY.to_dict(), "groups": "2"}))},
            r"'__config__' field 'groups' has the wrong type",
        ),
        "config value": (
            {**arrays, "__config__": np.array(json.dumps({**TINY.to_dict(), "groups": 3}))},
            r"'__config__': UNetConfig: width 8 is not divisible",
        ),
        "int parameter": (
            {**arrays, "conv_in.weight": np.zeros((3, 3, 3, 8), np.int64)},
            r"parameters must be floating arrays of one dtype; 'conv_in.weight' is int64",
        ),
    }
    for what, (bad, message) in cases.items():
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=r"bad.npz: " + message):
            DiffusionModel.load(tmp_path / "bad.npz")
        assert what
    np.savez(tmp_path / "logged.npz", **arrays)
    (tmp_path / "logged.json").write_text("[not json")
    with pytest.raises(ValueError, match=r"logged.json: not JSON"):
        DiffusionModel.load(tmp_path / "logged.npz")
    (tmp_path / "logged.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"logged.json: the training log must be a JSON object, got list"):
        DiffusionModel.load(tmp_path / "logged.npz")


def test_a_trace_file_names_what_is_wrong(tmp_path):
    bad_metas = [
        (None, r"lacks 'meta'"),
        (np.array("{x"), r"'meta' is not JSON"),
        (np.array("[]"), r"'meta' must be a JSON object"),
        (np.array([1.0]), r"'meta' must be a JSON string"),
    ]
    for meta, message in bad_metas:
        arrays = {"images": np.zeros((1, 2, 2, 3))} | ({} if meta is None else {"meta": meta})
        np.savez(tmp_path / "t.npz", **arrays)
        with pytest.raises(ValueError, match=r"t.npz: " + message):
            load_trace(tmp_path / "t.npz")


def test_a_vectors_index_may_not_point_outside_its_folder(tmp_path):
    write_vectors(tmp_path / "v", "float64", cases=["plain"])
    index = json.loads((tmp_path / "v" / "index.json").read_text())
    for file_name in ("../secret.npz", "/etc/passwd", 3, None):
        index["cases"][0]["file"] = file_name
        (tmp_path / "v" / "index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"cases\[0\] 'file' must name an .npz file"):
            load_vectors(tmp_path / "v")
    (tmp_path / "v" / "index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"index.json: must be a JSON object"):
        load_vectors(tmp_path / "v")


# ---------------------------------------------------------------- saving


def test_a_token_that_is_not_text_is_refused_before_anything_is_written(tmp_path):
    page = Explorer(_page().layers, tokens=("a", "\ud800"))
    target = tmp_path / "page.html"
    target.write_text("the old page")
    with pytest.raises(ValueError, match=r"page.html: tokens\[1\] '\\ud800' holds '\\ud800', a lone surrogate"):
        page.save(target)
    assert target.read_text() == "the old page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # no temporary file left behind
    back = load_explorer(page.save_npz(tmp_path / "page.npz"))  # the data file keeps the token as it is
    assert back.tokens == ("a", "\ud800")


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_write(target) as f:
        f.write(b"new, partly")
        raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_every_save_is_atomic(tmp_path, monkeypatch):
    page, model = _page(), DiffusionModel.fresh(TINY)
    saves = {
        "page.npz": lambda p: page.save_npz(p),
        "page.html": lambda p: page.save(p),
        "model.npz": lambda p: model.save(p),
        "vectors/index.json": lambda p: write_vectors(p.parent, "float64", cases=["plain"]),
    }
    (tmp_path / "vectors").mkdir()

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    for name, save in saves.items():
        target = tmp_path / name
        target.write_bytes(b"old")
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", broken_write)  # every atomic write syncs its temporary file before the rename
            with pytest.raises(OSError, match="disk full"):
                save(target)
        assert target.read_bytes() == b"old", name
        save(target)
        assert target.read_bytes() != b"old", name
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert not leftovers


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = _page().save(tmp_path / "p.html")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    os.chmod(path, 0o600)
    _page().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
