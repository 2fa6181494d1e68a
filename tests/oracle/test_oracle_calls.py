"""check_call: one recorded call of a diffusers Attention judged by the block rule (its mask read by the
trace's rule); check_model turns whatever it cannot judge into a row."""

from __future__ import annotations

import pytest
from oracle_modules import Attention, AttnProcessor, AttnProcessor2_0, make_attention, torch

import attention_ref as ar
from attention_ref.testing import check_call, check_diffusers_attention
from attention_ref.testing.torch_wrap import torch_to_numpy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    row = check_call(self_attn, x, output=out, dtype=dtype, name="mid_block.attn")
    assert row.ok and row.case == "mid_block.attn" and row.output == "y" and 0 < row.ratio < 0.5
    wrong = out.clone()
    wrong[1, 3, 2, 1] += 0.05 * wrong.abs().max()
    assert not check_call(self_attn, x, output=wrong, dtype=dtype).ok
    # tokens (B, N, C) with a context and a padding mask, as a transformer block's attn2 is called
    cross = make_attention(AttnProcessor(), cross=True).to(tdtype)
    tokens = torch.randn(2, 15, 16, generator=g).to(tdtype)
    context = torch.randn(2, 7, 12, generator=g).to(tdtype)
    mask = torch.zeros(2, 1, 7, dtype=tdtype)
    mask[1, :, 4:] = -10000.0
    out = record(cross, tokens, context, mask)
    assert check_call(cross, tokens, context, mask, output=out, dtype=dtype).ok
    # the same output judged without the mask it was computed with: the padded tokens were ignored, not attended
    assert not check_call(cross, tokens, context, None, output=out, dtype=dtype).ok


def test_one_recorded_call_takes_converted_params_and_reports_fully_masked_samples():
    cross = make_attention(AttnProcessor(), cross=True)
    g = torch.Generator().manual_seed(2)
    tokens, context = torch.randn(2, 6, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0] = True  # sample 1: every token masked (diffusers does not give 0 there, the reference does)
    out = record(cross, tokens, context, torch.where(mask, 0.0, -10000.0)[:, None])
    row = check_call(ar.interop.from_diffusers(cross), tokens, context, mask, output=out, dtype="float32")
    assert row.ok and "samples [1] have every key masked: not compared" in row.note
    everything = check_call(cross, tokens, context, torch.zeros(2, 7, dtype=torch.bool), output=out,
                                      dtype="float32")  # fmt: skip
    assert not everything.supported and not everything.ok and not everything.failed
    with pytest.raises(NotImplementedError, match="additive bias"):
        check_call(cross, tokens, context, torch.full((2, 7), -1.0), output=out, dtype="float32")


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
    assert check_call(one_head, tokens, context, shared, output=out, dtype="float32").ok
    assert not check_call(one_head, tokens, context, None, output=out, dtype="float32").ok
    for bad in (float("nan"), float("inf")):
        mask = torch.zeros(2, 1, 7)
        mask[1, 0, 3] = bad
        with pytest.raises(ValueError, match=r"attention_mask holds NaN or \+inf"):
            check_call(one_head, tokens, context, mask, output=out, dtype="float32")


def test_one_recorded_call_checks_its_arguments():
    self_attn = make_attention(AttnProcessor2_0(), cross=False).to(torch.bfloat16)
    x = torch.randn(2, 16, 5, 3, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = record(self_attn, x)
    # bfloat16 torch tensors and ml_dtypes bfloat16 arrays are both bfloat16
    assert check_call(self_attn, x, output=out, dtype="bfloat16").ok
    assert check_call(self_attn, torch_to_numpy(x), output=torch_to_numpy(out), dtype="bfloat16").ok
    # inputs in another dtype than the call's would give the reference other values than the module saw
    with pytest.raises(TypeError, match="hidden_states is float32, not bfloat16"):
        check_call(self_attn, x.float(), output=out, dtype="bfloat16")
    with pytest.raises(TypeError, match="hidden_states is bfloat16, not float16"):
        check_call(self_attn, x, output=out, dtype="float16")
    # an output in another dtype is the module's fault: a failed row that says so
    upcast = check_call(self_attn, x, output=out.float(), dtype="bfloat16")
    assert upcast.failed and "dtype float32, expected bfloat16" in upcast.note
    with pytest.raises(ValueError, match=r"output must be \(B, C, H, W\) or \(B, N, C\)"):
        check_call(self_attn, x, output=out[0, 0], dtype="bfloat16")
    with pytest.raises(TypeError, match=r"policy must be .fused., .eager. or a Policy"):
        check_call(self_attn, x, output=out, dtype="bfloat16", policy={"c": 3})
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
    row = check_call(self_attn, tokens, None, allowed, output=out, dtype=dtype)
    assert row.ok and "1 query rows with every key masked: not compared" in row.note
    # every other row is still judged
    wrong = out.clone()
    wrong[1, 3] += 0.05 * wrong.abs().max()
    assert not check_call(self_attn, tokens, None, allowed, output=wrong, dtype=dtype).ok


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
