"""``python -m attention_ref figures``: the gallery command, in its quick mode."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np

STAGE = re.compile(r"^\[ *(\d+\.\d) s\] (.+)$")


def test_figures_command_quick_writes_at_least_eight_non_blank_figures_and_reports_each_stage(tmp_path):
    out = tmp_path / "figs"
    cmd = [sys.executable, "-m", "attention_ref", "figures", "--quick", "--out", str(out), "--dpi", "40"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        # stderr is a pipe, not a terminal: the first stage's line still comes at once, not at the end
        first = proc.stderr.readline()
        still_running = proc.poll() is None
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert still_running and STAGE.match(first) and "training the long-range toy" in first
    stages = [m for m in (STAGE.match(line) for line in [first, *stderr.splitlines()]) if m]
    elapsed = [float(m.group(1)) for m in stages]
    assert elapsed == sorted(elapsed) and len(stages) >= 9
    told = " | ".join(m.group(2) for m in stages)
    for stage in ("grounding toy trained in", "measuring the attention variants", "drawing the grounding figures"):
        assert stage in told
    assert re.fullmatch(rf"\d+ figures written to {re.escape(str(out))}", stages[-1].group(2))

    lines = [s for s in stdout.splitlines() if ".png: " in s]
    assert len(lines) >= 8
    for line in lines:
        path, caption = line.split(": ", 1)
        assert len(caption) > 20
        img = mpimg.imread(path)[..., :3]
        assert img.std() > 0.05 and len(np.unique(img.reshape(-1, 3).round(2), axis=0)) > 20, path
    numbers = json.loads(stdout[stdout.index("{") :])
    assert set(numbers["iou"]) == {"red", "green", "blue", "square", "circle", "triangle"}
    assert 0.0 <= numbers["partner_attention_init"] <= 1.0
    assert json.loads((out / "complexity.json").read_text())["schema"] == "attention_ref.complexity/2"


def test_figures_help_says_it_rewrites_the_committed_figures():
    result = subprocess.run(
        [sys.executable, "-m", "attention_ref", "figures", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    assert "REWRITES the figures committed with the project" in text
    assert "default: figures, the committed gallery: rewritten" in text
