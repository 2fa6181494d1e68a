"""Probe the public functions and the file loaders with bad input; count what comes back.

Every case of ``tests/bad_input_table.py`` (each public forward and backward, its inputs changed one way
at a time: dtypes, shapes incl. 0 and mismatched, axes, NaN/inf, None, wrong types, bad options,
the backward's dout and cache) is run and judged:

* correct — the value equals the same call in float64 (to the dtype's tolerance), or is an
  accepted NaN/inf that the float64 call gives too;
* clear error — a documented ValueError/TypeError/MemoryError raised by attention_ref's own code
  (``vague error``: the same, but the message does not name the changed argument);
* silent wrong — returned where it must refuse, or a value that differs;
* internal error — any other exception, or one raised inside NumPy or Python rather than by a check.

Then the files: hostile and malformed ``.npz`` files on every load path, and a save that fails half way.

    PYTHONPATH=. python scripts/probe_bad_input.py            # counts, and every non-correct case
    PYTHONPATH=. python scripts/probe_bad_input.py --bomb-mib 1536   # the issue's 1.5 GiB bomb (slow before the fix)
    PYTHONPATH=. python scripts/probe_bad_input.py --only dit --no-files   # the diffusion transformers' pieces
    PYTHONPATH=. python scripts/probe_bad_input.py --only rope patchify     # some rows of the table, by name
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bad_input_table import DIT_SPECS, all_specs, cases, run_case  # noqa: E402

BAD = ("silent wrong", "internal error")


def probe_functions(verbose: bool, only: list[str] | None = None) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    per_kind: dict[str, list[str]] = collections.defaultdict(list)
    specs = all_specs()
    if only:
        names = {name for word in only for name in (DIT_SPECS if word == "dit" else [word])}
        unknown = names - {spec.name for spec in specs}
        if unknown:
            raise SystemExit(f"probe_bad_input: no row named {sorted(unknown)} in the table")
        specs = [spec for spec in specs if spec.name in names]
    for spec in specs:
        for case in cases(spec):
            verdict = run_case(case)
            counts[verdict.kind] += 1
            per_kind[verdict.kind].append(f"{spec.name}: {case.what}: {verdict.detail}")
    if verbose:
        for kind in ("silent wrong", "internal error", "vague error"):
            print(f"\n== {kind} ({len(per_kind[kind])})")
            for line in per_kind[kind]:
                print("  " + line[:300])
    return counts


# ---------------------------------------------------------------- files

_LOADERS = {
    "load_explorer": "from attention_ref.viz import load_explorer as load",
    "DiffusionModel.load": "from attention_ref.toys.diffusion.model import DiffusionModel; load = DiffusionModel.load",
    "load_trace": "from attention_ref.toys.diffusion.sample import load_trace as load",
    "load_vectors": "from attention_ref.testing.vectors import load_vectors as load",
    "explore --source": None,  # the command line
}


def _bomb(path: Path, mib: int) -> None:
    """A compressed .npz whose one member is ``mib`` MiB of zeros (about 1000:1)."""
    import zipfile

    import numpy as np

    header = np.lib.format.header_data_from_array_1_0(np.zeros(0))
    header["shape"] = (mib * 2**20 // 8,)
    from attention_ref.toys.diffusion.unet import UNetConfig
    from attention_ref.viz.explorer import FORMAT

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        # the small entries each loader reads first, so that every one of them reaches the large member
        small = {
            "format": np.array(FORMAT),
            "layers": np.array(["a"]),
            "__config__": np.array(json.dumps(UNetConfig().to_dict())),
            "meta": np.array("{}"),
        }
        for name, a in small.items():
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
        with z.open("layer0.weights.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(2**24)
            for _ in range(mib // 16):
                f.write(chunk)


def _run_loader(name: str, target: Path, python: str) -> dict:
    """Load ``target`` with ``name`` in a fresh process; its peak RSS, time and outcome."""
    if name == "load_vectors":
        folder = target.parent / "vectors"
        folder.mkdir(exist_ok=True)
        (folder / target.name).write_bytes(target.read_bytes()) if not (folder / target.name).exists() else None
        (folder / "index.json").write_text(
            json.dumps({"format": 1, "dtype": "float64", "cases": [{"name": "x", "file": target.name}]})
        )
        arg = folder
    else:
        arg = target
    if name == "explore --source":
        argv = ["explore", "--source", str(arg), "--out", str(arg) + ".html"]
        body = f"from attention_ref.cli import main\nraise SystemExit(main({argv!r}))\n"
    else:
        body = f"{_LOADERS[name]}\nload({str(arg)!r})\n"
    code = "\n".join(
        [
            "import resource, time, json, sys",
            "t = time.perf_counter()",
            "outcome = 'returned'",
            "try:",
            textwrap.indent(body, "    "),
            "except BaseException as err:",
            "    outcome = type(err).__name__ + ': ' + str(err)[:160]",
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024",
            "print(json.dumps({'outcome': outcome, 'seconds': time.perf_counter() - t, 'peak_mib': peak}))",
        ]
    )
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"outcome": f"crashed: {run.stderr.strip().splitlines()[-1:]}", "seconds": None, "peak_mib": None}
    return json.loads(lines[-1])


def probe_files(bomb_mib: int) -> None:
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bomb = folder / "bomb.npz"
        _bomb(bomb, bomb_mib)
        baseline = _run_loader("load_explorer", folder / "missing.npz", python)["peak_mib"]
        print(f"\n== hostile .npz: {bomb.stat().st_size / 2**20:.2f} MiB on disk, one member of {bomb_mib} MiB")
        print(f"   (a process that imports attention_ref and fails at once peaks at {baseline:.0f} MiB)")
        for name in _LOADERS:
            r = _run_loader(name, bomb, python)
            print(f"   {name:22s} {r['seconds'] or 0:7.2f} s  peak {r['peak_mib'] or 0:7.0f} MiB  {r['outcome'][:110]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="only the counts")
    parser.add_argument("--bomb-mib", type=int, default=256, help="the hostile member's size (default 256 MiB)")
    parser.add_argument("--no-files", action="store_true")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="only these rows of the table ('dit': the diffusion transformers')"
    )
    args = parser.parse_args()
    t = time.perf_counter()
    counts = probe_functions(verbose=not args.quiet, only=args.only)
    total = sum(counts.values())
    print(f"\n== {total} calls in {time.perf_counter() - t:.1f} s")
    for kind in ("correct", "clear error", "vague error", "silent wrong", "internal error"):
        print(f"   {kind:15s} {counts[kind]}")
    if not args.no_files:
        probe_files(args.bomb_mib)
    return 1 if any(counts[k] for k in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
