"""Memory of a trace: 25 denoising steps of a U-Net with Stable Diffusion 1.5's block layout at a 32×32 latent.

keep="sum" holds one sum per layer, whatever the number of steps: for the 16 cross-attention layers (5 at 32×32,
5 at 16×16, 5 at 8×8, 1 at 4×4 — 6,736 pixels in all), B = 2 (classifier-free guidance), M = 77 tokens and three
self-attention query rows per self-attention layer, in float32:

    2·77·4·6,736 + 2·3·4·6,736 = 4,311,040 bytes (4.1 MiB)

The peak of the process (its resident set's high-water mark, in a fresh interpreter) grows by the maps kept plus one
call's temporaries — at 32×32 the logits (2, 8, 1,024, 77) in float32 are 5 MiB: 24.7 MiB measured on the 2-core
AMD EPYC (Zen 4) development machine (shared). The test allows 48 MiB; computing the full 1,024 × 1,024
self-attention of a 32×32 layer instead of the three rows asked for would take 64 MiB at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
KEPT = 2 * 77 * 4 * 6736 + 2 * 3 * 4 * 6736  # bytes: cross maps + self rows, see the module docstring
PEAK_BOUND = 48 * 2**20

SCRIPT = r"""
import json, resource, torch
from attention_ref.interop import trace
from attention_ref.interop.toy_models import toy_unet

torch.set_num_threads(1)
unet = toy_unet(sample_size=32)
g = torch.Generator().manual_seed(0)
x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)

def steps(first, n):
    with torch.no_grad():
        for i in range(first, first + n):
            unet(x, 1000 - 40 * i, encoder_hidden_states=context)

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

steps(0, 2)  # the model's own high-water mark
before = peak()
with trace(unet, self_queries=[(0.25, 0.25), (0.5, 0.5), (0.75, 0.75)]) as tr:
    steps(0, 1)
    after_one = tr.nbytes
    steps(1, 24)
print(json.dumps({"peak_increase": peak() - before, "kept_1": after_one, "kept_25": tr.nbytes,
                  "calls": sorted({r.calls for r in tr.layers}), "layers": len(tr.layers)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads the resident set's high-water mark (Linux)")
def test_25_steps_at_32x32_stay_within_the_bound():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers"] == 32 and result["calls"] == [25]
    assert result["kept_1"] == result["kept_25"] == KEPT  # bounded: the sum does not grow with the steps
    assert 0 <= result["peak_increase"] <= PEAK_BOUND, result
