"""Small diffusers models and a Stable Diffusion pipeline built offline, with random weights.

For the tests, the notebook and the trace benchmark: nothing is downloaded. The U-Net has Stable
Diffusion 1.5's block layout (three ``CrossAttnDownBlock2D`` and a ``DownBlock2D``, a cross-attention
mid block, an ``UpBlock2D`` and three ``CrossAttnUpBlock2D``, two layers per block, 8 heads: 16
transformers, each with a self- and a cross-attention) at widths of your choice; SD 1.5's are
``(320, 640, 1280, 1280)`` with a 768-wide context. The tokenizer is a real ``CLIPTokenizer``
(byte-level BPE) whose vocabulary and merges are written for a given list of words.

torch and diffusers are imported when a function is called; the tokenizer, the text encoder and
the pipeline also need ``transformers``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SD15_WIDTHS", "toy_clip_tokenizer", "toy_pipeline", "toy_text_encoder", "toy_unet"]

SD15_WIDTHS = (320, 640, 1280, 1280)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def toy_unet(
    widths: Sequence[int] = (32, 64, 128, 128),
    *,
    sample_size: int = 32,
    cross_attention_dim: int = 32,
    heads: int = 8,
    groups: int = 32,
    seed: int = 0,
) -> Any:
    """A ``UNet2DConditionModel`` with Stable Diffusion 1.5's block layout, random weights, in eval mode.

    Inputs:
        widths: the four blocks' channels (SD 1.5: :data:`SD15_WIDTHS`); each divisible by ``groups`` and ``heads``.
        sample_size: the latent's side (SD 1.5: 64); cross_attention_dim: the context's width (SD 1.5: 768).
        heads: attention heads per transformer (diffusers' ``attention_head_dim``, 8 in SD 1.5).
        groups: the group norms' groups (32 in SD 1.5); seed: for the weights.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=tuple(widths),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=groups,
    )
    return unet.eval()


def _chain_merges(pieces: Sequence[str]) -> list[str]:
    """BPE merges that join ``pieces`` left to right: ``"a b"``, ``"ab c"``, …"""
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append(f"{left} {right}")
        left += right
    return merges


def _pieces(word: str, end: bool) -> list[str]:
    """``word``'s letters, the last one with CLIP's end-of-word mark ``</w>`` when ``end``."""
    return [*word[:-1], word[-1] + "</w>"] if end else list(word)


def toy_clip_tokenizer(words: Sequence[str], directory: str | Path, *, split: Sequence[str] = ()) -> Any:
    """A ``CLIPTokenizer`` whose vocabulary has every letter and ``words`` as whole tokens.

    Writes ``vocab.json`` and ``merges.txt`` into ``directory`` and loads them (no download). Words in
    ``split`` become two tokens (their first half, then the rest with the end-of-word mark), to show
    sub-word merging; any other lowercase word falls apart into letters. ``model_max_length`` is 77.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in LETTERS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        word = word.lower()
        if word in split:
            half = len(word) // 2
            chain = _chain_merges(_pieces(word[:half], False)) + _chain_merges(_pieces(word[half:], True))
        else:
            chain = _chain_merges(_pieces(word, True))
        for m in chain:
            if m not in merges:
                merges.append(m)
                vocab.setdefault(m.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def toy_text_encoder(
    vocab_size: int, *, bos: int, eos: int, width: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> Any:
    """A ``CLIPTextModel`` from a config (random weights, eval mode), 77 positions, ``width`` channels.

    ``bos``, ``eos``: the tokenizer's start and end token ids (the end token's state is the pooled output).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config).eval()


def toy_pipeline(
    words: Sequence[str],
    directory: str | Path,
    *,
    widths: Sequence[int] = (32, 64, 128, 128),
    sample_size: int = 32,
    split: Sequence[str] = (),
    seed: int = 0,
) -> Any:
    """A ``StableDiffusionPipeline`` of toy parts: :func:`toy_unet`, a small ``AutoencoderKL`` (8× down, as SD's),
    :func:`toy_text_encoder` and :func:`toy_clip_tokenizer` (files written into ``directory``), a DDIM
    scheduler with SD's noise schedule, no safety checker. Images are ``8·sample_size`` pixels square.
    """
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # importing the pipeline reports optional image processors
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = toy_clip_tokenizer(words, directory, split=split)
    text_encoder = toy_text_encoder(len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, seed=seed)
    unet = toy_unet(widths, sample_size=sample_size, cross_attention_dim=32, seed=seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8 * sample_size,
    ).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
