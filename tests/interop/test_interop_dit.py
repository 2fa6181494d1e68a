"""from_diffusers_joint and flux_rope_tables: the parameters and options of SD3's, SD3.5's and Flux's attention
modules, checked on the modules alone and inside tiny SD3.5 and Flux transformers (every attention call of a
forward pass recomputed from its inputs), and every feature the loader refuses."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import HAS_TORCH
from dit_helpers import DiffusersCase, build_module, float64_rms_norms, flux_ids, our_params

from attention_ref.blocks import joint_attention_forward
from attention_ref.gradcheck import rel_error
from attention_ref.interop import flux_rope_tables, from_diffusers_joint
from attention_ref.ops import rope_angles

HAS_DIFFUSERS = HAS_TORCH and importlib.util.find_spec("diffusers") is not None
pytestmark = [
    pytest.mark.skipif(not HAS_DIFFUSERS, reason="torch and diffusers are not installed"),
    pytest.mark.usefixtures("one_torch_thread"),
]

MODULES = [
    pytest.param(DiffusersCase("sd3", heads=2, head_dim=4, qk_norm="rms_norm"), id="SD3.5 joint"),
    pytest.param(DiffusersCase("sd3", heads=2, head_dim=4, context_pre_only=True), id="SD3 last block"),
    pytest.param(DiffusersCase("sd3", heads=3, head_dim=2, context_dim=5, qk_norm="layer_norm"), id="layer norm"),
    pytest.param(DiffusersCase("sd35_attn2", heads=2, head_dim=4, M=0, qk_norm="rms_norm"), id="SD3.5 attn2"),
    pytest.param(DiffusersCase("flux", heads=2, head_dim=8, qk_norm="rms_norm"), id="Flux double"),
    pytest.param(DiffusersCase("flux_single", heads=2, head_dim=8, qk_norm="rms_norm"), id="Flux single"),
]


@pytest.mark.parametrize("case", MODULES)
def test_loader_reads_every_weight_and_the_options(case):
    module = build_module(case, np.random.default_rng(0))
    params, options = from_diffusers_joint(module)
    want = our_params(module)
    assert sorted(params) == sorted(want)
    for name in params:
        assert params[name].dtype == np.float64
        np.testing.assert_array_equal(params[name], want[name])
    flux = case.family.startswith("flux")
    assert options["heads"] == case.heads and options["scale"] == case.head_dim**-0.5
    assert options["order"] == ("text_first" if flux else "image_first")
    assert options.get("qk_norm") == case.qk_norm and options.get("eps", 1e-6) == 1e-6
    assert ("add_out.weight" in params) == (case.family in ("sd3", "flux") and not case.context_pre_only)
    assert ("out.weight" in params) == (case.family != "flux_single")


def test_loader_options_reproduce_flux_with_a_norm_without_scale():
    """FluxAttention(elementwise_affine=False): norm_q and norm_k have no weight; the added norms keep theirs."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(0)
    attn = FluxAttention(8, heads=2, dim_head=4, added_kv_proj_dim=8, bias=True, eps=1e-6, elementwise_affine=False)
    attn = attn.double().eval()
    params, options = from_diffusers_joint(attn)
    assert "norm_q.weight" not in params and "norm_added_q.weight" in params and options["qk_norm"] == "rms_norm"
    rng = np.random.default_rng(1)
    x, context = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 3, 8))
    cos, sin = rope_angles(flux_ids(3, 2, 3)[:, 1:], (2, 2), dtype="float32")  # (row, col) axes of a 4-wide head
    tables = (torch.from_numpy(cos), torch.from_numpy(sin))
    y_t, y_context_t = attn(torch.from_numpy(x), torch.from_numpy(context), image_rotary_emb=tables)
    (y, y_context), _ = joint_attention_forward(x, context, params, rope=(cos, sin), rope_dtype="float32", **options)
    assert rel_error(y, y_t.detach().numpy()) < 1e-13 and rel_error(y_context, y_context_t.detach().numpy()) < 1e-13


def test_loader_keeps_the_modules_dtype_when_asked():
    module = build_module(DiffusersCase("sd3", heads=2, head_dim=4), np.random.default_rng(0)).float()
    params, _ = from_diffusers_joint(module, dtype=None)
    assert all(p.dtype == np.float32 for p in params.values())


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex128", "bfloat16", "x", 3])
def test_loader_refuses_a_dtype_that_is_not_a_float(dtype):
    # an integer dtype used to truncate every weight without a word
    module = build_module(DiffusersCase("sd3", heads=2, head_dim=4), np.random.default_rng(0))
    with pytest.raises(
        TypeError, match=r"from_diffusers_joint: dtype must be None or one of \('float16', 'float32', 'float64'\)"
    ):
        from_diffusers_joint(module, dtype=dtype)
    params, _ = from_diffusers_joint(module, dtype=np.float32)
    assert all(p.dtype == np.float32 for p in params.values())


# ---------------------------------------------------------------- RoPE tables


@pytest.mark.parametrize("axes", [(16, 56, 56), (2, 2, 4), (4, 6, 2)])
def test_flux_rope_tables_equal_flux_pos_embed(axes):
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = flux_ids(4, 3, 5)
    txt_ids, img_ids = torch.from_numpy(ids[:4]), torch.from_numpy(ids[4:])
    cos_t, sin_t = FluxPosEmbed(theta=10000, axes_dim=list(axes))(torch.cat([txt_ids, img_ids]))
    cos, sin = flux_rope_tables(txt_ids, img_ids, axes, dtype="float32")
    np.testing.assert_array_equal(cos, cos_t.numpy())
    np.testing.assert_array_equal(sin, sin_t.numpy())
    cos64, _ = flux_rope_tables(ids[:4], ids[4:], axes)  # NumPy ids, float64 tables: the same to float32's rounding
    assert cos64.dtype == np.float64 and np.max(np.abs(cos64 - cos_t.numpy())) < 2**-24


def test_flux_rope_tables_read_the_model_and_refuse_batched_ids():
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    pos_embed = FluxPosEmbed(theta=500, axes_dim=[2, 4, 2])
    ids = flux_ids(2, 2, 2)
    cos, sin = flux_rope_tables(ids[:2], ids[2:], pos_embed, dtype="float32")
    np.testing.assert_array_equal(cos, pos_embed(torch.from_numpy(ids))[0].numpy())
    with pytest.raises(ValueError, match=r"takes txt_ids\[0\] of a batched"):
        flux_rope_tables(ids[None, :2], ids[2:], (2, 4, 2))
    with pytest.raises(ValueError, match="different axes"):
        flux_rope_tables(ids[:2, :2], ids[2:], (2, 4, 2))


# ---------------------------------------------------------------- inside tiny transformers


def randomise_model(model, rng: np.random.Generator) -> None:
    """Every weight of a whole model off its init (the zero-initialised modulations and projections included)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
            scale = 1 / np.sqrt(fan_in) if p.ndim > 1 else 0.3
            p.copy_(torch.from_numpy(scale * rng.standard_normal(tuple(p.shape))))


def recorded_calls(model, modules: dict, **inputs) -> dict:
    """Run ``model(**inputs)`` without gradients, each module's call recorded by a forward hook (removed after):
    ``{name: (keyword inputs, output)}``."""
    import torch

    records, handles = {}, []
    for name, module in modules.items():

        def hook(mod, args, kwargs, output, name=name):
            records[name] = ({k: v for k, v in kwargs.items()}, output)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records


def test_every_attention_of_a_tiny_sd35_transformer_is_reproduced():
    """SD3.5's layout: joint attention with RMS q/k norms, a dual attention (attn2) in block 0, and the last
    block's context_pre_only attention; each call recomputed from the inputs the model gave it."""
    import torch
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).double()  # fmt: skip
    randomise_model(model, np.random.default_rng(0))
    modules = {"0.attn": model.transformer_blocks[0].attn, "0.attn2": model.transformer_blocks[0].attn2}
    modules["1.attn"] = model.transformer_blocks[1].attn
    assert modules["1.attn"].context_pre_only
    for module in modules.values():
        float64_rms_norms(module)  # diffusers' RMSNorm takes its mean square in float32 (see test_rms_norm)
    rng = np.random.default_rng(1)
    records = recorded_calls(
        model,
        modules,
        hidden_states=torch.from_numpy(rng.standard_normal((2, 4, 8, 8))),
        encoder_hidden_states=torch.from_numpy(rng.standard_normal((2, 5, 12))),
        pooled_projections=torch.from_numpy(rng.standard_normal((2, 8))),
        timestep=torch.tensor([10.0, 500.0], dtype=torch.float64),
    )
    assert sorted(records) == sorted(modules)
    for name, module in modules.items():
        kwargs, output = records[name]
        params, options = from_diffusers_joint(module)
        x = kwargs["hidden_states"].numpy()
        context = kwargs.get("encoder_hidden_states")
        context = None if context is None else context.numpy()
        assert (context is None) == (name == "0.attn2") and x.shape[1] == 16  # a 4×4 patch grid
        (y, y_context), cache = joint_attention_forward(x, context, params, **options)
        theirs = output if isinstance(output, tuple) else (output, None)
        assert rel_error(y, theirs[0].numpy()) < 1e-12, name
        if y_context is not None:
            assert rel_error(y_context, theirs[1].numpy()) < 1e-12, name
        assert cache.order == "image_first" and cache.image_tokens == slice(0, 16)


def test_every_attention_of_a_tiny_flux_transformer_is_reproduced():
    """Flux: a double-stream and a single-stream block, RoPE tables from the model's own ids and axes."""
    import torch
    from diffusers import FluxTransformer2DModel

    axes = (2, 2, 4)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=8, axes_dims_rope=axes,
    ).double()  # fmt: skip
    randomise_model(model, np.random.default_rng(0))
    modules = {"double": model.transformer_blocks[0].attn, "single": model.single_transformer_blocks[0].attn}
    rng = np.random.default_rng(1)
    M, (h, w) = 3, (2, 3)
    ids = flux_ids(M, h, w)
    txt_ids, img_ids = torch.from_numpy(ids[:M]), torch.from_numpy(ids[M:])
    records = recorded_calls(
        model,
        modules,
        hidden_states=torch.from_numpy(rng.standard_normal((2, h * w, 4))),
        encoder_hidden_states=torch.from_numpy(rng.standard_normal((2, M, 12))),
        pooled_projections=torch.from_numpy(rng.standard_normal((2, 8))),
        timestep=torch.tensor([0.2, 0.9], dtype=torch.float64),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )
    cos, sin = flux_rope_tables(txt_ids, img_ids, model, dtype="float32")
    for name, module in modules.items():
        kwargs, output = records[name]
        # the tables the model passed are the ones flux_rope_tables builds from its ids
        np.testing.assert_array_equal(kwargs["image_rotary_emb"][0].numpy(), cos)
        np.testing.assert_array_equal(kwargs["image_rotary_emb"][1].numpy(), sin)
        params, options = from_diffusers_joint(module)
        x = kwargs["hidden_states"].numpy()
        context = kwargs.get("encoder_hidden_states")
        context = None if context is None else context.numpy()
        # Flux rotates in float32: rope_dtype="float32" is its rounding, bit for bit
        (y, y_context), cache = joint_attention_forward(
            x, context, params, rope=(cos, sin), rope_dtype="float32", **options
        )
        theirs = output if isinstance(output, tuple) else (output, None)
        assert rel_error(y, theirs[0].numpy()) < 1e-12, name
        if name == "double":
            assert rel_error(y_context, theirs[1].numpy()) < 1e-12
            assert cache.text_tokens == slice(0, M) and cache.image_tokens == slice(M, M + h * w)
        else:
            assert context is None and x.shape[1] == M + h * w and y.shape == (2, M + h * w, 16)


# ---------------------------------------------------------------- refusals


def sd3_attention(**config):
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    base = dict(query_dim=8, added_kv_proj_dim=8, dim_head=4, heads=2, out_dim=8, context_pre_only=False, bias=True)
    return Attention(**{**base, **config}, processor=JointAttnProcessor2_0())


def test_loader_refuses_what_the_reference_does_not_express():
    import torch
    from diffusers.models.transformers.transformer_flux import FluxAttention

    refused = {
        "a group norm": sd3_attention(norm_num_groups=2),
        "residual_connection": sd3_attention(residual_connection=True),
        "rescale_output_factor=2.0": sd3_attention(rescale_output_factor=2.0),
        "kv_heads": sd3_attention(kv_heads=1),
        "cross_attention_dim": sd3_attention(cross_attention_dim=6, added_kv_proj_dim=None, context_pre_only=None),
        "without add_q_proj": sd3_attention(context_pre_only=None),
        "across heads": sd3_attention(qk_norm="rms_norm_across_heads", kv_heads=2),
        "FP32LayerNorm": sd3_attention(qk_norm="fp32_layer_norm"),
        "LpNorm": sd3_attention(qk_norm="l2", added_kv_proj_dim=None, context_pre_only=None),
        r"scale 1.0 \(the joint processors use 1/sqrt\(head_dim\)": sd3_attention(scale_qk=False),
        r"pre_only with added_kv_proj_dim": FluxAttention(8, heads=2, dim_head=4, added_kv_proj_dim=8, pre_only=True),
    }
    for what, module in refused.items():
        with pytest.raises(NotImplementedError, match=what):
            from_diffusers_joint(module)

    fused = sd3_attention()
    fused.fuse_projections()
    with pytest.raises(NotImplementedError, match="fused projections"):
        from_diffusers_joint(fused)
    fused_flux = FluxAttention(8, heads=2, dim_head=4, added_kv_proj_dim=8)
    fused_flux.fuse_projections()
    with pytest.raises(NotImplementedError, match="fused projections"):
        from_diffusers_joint(fused_flux)

    class LoRALinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    lora = sd3_attention()
    lora.add_k_proj = LoRALinear(8, 8)
    with pytest.raises(NotImplementedError, match=r"add_k_proj is a LoRALinear, not a plain torch\.nn\.Linear"):
        from_diffusers_joint(lora)

    one_sided = sd3_attention(qk_norm="rms_norm")
    one_sided.norm_added_k = None
    with pytest.raises(NotImplementedError, match="on some projections only"):
        from_diffusers_joint(one_sided)

    eps_none = FluxAttention(8, heads=2, dim_head=4)
    eps_none.norm_q = torch.nn.RMSNorm(4, eps=None)
    with pytest.raises(NotImplementedError, match="eps=None"):
        from_diffusers_joint(eps_none)

    training = sd3_attention(dropout=0.1)
    training.train()
    with pytest.raises(NotImplementedError, match=r"dropout p=0.1 in training mode"):
        from_diffusers_joint(training)
    training.eval()
    from_diffusers_joint(training)  # in eval mode dropout does nothing

    with pytest.raises(TypeError, match="got a Linear"):
        from_diffusers_joint(torch.nn.Linear(2, 2))
