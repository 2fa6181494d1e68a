"""``python -m attention_ref complexity``: runs in quick mode on tiny maps and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attention_ref.cli import complexity

ROW_KEYS = {
    "variant",
    "side",
    "tokens",
    "forward_s",
    "backward_s",
    "peak_bytes",
    "flops_forward",
    "flops_backward",
    "theory_bytes",
    "skipped",
}


def test_quick_run_writes_the_documented_schema(tmp_path):
    out = tmp_path / "complexity.json"
    cmd = [sys.executable, "-m", "attention_ref", "complexity", "--quick", "--sizes", "4", "8", "16", "--dim", "8"]
    cmd += ["--window", "4", "--shift", "2", "--kernel", "5", "--exact-max-tokens", "64", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())

    assert report["schema"] == complexity.SCHEMA == "attention_ref.complexity/1"
    assert set(report) == {"schema", "config", "machine", "results"}
    assert report["config"]["quick"] is True and report["config"]["sizes"] == [4, 8, 16]
    assert report["config"]["dim"] == 8 and report["config"]["repeats"] == 1
    rows = {(r["variant"], r["side"]): r for r in report["results"]}
    assert set(rows) == {(v, s) for v in complexity.VARIANTS for s in (4, 8, 16)}
    for (variant, side), row in rows.items():
        assert set(row) == ROW_KEYS
        assert row["tokens"] == side * side
        assert row == {**row, **complexity.theory(variant, side * side, 8, report["config"])}
        if row["skipped"] is None:
            assert row["forward_s"] > 0 and row["backward_s"] > 0 and row["peak_bytes"] > 0
        else:
            assert row["forward_s"] is None and row["peak_bytes"] is None

    # what was skipped, and why
    assert rows[("exact", 16)]["skipped"] and "64 tokens" in rows[("exact", 16)]["skipped"]
    assert rows[("neighborhood", 4)]["skipped"] and "does not fit" in rows[("neighborhood", 4)]["skipped"]
    assert rows[("exact", 8)]["skipped"] is None and rows[("window", 4)]["skipped"] is None

    # the N² term shows at 8×8 already: exact attention holds a 64×64 weight matrix, the local variants don't
    assert rows[("exact", 8)]["theory_bytes"] > rows[("neighborhood", 8)]["theory_bytes"]
    assert rows[("exact", 8)]["flops_forward"] == 2 * 64 * 64 * (8 + 8)


def test_theory_grows_quadratically_only_for_exact_and_chunked():
    config = {"window": 8, "shift": 4, "kernel": 7, "block_size": 512}
    for variant in complexity.VARIANTS:
        small = complexity.theory(variant, 64**2, 64, config)["flops_forward"]
        large = complexity.theory(variant, 128**2, 64, config)["flops_forward"]
        assert large / small == (16 if variant in ("exact", "chunked") else 4), variant
    with pytest.raises(ValueError, match="unknown variant"):
        complexity.theory("sparse", 16, 4, config)


def test_bad_arguments_are_rejected(tmp_path):
    cmd = [sys.executable, "-m", "attention_ref", "complexity", "--out", str(tmp_path / "x.json"), "--dim", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0 and "must be positive" in result.stderr


def test_shift_defaults_to_half_the_window_and_is_checked(tmp_path):
    import argparse

    import pytest

    parser = argparse.ArgumentParser()
    complexity.add_arguments(parser)
    common = ["--quick", "--sizes", "4", "--dim", "4", "--variants", "window", "--out", str(tmp_path / "c.json")]
    report = complexity.main(parser.parse_args([*common, "--window", "4"]))  # no --shift: Swin's window // 2
    assert report["config"]["shift"] == 2 and report["results"][0]["skipped"] is None
    with pytest.raises(ValueError, match="--shift must satisfy 0 ≤ shift < window = 4; got 4"):
        complexity.main(parser.parse_args([*common, "--window", "4", "--shift", "4"]))
