"""attention_ref.testing.check_model: a whole U-Net's attention, call by call. Correct processors pass in three
dtypes; planted bugs (a dropped padding mask, heads merged in the wrong order, a squared scale) fail at exactly
the layers where they are installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor  # noqa: E402

from attention_ref.interop.toy_models import toy_unet  # noqa: E402
from attention_ref.testing import ModelReport, check_model  # noqa: E402

CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
SELF = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BuggyProcessor:
    """Attention written out by hand, with one optional bug: "mask" drops the padding mask, "heads" merges the
    heads d-major instead of head-major, "scale" squares the scale; ``None`` is correct."""

    def __init__(self, bug: str | None = None):
        self.bug = bug

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        B, N, _ = hidden_states.shape
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        heads = attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
        scale = attn.scale**2 if self.bug == "scale" else attn.scale
        logits = scale * q @ k.transpose(-1, -2)  # (B, heads, N, M)
        if attention_mask is not None and self.bug != "mask":
            logits = logits + attention_mask.reshape(B, 1, -1, attention_mask.shape[-1])
        o = logits.softmax(dim=-1) @ v  # (B, heads, N, d)
        if self.bug == "heads":
            o = o.permute(0, 2, 3, 1).reshape(B, N, heads * d)  # channel j·heads + h: wrong
        else:
            o = o.transpose(1, 2).reshape(B, N, heads * d)  # channel h·d + j
        return attn.to_out[1](attn.to_out[0](o))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 9, 32, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False  # the second prompt is padded after 5 tokens
    return (x, 10), {"encoder_hidden_states": context, "encoder_attention_mask": mask}


@pytest.fixture(scope="module")
def unet():
    return toy_unet(sample_size=8, seed=2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "processor",
    [AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(slice_size=3)],
    ids=lambda p: type(p).__name__,
)
def test_diffusers_processors_pass(unet, processor, dtype):
    unet.set_attn_processor(processor)
    args, kwargs = inputs()
    report = check_model(unet, *args, dtype=dtype, **kwargs)
    assert report.ok, report.format(verbose=False)
    assert len(report.rows) == 32 and {r.processor for r in report.rows} == {type(processor).__name__}
    assert next(unet.parameters()).dtype == torch.float32  # the model itself was not cast


@pytest.mark.parametrize(
    ("bug", "where"),
    [("mask", [CROSS, MID]), ("heads", [SELF, CROSS]), ("scale", [SELF])],
)
def test_planted_bugs_fail_exactly_where_installed(unet, bug, where):
    unet.set_attn_processor(AttnProcessor2_0())
    for name in where:
        unet.get_submodule(name).set_processor(BuggyProcessor(bug))
    args, kwargs = inputs(seed=1)
    report = check_model(unet, *args, dtype="float32", **kwargs)
    calls = [r.name for r in report.rows]
    assert report.failed_layers == sorted(where, key=calls.index), report.format(verbose=False)
    assert not report.ok and all(r.ratio > 10 for r in report.failures)
    text = report.format()
    first = text.splitlines()[4 : 4 + len(where)]  # the failing layers come first in the table
    assert all(line.startswith("FAIL") for line in first) and {n for n in where if any(n in ln for ln in first)} == set(
        where
    )
    unet.set_attn_processor(AttnProcessor2_0())


def test_hand_written_correct_processor_passes_in_float16(unet):
    unet.set_attn_processor(BuggyProcessor(None))
    args, kwargs = inputs(seed=2)
    report = check_model(unet, *args, dtype="float16", **kwargs)
    unet.set_attn_processor(AttnProcessor2_0())
    assert report.ok, report.format(verbose=False)


def test_report_rows_shapes_and_text(unet):
    unet.set_attn_processor(AttnProcessor2_0())
    args, kwargs = inputs()
    report = check_model(unet, *args, dtype="float64", title="toy", **kwargs)
    assert isinstance(report, ModelReport) and report.ok
    row = next(r for r in report.rows if r.name == CROSS)
    assert (row.kind, row.call, row.verdict) == ("cross", 0, "ok")
    assert row.hidden_shape == (2, 16, 64) and row.context_shape == (2, 9, 32) and row.output_shape == (2, 16, 64)
    assert row.shapes == "(2, 16, 64), ctx (2, 9, 32) → (2, 16, 64)"
    head = "toy: 32 attention calls in 32 layers, checked in float64 (fused policy) — PASSED"
    assert report.summary().startswith(head)
    assert 0 < report.worst_ratio() <= 1


def test_unsupported_module_is_a_row_and_bad_arguments(unet):
    from diffusers.models.attention_processor import Attention

    model = torch.nn.Sequential(Attention(query_dim=8, heads=2, dim_head=4, qk_norm="l2"))
    report = check_model(model, torch.randn(1, 5, 8))
    assert report.rows[0].verdict == "not supported" and "q/k norms" in report.rows[0].check.note
    assert not report.ok and report.summary().endswith("NOTHING CHECKED; worst ratio 0")
    with pytest.raises(ValueError, match="dtype must be"):
        check_model(unet, dtype="float8")
    with pytest.raises(TypeError, match=r"pipe\.unet"):

        class Pipe:
            unet = None

        check_model(Pipe())
    with pytest.raises(ValueError, match="no diffusers Attention"):
        check_model(torch.nn.Linear(2, 2), torch.randn(1, 2))


def test_a_call_without_hidden_states_is_a_failed_row_not_an_escaped_error():
    from diffusers.models.attention_processor import Attention

    class Wrapper(torch.nn.Module):
        """Calls its Attention with a keyword the hook does not know (through a replaced forward)."""

        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=16, heads=2, dim_head=8)
            forward = self.attn.forward
            self.attn.forward = lambda *, tokens: forward(tokens)

        def forward(self, x):
            return self.attn(tokens=x)

    report = check_model(Wrapper(), torch.randn(1, 5, 16))
    assert [r.name for r in report.rows] == ["attn"] and report.rows[0].check.failed
    assert "TypeError: a call of Attention needs its hidden_states; got ['tokens']" in report.rows[0].check.note


def test_a_policy_must_be_a_policy():
    with pytest.raises(TypeError, match=r"policy must be .fused., .eager. or a Policy"):
        args, kwargs = inputs()
        check_model(toy_unet(), *args, policy={"c": 3}, **kwargs)
