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

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = "attention_ref.testing.examples"


def test_check_command_passes_a_correct_implementation(capsys):
    grad = f"{EXAMPLES}:numpy_attention_grad"
    rc = main(["check", f"{EXAMPLES}:numpy_attention", "--grad", grad, "--dtype", "float16"])
    out = capsys.readouterr().out
    assert rc == 0 and "float16" in out and "PASSED" in out
    assert all(name in out for name in CASE_NAMES)


def test_check_command_exits_1_on_failure(capsys):
    rc = main(["check", "oracle_impls:bias_ignored", "--cases", "plain,bias"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED (1 of 2 checks)" in out and "<-- FAIL" in out


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
    assert "expected package.module:function" in err and "no_such_function" in err and "no_such_module" in err


def test_python_dash_m_check_end_to_end():
    cmd = [sys.executable, "-m", "attention_ref", "check", f"{EXAMPLES}:numpy_attention", "--cases", "plain,causal"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "float32: 2 cases, 2 checks — PASSED" in result.stdout
    # a float32 computation does not pass as float64
    result = subprocess.run([*cmd, "--dtype", "float64"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "FAILED (2 of 2 checks)" in result.stdout


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
            # the file's allowed error and reference are the harness's, to the last bit
            assert float(a[f"allowed_{output}"]) == case["allowed"][output] == check.allowed
            error = float(np.max(np.abs(x.astype(np.float64) - a[output])))
            assert error == check.error and error <= check.allowed


def test_vectors_keep_cases_exactly(tmp_path):
    path = write_vectors(tmp_path, "float32", cases=["custom scale", "key padding", "plain"])
    _, cases = load_vectors(path.parent)
    scale, padding, plain = cases
    assert scale["scale"] == 2.5 and plain["scale"] is None and plain["default_scale"]
    assert padding["has_mask"] and padding["arrays"]["mask"].dtype == bool
    assert padding["shapes"]["mask"] == [2, 1, 1, 10] and "bias" not in plain["arrays"]
    with np.load(tmp_path / plain["file"]) as raw:
        assert np.isnan(raw["scale"]) and raw["out"].dtype == np.float64 and raw["q"].dtype == np.float32


def test_the_readme_pytest_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it as a test oracle") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert len(code.strip().splitlines()) <= 10
    code = code.replace(
        "from mykernels import attention, attention_backward",
        f"from {EXAMPLES} import numpy_attention as attention, numpy_attention_grad as attention_backward",
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    for dtype in ("float32", "float16", "bfloat16"):
        namespace["test_attention_matches_the_reference"](dtype)
