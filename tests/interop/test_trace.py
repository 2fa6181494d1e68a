"""attention_ref.interop.trace on diffusers models: exact weights (against diffusers' own get_attention_scores),
grids from the enclosing block, any processor, output unchanged, hooks removed. Reading a trace (records, steps,
the explorer, word maps): tests/interop/test_trace_reading.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, Transformer2DModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)
from trace_helpers import QUERIES, unet_inputs  # noqa: E402

import attention_ref as ar  # noqa: E402
from attention_ref.interop import from_diffusers, trace  # noqa: E402
from attention_ref.interop.toy_models import toy_unet  # noqa: E402
from attention_ref.interop.trace import attention_weights, query_pixels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- helpers ---------------------------------------------------------------------------------------------
def record_calls(model):
    """Every Attention call's inputs, recorded by hooks of the test's own: [(name, module, hidden, context, mask)]."""
    calls, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, Attention):

            def hook(module, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                calls.append((name, module, hidden, kwargs.get("encoder_hidden_states"), kwargs.get("attention_mask")))

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def diffusers_scores(attn, hidden, context, mask):
    """``(B, heads, N, M)``: the weights diffusers' AttnProcessor computes, with its own helpers."""
    with torch.no_grad():
        tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden  # (B, N, C)
        B, N, _ = tokens.shape
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        source = tokens if context is None else context
        q = attn.head_to_batch_dim(attn.to_q(tokens))  # (B·heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(source))  # (B·heads, M, d)
        prepared = attn.prepare_attention_mask(mask, source.shape[1], B)
        p = attn.get_attention_scores(q, k, prepared)  # (B·heads, N, M)
    return p.reshape(B, attn.heads, N, source.shape[1]).double().numpy()


def all_hooks(model):
    return {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called))
        for name, m in model.named_modules()
    }


@pytest.fixture(scope="module")
def unet64():
    return toy_unet(sample_size=8, seed=3).double()


@pytest.fixture(scope="module")
def unet32():
    return toy_unet(sample_size=8, seed=3)


# ----- exactness ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "tol"), [("float64", 1e-12), ("float32", 1e-5)])
def test_cross_and_self_rows_equal_diffusers_scores(unet64, unet32, precision, tol):
    model = unet64 if precision == "float64" else unet32
    x, kwargs = unet_inputs(torch.float64 if precision == "float64" else torch.float32)
    calls, handles = record_calls(model)
    try:
        with torch.no_grad(), trace(model, self_queries=QUERIES, heads="all", dtype=precision) as tr:
            model(x, 7, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 32 and len(tr.layers) == 32
    worst = {"self": 0.0, "cross": 0.0}
    for name, attn, hidden, context, mask in calls:
        record = tr.layer(name)
        want = diffusers_scores(attn, hidden, context, mask)  # (B, heads, N, M)
        H, W = record.grid
        if record.kind == "cross":
            got = record.maps.reshape(2, attn.heads, H * W, -1)
        else:
            pixels = query_pixels(np.asarray(QUERIES), (H, W))
            np.testing.assert_array_equal(record.query_pixels, pixels)
            want = want[:, :, pixels[:, 0] * W + pixels[:, 1]]  # the query rows
            got = record.maps.reshape(2, attn.heads, len(QUERIES), H * W)
        assert got.dtype == np.dtype(precision)
        worst[record.kind] = max(worst[record.kind], float(np.max(np.abs(got - want))))
    assert worst["cross"] <= tol and worst["self"] <= tol, worst
    # the padded tokens of the second sample get no weight, the first sample's do
    maps = tr.layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2").maps
    assert np.all(maps[1, ..., -3:] < 1e-30) and np.all(maps[0, ..., -3:] > 0)


def test_full_self_attention_and_group_norm_path_equal_diffusers():
    """self_queries='all' gives the N × N rows; an Attention called on a (B, C, H, W) map (a VAE's, with its
    group norm and residual) gets its grid from its own input."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    ).double()
    for p in vae.parameters():  # a fresh Attention's zero-initialised parts would hide a missing term
        p.data += 0.1 * torch.randn_like(p)
    attn = vae.decoder.mid_block.attentions[0]
    attn.upcast_softmax = False  # diffusers' "upcast" casts float64 logits down to float32; not here
    z = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    calls, handles = record_calls(vae.decoder)
    try:
        with torch.no_grad(), trace(vae.decoder, self_queries="all", heads="all", dtype="float64") as tr:
            vae.decode(z)
    finally:
        for h in handles:
            h.remove()
    ((name, attn, hidden, _, _),) = calls
    assert hidden.ndim == 4 and attn.group_norm is not None
    record = tr.layer(name)
    assert record.grid == (6, 5) and record.query_pixels is None and record.queries == 30
    want = diffusers_scores(attn, hidden, None, None)
    got = record.maps.reshape(1, attn.heads, 30, 30)
    assert np.max(np.abs(got - want)) <= 1e-12
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-13)


def test_weights_are_the_token_layers():
    """The trace's chain of ops is attention_layer_forward's: the same weights as its cache."""
    rng = np.random.default_rng(1)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, bias=True).double()
    params, options = from_diffusers(attn)
    h, ctx = rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 5, 12))
    mask = np.ones((2, 5), bool)
    mask[0, 3:] = False
    _, cache = ar.attention_layer_forward(h, params, context=ctx, context_mask=mask, **options)
    got = attention_weights(h, params, options, context=ctx, mask=mask[:, None, None, :])
    np.testing.assert_allclose(got, cache.weights, rtol=0, atol=1e-15)
    rows = np.array([4, 0, 8])
    np.testing.assert_allclose(
        attention_weights(h, params, options, context=ctx, mask=mask[:, None, None, :], rows=rows),
        cache.weights[:, :, rows],
        rtol=0,
        atol=1e-15,
    )


# ----- processors, grids -----------------------------------------------------------------------------------
class StoringProcessor(AttnProcessor):
    """A DAAM / prompt-to-prompt style processor: a subclass that keeps its own maps."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.seen += 1
        return super().__call__(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize(
    "processor",
    [AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(slice_size=3), StoringProcessor()],
    ids=lambda p: type(p).__name__,
)
def test_any_processor_same_maps_and_bitwise_same_output(processor):
    unet = toy_unet(sample_size=8, seed=5).double()
    x, kwargs = unet_inputs(torch.float64, seed=1)
    with torch.no_grad():
        reference_run = unet(x, 3, **kwargs).sample
        with trace(unet, self_queries=QUERIES, dtype="float64") as default:
            unet(x, 3, **kwargs)
        unet.set_attn_processor(processor)
        plain = unet(x, 3, **kwargs).sample
        with trace(unet, self_queries=QUERIES, heads="all", keep="all", dtype="float64") as tr:
            traced = unet(x, 3, **kwargs).sample
    assert torch.equal(plain, traced)  # bit for bit: the trace observes and changes nothing
    assert torch.allclose(plain, reference_run, atol=1e-12)
    for a, b in zip(default.layers, tr.layers, strict=True):
        assert a.name == b.name and a.grid == b.grid
        np.testing.assert_allclose(b.maps[0].mean(axis=1), a.maps, rtol=0, atol=1e-12)
    if isinstance(processor, StoringProcessor):
        assert processor.seen == 2 * 32  # the processor ran, untouched, and so did the trace


def test_output_bitwise_unchanged_float32_and_float16_models():
    for dtype in (torch.float32, torch.float16):
        unet = toy_unet(sample_size=8, seed=6).to(dtype)
        x, kwargs = unet_inputs(dtype, seed=2)
        with torch.no_grad():
            before = unet(x, 11, **kwargs).sample
            with trace(unet, self_queries=QUERIES, heads="all", keep="all") as tr:
                during = unet(x, 11, **kwargs).sample
            after = unet(x, 11, **kwargs).sample
        assert torch.equal(before, during) and torch.equal(before, after)
        assert tr.layers[0].maps.dtype == np.float32  # float16 inputs, converted exactly, computed in float32


def test_grid_comes_from_the_enclosing_block_non_square():
    unet = toy_unet(sample_size=8, seed=0)
    x = torch.randn(1, 4, 16, 8)
    with torch.no_grad(), trace(unet) as tr:
        unet(x, 1, encoder_hidden_states=torch.randn(1, 5, 32))
    grids = {r.name.split(".attentions")[0]: r.grid for r in tr.layers}
    assert grids == {
        "down_blocks.0": (16, 8),
        "down_blocks.1": (8, 4),
        "down_blocks.2": (4, 2),
        "mid_block": (2, 1),
        "up_blocks.1": (4, 2),
        "up_blocks.2": (8, 4),
        "up_blocks.3": (16, 8),
    }
    assert tr.grids == [(16, 8), (8, 4), (4, 2), (2, 1)]
    assert all(r.kind == "cross" for r in tr.layers)  # no self_queries: self-attention is not traced


def test_transformer2d_traced_directly():
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8,
                               cross_attention_dim=12).double().eval()  # fmt: skip
    x, ctx = torch.randn(2, 16, 6, 10, dtype=torch.float64), torch.randn(2, 4, 12, dtype=torch.float64)
    calls, handles = record_calls(model)
    try:
        with torch.no_grad(), trace(model, self_queries=[(0.5, 0.5)], dtype="float64") as tr:
            model(x, encoder_hidden_states=ctx, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    assert [(r.kind, r.grid) for r in tr.layers] == [("self", (6, 10)), ("cross", (6, 10))]
    _, attn, hidden, context, mask = calls[1]
    want = diffusers_scores(attn, hidden, context, mask).mean(axis=1)  # head mean (B, N, M)
    np.testing.assert_allclose(tr.layers[1].maps.reshape(2, 60, 4), want, rtol=0, atol=1e-12)
    assert tr.timesteps == [None]
    # the context given positionally is not taken for a timestep
    with torch.no_grad(), trace(model) as positional:
        model(x, ctx, return_dict=False)
    assert positional.timesteps == [None]


def test_autocast_does_not_lower_the_traced_precision():
    torch.manual_seed(0)
    # a VAE-style Attention on a (B, C, H, W) map: the traced call's input is x itself, whatever autocast does
    model = torch.nn.Sequential(Attention(16, heads=2, dim_head=8, norm_num_groups=8, residual_connection=True)).eval()
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad(), trace(model, self_queries="all", dtype="float32") as plain:
        model(x)
    for low in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=low), trace(model, self_queries="all", dtype="float32") as tr:
            model(x)
        assert tr.layers[0].maps.dtype == np.float32
        np.testing.assert_array_equal(tr.layers[0].maps, plain.layers[0].maps)


def test_projections_that_are_not_plain_linear_layers_are_refused():
    class Adapter(torch.nn.Module):
        """A LoRA adapter as peft lays it out: the base layer's weight shown, an update added in forward."""

        def __init__(self, base):
            super().__init__()
            self.base_layer, self.lora = base, torch.nn.Linear(base.in_features, base.out_features, bias=False)

        weight = property(lambda self: self.base_layer.weight)
        bias = property(lambda self: self.base_layer.bias)

        def forward(self, x):
            return self.base_layer(x) + self.lora(x)

    class OwnForward(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    attn.to_q = Adapter(attn.to_q)
    with pytest.raises(NotImplementedError, match=r"to_q is a Adapter, not a plain torch.nn.Linear.*fuse_lora"):
        from_diffusers(attn)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    attn.to_k = OwnForward(12, 16, bias=False)
    with pytest.raises(NotImplementedError, match="to_k is a OwnForward"):
        with trace(torch.nn.Sequential(attn)):
            pass


def test_query_pixels_refuse_positions_outside_the_image():
    np.testing.assert_array_equal(query_pixels([[0.0, 1.0], [0.5, 0.26]], (4, 4)), [[0, 3], [2, 1]])
    for bad in ([[-0.5, 0.2]], [[0.5]], [0.5, 0.5]):
        with pytest.raises(ValueError, match=r"\(Q, 2\) fractional"):
            query_pixels(bad, (4, 4))


def test_tokens_without_an_enclosing_map_are_refused():
    block = BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=12).eval()
    before = all_hooks(block)
    with pytest.raises(ValueError, match=r"^attn2: called on 12 tokens.*H·W = 12"):
        with torch.no_grad(), trace(block) as tr:
            block(torch.randn(1, 12, 16), encoder_hidden_states=torch.randn(1, 3, 12))
    assert all_hooks(block) == before and tr.layers == []


# ----- restoration ----------------------------------------------------------------------------------------
def test_hooks_removed_after_exit_and_after_exceptions(unet32):
    user = unet32.down_blocks[0].register_forward_pre_hook(lambda m, a: None)  # a hook of the user's, kept
    try:
        before = all_hooks(unet32)
        x, kwargs = unet_inputs(torch.float32, padded=False)
        with trace(unet32, self_queries=QUERIES) as tr:
            assert all_hooks(unet32) != before
            with torch.no_grad():
                unet32(x, 1, **kwargs)
        assert all_hooks(unet32) == before and tr._stack == []
        with pytest.raises(RuntimeError, match="in the block"):
            with trace(unet32, self_queries=QUERIES):
                raise RuntimeError("in the block")
        assert all_hooks(unet32) == before

        class Failing(AttnProcessor2_0):
            def __call__(self, attn, *args, **kwargs):
                raise RuntimeError("processor failed")

        name = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
        original = unet32.get_submodule(name).processor
        unet32.get_submodule(name).set_processor(Failing())
        try:
            with pytest.raises(RuntimeError, match="processor failed"):
                with torch.no_grad(), trace(unet32, self_queries=QUERIES) as failed:
                    unet32(x, 1, **kwargs)
        finally:
            unet32.get_submodule(name).set_processor(original)
        assert all_hooks(unet32) == before and failed._stack == []
        assert failed.layer(name).calls == 1  # the trace saw the call before the processor raised
        with pytest.raises(RuntimeError, match="records one run"):
            with tr:
                pass
    finally:
        user.remove()


def test_unsupported_modules_and_bad_arguments_refused_before_any_hook():
    model = torch.nn.Sequential(Attention(query_dim=8, heads=2, dim_head=4, qk_norm="l2"))
    before = all_hooks(model)
    with pytest.raises(NotImplementedError, match=r"^0: .*q/k norms must be a per-head"):
        with trace(model):
            pass
    assert all_hooks(model) == before
    with pytest.raises(ValueError, match="no diffusers Attention"):
        with trace(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match=r"pipeline with \.unet"):
        trace(object())
    unet = toy_unet(sample_size=8)
    for bad, match in [
        ({"heads": "max"}, "heads must be"),
        ({"keep": "last"}, "keep must be"),
        ({"dtype": "float16"}, "dtype must be"),
        ({"self_queries": [(0.5, 1.5)]}, r"\[0, 1\]"),
        ({"self_queries": [(0.5, 0.5, 0.5)]}, r"\(Q, 2\)"),
        ({"self_queries": "centre"}, "or 'all'"),
    ]:
        with pytest.raises(ValueError, match=match):
            trace(unet, **bad)
