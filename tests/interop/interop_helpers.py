"""Helpers of the loader tests (tests/interop/test_interop*.py): random weights, channels-last maps, leaf tensors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

TOL = 1e-9  # every peer agrees with the reference to ~1e-15 in float64; 1e-9 relative is the bound asserted


def randomise(module, seed, std=0.4):
    """Every parameter of ``module`` drawn from N(0, std²), norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def channels_last(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def leaf(rng, shape):
    return torch.tensor(rng.standard_normal(shape), requires_grad=True)
