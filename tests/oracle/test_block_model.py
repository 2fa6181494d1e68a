"""The block's rounding model takes the map block's options as one mapping, defaulting as the blocks do."""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.testing import block_model
from attention_ref.testing.block_model import BlockCall, block_magnitudes, simulated_block
from attention_ref.testing.rounding import RoundingModel


class _Exact(RoundingModel):
    """Every error the model draws is 0 (u = w = 0): what is left is the reference block itself."""

    def __init__(self, dtype, rng):
        super().__init__(dtype, rng)
        self.u = self.w = 0.0


def _inputs(cross: bool):
    """A 32-channel block (so that the default 32 groups divide it), 2 heads, random weights and inputs."""
    rng = np.random.default_rng(1)
    if cross:
        params = ar.init_cross_attention(32, 12, heads=2, rng=rng)
    else:
        params = ar.init_self_attention(32, heads=2, rng=rng)
    x = rng.standard_normal((2, 2, 3, 32))  # (B, H, W, C)
    context = rng.standard_normal((2, 5, 12)) if cross else None  # (B, M, D)
    dy = rng.standard_normal((2, 2, 3, 32))
    return x, context, params, dy


@pytest.mark.parametrize("cross", [False, True])
def test_options_left_out_default_as_the_blocks_do(cross, monkeypatch):
    monkeypatch.setattr(block_model, "RoundingModel", _Exact)
    x, context, params, dy = _inputs(cross)
    if cross:
        y, cache = ar.cross_attention_forward(x, context, params, heads=2)
        grads = ar.cross_attention_backward(dy, cache)
    else:
        y, cache = ar.self_attention_forward(x, params, heads=2)
        grads = ar.self_attention_backward(dy, cache)
    call = BlockCall(x, context, params, {"heads": 2}, dy=dy)
    model = simulated_block(call, dtype="float64", rng=np.random.default_rng(0))
    assert set(model) == {"y", *grads}
    for key, value in {"y": y, **grads}.items():
        np.testing.assert_allclose(model[key], value, rtol=0, atol=1e-12 * max(1.0, np.max(np.abs(value))), err_msg=key)
    spelled = {"heads": 2, "groups": 32, "eps": 1e-6, "residual": True, "rescale": 1.0, "scale": None}
    assert block_magnitudes(call) == block_magnitudes(BlockCall(x, context, params, spelled, dy=dy))


@pytest.mark.parametrize(
    ("options", "named"),
    [({"heads": 2, "attention": "chunked", "bias": 0.0}, "'attention', 'bias'"), ({"groups": 32}, "'heads'")],
    ids=["unknown-keys", "no-heads"],
)
def test_options_a_map_block_does_not_take_are_refused_by_name(options, named):
    x, _, params, dy = _inputs(cross=False)
    with pytest.raises(ValueError, match=named):
        simulated_block(BlockCall(x, None, params, options, dy=dy), dtype="float16", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=named):
        block_magnitudes(BlockCall(x, None, params, options, dy=dy))
