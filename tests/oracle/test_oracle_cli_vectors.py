"""The oracle's command line (check, vectors) and the test vectors read back against the harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HAS_TORCH

from attention_ref.cli import main
from attention_ref.testing import CASE_NAMES, check_attention, load_vectors, write_vectors
from attention_ref.testing.dtypes import numpy_dtype
from attention_ref.testing.examples import numpy_attention, numpy_attention_grad

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = "attention_ref.testing.examples"


def test_check_command_passes_a_correct_implementation(capsys):
    grad = f"{EXAMPLES}:numpy_attention_grad"
    rc = main(["check", f"{EXAMPLES}:numpy_attention", "--grad", grad, "--dtype", "float16"])
    out = capsys.readouterr().out
    n = len(CASE_NAMES)
    assert rc == 0 and f"float16, fused policy: {n} cases, {4 * n} checks — PASSED" in out and "worst ratio: out" in out
    assert "plain" not in out  # by default the summary and the failing rows only: here none
    assert main(["check", f"{EXAMPLES}:numpy_attention", "--grad", grad, "--dtype", "float16", "-v"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CASE_NAMES)  # -v: every row


def test_check_command_exits_1_on_failure_and_prints_the_failing_rows(capsys):
    rc = main(["check", "oracle_impls:bias_ignored", "--cases", "plain,bias"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED (1 of 2 checks, in 1 case)" in out and "<-- FAIL" in out
    rows = [line for line in out.splitlines() if line.startswith(("plain ", "bias "))]
    assert len(rows) == 1 and rows[0].startswith("bias ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "plain,no such case"], "no case named 'no such case'; the battery has: plain, N=1, M=1"),
        (["--cases", ","], "no cases given: nothing would be checked; the battery has: plain"),
        (["--unsupported", "scale"], "unknown features ['scale'] in unsupported; the features are: d != dv, N != M"),
    ],
)
def test_usage_errors_exit_2_with_one_line_naming_what_is_valid(capsys, args, message):
    assert main(["check", f"{EXAMPLES}:numpy_attention", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_a_torch_function_without_torch_flag_is_a_usage_error(capsys):
    assert main(["check", f"{EXAMPLES}:torch_sdpa"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add --torch" in err and "takes torch tensors" in err


def test_more_usage_errors_exit_2_with_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "mykernels.py").write_text(
        "from attention_ref.testing.examples import numpy_attention, numpy_attention_grad\n"
        "def attn_mask_style(q, k, v, *, attn_mask=None, scale=None):\n"
        "    return numpy_attention(q, k, v, mask=attn_mask, scale=scale)\n"
        "def grads_as_dict(q, k, v, dout, **kw):\n"
        "    dq, dk, dv = numpy_attention_grad(q, k, v, dout, **kw)\n"
        "    return {'q': dq, 'k': dk, 'v': dv}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {
        "lacks mask=, bias=: wrap it": ["mykernels:attn_mask_style"],
        "grad_fn returned a dict": [f"{EXAMPLES}:numpy_attention", "--grad", "mykernels:grads_as_dict"],
        "--device says where a torch function runs: it needs --torch": [
            f"{EXAMPLES}:numpy_attention",
            "--device",
            "cpu",
        ],
    }
    if HAS_TORCH:
        runs["takes NumPy arrays, not the torch tensors"] = [f"{EXAMPLES}:numpy_attention", "--torch"]
        import torch

        if not torch.cuda.is_available():
            runs["--device cuda: torch"] = [f"{EXAMPLES}:torch_sdpa", "--torch", "--device", "cuda"]
    for message, args in runs.items():
        assert main(["check", *args, "--cases", "plain"]) == 2, message
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_check_command_policy_layout_and_missing_ok(capsys):
    assert main(["check", "oracle_impls:logits_rounded_to_float16", "--dtype", "float16"]) == 1
    out = capsys.readouterr().out
    assert "fused policy" in out and "fails the fused policy but passes eager" in out
    assert main(["check", "oracle_impls:logits_rounded_to_float16", "--dtype", "float16", "--policy", "eager"]) == 0
    assert "eager policy" in capsys.readouterr().out
    # numpy_attention works on (B, H, N, d), and reads (B, N, H, d) wrongly: its softmax runs over the heads
    layout = ["check", f"{EXAMPLES}:numpy_attention", "--cases", "batch and heads,causal", "--layout"]
    assert main([*layout, "bhnd"]) == 0 and main([*layout, "bnhd"]) == 1
    capsys.readouterr()
    args = ["check", f"{EXAMPLES}:numpy_attention", "--unsupported", "mask"]
    assert main(args) == 1 and "CORE CASES NEVER RAN: masks" in capsys.readouterr().out
    assert main([*args, "--missing-ok", "masks"]) == 0


def test_check_command_masked_rows_option(capsys):
    args = ["check", "oracle_impls:nan_on_fully_masked_rows", "--cases", "fully masked rows"]
    assert main(args) == 1
    assert main([*args, "--masked-rows", "nan-ok"]) == 0
    assert "fully masked rows: nan-ok" in capsys.readouterr().out


def test_check_command_rejects_a_bad_target(capsys):
    assert main(["check", "numpy_attention"]) == 2
    assert main(["check", f"{EXAMPLES}:no_such_function"]) == 2
    assert main(["check", "no_such_module:f"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "expected package.module:function" in err and "no_such_module" in err
    assert "has no 'no_such_function'; its callables: numpy_attention, numpy_attention_grad, torch_mha" in err


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_check_command_reads_a_peers_declared_unsupported_cases(capsys):
    assert main(["check", f"{EXAMPLES}:torch_mha", "--torch", "--cases", "plain,custom scale", "-v"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 cases ran (1 not supported)" in out and "not supported: custom scale" in out


def test_python_dash_m_check_end_to_end():
    cmd = [sys.executable, "-m", "attention_ref", "check", f"{EXAMPLES}:numpy_attention", "--cases", "plain,causal"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "float32, fused policy: 2 cases, 2 checks — PASSED" in result.stdout and not result.stderr
    # a float32 computation does not pass as float64
    result = subprocess.run([*cmd, "--dtype", "float64"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "FAILED (2 of 2 checks, in 2 cases)" in result.stdout


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_check_command_with_torch(capsys):
    assert main(["check", f"{EXAMPLES}:torch_sdpa", "--torch", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "PASSED" in out and "worst ratio: out" in out and " dq " in out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_vectors_agree_with_the_harness(tmp_path, capsys, dtype):
    assert main(["vectors", "--out", str(tmp_path), "--dtype", dtype]) == 0
    assert "index.json" in capsys.readouterr().out
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["dtype"] == dtype and [e["name"] for e in index["cases"]] == list(CASE_NAMES)
    assert "NumPy's rules" in index["broadcasting"] and "from the right" in index["broadcasting"]
    dead = {e["name"]: e["fully_masked_rows"] for e in index["cases"] if e["fully_masked_rows"]}
    assert dead == {"fully masked rows": 4, "mask+bias+scale": 12}
    assert all(("fully masked rows" in e["features"]) == (e["name"] in dead) for e in index["cases"])
    assert len(list(tmp_path.glob("*.npz"))) == len(CASE_NAMES)

    index, cases = load_vectors(tmp_path)
    report = check_attention(numpy_attention, grad_fn=numpy_attention_grad, dtype=dtype)
    by_key = {(c.case, c.output): c for c in report.checks}
    for case in cases:
        a = case["arrays"]
        assert a["q"].dtype == numpy_dtype(dtype)
        kw = {"mask": a.get("mask"), "bias": a.get("bias"), "scale": case["scale"]}
        got = {"out": numpy_attention(a["q"], a["k"], a["v"], **kw)}
        got.update(zip(("dq", "dk", "dv"), numpy_attention_grad(a["q"], a["k"], a["v"], a["dout"], **kw), strict=True))
        for output, x in got.items():
            check = by_key[(case["name"], output)]
            # the file's allowed errors and reference are the harness's, to the last bit: the index's figure is the
            # largest of the per-entry array, and the harness's row is judged against the same numbers
            allowed = a[f"allowed_{output}"]
            assert allowed.shape == a[output].shape and float(np.max(allowed)) == case["allowed"][output]
            # the pass rule as the index states it, computed with nextafter as another language would
            x64 = x.astype(np.float64)
            spacing = np.nextafter(np.abs(x), np.array(np.inf, x.dtype)).astype(np.float64) - np.abs(x64)
            excess = np.maximum(np.abs(x64 - a[output]) - spacing / 2, 0.0)
            assert np.all(excess <= allowed) and check.ok
            where = tuple(check.where)
            assert excess[where] == check.error and allowed[where] == check.allowed


def test_vectors_name_their_policy(tmp_path, capsys):
    assert main(["vectors", "--out", str(tmp_path), "--dtype", "float16", "--cases", "large logits",
                 "--policy", "eager"]) == 0  # fmt: skip
    assert "(eager policy)" in capsys.readouterr().out
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == 2 and index["policy"]["arithmetic"] == "eager" and "spacing" in index["pass_rule"]
    eager = index["cases"][0]["allowed"]["out"]
    write_vectors(tmp_path, "float16", cases=["large logits"])
    fused = json.loads((tmp_path / "index.json").read_text())["cases"][0]["allowed"]["out"]
    assert eager > 5 * fused  # logits stored in float16 near 500 move by 0.25


def test_vectors_keep_cases_exactly(tmp_path):
    path = write_vectors(tmp_path, "float32", cases=["custom scale", "key padding", "plain"])
    _, cases = load_vectors(path.parent)
    by_name = {c["name"]: c for c in cases}
    scale, padding, plain = by_name["custom scale"], by_name["key padding"], by_name["plain"]
    assert scale["scale"] == 2.5 and plain["scale"] is None and plain["default_scale"]
    assert padding["has_mask"] and padding["arrays"]["mask"].dtype == bool
    assert padding["shapes"]["mask"] == [2, 1, 1, 10] and "bias" not in plain["arrays"]
    with np.load(tmp_path / plain["file"]) as raw:
        assert np.isnan(raw["scale"]) and raw["out"].dtype == np.float64 and raw["q"].dtype == np.float32


def test_the_docs_pytest_example_runs():
    text = (ROOT / "docs" / "oracle.md").read_text()
    code = text[text.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert len(code.strip().splitlines()) <= 10
    code = code.replace(
        "from mykernels import attention, attention_backward",
        f"from {EXAMPLES} import numpy_attention as attention, numpy_attention_grad as attention_backward",
    )
    namespace: dict = {}
    exec(compile(code, "docs/oracle.md", "exec"), namespace)
    for dtype in ("float32", "float16", "bfloat16"):
        namespace["test_attention_matches_the_reference"](dtype)
