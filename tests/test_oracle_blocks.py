"""check_diffusers_attention: diffusers' Attention processors pass in every dtype; planted module bugs fail."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.testing import BLOCK_CASES, BlockCase, check_diffusers_attention
from attention_ref.testing.blocks import block_magnitudes, simulated_block

torch = pytest.importorskip("torch", reason="torch is not installed")
if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed", allow_module_level=True)

from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)

PROCESSORS = {
    "AttnProcessor": AttnProcessor,
    "AttnProcessor2_0": AttnProcessor2_0,
    "SlicedAttnProcessor": lambda: SlicedAttnProcessor(slice_size=1),
}


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


# every processor in every low-precision dtype, alternating self- and cross-attention
RUNS = [
    (name, dtype, cross)
    for i, name in enumerate(PROCESSORS)
    for j, dtype in enumerate(["float32", "float16", "bfloat16"])
    for cross in [bool((i + j) % 2)]
]


@pytest.mark.parametrize(
    ("processor", "dtype", "cross"), RUNS, ids=[f"{p}-{d}-{'cross' if c else 'self'}" for p, d, c in RUNS]
)
def test_diffusers_processors_pass(processor, dtype, cross):
    report = check_diffusers_attention(make_attention(PROCESSORS[processor](), cross=cross), dtype=dtype)
    assert report.ok, str(report)
    outputs = {c.output for c in report.checks}
    assert {"y", "dx", "dq.weight", "dk.weight", "dv.weight", "dout.weight", "dq.bias"} <= outputs
    assert ("dcontext" in outputs) == cross and ("dnorm.weight" in outputs) != cross
    assert processor in str(report) and report.worst_ratio() < 0.8


@pytest.mark.parametrize("processor", ["AttnProcessor", "AttnProcessor2_0"])
@pytest.mark.parametrize("seed", [0, 3])
def test_float16_large_logits_pass(processor, seed):
    """Large inputs (|logits| ≈ 200) in float16: the module rounds x W and + b separately (PyTorch's CPU
    half Linear on a non-contiguous input) and Q Kᵀ before scaling it (baddbmm); both are legitimate and
    the rounded model now rounds the same way. These once failed with ratios 1.1-1.7."""
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8, bias=True, processor=PROCESSORS[processor]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    report = check_diffusers_attention(attn.eval(), dtype="float16")  # the "large values" case among them
    assert report.ok, str(report)


def test_float64_and_the_original_module_is_left_alone():
    attn = make_attention(AttnProcessor2_0(), cross=True)
    before = attn.to_q.weight.detach().clone()
    assert check_diffusers_attention(attn, dtype="float64").ok
    assert attn.to_q.weight.dtype == torch.float32 and attn.to_q.weight.grad is None
    assert torch.equal(attn.to_q.weight, before)


@pytest.mark.parametrize("cross", [False, True])
def test_the_rounded_model_is_the_reference_block_without_rounding(cross):
    # in float64 "every op rounded to the dtype" rounds nothing: the model must be the reference block itself
    attn = make_attention(AttnProcessor(), cross=cross).double()
    params, options = ar.interop.from_diffusers(attn)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 16))
    context = rng.standard_normal((2, 5, 12)) if cross else None
    dy = rng.standard_normal((2, 3, 4, 16))
    mask = np.array([[True] * 5, [True, True, False, True, False]]) if cross else None
    if cross:
        y, cache = ar.cross_attention_forward(x, context, params, context_mask=mask, **options)
        grads = ar.cross_attention_backward(dy, cache)
    else:
        y, cache = ar.self_attention_forward(x, params, **options)
        grads = ar.self_attention_backward(dy, cache)
    model = rounded_block(x, context, params, dy, dtype="float64", context_mask=mask, **options)
    magnitudes = block_magnitudes(x, context, params, dy, context_mask=mask, **options)
    assert set(model) == set(magnitudes) == {"y", *grads}
    for key, value in {"y": y, **grads}.items():
        # root-sum-squares of the terms: the size of the values, and not 0 where a gradient cancels to 0
        assert magnitudes[key] > 0.1 * np.max(np.abs(value)) and magnitudes[key] > 0.1, key
        assert model[key].dtype == np.float64
        np.testing.assert_allclose(model[key], value, rtol=0, atol=1e-12 * max(1.0, np.max(np.abs(value))), err_msg=key)


# ---------------------------------------------------------------- planted bugs in a module


class Detached(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, s):
        return self.inner(s).detach()


def buggy(base, bug):
    """A processor class with diffusers' name (so it is recognised) and one bug."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if bug == "mask ignored":
            attention_mask = None
        if bug == "keys detached":
            to_k = attn.to_k
            attn.to_k = Detached(to_k)  # the forward is right, no gradient reaches to_k, nor x through K
            try:
                return base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
            finally:
                attn.to_k = to_k
        if bug == "scale squared":
            attn.scale, old = attn.scale**2, attn.scale
            try:
                return base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
            finally:
                attn.scale = old
        return base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, **kw)

    return type(base.__name__, (base,), {"__call__": __call__})()


def test_a_processor_that_ignores_the_padding_mask_fails():
    report = check_diffusers_attention(make_attention(buggy(AttnProcessor2_0, "mask ignored"), cross=True))
    assert report.failed_cases == ["padded context"]


def test_a_processor_that_cuts_the_key_gradient_fails():
    report = check_diffusers_attention(make_attention(buggy(AttnProcessor, "keys detached"), cross=False))
    failed = {c.output for c in report.failures}
    assert {"dk.weight", "dx"} <= failed and "y" not in failed
    assert "dk.bias" not in failed  # softmax ignores a bias shared by all keys: its exact gradient is 0 anyway


def test_a_processor_with_a_wrong_scale_fails():
    report = check_diffusers_attention(
        make_attention(buggy(AttnProcessor, "scale squared"), cross=False), dtype="bfloat16", cases=BLOCK_CASES[:1]
    )
    assert report.failed_cases == ["map 5×4"] and report.worst_ratio() > 10


def test_block_cases_can_be_chosen():
    mine = BlockCase("tall map", 1, 9, 2)
    report = check_diffusers_attention(make_attention(AttnProcessor(), cross=False), cases=[mine])
    assert report.ok and {c.case for c in report.checks} == {"tall map"}


def test_one_context_token_gives_zero_gradients_and_a_floor_that_does_not_vanish():
    # with one key every weight is 1, so dS = 0 and dq.weight is exactly 0; SDPA's fused backward (D = dO·O)
    # leaves rounding noise there, which the magnitude floor must allow
    attn = make_attention(AttnProcessor2_0(), cross=True)
    report = check_diffusers_attention(attn, cases=[BlockCase("one token", 2, 3, 3, M=1)])
    row = next(c for c in report.checks if c.output == "dq.weight")
    assert row.expected == 0 and row.floor > 0 and report.ok
