"""``python -m attention_ref figures``: the gallery command, in its quick mode."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np


def test_figures_command_quick_writes_at_least_eight_non_blank_figures(tmp_path):
    out = tmp_path / "figs"
    result = subprocess.run(
        [sys.executable, "-m", "attention_ref", "figures", "--quick", "--out", str(out), "--dpi", "40"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [s for s in result.stdout.splitlines() if ".png: " in s]
    assert len(lines) >= 8
    for line in lines:
        path, caption = line.split(": ", 1)
        assert len(caption) > 20
        img = mpimg.imread(path)[..., :3]
        assert img.std() > 0.05 and len(np.unique(img.reshape(-1, 3).round(2), axis=0)) > 20, path
    numbers = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(numbers["iou"]) == {"red", "green", "blue", "square", "circle", "triangle"}
    assert 0.0 <= numbers["partner_attention_init"] <= 1.0
    assert json.loads((out / "complexity.json").read_text())["schema"] == "attention_ref.complexity/1"
