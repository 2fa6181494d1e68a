"""check_diffusers_attention: diffusers' Attention processors pass in every dtype; planted module bugs fail."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.testing import BlockCase, block_model, blocks, check_attention_call, check_diffusers_attention
from attention_ref.testing.block_model import block_magnitudes, simulated_block
from attention_ref.testing.rounding import RoundingModel
from attention_ref.testing.torch_wrap import torch_to_numpy

torch = pytest.importorskip("torch", reason="torch is not installed")
if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed", allow_module_level=True)

from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    model = simulated_block(x, context, params, dy, dtype="float64", rng=rng, context_mask=mask, **options)
    magnitudes = block_magnitudes(x, context, params, dy, context_mask=mask, **options)
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


# ---------------------------------------------------------------- one recorded call


def record(attn, x, context=None, mask=None):
    with torch.no_grad():
        kwargs = {"encoder_hidden_states": context, "attention_mask": mask}
        return attn(x, **{k: v for k, v in kwargs.items() if v is not None})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_one_recorded_call_passes_and_a_wrong_output_fails(dtype):
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    self_attn = make_attention(AttnProcessor2_0(), cross=False).to(tdtype)
    x = torch.randn(2, 16, 5, 3, generator=g).to(tdtype)  # (B, C, H, W)
    out = record(self_attn, x)
    row = check_attention_call(self_attn, x, output=out, dtype=dtype, name="mid_block.attn")
    assert row.ok and row.case == "mid_block.attn" and row.output == "y" and 0 < row.ratio < 0.5
    wrong = out.clone()
    wrong[1, 3, 2, 1] += 0.05 * wrong.abs().max()
    assert not check_attention_call(self_attn, x, output=wrong, dtype=dtype).ok
    # tokens (B, N, C) with a context and a padding mask, as a transformer block's attn2 is called
    cross = make_attention(AttnProcessor(), cross=True).to(tdtype)
    tokens = torch.randn(2, 15, 16, generator=g).to(tdtype)
    context = torch.randn(2, 7, 12, generator=g).to(tdtype)
    mask = torch.zeros(2, 1, 7, dtype=tdtype)
    mask[1, :, 4:] = -10000.0
    out = record(cross, tokens, context, mask)
    assert check_attention_call(cross, tokens, context, mask, output=out, dtype=dtype).ok
    # the same output judged without the mask it was computed with: the padded tokens were ignored, not attended
    assert not check_attention_call(cross, tokens, context, None, output=out, dtype=dtype).ok


def test_one_recorded_call_takes_converted_params_and_reports_fully_masked_samples():
    cross = make_attention(AttnProcessor(), cross=True)
    g = torch.Generator().manual_seed(2)
    tokens, context = torch.randn(2, 6, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0] = True  # sample 1: every token masked (diffusers does not give 0 there, the reference does)
    out = record(cross, tokens, context, torch.where(mask, 0.0, -10000.0)[:, None])
    row = check_attention_call(ar.interop.from_diffusers(cross), tokens, context, mask, output=out, dtype="float32")
    assert row.ok and "samples [1] have every key masked: not compared" in row.note
    everything = check_attention_call(cross, tokens, context, torch.zeros(2, 7, dtype=torch.bool), output=out,
                                      dtype="float32")  # fmt: skip
    assert not everything.supported and not everything.ok and not everything.failed
    with pytest.raises(NotImplementedError, match="additive bias"):
        check_attention_call(cross, tokens, context, torch.full((2, 7), -1.0), output=out, dtype="float32")


def test_one_recorded_call_reads_its_mask_by_the_trace_s_rule():
    # one reader (attention_ref.interop.attention_mask): a mask of batch 1 serves every sample — diffusers'
    # AttnProcessor with one head broadcasts it so — and NaN or +inf is a bad mask (ValueError), not a feature
    cross = make_attention(AttnProcessor(), cross=True)
    one_head = Attention(16, cross_attention_dim=12, heads=1, dim_head=16, bias=True, processor=AttnProcessor())
    one_head.load_state_dict(cross.state_dict())  # the same weights as one head of 16
    g = torch.Generator().manual_seed(5)
    tokens, context = torch.randn(2, 6, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    shared = torch.zeros(1, 1, 7)
    shared[..., 5:] = -10000.0
    out = record(one_head, tokens, context, shared)
    assert check_attention_call(one_head, tokens, context, shared, output=out, dtype="float32").ok
    assert not check_attention_call(one_head, tokens, context, None, output=out, dtype="float32").ok
    for bad in (float("nan"), float("inf")):
        mask = torch.zeros(2, 1, 7)
        mask[1, 0, 3] = bad
        with pytest.raises(ValueError, match=r"attention_mask holds NaN or \+inf"):
            check_attention_call(one_head, tokens, context, mask, output=out, dtype="float32")


def test_one_recorded_call_checks_its_arguments():
    self_attn = make_attention(AttnProcessor2_0(), cross=False).to(torch.bfloat16)
    x = torch.randn(2, 16, 5, 3, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = record(self_attn, x)
    # bfloat16 torch tensors and ml_dtypes bfloat16 arrays are both bfloat16
    assert check_attention_call(self_attn, x, output=out, dtype="bfloat16").ok
    assert check_attention_call(self_attn, torch_to_numpy(x), output=torch_to_numpy(out), dtype="bfloat16").ok
    # inputs in another dtype than the call's would give the reference other values than the module saw
    with pytest.raises(TypeError, match="hidden_states is float32, not bfloat16"):
        check_attention_call(self_attn, x.float(), output=out, dtype="bfloat16")
    with pytest.raises(TypeError, match="hidden_states is bfloat16, not float16"):
        check_attention_call(self_attn, x, output=out, dtype="float16")
    # an output in another dtype is the module's fault: a failed row that says so
    upcast = check_attention_call(self_attn, x, output=out.float(), dtype="bfloat16")
    assert upcast.failed and "dtype float32, expected bfloat16" in upcast.note
    with pytest.raises(ValueError, match=r"output must be \(B, C, H, W\) or \(B, N, C\)"):
        check_attention_call(self_attn, x, output=out[0, 0], dtype="bfloat16")
    with pytest.raises(TypeError, match=r"policy must be .fused., .eager. or a Policy"):
        check_attention_call(self_attn, x, output=out, dtype="bfloat16", policy={"c": 3})
    with pytest.raises(TypeError, match=r"policy must be .fused., .eager. or a Policy"):
        check_diffusers_attention(self_attn, dtype="bfloat16", policy={"c": 3})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_recorded_call_leaves_out_single_fully_masked_query_rows(dtype):
    tdtype = getattr(torch, dtype)
    self_attn = make_attention(AttnProcessor(), cross=False).to(tdtype)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 6, 16, generator=g).to(tdtype)  # (B, N, C)
    allowed = torch.rand(2, 6, 6, generator=g) < 0.6
    allowed[:, :, 0] = True
    allowed[1, 2] = False  # sample 1, query 2: every key masked (diffusers does not give 0 there)
    out = record(self_attn, tokens, mask=torch.where(allowed, 0.0, -10000.0).to(tdtype))
    row = check_attention_call(self_attn, tokens, None, allowed, output=out, dtype=dtype)
    assert row.ok and "1 query rows with every key masked: not compared" in row.note
    # every other row is still judged
    wrong = out.clone()
    wrong[1, 3] += 0.05 * wrong.abs().max()
    assert not check_attention_call(self_attn, tokens, None, allowed, output=wrong, dtype=dtype).ok


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


# ---------------------------------------------------------------- check_model: every call becomes a row


def ip_adapter_unet():
    """The toy U-Net with an IP-Adapter: an image projection, and IPAdapterAttnProcessor2_0 on every attn2, which
    receives the context as a (text, [image tokens]) tuple."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    from attention_ref.interop.toy_models import toy_unet

    unet = toy_unet()
    cross = unet.config.cross_attention_dim
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=16, cross_attention_dim=cross, num_image_text_embeds=4)]
    )
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    processors = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        ip = name.endswith("attn2.processor")
        processors[name] = IPAdapterAttnProcessor2_0(module.to_q.in_features, cross) if ip else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return unet


def test_an_ip_adapter_context_is_a_row_not_a_crash():
    # before: AttributeError: 'tuple' object has no attribute 'shape' (testing/check_model.py, building the row)
    from attention_ref.testing import check_model

    g = torch.Generator().manual_seed(0)
    x, context, image = (torch.randn(*s, generator=g) for s in ((2, 4, 8, 8), (2, 9, 32), (2, 1, 16)))
    report = check_model(ip_adapter_unet(), x, 10, encoder_hidden_states=context,
                         added_cond_kwargs={"image_embeds": [image]})  # fmt: skip
    cross = [r for r in report.rows if r.name.endswith("attn2")]
    assert len(report.rows) == 32 and len(cross) == 16 and report.ok
    assert all(r.verdict == "not supported" and "IP-Adapter" in r.check.note for r in cross)
    assert all(r.context_shape == (2, 9, 32) for r in cross)  # the text part's shape
    assert all(r.ok for r in report.rows if r.name.endswith("attn1"))


def test_any_exception_while_building_a_row_is_a_failed_row(monkeypatch):
    import importlib

    check_model_module = importlib.import_module("attention_ref.testing.check_model")  # the module, not the function

    def broken(value):
        raise RuntimeError("no shape today")

    monkeypatch.setattr(check_model_module, "_shape", broken)
    attn = make_attention(AttnProcessor2_0(), cross=False)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x)

    report = check_model_module.check_model(Wrapper(), torch.randn(1, 16, 3, 4))
    row = report.rows[0]
    assert len(report.rows) == 1 and row.failed and "RuntimeError: no shape today" in row.check.note
