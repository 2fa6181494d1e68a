"""Helpers of the trace tests (tests/interop/test_trace*.py): the query positions and a toy U-Net's inputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

QUERIES = [(0.1, 0.9), (0.5, 0.5), (0.99, 0.0)]


def unet_inputs(dtype, *, B=2, side=8, M=7, D=32, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, side, side, generator=g, dtype=dtype)
    ctx = torch.randn(B, M, D, generator=g, dtype=dtype)
    kwargs = {"encoder_hidden_states": ctx}
    if padded:
        mask = torch.ones(B, M, dtype=torch.bool)
        mask[1, M - 3 :] = False  # the second prompt is shorter: its last 3 tokens are padding
        kwargs["encoder_attention_mask"] = mask
    return x, kwargs
