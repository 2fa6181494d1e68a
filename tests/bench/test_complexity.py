"""``python -m attention_ref complexity``: runs in quick mode on tiny maps and writes the documented JSON
(:mod:`attention_ref.cli.complexity` reads the command line, :mod:`attention_ref.bench.complexity` measures,
with :mod:`attention_ref.bench.measure`'s timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attention_ref.bench import complexity as sweep
from attention_ref.bench import measure
from attention_ref.cli import complexity

ROW_KEYS = {
    "variant",
    "side",
    "tokens",
    "forward_s",
    "backward_s",
    "peak_bytes",
    "forward_cpu_s",
    "backward_cpu_s",
    "runs",
    "cpu_share",
    "disturbed",
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

    assert report["schema"] == sweep.SCHEMA == "attention_ref.complexity/2"
    assert set(report) == {"schema", "config", "machine", "results"}
    assert report["config"]["quick"] is True and report["config"]["sizes"] == [4, 8, 16]
    assert report["config"]["dim"] == 8 and report["config"]["repeats"] == 1 and report["config"]["min_time"] == 0
    assert report["config"]["threads"] == 1 and report["config"]["blas_limited"] is True  # threadpoolctl is here
    assert report["machine"]["cpu"] and "load_before" in report["machine"]
    rows = {(r["variant"], r["side"]): r for r in report["results"]}
    assert set(rows) == {(v, s) for v in sweep.VARIANTS for s in (4, 8, 16)}
    for (variant, side), row in rows.items():
        assert set(row) == ROW_KEYS
        assert row["tokens"] == side * side
        assert row == {**row, **sweep.theory(variant, side * side, 8, report["config"])}
        if row["skipped"] is None:
            assert row["forward_s"] > 0 and row["backward_s"] > 0 and row["peak_bytes"] > 0
            assert row["forward_cpu_s"] >= 0 and row["backward_cpu_s"] >= 0 and row["runs"] == 1
            assert row["cpu_share"] > 0 and row["disturbed"] == (row["cpu_share"] < measure.DISTURBED_SHARE)
        else:
            assert row["forward_s"] is None and row["peak_bytes"] is None and row["disturbed"] is None

    # what was skipped, and why
    assert rows[("exact", 16)]["skipped"] and "64 tokens" in rows[("exact", 16)]["skipped"]
    assert rows[("neighborhood", 4)]["skipped"] and "does not fit" in rows[("neighborhood", 4)]["skipped"]
    assert rows[("exact", 8)]["skipped"] is None and rows[("window", 4)]["skipped"] is None

    # the N² term shows at 8×8 already: exact attention holds a 64×64 weight matrix, the local variants don't
    assert rows[("exact", 8)]["theory_bytes"] > rows[("neighborhood", 8)]["theory_bytes"]
    assert rows[("exact", 8)]["flops_forward"] == 2 * 64 * 64 * (8 + 8)


def test_theory_grows_quadratically_only_for_exact_and_chunked():
    config = {"window": 8, "shift": 4, "kernel": 7, "block_size": 512}
    for variant in sweep.VARIANTS:
        small = sweep.theory(variant, 64**2, 64, config)["flops_forward"]
        large = sweep.theory(variant, 128**2, 64, config)["flops_forward"]
        assert large / small == (16 if variant in ("exact", "chunked") else 4), variant
    with pytest.raises(ValueError, match="unknown variant"):
        sweep.theory("sparse", 16, 4, config)


def test_bad_arguments_are_rejected(tmp_path):
    cmd = [sys.executable, "-m", "attention_ref", "complexity", "--out", str(tmp_path / "x.json"), "--dim", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and "--dim: must be a positive integer" in result.stderr


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


def test_time_passes_keeps_the_best_run_and_runs_until_min_time():
    calls = []

    def forward(a):
        calls.append("f")
        return a, None

    def backward(dout, cache):
        calls.append("b")

    timings = measure.time_passes(forward, backward, (1,), 1, repeats=2, min_time=0.0)
    assert calls == ["f", "b", "f", "b"] and len(timings["forward_cpu"]) == 2
    # every run fast: repeats until min_time, at most max_runs
    timings = measure.time_passes(forward, backward, (1,), 1, repeats=1, min_time=10.0, max_runs=7)
    assert len(timings["forward_wall"]) == 7
    # runs made later add to the same record
    measure.time_passes(forward, backward, (1,), 1, repeats=2, min_time=0.0, timings=timings)
    row = measure.summarise(timings)
    assert row["runs"] == 9
    assert row["forward_s"] == min(timings["forward_wall"]) and row["backward_cpu_s"] == min(timings["backward_cpu"])


def test_a_run_that_waits_off_the_cpu_is_flagged_disturbed():
    import time

    def forward(a):
        time.sleep(0.02)  # wall time passes, this process's CPU time does not: as when others hold the core
        return a, None

    row = measure.summarise(measure.time_passes(forward, lambda d, c: None, (1,), 1, repeats=3, min_time=0))
    assert row["cpu_share"] < 0.5 and row["disturbed"] is True
    assert row["forward_cpu_s"] < row["forward_s"] / 5  # CPU time leaves out the wait, wall time does not

    def busy(a):
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass
        return a, None

    timings = measure.time_passes(busy, lambda d, c: None, (1,), 1, repeats=3, min_time=0)
    assert measure.summarise(timings)["forward_cpu_s"] >= 0.02


def test_one_thread_sets_and_restores_the_thread_count(monkeypatch):
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "7")
    from attention_ref.backend import thread_count

    with measure.one_thread() as limited:
        assert thread_count() == 1 and limited is True
        from threadpoolctl import threadpool_info

        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert thread_count() == 7
    monkeypatch.delenv("ATTENTION_REF_NUM_THREADS")
    with measure.one_thread():
        pass
    import os

    assert "ATTENTION_REF_NUM_THREADS" not in os.environ


def test_rounds_spread_each_cells_runs_and_min_time_is_checked(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    complexity.add_arguments(parser)
    args = ["--sizes", "4", "8", "--dim", "4", "--window", "4", "--kernel", "3", "--out", str(tmp_path / "c.json")]
    report = complexity.main(parser.parse_args([*args, "--repeats", "2", "--min-time", "0"]))
    assert report["config"]["repeats"] == 2 and report["config"]["min_time"] == 0.0
    assert all(r["runs"] == 2 for r in report["results"] if r["skipped"] is None)
    with pytest.raises(ValueError, match=r"--min-time must be 0 or more seconds; got -1\.0"):
        complexity.main(parser.parse_args([*args, "--min-time", "-1"]))
