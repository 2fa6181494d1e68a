"""attention_ref.interop.trace on the diffusion transformers and video U-Nets: maps equal to the weights the model
computes (an independent probe on torch's scaled_dot_product_attention), patch grids, temporal layers kept apart,
layers=, a trace that records nothing says why, pipelines with .transformer, IP-Adapter's parts, verify=."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0  # noqa: E402
from dit_helpers import flux_masks  # noqa: E402

from attention_ref.interop import trace  # noqa: E402
from attention_ref.interop.toy_models import toy_unet  # noqa: E402
from attention_ref.interop.toy_transformers import toy_inputs, toy_model  # noqa: E402
from attention_ref.interop.trace import TraceWarning  # noqa: E402
from attention_ref.interop.trace.weights import softmax_rows  # noqa: E402
from attention_ref.testing.sdpa_probe import (  # noqa: E402
    compare_with_trace,
    diffusers_in_the_models_dtype,
    sdpa_probe,
)

QUERIES = [(0.1, 0.9), (0.5, 0.5), (0.99, 0.0)]
SOFTMAX_FAMILIES = ["pixart", "dit", "sana", "svd", "animatediff"]
JOINT_FAMILIES = ["sd3", "sd35", "flux", "wan"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def all_hooks(model):
    return {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called))
        for name, m in model.named_modules()
    }


def probed(family, precision, *, in_float64=False, **trace_options):
    """The family's toy model run once under the probe and a trace (every head, every call)."""
    model = toy_model(family)
    model = model.double() if precision == "float64" else model
    args, kwargs = toy_inputs(family, model)
    options = {"self_queries": QUERIES, "heads": "all", "keep": "all", "dtype": precision, **trace_options}
    patched = diffusers_in_the_models_dtype() if in_float64 else contextlib.nullcontext()
    with patched, torch.no_grad(), sdpa_probe(model) as probe, trace(model, **options) as tr:
        model(*args, **kwargs)
    return tr, probe


# ----- exactness against the model's own weights -----------------------------------------------------------------
@pytest.mark.parametrize(("precision", "tol"), [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_maps_equal_the_models_own_weights(family, precision, tol):
    tr, probe = probed(family, precision)
    differences = compare_with_trace(tr, probe)
    assert differences and max(differences.values()) <= tol, differences
    kinds = {r.kind for r in tr.layers}
    expected = {"pixart": {"self", "cross"}, "dit": {"self"}, "sana": {"self", "cross"}}
    assert kinds == expected.get(family, {"self", "cross", "temporal"})
    for r in tr.layers:
        assert r.maps.dtype == np.dtype(precision)
        if r.kind in ("cross", "temporal") or family != "sana":
            total = r.maps.sum(axis=-1) if r.kind != "self" else r.maps.sum(axis=(-2, -1))
            np.testing.assert_allclose(total, 1.0, atol=1e-5)  # a softmax's rows


@pytest.mark.parametrize("family", JOINT_FAMILIES)
def test_joint_and_rope_families_equal_the_models_own_weights(family):
    """float64 within 1e-12 once diffusers computes in float64 throughout; as diffusers ships, SD3.5's RMSNorm
    and Flux's RoPE round q and k to float32 even in a float64 model, and the maps agree to that rounding."""
    tr, probe = probed(family, "float64", in_float64=True)
    exact = compare_with_trace(tr, probe, text_first=family == "flux")
    assert max(exact.values()) <= 1e-12, exact
    tr32, probe32 = probed(family, "float32")
    single = compare_with_trace(tr32, probe32, text_first=family == "flux")
    assert max(single.values()) <= 1e-5, single
    tr_shipped, probe_shipped = probed(family, "float64")
    shipped = compare_with_trace(tr_shipped, probe_shipped, text_first=family == "flux")
    assert max(shipped.values()) <= (1e-5 if family in ("sd35", "flux") else 1e-12), shipped
    if family in ("sd3", "flux"):  # every joint layer: the text part and the self rows
        assert {r.kind for r in tr.layers} == {"joint", "self"}
        assert all(r.part == "self" for r in tr.layers if r.kind == "self")
    if family == "sd35":  # the first block's attn2: self-attention of the image tokens, rows summing to 1
        attn2 = tr.layer("transformer_blocks.0.attn2")
        assert attn2.kind == "self" and attn2.part is None
        np.testing.assert_allclose(attn2.maps.sum(axis=(-2, -1)), 1, atol=1e-12)
    for r in tr.layers:
        assert r.grid == (4, 6)
        if r.kind == "joint":  # the share read from the text: between 0 and 1, and the self rows read the rest
            share = r.maps.sum(axis=-1)
            assert np.all((share > 0) & (share < 1))
    if family == "flux":
        assert {r.name for r in tr.layers} == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}


@pytest.mark.parametrize(
    "kind",
    [
        "boolean (B, 1, 1, L)",
        "additive (B, L)",
        "additive -inf (B, 1, 1, L)",
        "boolean per head (heads, L, L)",
        "bias per query (1, 1, L, L)",
    ],
)
def test_flux_masks_are_read_as_its_processor_reads_them(kind):
    """A Flux call's attention_mask goes to scaled_dot_product_attention as it is: a (B, L) key mask per sample, any
    other shape broadcast to (B, heads, L, L); boolean or added to the logits. The maps equal the model's own."""
    model = toy_model("flux").double()
    args, kwargs = toy_inputs("flux", model)
    kwargs["joint_attention_kwargs"] = {"attention_mask": flux_masks(torch.float64)[kind]}
    options = {"self_queries": QUERIES, "heads": "all", "keep": "all", "dtype": "float64"}
    with diffusers_in_the_models_dtype(), torch.no_grad(), sdpa_probe(model) as probe, trace(model, **options) as tr:
        model(*args, **kwargs)
    differences = compare_with_trace(tr, probe, text_first=True)
    assert {r.kind for r in tr.layers} == {"joint", "self"}
    assert max(differences.values()) <= 1e-12, differences
    if kind.startswith("boolean (B"):  # sample 1's padded words get no weight
        joint = tr.layer("transformer_blocks.0.attn")
        assert np.all(joint.maps[:, 1, ..., 4:7] == 0) and np.all(joint.maps[:, 0, ..., 4:7] > 0)


def test_flux_masks_that_do_not_broadcast_are_refused_by_name():
    model = toy_model("flux")
    args, kwargs = toy_inputs("flux", model)
    kwargs["joint_attention_kwargs"] = {"attention_mask": torch.ones(3, 1, 31, dtype=torch.bool)}  # 3 ≠ heads
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn: attention_mask of shape \(3, 1, 31\) does not "
                       r"broadcast to \(B, heads, N, M\) = \(2, 2, 31, 31\)"), trace(model) as _:  # fmt: skip
        model(*args, **kwargs)


def test_joint_weights_are_the_reference_blocks():
    """The trace's chain for a joint layer is joint_attention_forward's: its cache.weights, text columns."""
    from attention_ref.blocks import joint_attention_forward
    from attention_ref.interop.dit import from_diffusers_joint

    model = toy_model("sd35").double()
    args, kwargs = toy_inputs("sd35", model)
    inputs = {}
    attn = model.transformer_blocks[0].attn

    def keep(module, a, k):
        inputs.update(k)

    handle = attn.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad(), trace(model, self_queries="all", heads="all", dtype="float64", layers="*.0.attn") as tr:
        model(*args, **kwargs)
    handle.remove()
    params, options = from_diffusers_joint(attn)
    x, c = (inputs[k].numpy() for k in ("hidden_states", "encoder_hidden_states"))
    _, cache = joint_attention_forward(x, c, params, **options)
    N = x.shape[1]
    joint, rows = tr.layer("transformer_blocks.0.attn"), tr.layer("transformer_blocks.0.attn[self]")
    np.testing.assert_allclose(joint.maps.reshape(2, 2, N, -1), cache.weights[:, :, :N, N:], rtol=0, atol=1e-15)
    np.testing.assert_allclose(rows.maps.reshape(2, 2, N, N), cache.weights[:, :, :N, :N], rtol=0, atol=1e-15)


def test_joint_layers_in_token_maps_and_the_explorer():
    pytest.importorskip("matplotlib")
    tr, _ = probed("sd3", "float32", heads="mean", keep="sum")
    maps = tr.token_maps(normalize="sum")
    joint = [r for r in tr.layers if r.kind == "joint"]
    assert maps.shape == (2, 7, 4, 6) and len(joint) == 2
    np.testing.assert_allclose(maps, sum(np.moveaxis(r.maps, -1, 1) for r in joint), atol=1e-6)
    page = tr.explorer(batch=1)
    assert [layer.kind for layer in page.layers] == ["cross", "self", "cross", "self"]
    assert page.layers[0].name == "transformer_blocks.0.attn (joint: text part)"


def test_patch_grids_and_video_layers_are_spatial_maps():
    """PixArt's 8×12 latent in 2×2 patches is a 4×6 grid; a video U-Net's spatial layers have B·F samples."""
    tr, _ = probed("pixart", "float32")
    assert {r.grid for r in tr.layers} == {(4, 6)}
    tr, _ = probed("svd", "float32")
    spatial = [r for r in tr.layers if r.kind != "temporal"]
    assert spatial and all(r.batch == 2 * 3 for r in spatial)  # 2 videos of 3 frames
    temporal = [r for r in tr.layers if r.kind == "temporal"]
    assert temporal and all(r.batch == 2 and r.frames == 3 and r.queries == 3 for r in temporal)
    assert {r.keys for r in temporal} == {3, 1}  # frames, and the image context of SVD's temporal attn2


@pytest.mark.parametrize(("patch", "grid"), [(1, (8, 8)), (4, (2, 2))])
def test_any_patch_size_gives_the_patch_grid(patch, grid):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    config = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8}
    model = DiTTransformer2DModel(**config, num_layers=1, sample_size=8, patch_size=patch, num_embeds_ada_norm=10)
    args, kwargs = toy_inputs("dit", model.eval())
    options = {"self_queries": QUERIES, "heads": "all", "keep": "all"}
    with torch.no_grad(), sdpa_probe(model) as probe, trace(model, **options) as tr:
        model(*args, **kwargs)
    assert [r.grid for r in tr.layers] == [grid]
    assert max(compare_with_trace(tr, probe).values()) <= 1e-5


def test_temporal_attention_is_never_a_spatial_map_when_frames_equal_pixels():
    """4 frames at a 2×2 map: (B·H·W, F, C) has the shape of (B·F, H·W, C); the block it sits in decides."""
    model = toy_model("svd")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 2, 2, generator=g)
    with torch.no_grad(), trace(model, self_queries=[(0.5, 0.5)]) as tr:
        model(x, torch.tensor([500.0]), torch.randn(1, 1, 24, generator=g), torch.randn(1, 3, generator=g))
    for r in tr.layers:
        assert (r.kind == "temporal") == (".temporal_transformer_blocks." in r.name), (r.label, r.kind)
    assert tr.token_maps().shape == (4, 1, 2, 2)  # only the spatial cross layers, over 1 token
    with pytest.raises(ValueError, match="no map of pixels"):
        next(r for r in tr.layers if r.kind == "temporal").explorer_layer()


def test_chunked_softmax_equals_one_piece():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 37, 8)), rng.standard_normal((2, 3, 11, 8))
    mask = rng.random((2, 1, 37, 11)) > 0.3
    bias = rng.standard_normal((2, 1, 1, 11))
    whole = softmax_rows(q, k, 0.3, bias=bias, mask=mask)
    rows = softmax_rows(q, k, 0.3, bias=bias, mask=mask, chunk_bytes=1)  # one row at a time
    np.testing.assert_allclose(rows, whole, rtol=0, atol=1e-15)
    kept = softmax_rows(q, k, 0.3, bias=bias, mask=mask, columns=slice(4, 9), chunk_bytes=5 * 2 * 3 * 11 * 8,
                        reduce=lambda p: p.mean(axis=1))  # fmt: skip
    np.testing.assert_allclose(kept, whole[..., 4:9].mean(axis=1), rtol=0, atol=1e-15)
    # peaked rows: weights far below the dtype's tiniest normal number are as torch's own softmax gives them
    big = torch.from_numpy(40 * q).float(), torch.from_numpy(40 * k).float()
    exact = torch.softmax(0.3 * big[0].double() @ big[1].double().transpose(-1, -2), dim=-1)
    peaked = softmax_rows(*big, 0.3)
    assert float(exact.min()) < 1e-60 and float((peaked.double() - exact).abs().max()) < 1e-6
    assert float(peaked.min()) >= 0 and float((peaked.double() - exact).abs()[exact < 1e-40].max()) < 2e-35


# ----- outputs unchanged, hooks removed --------------------------------------------------------------------------
@pytest.mark.parametrize("family", SOFTMAX_FAMILIES + JOINT_FAMILIES)
def test_outputs_bitwise_unchanged_and_hooks_removed(family):
    model = toy_model(family)
    args, kwargs = toy_inputs(family, model, seed=3)
    before = all_hooks(model)
    with torch.no_grad():
        plain = model(*args, **kwargs)[0]
        with trace(model, self_queries=QUERIES, verify=family == "pixart") as tr:
            traced = model(*args, **kwargs)[0]
    assert torch.equal(plain, traced) and all_hooks(model) == before and tr.layers
    with pytest.raises(RuntimeError, match="inside"):
        with trace(model, self_queries=QUERIES):
            raise RuntimeError("inside")
    assert all_hooks(model) == before


# ----- layers=, and a trace that records nothing -----------------------------------------------------------------
def test_dit_default_trace_says_why_it_recorded_nothing():
    model = toy_model("dit")
    args, kwargs = toy_inputs("dit", model)
    why = r"recorded no layer: 2 attention layers were called \(2 self\);.*self_queries"
    with pytest.warns(TraceWarning, match=why):
        with torch.no_grad(), trace(model) as tr:
            model(*args, **kwargs)
    assert tr.layers == [] and "self_queries" in tr.summary()
    with pytest.warns(TraceWarning, match="not called inside the with block"):
        with trace(model):
            pass


def test_layers_by_name_glob_kind_and_predicate():
    model = toy_model("pixart")
    args, kwargs = toy_inputs("pixart", model)

    def names(**options):
        with torch.no_grad(), trace(model, self_queries=QUERIES, **options) as tr:
            model(*args, **kwargs)
        return [r.label for r in tr.layers]

    everything = names()
    assert len(everything) == 4
    assert names(layers="transformer_blocks.1.*") == ["transformer_blocks.1.attn1", "transformer_blocks.1.attn2"]
    assert names(layers="cross") == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert names(layers=["transformer_blocks.0.attn1", "cross"]) == everything[:2] + everything[3:]
    assert names(layers=lambda name, kind: kind == "self" and name.startswith("transformer_blocks.1")) == [
        "transformer_blocks.1.attn1"
    ]
    with pytest.raises(ValueError, match=r"\['down_blocks\.\*'\] match no attention module"):
        trace(model, layers="down_blocks.*").__enter__()
    with pytest.raises(ValueError, match="give self_queries"):
        trace(model, layers="self").__enter__()
    with pytest.raises(TypeError, match="layers must be"):
        trace(model, layers=[3])
    with pytest.warns(TraceWarning, match="chose none of the called layers"):
        with torch.no_grad(), trace(model, layers=lambda name, kind: False):
            model(*args, **kwargs)
    assert all_hooks(model) == all_hooks(toy_model("pixart"))


def test_select_reads_globs_and_kinds():
    tr, _ = probed("svd", "float32")
    assert [r.label for r in tr.select("temporal")] == [r.label for r in tr.layers if r.kind == "temporal"]
    mid = "mid_block.attentions.0"
    expected = [tr.layer(f"{mid}.transformer_blocks.0.attn2"), tr.layer(f"{mid}.temporal_transformer_blocks.0.attn2")]
    assert tr.select("mid_block.*.attn2") == expected
    with pytest.raises(KeyError, match="no traced layer"):
        tr.select("nowhere.*")


# ----- pipelines ---------------------------------------------------------------------------------------------------
def test_a_pipeline_with_a_transformer_is_traced():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    transformer = toy_model("dit")
    torch.manual_seed(1)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
    vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, **blocks).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe, self_queries=[(0.5, 0.5)], keep="all") as tr:
        pipe(class_labels=[1], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    assert len(tr.timesteps) == 2 and [r.calls for r in tr.layers] == [2, 2] and tr.layers[0].grid == (4, 4)

    class Both:
        def __init__(self):
            self.unet, self.transformer = toy_unet(sample_size=8), transformer

    with pytest.raises(TypeError, match=r"both \.unet and \.transformer"):
        trace(Both())


# ----- IP-Adapter ------------------------------------------------------------------------------------------------
def ip_unet(scale=0.7, processor=IPAdapterAttnProcessor2_0):
    unet = toy_unet(sample_size=8, seed=3).double()
    torch.manual_seed(4)
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and name.endswith("attn2"):
            p = processor(m.to_q.out_features, 32, num_tokens=(4,), scale=scale).double()
            m.set_processor(p)
    return unet


def ip_inputs():
    g = torch.Generator().manual_seed(0)
    x, ctx, ip = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 4, 8, 8), (2, 7, 32), (2, 4, 32)))
    return x, ctx, ip


def test_ip_adapter_parts_each_with_its_own_softmax_and_the_appended_layout():
    unet = ip_unet()
    x, ctx, ip = ip_inputs()
    with torch.no_grad(), sdpa_probe(unet) as probe, trace(unet, heads="all", keep="all", dtype="float64") as tr:
        y = unet(x, 5, encoder_hidden_states=(ctx, [ip])).sample
    assert len(tr.layers) == 32 and len({r.name for r in tr.layers}) == 16
    differences = compare_with_trace(tr, probe)
    assert max(differences.values()) <= 1e-12, differences
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    text, image = tr.layer(name), tr.layer(f"{name}[ip0]")
    assert (text.keys, image.keys, image.part) == (7, 4, "ip0")
    np.testing.assert_allclose(text.maps.sum(-1), 1, atol=1e-12)
    np.testing.assert_allclose(image.maps.sum(-1), 1, atol=1e-12)  # a softmax of its own, not over 11 tokens
    assert tr.token_maps().shape == (2, 7, 8, 8)  # the text tokens; the image part only when chosen
    assert tr.token_maps(layers="*[[]ip0]").shape == (2, 4, 8, 8)
    # the older layout: the image tokens appended to the text, split by the processor and by the trace alike
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You have passed a tensor as `encoder_hidden_states`", FutureWarning)
        with torch.no_grad(), trace(unet, heads="all", keep="all", dtype="float64") as appended:
            y2 = unet(x, 5, encoder_hidden_states=torch.cat([ctx, ip], dim=1)).sample
    assert torch.equal(y, y2)
    for a, b in zip(tr.layers, appended.layers, strict=True):
        assert a.label == b.label
        np.testing.assert_allclose(a.maps, b.maps, rtol=0, atol=1e-15)  # a sliced context sums in another order


def test_ip_adapter_image_part_not_traced_is_said_and_never_aborts():
    x, ctx, ip = ip_inputs()
    unet = ip_unet(scale=0.0)
    with torch.no_grad(), trace(unet, dtype="float64") as tr:
        unet(x, 5, encoder_hidden_states=(ctx, [ip]))
    assert len(tr.layers) == 16 and all(r.part is None for r in tr.layers)
    assert "scale 0" in tr.summary()
    unet = toy_unet(sample_size=8, seed=3).double()  # the standard processor: it cannot take a (text, image) pair
    attn = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")

    class TextOnly(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states[0], *args, **kwargs)

    attn.set_processor(TextOnly())
    with torch.no_grad(), trace(attn) as one:
        attn(torch.randn(1, 128, 2, 2, dtype=torch.float64), encoder_hidden_states=(ctx[:1], [ip[:1]]))
    assert len(one.layers) == 1 and (one.layers[0].kind, one.layers[0].keys) == ("cross", 7)  # the text part
    assert "not an IP-Adapter processor" in one.summary()


# ----- verify= ---------------------------------------------------------------------------------------------------
class Reweighting(AttnProcessor2_0):
    """A prompt-to-prompt style edit: token 2's weight tripled, the rows renormalised."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        B, N, _ = hidden_states.shape
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        q, k, v = (attn.head_to_batch_dim(t) for t in (q, k, v))
        p = attn.get_attention_scores(q, k, None)
        p[..., 2] *= 3
        p = p / p.sum(-1, keepdim=True)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(p @ v)))


def test_verify_marks_a_layer_whose_processor_edits_the_weights():
    unet = toy_unet(sample_size=8, seed=3)
    edited = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
    unet.get_submodule(edited).set_processor(Reweighting())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad(), trace(unet, verify=True) as tr:
        unet(x, 5, encoder_hidden_states=ctx)
    assert [r.label for r in tr.layers if r.edited] == [edited]
    assert all(r.verified is not None and (r.verified <= 1) != r.edited for r in tr.layers)
    assert "edited" in tr.layer(edited).note and "edited" in tr.summary()
    with pytest.warns(TraceWarning, match="marked edited"):
        tr.token_maps()
    tr.token_maps(layers=[r for r in tr.layers if not r.edited])  # no warning without it
    with pytest.warns(TraceWarning, match="marked edited") as caught:
        tr.explorer()
    assert caught[0].filename == __file__  # the warning points at the caller of tr.explorer()


def test_wan_image_to_video_context_is_its_own_part_and_checked():
    """Wan's image-to-video attn2: the first M − 512 context tokens are the image's, attended with their own softmax."""
    from diffusers import WanTransformer3DModel

    from attention_ref.interop.toy_transformers import _randomise
    from attention_ref.testing import check_model

    torch.manual_seed(0)
    config = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4}
    model = WanTransformer3DModel(**config, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=64, num_layers=1,
                                  rope_max_seq_len=64, image_dim=20, added_kv_proj_dim=32)  # fmt: skip
    model = _randomise(model, 0).double()
    g = torch.Generator().manual_seed(0)
    x, text, image = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, 4, 2, 8, 12), (1, 512, 24),
                                                                                 (1, 5, 20)))  # fmt: skip
    options = {"self_queries": [(0.5, 0.5)], "heads": "all", "keep": "all", "dtype": "float64"}
    with torch.no_grad(), sdpa_probe(model) as probe, trace(model, **options) as tr:
        model(x, torch.tensor([500]), text, encoder_hidden_states_image=image)
    assert [(r.label, r.keys) for r in tr.layers if r.kind == "cross"] == [("blocks.0.attn2", 512),
                                                                          ("blocks.0.attn2[image]", 5)]  # fmt: skip
    assert max(compare_with_trace(tr, probe).values()) <= 1e-12
    report = check_model(model, x, torch.tensor([500]), text, encoder_hidden_states_image=image, dtype="float16")
    assert report.ok and len(report.rows) == 2, report.format(verbose=False)
