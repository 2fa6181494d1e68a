"""The README's gallery: every figure of ``python -m attention_ref figures``, drawn from trained toys.

Trains the two toys (:mod:`attention_ref.toys`), measures the attention
variants' costs (:mod:`attention_ref.cli.complexity`, unless ``--complexity FILE``
gives a report already made), and draws every figure with
:mod:`attention_ref.viz`. Prints one line per figure saying what it shows, then
the numbers behind them. ``--quick`` trains briefly and measures small maps:
a smoke test, not the gallery.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..toys import train_long_range, train_token_grounding
from ..toys.long_range import LongRangeResult
from ..toys.scenes import SIZE as SCENE_SIZE
from ..toys.scenes import VOCAB
from ..viz import (
    conv_stack_receptive_field,
    draw_cross_attention,
    draw_self_attention_block,
    input_gradient,
    mean_attention_distance,
    plot_attention_distance,
    plot_attention_grid,
    plot_complexity,
    plot_receptive_fields,
    plot_token_maps,
    plot_token_normalizations,
    plot_token_segmentation,
    plot_weights_vs_influence,
    query_map,
    save_figure,
    scaling_exponents,
    token_segmentation,
    uniform_distance,
)
from .complexity import add_arguments as complexity_arguments
from .complexity import main as run_complexity

__all__ = ["make_figures"]

COMPLEXITY_SIZES = ("16", "32", "48", "64", "96", "128")


def _pattern_queries(result: LongRangeResult, b: int) -> list[tuple[int, int]]:
    """The top-left pixel of every pattern copy in evaluation map ``b``, copy 0, 1, 2, …"""
    ids = result.eval_data.copy_id[b]
    return [tuple(int(v) for v in np.argwhere(ids == c)[0]) for c in range(ids.max() + 1)]


def _long_range_figures(result: LongRangeResult, out: Path, dpi: int) -> list[tuple[Path, str]]:
    size = result.eval_data.x.shape[1]
    shape = (size, size)
    b = 0
    image = result.eval_data.x[b]
    queries = _pattern_queries(result, b)
    figures = []

    both = np.concatenate([result.weights_init[:, :1], result.weights[:, :1]], axis=1)  # (B, 2, N, N)
    fig = plot_attention_grid(
        both,
        queries,
        shape,
        image=image,
        batch=b,
        row_labels=["at initialisation", "trained"],
        title=f"Trained, a pattern pixel looks at its twin half a map away "
        f"(mean weight on the twin {result.partner_attention_init:.2f} → {result.partner_attention:.2f})",
    )
    figures.append(
        (
            save_figure(fig, out / "long_range_attention.png", dpi=dpi),
            "Self-attention of one pixel in each of four patterns, before and after training the "
            "long-range toy: trained, each pixel's weight sits on its identical twin.",
        )
    )

    init_d, trained_d = (float(mean_attention_distance(w, shape)[0]) for w in (result.weights_init, result.weights))
    fig = plot_attention_distance(
        {"at initialisation": result.weights_init, "trained": result.weights},
        shape,
        title=f"Trained, attention reaches further: mean distance {init_d:.1f} → {trained_d:.1f} pixels "
        f"(uniform weights: {uniform_distance(shape):.1f})",
    )
    figures.append(
        (
            save_figure(fig, out / "attention_distance.png", dpi=dpi),
            "Mean attention distance per head and its distribution over query pixels, before and after "
            "training the long-range toy.",
        )
    )

    from ..blocks import self_attention_backward

    query = queries[0]
    z = result.eval_input[b : b + 1]
    attention_field = input_gradient(result.block_forward, self_attention_backward, z, query)
    twin = np.argwhere(result.eval_data.copy_id[b] == 1)[0]
    far = float(np.hypot(*(np.array(query) - twin)))
    fields = {
        "3×3 conv ×2": conv_stack_receptive_field(2, shape, query),
        "3×3 conv ×4": conv_stack_receptive_field(4, shape, query),
        "self-attention, trained": attention_field,
    }
    fig = plot_receptive_fields(
        fields,
        query,
        image=image,
        title=f"Convs reach as many pixels as they have layers; one attention block reaches the twin {far:.0f} "
        "pixels away",
    )
    figures.append(
        (
            save_figure(fig, out / "receptive_fields.png", dpi=dpi),
            "Effective receptive field |∂y_q/∂x| of the marked pixel, from the library's backward "
            "passes: stacks of random 3×3 convolutions against the trained self-attention block.",
        )
    )

    fig = plot_weights_vs_influence(
        query_map(result.weights, query, shape, batch=b),
        attention_field,
        query,
        image=image,
        title="The weights point at the twin; the gradient adds the pixel itself (residual) and the keys",
    )
    figures.append(
        (
            save_figure(fig, out / "weights_vs_influence.png", dpi=dpi),
            "One query's attention weights next to its true influence map |∂y_q/∂x| from the backward pass.",
        )
    )
    return figures


def _grounding_figures(result: Any, out: Path, dpi: int) -> list[tuple[Path, str]]:
    scenes = result.eval_scenes
    shape = (SCENE_SIZE, SCENE_SIZE)
    b = int(np.flatnonzero(scenes.lengths == scenes.lengths.max())[0])  # a scene with three objects
    tokens = scenes.prompt(b)
    image = np.clip(scenes.images[b], 0.0, 1.0)
    mask = scenes.context_mask[b]
    figures = []
    ious = ", ".join(f"{w} {v:.2f}" for w, v in result.iou.items())

    fig = plot_token_maps(
        result.weights,
        tokens,
        shape,
        image=image,
        batch=b,
        context_mask=mask,
        title=f"Each word is read by its own object's pixels (held-out IoU: {ious})",
    )
    figures.append(
        (
            save_figure(fig, out / "token_maps.png", dpi=dpi),
            "Cross-attention weights of every prompt token over the pixels of a held-out scene, after "
            "training the grounding toy; `<sot>` and `and` collect the background.",
        )
    )

    fig = plot_token_normalizations(
        result.weights,
        tokens,
        shape,
        image=image,
        batch=b,
        context_mask=mask,
        title="Raw weights, per-token max, per-token min–max, and renormalised without special tokens",
    )
    figures.append(
        (
            save_figure(fig, out / "token_normalizations.png", dpi=dpi),
            "The same token maps under the four usual normalisations, side by side.",
        )
    )

    shape_words = [t for t in range(len(tokens)) if VOCAB[scenes.words[b, t]] in ("square", "circle", "triangle")]
    truth = np.full(shape, -1)
    for t in shape_words:
        truth[scenes.masks[b, scenes.token_object[b, t]]] = t
    agree = float(np.mean(token_segmentation(result.weights, shape, shape_words, batch=b) == truth))
    fig = plot_token_segmentation(
        result.weights,
        tokens,
        shape,
        shape_words,
        image=image,
        truth=truth,
        batch=b,
        title=f"Labelling each pixel by the shape word it attends to most: {100 * agree:.0f}% of pixels right",
    )
    figures.append(
        (
            save_figure(fig, out / "token_segmentation.png", dpi=dpi),
            "Argmax-token segmentation over the shape words next to the true objects.",
        )
    )
    return figures


DIFFUSION_PROMPT, DIFFUSION_SEED = "red circle and blue triangle", 1000  # a held-out prompt, the first eval seed


def _diffusion_figures(out: Path, dpi: int, *, quick: bool, retrain: bool) -> tuple[list[tuple[Path, str]], dict]:
    """The diffusion toy: a held-out prompt denoised step by step, each word's map under the image.

    Loads the shipped weights (``retrain``: trains them again first and overwrites them, hours).
    """
    from ..toys.diffusion import load_pretrained, sample, score_samples
    from ..toys.diffusion.model import pretrained_path
    from ..toys.diffusion.train import retrain_shipped
    from ..viz import plot_denoising_steps

    start = time.perf_counter()
    if retrain:
        retrain_shipped(pretrained_path())
    model = load_pretrained()
    steps = 10 if quick else 25
    result = sample([DIFFUSION_PROMPT], seed=DIFFUSION_SEED, steps=steps, model=model, queries=())
    score = score_samples(result.images, result.prompts, result.word_maps())
    n = len(result.tokens[0])
    held = model.log.get("evaluation", {}).get("held_out", {})
    title = (
        f"“{DIFFUSION_PROMPT}” (never seen in training) denoised in {steps} DDIM steps;\n"
        f"under the image, where each word is read (IoU of the summed maps: colour words "
        f"{score['iou_colour']:.2f}, shape words {score['iou_shape']:.2f})"
    )
    fig = plot_denoising_steps(
        (result.x0_pred[0] + 1.0) / 2.0,
        result.step_word_maps(0)[..., :n],
        result.tokens[0],
        timesteps=result.timesteps,
        image_label="predicted x̂₀",
        title=title,
    )
    caption = (
        "The NumPy diffusion U-Net draws a held-out prompt: the clean image each DDIM step predicts, and under "
        "it each token's cross-attention (mean over the 4 cross-attention layers and their heads)."
    )
    figures = [(save_figure(fig, out / "diffusion_denoising.png", dpi=dpi), caption)]
    numbers = {
        "diffusion_figure_iou": {"colour": score["iou_colour"], "shape": score["iou_shape"]},
        "diffusion_held_out": {k: held[k] for k in ("colour_accuracy", "shape_accuracy", "iou_colour", "iou_shape")}
        if held
        else {},
    }
    print(
        f"diffusion toy: weights loaded, one prompt sampled and drawn in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return figures, numbers


def make_figures(
    out: str | Path = "figures",
    *,
    quick: bool = False,
    complexity: str | Path | None = None,
    dpi: int = 80,
    progress_bar: bool | None = None,
    retrain: bool = False,
) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
    """Draw the gallery into ``out``.

    ``retrain``: train the diffusion toy again (hours) and overwrite its shipped weights, instead of
    loading them.

    Returns:
        ``[(path, one-line description), …]`` and a dict of the numbers behind the figures
        (partner attention, IoU per word, training times, scaling exponents, the diffusion toy's scores).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {"long": 40, "ground": 40} if quick else {}
    long_range = train_long_range(0, progress_bar=progress_bar, **({"steps": steps["long"]} if quick else {}))
    grounding = train_token_grounding(0, progress_bar=progress_bar, **({"steps": steps["ground"]} if quick else {}))

    if complexity is None:
        complexity = out / "complexity.json"
        parser = argparse.ArgumentParser()
        complexity_arguments(parser)
        sizes = ["--quick"] if quick else ["--sizes", *COMPLEXITY_SIZES]
        run_complexity(parser.parse_args(["--out", str(complexity), *sizes]))

    figures = _long_range_figures(long_range, out, dpi) + _grounding_figures(grounding, out, dpi)
    figures.append(
        (
            save_figure(plot_complexity(complexity), out / "complexity.png", dpi=dpi),
            "Measured time and peak memory of exact, tiled, linear, window and neighborhood attention "
            "against the number of pixels, log-log, with the theoretical memory dashed.",
        )
    )
    figures.append(
        (
            save_figure(draw_self_attention_block(), out / "self_attention_block.png", dpi=dpi),
            "The self-attention block inside a U-Net stage, every shape read off a forward pass.",
        )
    )
    figures.append(
        (
            save_figure(draw_cross_attention(), out / "cross_attention.png", dpi=dpi),
            "Cross-attention: queries from the pixels, keys and values from the text tokens.",
        )
    )

    diffusion_figures, diffusion_numbers = _diffusion_figures(out, dpi, quick=quick, retrain=retrain)
    figures += diffusion_figures

    numbers = {
        "partner_attention_init": long_range.partner_attention_init,
        "partner_attention": long_range.partner_attention,
        "long_range_accuracy": long_range.accuracy,
        "long_range_seconds": long_range.seconds,
        "iou": grounding.iou,
        "iou_init": grounding.iou_init,
        "mean_iou": grounding.mean_iou,
        "grounding_seconds": grounding.seconds,
        "memory_exponents": scaling_exponents(complexity, "peak_bytes"),
        "time_exponents": scaling_exponents(complexity, "time"),
        **diffusion_numbers,
    }
    return figures, numbers
