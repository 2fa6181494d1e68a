"""The benchmark command runs end to end in a tiny quick mode and writes its JSON (no timing is asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import HAS_TORCH

from attention_ref.bench.cases import (
    FULL_MATRIX_LIMIT,
    PARTS,
    SMALL_BATCH,
    SMALL_PARTS,
    case_flops,
    gemm_bound,
    make_inputs,
    ours,
    part_available,
    part_runs_at,
    work,
)
from attention_ref.bench.measure import Device, peak_memory_mib, rss_available
from attention_ref.cli import main


def test_bench_command_writes_every_case(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "16", "36", "--repeats", "1", "--pause", "0", "--retries", "0", "--return-memory"]
    assert main([*argv, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "×torch" in printed and "×limit" in printed and f"wrote {path}" in printed
    assert "# BLAS: " in printed and "# limit, float64 on" in printed
    result = json.loads(path.read_text())
    assert result["config"]["sizes"] == [16, 36] and result["config"]["freed_memory_kept"] is False
    assert "freed memory returned to the OS" in printed
    assert result["machine"]["cores"] >= 1 and "blas" in result["machine"]
    for dtype in ("float64", "float32"):
        limit = result["limits"][dtype]
        best = max(limit["gemm_one_call_flops_per_s"], limit["gemm_side_by_side_flops_per_s"])
        assert limit["gemm_flops_per_s"] == best
        assert limit["gemm_flops_per_s"] > 0 and limit["exp_per_s"] > 0
    impls = {"limit", "ours", "gemm"} | ({"torch"} if HAS_TORCH else set())
    for part in PARTS:
        n = 64 if part in SMALL_PARTS else 36
        for dtype in ("float64", "float32"):
            rows = {r["impl"]: r for r in result["results"] if (r["part"], r["n"], r["dtype"]) == (part, n, dtype)}
            assert set(rows) == impls, (part, dtype)
            mine, limit = rows["ours"], rows["limit"]
            assert mine["total_s"] > 0 and len(mine["runs_fwd_s"]) == 1
            assert mine["other_load"] is None or 0.0 <= mine["other_load"] <= 1.0
            assert mine["peak_method"] == "tracemalloc" and mine["peak_mib"] > 0
            assert mine["total_vs_gemm"] == pytest.approx(mine["total_s"] / rows["gemm"]["total_s"])
            # the limit: the case's flops at the peak GEMM rate plus its exponentials at the exp rate
            rates = result["limits"][dtype]
            want = limit["flops"] / rates["gemm_flops_per_s"] + limit["exps"] / rates["exp_per_s"]
            assert limit["total_s"] == pytest.approx(want) and limit["flops"] == mine["flops"] > 0
            assert mine["total_vs_limit"] == pytest.approx(mine["total_s"] / limit["total_s"])
            if HAS_TORCH:
                assert mine["total_vs_torch"] == pytest.approx(mine["total_s"] / rows["torch"]["total_s"])
                assert rows["torch"]["total_vs_limit"] == pytest.approx(rows["torch"]["total_s"] / limit["total_s"])
        if part in SMALL_PARTS:  # run once, at their own size, not at each N
            assert not any(r["part"] == part and r["n"] != 64 for r in result["results"])
            assert all(r["batch"] == SMALL_BATCH for r in result["results"] if r["part"] == part)
    assert not any("not in this version" in s["reason"] for s in result["skipped"])


def test_quick_mode_without_torch_or_memory(tmp_path, capsys):
    path = tmp_path / "quick.json"
    argv = ["bench", "--quick", "--sizes", "16", "--parts", "plain", "--dtypes", "float32", "--return-memory"]
    assert main([*argv, "--no-torch", "--no-memory", "--pause", "0", "--retries", "0", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["config"]["repeats"] == 3 and not result["config"]["torch"]
    assert {r["impl"] for r in result["results"]} == {"limit", "ours", "gemm"}
    assert all(r["peak_mib"] is None for r in result["results"])


def test_keep_freed_memory_takes_on_glibc():
    """In a child process (the setting lasts for the process): glibc's mallopt accepts both settings."""
    import platform
    import subprocess
    import sys

    code = "from attention_ref.bench.measure import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    libc = platform.libc_ver()[0]
    assert out == ("True" if libc == "glibc" else out), (libc, out)
    assert out in ("True", "False")


def test_parts_that_hold_full_matrices_stop_at_4096():
    assert part_runs_at("plain", FULL_MATRIX_LIMIT) is None
    assert "N = 4096" in part_runs_at("plain", 4 * FULL_MATRIX_LIMIT)
    assert "perfect square" in part_runs_at("block", 1000)


def test_every_part_runs_on_this_version():
    """part_available lets the bench run against older versions side by side; this one has every part."""
    assert all(part_available(p) for p in PARTS)


def test_flops_and_gemm_bound_shapes():
    inputs = make_inputs("plain", 40, 2, 8, "float64")
    fwd, bwd = case_flops(inputs)
    assert (fwd, bwd) == (4 * 2 * 40 * 40 * 8, 8 * 2 * 40 * 40 * 8)
    device = Device.create("numpy")
    gemm = gemm_bound(inputs, device)
    outs = gemm.fwd()  # one list per (head, band group) task
    grads = gemm.bwd(outs)
    assert len(outs) == len(grads) >= 2  # one task per head at least
    assert outs[0][0].shape == (40, 8) and grads[0][0].shape == (40, 8)
    mine = ours(inputs, device)
    out, cache = mine.fwd()
    assert set(mine.bwd((out, cache))) == {"q", "k", "v"}


def test_the_work_of_each_path():
    """Flops and exponentials: the plain path keeps P, the tiled path recomputes S and P in its backward."""
    logits = 2 * 40 * 40  # heads · N · M
    plain = work(make_inputs("plain", 40, 2, 8, "float64"))
    assert (plain.flops_fwd, plain.flops_bwd, plain.exps_fwd, plain.exps_bwd) == (
        4 * logits * 8,
        8 * logits * 8,
        logits,
        0,
    )
    tiled = work(make_inputs("tiled", 40, 2, 8, "float64"))
    assert (tiled.flops_bwd, tiled.exps_bwd) == (10 * logits * 8, logits)
    assert tiled.flops == 14 * logits * 8 and tiled.exps == 2 * logits
    assert work(make_inputs("tiled", 40, 2, 8, "float64"), "gemm").exps == 0
    # the small cross-attention block: 32 maps of 8×8 pixels attending to 16 context tokens, C = 64
    cross = make_inputs("cross-small", 0, 4, 0, "float32")
    assert cross.x.shape == (SMALL_BATCH, 8, 8, 64) and cross.context.shape == (SMALL_BATCH, 16, 64)
    w = work(cross)
    attention = 4 * SMALL_BATCH * 64 * 16 * 64  # 4·N·M·d per head, heads·d = C = 64
    projections = 2 * (2 * SMALL_BATCH * 64 + 2 * SMALL_BATCH * 16) * 64 * 64
    assert (w.flops_fwd, w.flops_bwd) == (attention + projections, 2 * attention + 2 * projections)
    assert (w.exps_fwd, w.exps_bwd) == (SMALL_BATCH * 4 * 64 * 16, 0)


def test_the_small_blocks_and_their_torch_peers_run(capsys):
    device = Device.create("numpy")
    for part in SMALL_PARTS:
        inputs = make_inputs(part, 0, 4, 0, "float32")
        for runner in (ours(inputs, device), gemm_bound(inputs, device)):
            runner.bwd(runner.fwd())
        if HAS_TORCH:
            from attention_ref.bench.peers import torch_runner

            peer = torch_runner(inputs, "cpu")
            peer.bwd(peer.fwd())


def test_peak_memory_sees_numpy_allocations():
    peak = peak_memory_mib(lambda: np.ones((1024, 1024)), "tracemalloc")
    assert 7.9 < peak < 8.5
    with pytest.raises(ValueError, match="unknown"):
        peak_memory_mib(lambda: None, "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        Device.create("jax")


def test_peak_rss_sees_numpy_allocations():
    """The RSS method sees an 8 MiB array being written, in a fresh process.

    In a fresh process, because in this one the C heap may already hold resident pages that earlier
    tests freed, and an array placed in them adds nothing to the resident set (measured: 0.0 MiB after the
    rest of the suite). The child starts with no such pages, so the array's pages are new.
    """
    import subprocess
    import sys

    if not rss_available():  # not Linux: the method says it cannot measure
        assert peak_memory_mib(lambda: np.ones((1024, 1024)), "rss") is None
        return
    code = (
        "import numpy as np\n"
        "from attention_ref.bench.measure import peak_memory_mib\n"
        "print(peak_memory_mib(lambda: np.ones((1024, 1024)), 'rss'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 7.5 < float(out) < 12.0, out


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("part", ["plain", "tiled", "block"])
def test_the_torch_peer_computes_the_same_thing_as_ours(part):
    """The bench's torch side is the same computation (so the times compare like with like)."""
    assert part_available(part)
    from attention_ref.backend import to_numpy
    from attention_ref.bench.peers import torch_runner
    from attention_ref.gradcheck import rel_error

    inputs = make_inputs(part, 16, 2, 16, "float64")
    mine = ours(inputs, Device.create("numpy"))
    peer = torch_runner(inputs, "cpu")
    out, cache = mine.fwd()
    grads = mine.bwd((out, cache))
    t_out = peer.fwd()
    t_grads = peer.bwd(t_out)
    assert rel_error(to_numpy(out), t_out.detach().numpy()) <= 1e-10
    names = ["x", *inputs.params] if part == "block" else ["q", "k", "v"]
    for name, t_grad in zip(names, t_grads, strict=True):
        # on a floor of 1: the gradient of the key bias is 0 in exact arithmetic (softmax ignores a
        # per-row constant), so both sides are rounding noise there
        a, b = to_numpy(grads[name]), t_grad.numpy()
        assert np.max(np.abs(a - b)) <= 1e-10 * max(1.0, np.max(np.abs(b))), name


def test_a_disturbed_case_is_measured_again_and_the_quietest_try_kept(monkeypatch):
    from attention_ref.bench import run

    monkeypatch.setattr(run, "RETRY_WAIT_S", 0)
    loads = iter([0.5, 0.2, 0.3])
    tries = []

    def measure():
        tries.append(1)
        return [{"other_load": next(loads)}]

    logged = []
    best = run._least_noisy(measure, 2, logged.append)
    assert len(tries) == 3 and best[0]["other_load"] == 0.2 and best[0]["attempt"] == 2
    assert len(logged) == 2 and "measuring again" in logged[0]
    quiet = run._least_noisy(lambda: [{"other_load": 0.0}], 2, logged.append)
    assert quiet[0]["attempt"] == 1  # a quiet case is measured once


def test_threads_reach_ours_and_are_restored(tmp_path, monkeypatch):
    """--threads sets ours' thread count and BLAS's for the run, and restores both afterwards."""
    from attention_ref.backend import thread_count
    from attention_ref.bench import cases

    seen = []
    real_ours = cases.ours

    def spy(*args, **kwargs):
        seen.append((thread_count(), _blas_threads()))
        return real_ours(*args, **kwargs)

    monkeypatch.setattr("attention_ref.bench.run.ours", spy)
    monkeypatch.setenv("ATTENTION_REF_NUM_THREADS", "7")
    blas_before = _blas_threads()
    argv = ["bench", "--sizes", "16", "--parts", "plain", "--dtypes", "float32", "--repeats", "1", "--threads", "1"]
    path = tmp_path / "t.json"
    assert main([*argv, "--no-memory", "--pause", "0", "--retries", "0", "--return-memory", "--json", str(path)]) == 0
    assert seen and set(seen) == {(1, 1 if blas_before is not None else None)}
    assert json.loads(path.read_text())["machine"]["threads"] == 1
    assert thread_count() == 7 and _blas_threads() == blas_before


def _blas_threads():
    """NumPy's BLAS thread count (None without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return next((lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"), None)


def test_breakdown_names_every_part_of_the_tiled_path(tmp_path, capsys):
    path = tmp_path / "breakdown.json"
    argv = ["bench", "--breakdown", "--sizes", "256", "--dtypes", "float32", "--block-size", "64", "--repeats", "1"]
    assert main([*argv, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "product dS K_j (dQ)" in printed and "the path, forward + backward" in printed
    (result,) = json.loads(path.read_text())["breakdown"]
    assert result["config"] == {"n": 256, "d": 64, "dtype": "float32", "block": 64, "tiles": 16}
    parts = result["parts"]
    assert len([name for name in parts if name.startswith("product")]) == 6  # S counted twice: 7 per tile
    # the parts and the rest add up to the path's time
    total = sum(p["s"] for p in parts.values()) + result["other_s"]
    assert total == pytest.approx(result["path_s"])
    assert result["limit_s"] == pytest.approx(
        14 * 256 * 256 * 64 / (result["peak_gflops"] * 1e9) + 2 * 256 * 256 * result["exp_ns"] * 1e-9
    )
