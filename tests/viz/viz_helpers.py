"""What the viz tests share: a figure's pixels, the check that a figure is not blank, and the map size."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
from matplotlib.figure import Figure

H, W = 5, 6


def pixels(fig: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    buffer.seek(0)
    return mpimg.imread(buffer)


def assert_not_blank(fig: Figure) -> None:
    img = pixels(fig)[..., :3]
    assert img.std() > 0.05, "the figure is (nearly) one colour"
    assert len(np.unique(img.reshape(-1, 3).round(2), axis=0)) > 20, "the figure has almost no distinct colours"
