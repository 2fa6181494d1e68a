"""The diffusers Attention modules the block oracle checks (tests/oracle/test_oracle_blocks.py, test_oracle_calls)."""

from __future__ import annotations

import pytest

from attention_ref.testing import BlockCase, blocks

# imported by a test module, these skip it where torch or diffusers is missing
torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("diffusers", reason="diffusers is not installed")

from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)

__all__ = ["PROCESSORS", "Attention", "AttnProcessor", "AttnProcessor2_0", "block_case", "make_attention", "torch"]

PROCESSORS = {
    "AttnProcessor": AttnProcessor,
    "AttnProcessor2_0": AttnProcessor2_0,
    "SlicedAttnProcessor": lambda: SlicedAttnProcessor(slice_size=1),
}


def block_case(name: str) -> BlockCase:
    return next(c for c in blocks.BLOCK_CASES if c.name == name)


def make_attention(processor, *, cross: bool, seed: int = 0) -> Attention:
    """A small diffusers Attention with every weight random (diffusers zero-initialises none, but biases are 0)."""
    attn = Attention(
        16,
        cross_attention_dim=12 if cross else None,
        heads=2,
        dim_head=8,
        bias=True,
        norm_num_groups=None if cross else 4,
        residual_connection=not cross,
        rescale_output_factor=1.0 if cross else 2.0,
        processor=processor,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            base = 1.0 if name.startswith("group_norm") and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return attn.eval()
