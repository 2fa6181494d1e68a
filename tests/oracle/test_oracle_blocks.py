"""check_diffusers_attention: diffusers' Attention processors pass in every dtype; planted module bugs fail."""

from __future__ import annotations

import numpy as np
import pytest
from oracle_modules import PROCESSORS, Attention, AttnProcessor, AttnProcessor2_0, block_case, make_attention, torch

import attention_ref as ar
from attention_ref.testing import BlockCase, block_model, blocks, check_diffusers_attention
from attention_ref.testing.block_model import BlockCall, block_magnitudes, simulated_block
from attention_ref.testing.rounding import RoundingModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
def test_the_simulated_block_without_rounding_is_the_reference_block(cross, monkeypatch):
    # with u = w = 0 every error the model draws is 0: what is left must be the reference block itself
    class Exact(RoundingModel):
        def __init__(self, dtype, rng):
            super().__init__(dtype, rng)
            self.u = self.w = 0.0

    monkeypatch.setattr(block_model, "RoundingModel", Exact)
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
    call = BlockCall(x, context, params, options, dy=dy, context_mask=mask)
    model = simulated_block(call, dtype="float64", rng=rng)
    magnitudes = block_magnitudes(call)
    assert set(model) == set(magnitudes) == {"y", *grads}
    for key, value in {"y": y, **grads}.items():
        # root-sum-squares of the terms: the size of the values, and not 0 where a gradient cancels to 0
        assert magnitudes[key] > 0.1 * np.max(np.abs(value)) and magnitudes[key] > 0.1, key
        np.testing.assert_allclose(model[key], value, rtol=0, atol=1e-12 * max(1.0, np.max(np.abs(value))), err_msg=key)


# ---------------------------------------------------------------- planted bugs in a module


class Detached(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, s):
        return self.inner(s).detach()


def buggy(base, bug):
    """A processor class (a subclass with a name of its own) with one bug."""

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

    return type(f"{base.__name__}With{bug.title().replace(' ', '')}", (base,), {"__call__": __call__})()


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
        make_attention(buggy(AttnProcessor, "scale squared"), cross=False),
        dtype="bfloat16",
        cases=[block_case("map 5×4")],
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


def test_any_processor_class_is_checked_by_its_numbers():
    # a correct processor under a name of its own passes; the same with a bug fails
    class MyFusedAttention(AttnProcessor2_0):
        pass

    report = check_diffusers_attention(make_attention(MyFusedAttention(), cross=True), dtype="float16")
    assert report.ok and "MyFusedAttention" in report.title
    wrong = check_diffusers_attention(make_attention(buggy(MyFusedAttention, "mask ignored"), cross=True))
    assert wrong.failed_cases == ["padded context"] and "MaskIgnored" in wrong.title


def test_a_module_that_raises_gives_failed_rows():
    class Broken(AttnProcessor):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            if hidden_states.shape[-1] * hidden_states.shape[-2] == 1:
                raise RuntimeError("no kernel for a 1×1 map")
            return super().__call__(attn, hidden_states, *args, **kwargs)

    report = check_diffusers_attention(make_attention(Broken(), cross=False))
    assert report.failed_cases == ["one pixel"]
    rows = [c for c in report.checks if c.case == "one pixel"]
    assert {c.output for c in rows} >= {"y", "dx", "dq.weight"}
    assert all("RuntimeError: no kernel for a 1×1 map" in c.note for c in rows)


# ---------------------------------------------------------------- the policy that matches the module's arithmetic


def test_the_block_check_chooses_the_policy_of_the_module_s_arithmetic():
    # AttnProcessor2_0 calls scaled_dot_product_attention (logits and softmax in float32 on every backend): fused;
    # AttnProcessor and SlicedAttnProcessor run baddbmm and softmax in the dtype: eager
    want = {"AttnProcessor": "eager", "AttnProcessor2_0": "fused", "SlicedAttnProcessor": "eager"}
    for name, policy in want.items():
        attn = make_attention(PROCESSORS[name](), cross=True)
        assert blocks.module_policy(attn).arithmetic == policy
        report = check_diffusers_attention(attn, dtype="float16", cases=[block_case("map 5×4")])
        assert report.ok and report.policy == policy and f"{policy} policy" in report.summary()
        assert {c.policy for c in report.checks} == {policy}
    assert blocks.module_policy((None, None)).arithmetic == "eager"  # weights alone say nothing: the wider rule
    # a policy given by name overrides the choice
    forced = check_diffusers_attention(make_attention(AttnProcessor(), cross=True), dtype="float16", policy="fused",
                                       cases=[block_case("map 5×4")])  # fmt: skip
    assert forced.policy == "fused"


class DispatchProcessor:
    """The standard formula through diffusers' dispatch_attention_fn (default backend: torch's SDPA), as the
    diffusion transformers' processors call it: the same arithmetic as AttnProcessor2_0."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        B, C, H, W = hidden_states.shape
        tokens = hidden_states.flatten(2).transpose(1, 2)  # (B, N, C)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        source = tokens if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (p(s).unflatten(-1, (attn.heads, -1)) for p, s in ((attn.to_q, tokens), (attn.to_k, source),
                                                                     (attn.to_v, source)))  # (B, L, heads, d)
        o = dispatch_attention_fn(q, k, v).flatten(2)  # (B, N, inner)
        y = attn.to_out[0](o).transpose(1, 2).reshape(B, -1, H, W)
        return (y + hidden_states if attn.residual_connection else y) / attn.rescale_output_factor


def test_a_processor_calling_dispatch_attention_fn_is_judged_fused_as_the_transformer_judges_do():
    # one rule for every judge: dispatch_attention_fn's default backend is scaled_dot_product_attention
    from attention_ref.testing import transformer_calls

    attn = make_attention(DispatchProcessor(), cross=True)
    assert blocks.module_policy(attn).arithmetic == "fused"
    assert transformer_calls.module_policy is blocks.module_policy
    report = check_diffusers_attention(attn, dtype="float16", cases=[block_case("map 5×4")])
    assert report.ok and report.policy == "fused", str(report)


@pytest.mark.parametrize("processor", ["AttnProcessor", "AttnProcessor2_0"])
def test_large_logits_in_float16_are_judged_by_the_module_s_own_policy(processor):
    # logits near 200 in float16: AttnProcessor rounds them (eager) and passes as eager code; AttnProcessor2_0 keeps
    # them in float32 and passes the tighter fused rule
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8, bias=True, processor=PROCESSORS[processor]())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    report = check_diffusers_attention(attn.eval(), dtype="float16", cases=[block_case("large values")])
    assert report.ok and report.policy == ("fused" if processor == "AttnProcessor2_0" else "eager")
