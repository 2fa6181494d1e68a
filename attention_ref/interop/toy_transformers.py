"""Tiny diffusion transformers and video U-Nets built offline with random weights, and inputs that fit them.

For the tests, the trace benchmark and the docs: one small model per family the trace and ``check_model`` know,
each built from a diffusers config in well under a second, nothing downloaded:

============  =========================================  ==============================================
family        model                                      attention
============  =========================================  ==============================================
``sd3``       ``SD3Transformer2DModel``                   joint (image first), the last block context-pre-only
``sd35``      the same with ``dual_attention_layers``    joint + a second self-attention, RMS q/k norms
              and ``qk_norm="rms_norm"``
``flux``      ``FluxTransformer2DModel``                 double-stream joint (text first) and single-stream,
                                                         RoPE over ``axes_dims_rope``, RMS q/k norms
``pixart``    ``PixArtTransformer2DModel``                self + cross on the 2×2 patch grid, a padded prompt
``dit``       ``DiTTransformer2DModel``                   self only (class-conditional) on the patch grid
``sana``      ``SanaTransformer2DModel``                  ReLU linear self-attention + softmax cross
``wan``       ``WanTransformer3DModel``                   self over every frame's patches (3-D RoPE, RMS
                                                         norms across heads) + cross
``svd``       ``UNetSpatioTemporalConditionModel``        spatial self/cross + temporal (frame) self/cross
``animatediff`` ``UNetMotionModel``                       spatial self/cross + motion modules (frames)
============  =========================================  ==============================================

:func:`toy_model` builds one (eval mode, float32; call ``.double()`` for float64), :func:`toy_inputs` makes a
batch of inputs for it, ``model(*args, **kwargs)``. Maps are deliberately not square where the model allows it
(a 4×6 patch grid), so that a transposed grid shows. Randomised parameters: diffusers zero-initialises some
output projections and modulations, which would make a block the identity and hide a missing term.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FAMILIES", "toy_inputs", "toy_model"]

FAMILIES = ("sd3", "sd35", "flux", "pixart", "dit", "sana", "wan", "svd", "animatediff")
TEXT = 24  # width of the toy text embeddings
FRAMES = 3  # frames of the toy videos


def _randomise(model: Any, seed: int) -> Any:
    """Every parameter shifted by a random 0.1·N(0, 1), so no zero-initialised layer hides a term."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def toy_model(family: str, *, seed: int = 0, heads: int = 2, head_dim: int = 16, layers: int = 2) -> Any:
    """A tiny random-weight model of ``family`` (one of :data:`FAMILIES`), in eval mode, float32.

    ``heads``, ``head_dim``, ``layers``: the transformers' attention heads, head width and blocks (larger ones for
    the trace benchmark); the video U-Nets keep their own.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    if family in ("sd3", "sd35"):
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=TEXT, caption_projection_dim=heads * head_dim,
            pooled_projection_dim=16, pos_embed_max_size=64,
            dual_attention_layers=(0,) if family == "sd35" else (), qk_norm="rms_norm" if family == "sd35" else None,
        )  # fmt: skip
    elif family == "flux":
        from diffusers import FluxTransformer2DModel

        row = 3 * head_dim // 8  # RoPE channels for the row and the column; the rest for the first id axis
        double = max(1, layers // 2)  # as many double- as single-stream blocks
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=double, num_single_layers=double, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=TEXT, pooled_projection_dim=16,
            axes_dims_rope=(head_dim - 2 * row, row, row),
        )  # fmt: skip
    elif family == "pixart":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
            cross_attention_dim=heads * head_dim, sample_size=8, patch_size=2, caption_channels=TEXT,
        )  # fmt: skip
    elif family == "dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                      out_channels=8, num_layers=layers, sample_size=8, patch_size=2,
                                      num_embeds_ada_norm=10)  # learned variance, as DiT's  # fmt: skip
    elif family == "sana":
        from diffusers import SanaTransformer2DModel

        model = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
            num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
            caption_channels=TEXT, sample_size=8, patch_size=2,
        )  # fmt: skip
    elif family == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
            out_channels=4, text_dim=TEXT, freq_dim=16, ffn_dim=2 * heads * head_dim, num_layers=layers,
            rope_max_seq_len=64,
        )  # fmt: skip
    elif family == "svd":
        from diffusers import UNetSpatioTemporalConditionModel

        model = UNetSpatioTemporalConditionModel(
            sample_size=8, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
            layers_per_block=1, cross_attention_dim=TEXT, num_attention_heads=(2, 4), num_frames=FRAMES,
        )  # fmt: skip
    else:
        from diffusers import UNetMotionModel

        model = UNetMotionModel(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
            cross_attention_dim=TEXT, num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8,
        )  # fmt: skip
    return _randomise(model, seed)


def toy_inputs(
    family: str,
    model: Any,
    *,
    batch: int = 2,
    tokens: int = 7,
    seed: int = 0,
    padded: bool = True,
    size: tuple[int, int] | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``, in the model's dtype, from a seeded generator.

    Images are 8×12 latents (a 4×6 grid of 2×2 patches; DiT's are 8×8: its unpatchify needs a square), or
    ``size``; videos have :data:`FRAMES` frames. With ``padded`` (and a model that takes a mask) the second
    prompt's last 3 tokens are padding.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=g).to(dtype)

    B, M = batch, tokens
    h, w = size if size is not None else ((8, 8) if family == "dit" else (8, 12))
    mask = torch.ones(B, M, dtype=torch.bool)
    if padded and B > 1:
        mask[1, M - 3 :] = False
    t = torch.full((B,), 500.0 if family in ("sd3", "sd35") else 500, dtype=dtype)
    if family in ("sd3", "sd35"):
        return (), {"hidden_states": rand(B, 4, h, w), "encoder_hidden_states": rand(B, M, TEXT),
                    "pooled_projections": rand(B, 16), "timestep": t, "return_dict": False}  # fmt: skip
    if family == "flux":
        H, W = h // 2, w // 2  # Flux's pipeline packs 2×2 patches into 16 channels
        rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        img_ids = torch.stack([torch.zeros(H * W), rows.reshape(-1).float(), cols.reshape(-1).float()], dim=1)
        return (), {"hidden_states": rand(B, H * W, 16), "encoder_hidden_states": rand(B, M, TEXT),
                    "pooled_projections": rand(B, 16), "timestep": torch.full((B,), 0.5, dtype=dtype),
                    "img_ids": img_ids.to(dtype), "txt_ids": torch.zeros(M, 3, dtype=dtype),
                    "return_dict": False}  # fmt: skip
    if family == "pixart":
        kwargs = {"encoder_hidden_states": rand(B, M, TEXT), "timestep": t.long(),
                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}  # fmt: skip
        if padded:
            kwargs["encoder_attention_mask"] = mask
        return (rand(B, 4, h, w),), kwargs
    if family == "dit":
        labels = torch.arange(B) % 10
        return (rand(B, 4, h, w),), {"timestep": t.long(), "class_labels": labels, "return_dict": False}
    if family == "sana":
        kwargs = {"encoder_hidden_states": rand(B, M, TEXT), "timestep": t.long(), "return_dict": False}
        if padded:
            kwargs["encoder_attention_mask"] = mask
        return (rand(B, 4, h, w),), kwargs
    if family == "wan":
        return (rand(B, 4, FRAMES, h, w), t.long(), rand(B, M, TEXT)), {"return_dict": False}
    if family == "svd":
        return (rand(B, FRAMES, 8, h, w), t, rand(B, 1, TEXT), rand(B, 3)), {"return_dict": False}
    # AnimateDiff's pipeline gives every frame the prompt: (B·F, M, D), sample b's frames together
    context = rand(B, M, TEXT).repeat_interleave(FRAMES, dim=0)
    return (rand(B, 4, FRAMES, h, w), t.long(), context), {"return_dict": False}
