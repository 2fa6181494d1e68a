"""check_model on the diffusion transformers and video U-Nets: the default processors pass in float32, float16 and
bfloat16; a bug planted in one layer (a processor of the kind a kernel engineer writes) fails at exactly that layer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch.nn.functional as F  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, JointAttnProcessor2_0  # noqa: E402
from dit_helpers import flux_masks  # noqa: E402

from attention_ref.interop.toy_transformers import FAMILIES, toy_inputs, toy_model  # noqa: E402
from attention_ref.testing import check_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPECTED_KINDS = {
    "sd3": {"joint"},
    "sd35": {"joint", "self"},
    "flux": {"joint"},
    "pixart": {"self", "cross"},
    "dit": {"self"},
    "sana": {"self", "cross"},
    "wan": {"self", "cross"},
    "svd": {"self", "cross", "temporal"},
    "animatediff": {"self", "cross", "temporal"},
}


@pytest.fixture(scope="module")
def models():
    return {family: toy_model(family) for family in FAMILIES}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_default_processors_pass(models, family, dtype):
    model = models[family]
    args, kwargs = toy_inputs(family, model)
    report = check_model(model, *args, dtype=dtype, **kwargs)
    assert report.ok, report.format(verbose=False)
    assert {r.kind for r in report.rows} == EXPECTED_KINDS[family]
    assert all(r.verdict == "ok" for r in report.rows) and next(model.parameters()).dtype == torch.float32


# ----- planted bugs ----------------------------------------------------------------------------------------------
def _heads(t, heads):
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, L, d)


class SquaredScale(AttnProcessor):
    """diffusers' AttnProcessor with the scale squared."""

    def __call__(self, attn, *args, **kwargs):
        scale = attn.scale
        attn.scale = scale**2
        try:
            return super().__call__(attn, *args, **kwargs)
        finally:
            attn.scale = scale


class KeysTextFirst(JointAttnProcessor2_0):
    """SD3's joint attention with the keys joined text first while queries and values are image first."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        heads = attn.heads
        q, k, v = (_heads(f(hidden_states), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq, ck, cv = (_heads(f(encoder_hidden_states), heads) for f in (attn.add_q_proj, attn.add_k_proj,
                                                                         attn.add_v_proj))  # fmt: skip
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        o = F.scaled_dot_product_attention(torch.cat([q, cq], 2), torch.cat([ck, k], 2), torch.cat([v, cv], 2))
        o = o.transpose(1, 2).flatten(2)
        N = hidden_states.shape[1]
        y, y_ctx = attn.to_out[0](o[:, :N]), o[:, N:]
        return y, (y_ctx if attn.context_pre_only else attn.to_add_out(y_ctx))


class NoKeyNorm(JointAttnProcessor2_0):
    """SD3.5's second attention (one stream) with the key's q/k norm left out."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        o = F.scaled_dot_product_attention(attn.norm_q(q), k, v).transpose(1, 2).flatten(2)
        return attn.to_out[0](o)


def flux_without_key_rope():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, apply_rotary_emb

    class NoKeyRope(FluxAttnProcessor):
        """Flux's attention with RoPE applied to the queries only."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            def split(t):
                return t.unflatten(-1, (attn.heads, -1))  # (B, L, heads, d)

            q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if encoder_hidden_states is not None:
                cq, ck, cv = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj,
                                                                         attn.add_v_proj))  # fmt: skip
                q = torch.cat([attn.norm_added_q(cq), q], 1)
                k = torch.cat([attn.norm_added_k(ck), k], 1)
                v = torch.cat([cv, v], 1)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)  # k is not rotated: the bug
            o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).flatten(2)
            if encoder_hidden_states is None:
                return o
            M = encoder_hidden_states.shape[1]
            return attn.to_out[0](o[:, M:]), attn.to_add_out(o[:, :M])

    return NoKeyRope()


def wan_without_key_norm():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class NoKeyNormWan(WanAttnProcessor):
        """Wan's cross-attention with norm_k left out."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            k = attn.to_k(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).flatten(2)
            return attn.to_out[0](o)

    return NoKeyNormWan()


def sana_key_without_relu():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    class SanaLinearKeyWithoutRelu(SanaLinearAttnProcessor2_0):
        """Sana's linear attention with the key's features not passed through the ReLU."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
            q = F.relu(q.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()  # (B, heads, d, N)
            k = k.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3).float()  # (B, heads, N, d)
            v = F.pad(v.transpose(1, 2).unflatten(1, (attn.heads, -1)).float(), (0, 0, 0, 1), value=1.0)
            o = (v @ k) @ q
            o = (o[:, :, :-1] / (o[:, :, -1:] + 1e-15)).flatten(1, 2).transpose(1, 2).to(hidden_states.dtype)
            return attn.to_out[0](o)

    return SanaLinearKeyWithoutRelu()  # linear attention is told by the processor's name: "SanaLinear…"


PLANTED = {
    "sd3": ("transformer_blocks.1.attn", KeysTextFirst),
    "sd35": ("transformer_blocks.0.attn2", NoKeyNorm),
    "flux": ("single_transformer_blocks.0.attn", flux_without_key_rope),
    "pixart": ("transformer_blocks.1.attn2", SquaredScale),
    "dit": ("transformer_blocks.0.attn1", SquaredScale),
    "sana": ("transformer_blocks.1.attn1", sana_key_without_relu),
    "wan": ("blocks.0.attn2", wan_without_key_norm),
    "svd": ("down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1", SquaredScale),
    "animatediff": ("up_blocks.1.motion_modules.1.transformer_blocks.0.attn2", SquaredScale),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_bug_fails_at_exactly_its_layer(family):
    model = toy_model(family, seed=1)
    where, make = PLANTED[family]
    module = model.get_submodule(where)
    module.set_processor(make())
    args, kwargs = toy_inputs(family, model, seed=2)
    report = check_model(model, *args, dtype="float32", **kwargs)
    assert report.failed_layers == [where], report.format(verbose=False)
    assert all(r.ratio > 10 for r in report.failures), report.format(verbose=False)
    assert report.format().splitlines()[4].startswith("FAIL")  # listed first
    only = check_model(model, *args, dtype="float32", layers=where, **kwargs)
    assert [r.name for r in only.rows] == [where] and not only.ok


class FluxIgnoringTheMask:
    """Flux's attention computed without its attention_mask."""

    def __new__(cls):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        class IgnoresTheMask(FluxAttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                         image_rotary_emb=None):  # fmt: skip
                return super().__call__(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)

        return IgnoresTheMask()


@pytest.mark.parametrize(
    "kind", ["boolean (B, L)", "additive (B, L)", "boolean (B, 1, 1, L)", "boolean per head (heads, L, L)"]
)
def test_flux_calls_with_a_mask_are_judged_as_its_processor_reads_it(models, kind):
    """judge_joint_call reads a Flux call's mask by the processor's rule (one reader with the trace's): the default
    processor passes with it, and one that ignores it fails at every layer."""
    model = models["flux"]
    args, kwargs = toy_inputs("flux", model)
    kwargs["joint_attention_kwargs"] = {"attention_mask": flux_masks(torch.float32)[kind]}
    report = check_model(model, *args, dtype="float32", **kwargs)
    assert report.ok and all(r.verdict == "ok" for r in report.rows), report.format(verbose=False)
    buggy = toy_model("flux")
    for name in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        buggy.get_submodule(name).set_processor(FluxIgnoringTheMask())
    failed = check_model(buggy, *args, dtype="float32", **kwargs)
    assert failed.failed_layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"], failed.format()


def test_layers_and_kinds_in_check_model(models):
    model = models["svd"]
    args, kwargs = toy_inputs("svd", model)
    temporal = check_model(model, *args, layers="temporal", **kwargs)
    assert temporal.rows and {r.kind for r in temporal.rows} == {"temporal"} and temporal.ok
    mid = check_model(model, *args, layers=["mid_block.*", "cross"], **kwargs)
    assert {r.name for r in mid.rows} >= {r.name for r in mid.rows if r.name.startswith("mid_block")}
    assert all(r.name.startswith("mid_block") or r.kind == "cross" for r in mid.rows)
    with pytest.raises(ValueError, match="match no attention module"):
        check_model(model, *args, layers="nowhere.*", **kwargs)


# ----- one call recorded by hand ---------------------------------------------------------------------------------
def _first_calls(model, args, kwargs):
    """``{path: (module, args, kwargs, output)}``: the first call of every attention module the checks know."""
    from attention_ref.testing.model_layers import attention_modules

    calls, handles = {}, []
    for path, module, _, _ in attention_modules(model):

        def hook(module, hook_args, hook_kwargs, output, path=path):
            calls.setdefault(path, (module, hook_args, hook_kwargs, output))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("family", ["sd3", "flux", "wan", "pixart", "sana"])
def test_check_call_judges_a_recorded_call_by_its_modules_family(models, family):
    """check_call takes the arguments a module got, as it got them, and picks the judge of the module's family: every
    first call passes; the same call with its output moved by 5 % of its scale fails."""
    from attention_ref.testing import check_call

    model = models[family]
    calls = _first_calls(model, *toy_inputs(family, model))
    assert calls
    for path, (module, args, kwargs, output) in calls.items():
        row = check_call(module, *args, output=output, dtype="float32", name=path, **kwargs)
        assert row.ok and row.case == path, (path, row)
        y = output[0] if isinstance(output, tuple) else output
        moved = y + 0.05 * y.abs().max() * torch.sign(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)))
        wrong = (moved, *output[1:]) if isinstance(output, tuple) else moved
        assert not check_call(module, *args, output=wrong, dtype="float32", **kwargs).ok, path


def test_check_call_refuses_a_module_it_does_not_know_and_arguments_its_forward_would_not_take(models):
    from attention_ref.testing import check_call

    with pytest.raises(TypeError, match=r"must be \(params, options\) from from_diffusers; got \(int, int, int\)"):
        check_call((1, 2, 3), torch.zeros(1, 2, 4), output=torch.zeros(1, 2, 4), dtype="float32")
    with pytest.raises(TypeError, match="Linear is not an attention module"):
        check_call(torch.nn.Linear(4, 4), torch.zeros(1, 2, 4), output=torch.zeros(1, 2, 4), dtype="float32")
    model = models["flux"]
    module, args, kwargs, output = next(iter(_first_calls(model, *toy_inputs("flux", model)).values()))
    with pytest.raises(TypeError, match="do not fit FluxAttention's forward"):
        check_call(module, *args, None, None, None, None, output=output, dtype="float32", **kwargs)


def test_check_call_reads_a_forward_hidden_behind_a_generic_wrapper(models):
    """A forward replaced by ``(*args, **kwargs)`` without ``__wrapped__``: the positional arguments are named in
    diffusers' order (Flux's fourth is its RoPE tables), and the call is judged as before."""
    from attention_ref.testing import check_call

    model = models["flux"]
    module, args, kwargs, output = next(iter(_first_calls(model, *toy_inputs("flux", model)).values()))
    named = dict(kwargs)
    positional = [named.pop(k, None) for k in ("hidden_states", "encoder_hidden_states", "attention_mask",
                                                "image_rotary_emb")]  # fmt: skip
    positional = list(args) + positional[len(args):]
    original = module.forward

    def generic(*a, **k):
        return original(*a, **k)

    module.forward = generic
    try:
        assert check_call(module, *positional, output=output, dtype="float32", **named).ok
        with pytest.raises(TypeError, match="needs its hidden_states"):
            check_call(module, output=output, dtype="float32", **named)
        with pytest.raises(TypeError, match="at most 4 positional arguments"):
            check_call(module, *positional, None, output=output, dtype="float32", **named)
    finally:
        del module.forward
