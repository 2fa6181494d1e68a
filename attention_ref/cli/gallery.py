"""The README's gallery: every figure of ``python -m attention_ref figures``, drawn from trained toys.

Trains the two toys (:mod:`attention_ref.toys`), measures the attention
variants' costs (:mod:`attention_ref.bench.complexity`, unless ``--complexity FILE``
gives a report already made), and draws every figure with
:mod:`attention_ref.viz`. Prints one line per figure saying what it shows, then
the numbers behind them. ``--quick`` trains briefly and measures small maps:
a smoke test, not the gallery.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..toys import train_long_range, train_token_grounding
from ..toys._progress import toy_threads
from ..toys.long_range import LongRangeResult
from ..toys.scenes import SIZE as SCENE_SIZE
from ..toys.scenes import VOCAB
from ..viz import (
    conv_stack_receptive_field,
    draw_cross_attention,
    draw_self_attention_block,
    input_gradient,
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
    token_maps,
    token_segmentation,
    weight_within,
)
from .complexity import add_arguments as complexity_arguments
from .complexity import main as run_complexity

__all__ = ["make_figures"]

LONG_RANGE_BACKDROP = (
    "grey underneath the colours: the input map, the length of each pixel's channel vector "
    "(the four 2×2 patterns are the light squares)"
)
SCENE_BACKDROP = "grey underneath the colours: the scene's luminance"

COMPLEXITY_SIZES = ("16", "32", "48", "64", "96", "128")


# every figure of the gallery, in the order drawn, with the line printed under it (its {fields} filled in by
# the numbers of the run: _saved)
CAPTIONS = {
    "long_range_attention.png": (
        "Self-attention of one pixel in each of four patterns, before and after training the "
        "long-range toy, on one logarithmic scale: at initialisation every weight is near uniform "
        "(1/{pixels}); trained, each pixel's weight sits on its identical twin."
    ),
    "attention_distance.png": (
        "Left: the share of a pattern pixel's attention weight within distance r, averaged over the pattern "
        "pixels of the held-out maps, before and after training the long-range toy (one head), against "
        "all weight on the twin and uniform weights. Right: the share of the influence |∂y/∂x| within r, "
        "for stacked 3×3 convolutions at the map's centre and for the trained attention block at one "
        "pattern pixel."
    ),
    "receptive_fields.png": (
        "Effective receptive field |∂y_q/∂x| of the marked pixel, from the library's backward "
        "passes: stacks of random 3×3 convolutions against the trained self-attention block, each "
        "map divided by its maximum, over the input map in grey."
    ),
    "weights_vs_influence.png": (
        "One query's attention weights next to its true influence map |∂y_q/∂x| from the backward pass, each "
        "on a logarithmic scale of four decades below its maximum: the other keys' weights are far below it, "
        "and the faint floor of the influence is the group norm's statistics, which every pixel moves."
    ),
    "token_maps.png": (
        "The held-out scene in colour, then the cross-attention weights of every prompt token over its "
        "pixels after training the grounding toy, on one scale; `<sot>` and `and` collect the background."
    ),
    "token_normalizations.png": (
        "Five of the token maps under the usual normalisations, one row each, each row with its own "
        "labelled colour bar: ÷ max rescues a token read weakly everywhere, not one read strongly in a few "
        "pixels; a normalisation that looks the same as an earlier row is left out, and the note under the "
        "figure says so and why."
    ),
    "token_segmentation.png": "Argmax-token segmentation over the shape words next to the true objects.",
    "complexity.png": (
        "Forward + backward cost of exact, tiled, linear, window and neighborhood attention against the "
        "number of pixels, log-log: the operation counts (lines) with the measured CPU time of one thread "
        "(dots, best of several runs), and the measured peak memory with the theory dashed (the arrays a pass "
        "must hold; the measured peaks sit about 2–3× above it, the backward's temporaries)."
    ),
    "self_attention_block.png": (
        "A U-Net stage: a ResBlock that adds the timestep embedding, then the self-attention block, one "
        "column per head, every tensor named and every shape read off a forward pass."
    ),
    "cross_attention.png": (
        "Cross-attention: queries from the pixels, keys and values from the text tokens, one column per head; "
        "the projections' biases drawn as the library's blocks have them (diffusers' have none)."
    ),
    "diffusion_denoising.png": (
        "The NumPy diffusion U-Net draws a held-out prompt: the clean image x̂₀ six of its 25 DDIM steps predict, and "
        "under it each token's cross-attention at that step (mean over the {layers} "
        "cross-attention layers and their heads), drawn on one linear scale with the final image's objects outlined."
    ),
}


def _saved(fig: Any, out: Path, name: str, dpi: int, **numbers: Any) -> tuple[Path, str]:
    """The matplotlib figure ``fig`` saved as ``out/name``, and its caption (:data:`CAPTIONS`, its fields filled
    from ``numbers``)."""
    return save_figure(fig, out / name, dpi=dpi), CAPTIONS[name].format(**numbers)


def _pattern_queries(result: LongRangeResult, b: int) -> list[tuple[int, int]]:
    """The top-left pixel of every pattern copy in evaluation map ``b``, copy 0, 1, 2, …"""
    ids = result.eval_data.copy_id[b]
    return [tuple(int(v) for v in np.argwhere(ids == c)[0]) for c in range(ids.max() + 1)]


def _twin_distances(copy_id: np.ndarray) -> np.ndarray:
    """``(B, S, S)``: on every pixel of a pattern copy, how far its twin copy is (between their top-left
    pixels, so between matching pixels); 0 on the background."""
    out = np.zeros(copy_id.shape)
    for b, ids in enumerate(copy_id):
        for copy in np.unique(ids[ids >= 0]):
            here, there = np.argwhere(ids == copy)[0], np.argwhere(ids == (copy ^ 1))[0]  # copies 2p ↔ 2p + 1
            out[b][ids == copy] = np.hypot(*(here - there))
    return out


def _share_from(weights: np.ndarray, shape: tuple[int, int], queries: np.ndarray, r: float) -> float:
    """The mean, over the ``queries`` pixels, of the share of head 0's weight at distance ``r`` or more."""
    radii, within = weight_within(weights, shape)  # (B, heads, N, R)
    below = int(np.searchsorted(radii, r - 1e-9)) - 1  # the largest radius under r
    inside = within[:, 0][queries.reshape(len(weights), -1)]  # (queries, R)
    return 1.0 - float(inside[:, below].mean()) if below >= 0 else 1.0


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
        log=True,
        backdrop_note=LONG_RANGE_BACKDROP,
        title=f"Trained, a pattern pixel looks at its twin half a map away "
        f"(mean weight on the twin {result.partner_attention_init:.2f} → {result.partner_attention:.2f})",
    )
    figures.append(_saved(fig, out, "long_range_attention.png", dpi, pixels=size * size))

    from ..blocks import self_attention_backward

    query = queries[0]
    z = result.eval_input[b : b + 1]
    attention_field = input_gradient(result.block_forward, self_attention_backward, z, query)
    centre = (size // 2, size // 2)
    fields = {
        f"3×3 conv ×{layers}, at the centre (row {centre[0]}, col {centre[1]})": (
            conv_stack_receptive_field(layers, shape, centre),
            centre,
        )
        for layers in (2, 4)
    }
    fields[f"self-attention block, trained, at (row {query[0]}, col {query[1]})"] = (attention_field, query)
    inside = result.eval_data.copy_id >= 0  # (B, S, S): the pattern pixels
    twin = _twin_distances(result.eval_data.copy_id)
    near = float(twin[inside].min())
    far = {
        name: _share_from(w, shape, inside, near)
        for name, w in (("init", result.weights_init), ("trained", result.weights))
    }
    fig = plot_attention_distance(
        {"at initialisation": result.weights_init, "trained": result.weights},
        shape,
        queries=inside,
        target=twin,
        target_label="all weight on the twin",
        fields=fields,
        title=f"Trained, {far['trained']:.0%} of a pattern pixel's weight lies {near:.0f} px or more away, where "
        f"the twins are ({far['init']:.0%} at initialisation);\nstacked 3×3 convs move an output pixel only from "
        "a few pixels around it, the attention block from its twin too",
    )
    figures.append(_saved(fig, out, "attention_distance.png", dpi))

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
        backdrop_note=LONG_RANGE_BACKDROP,
        title=f"Convs reach as many pixels as they have layers; one attention block reaches the twin {far:.0f} "
        "pixels away",
    )
    figures.append(_saved(fig, out, "receptive_fields.png", dpi))

    weights = query_map(result.weights, query, shape, batch=b)
    others = np.ones(shape, dtype=bool)
    others[tuple(query)] = others[tuple(twin)] = False
    floor = float(np.median(attention_field) / attention_field.max())
    fig = plot_weights_vs_influence(
        weights,
        attention_field,
        query,
        image=image,
        backdrop_note=LONG_RANGE_BACKDROP,
        title=f"The weights sit on the twin ({weights[tuple(twin)]:.2f}) and the pixel itself "
        f"({weights[tuple(query)]:.2f}), under {weights[others].max():.0e} elsewhere;\nthe gradient adds the "
        f"residual at the pixel and, through the group norm's mean and variance, about 1/{round(1 / floor, -1):.0f} "
        "of its largest from every pixel",
    )
    figures.append(_saved(fig, out, "weights_vs_influence.png", dpi))
    return figures


def _pixels(n: int) -> str:
    """ "1 bright pixel keeps", "2 bright pixels keep" """
    return f"{n} bright pixel keeps" if n == 1 else f"{n} bright pixels keep"


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
        scene=True,
        backdrop_note=SCENE_BACKDROP,
        title=f"Each word is read by its own object's pixels (held-out IoU: {ious})",
    )
    figures.append(_saved(fig, out, "token_maps.png", dpi))

    show = [0, 1, 2, 3, int(scenes.lengths[b]) - 1]  # <sot>, a colour, a shape, "and", <eot>
    raw = token_maps(result.weights, shape, batch=b)[show]  # (5, H, W)
    top = token_maps(result.weights, shape, batch=b, normalization="token_max")[show]
    faint = [i for i in range(len(show)) if raw[i].max() <= 0.5 * raw.max()]  # dim on the shared raw scale
    lifted = max(faint, key=lambda i: top[i].mean()) if faint else None
    darkest = min(range(len(show)), key=lambda i: top[i].mean())  # ÷ max leaves it dark: one pixel holds its max
    lift = (
        f"÷ each token's max lifts “{tokens[show[lifted]]}”, faint on the raw scale, to full strength, "
        if lifted is not None and lifted != darkest
        else "÷ each token's max gives every map its own scale, "
    )
    fig = plot_token_normalizations(
        result.weights,
        tokens,
        shape,
        image=image,
        batch=b,
        show=show,
        backdrop_note=SCENE_BACKDROP,
        title=f"{lift}but {_pixels(int((top[darkest] > 0.5).sum()))} the rest of “{tokens[show[darkest]]}” dark;\n"
        "renormalised without the special tokens, the background goes to “and”",
    )
    figures.append(_saved(fig, out, "token_normalizations.png", dpi))

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
    figures.append(_saved(fig, out, "token_segmentation.png", dpi))
    return figures


def _diffusion_figures(
    out: Path, dpi: int, *, quick: bool, retrain: bool, say: Callable[[str], None]
) -> tuple[list[tuple[Path, str]], dict]:
    """The diffusion toy: a held-out prompt denoised step by step, each word's map under the image.

    Loads the shipped weights (``retrain``: trains them again first and overwrites them, hours).
    """
    from ..toys.diffusion import EXAMPLE_PROMPT, load_pretrained, sample, score_samples
    from ..toys.diffusion.evaluate import EVAL_SEEDS, classify_shape, segment_objects
    from ..toys.diffusion.model import pretrained_path
    from ..toys.diffusion.train import retrain_shipped
    from ..viz import plot_denoising_steps

    if retrain:
        say("training the diffusion U-Net again (hours) and overwriting its shipped weights")
        retrain_shipped(pretrained_path())
    say("the diffusion toy: loading its shipped weights, sampling a held-out prompt")
    model = load_pretrained()
    steps = 10 if quick else 25
    result = sample([EXAMPLE_PROMPT], seed=EVAL_SEEDS[0], steps=steps, model=model, queries=())
    score = score_samples(result.images, result.prompts, result.word_maps())
    n = len(result.tokens[0])
    held = model.log.get("evaluation", {}).get("held_out", {})
    objects = segment_objects(result.images[0])  # the final image's objects: [(colour, mask)], largest first
    outlines = {f"{colour} {classify_shape(mask)}": mask for colour, mask in objects}
    title = (
        f"“{EXAMPLE_PROMPT}” (never seen in training) denoised in {steps} DDIM steps: each word's map at six steps\n"
        f"(IoU of the maps summed over all steps and layers: colour words {score['iou_colour']:.2f}, "
        f"shape words {score['iou_shape']:.2f})"
    )
    fig = plot_denoising_steps(
        (result.x0_pred[0] + 1.0) / 2.0,
        result.step_word_maps(0)[..., :n],
        result.tokens[0],
        timesteps=result.timesteps,
        outlines=outlines,
        image_label="predicted x̂₀",
        map_label=f"cross-attention weight\n(mean of the {len(result.cross_layers())} layers and their heads)",
        title=title,
    )
    figures = [_saved(fig, out, "diffusion_denoising.png", dpi, layers=len(result.cross_layers()))]
    numbers = {
        "diffusion_figure_iou": {"colour": score["iou_colour"], "shape": score["iou_shape"]},
        "diffusion_held_out": {k: held[k] for k in ("colour_accuracy", "shape_accuracy", "iou_colour", "iou_shape")}
        if held
        else {},
    }
    say("diffusion figure drawn")
    return figures, numbers


def make_figures(
    out: str | Path = "figures",
    *,
    quick: bool = False,
    complexity: str | Path | None = None,
    dpi: int = 80,
    progress_bar: bool | None = None,
    log: Callable[[str], None] | None = None,
    retrain: bool = False,
) -> tuple[list[tuple[Path, str]], dict[str, Any]]:
    """Draw the gallery into ``out``, overwriting the PNGs (and ``complexity.json``) already there.

    Inputs:
        out: the folder; ``figures`` is the gallery committed with the project.
        quick: short training, small maps: a smoke test, not the gallery.
        complexity: a complexity report to plot instead of measuring one (then ``out/complexity.json``
            is left alone).
        dpi: resolution of the PNGs.
        progress_bar: tqdm bars during training (``None``: only in a terminal or a notebook).
        log: called with a line at the start and the end of each stage (training, measuring, drawing).
        retrain: train the diffusion toy again (hours) and overwrite its shipped weights, instead of
            loading them.

    Returns:
        ``[(path, one-line description), …]`` and a dict of the numbers behind the figures
        (partner attention, IoU per word, training times, scaling exponents, the diffusion toy's scores).
    """
    say = log or (lambda _line: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {"steps": 40} if quick else {}
    # the toys train on toy_threads() (ATTENTION_REF_NUM_THREADS, else 1, BLAS included: see attention_ref.backend);
    # the complexity measurement runs on one thread (attention_ref.bench.measure.one_thread)
    say(f"training the long-range toy (self-attention) on {toy_threads()} thread(s), then the grounding toy")
    long_range = train_long_range(0, progress_bar=progress_bar, **steps)
    say(f"long-range toy trained in {long_range.seconds:.0f} s: partner attention {long_range.partner_attention:.2f}")
    say("training the grounding toy (cross-attention)")
    grounding = train_token_grounding(0, progress_bar=progress_bar, **steps)
    say(f"grounding toy trained in {grounding.seconds:.0f} s: mean IoU {grounding.mean_iou:.2f}")

    if complexity is None:
        complexity = out / "complexity.json"
        parser = argparse.ArgumentParser()
        complexity_arguments(parser)
        sizes = ["--quick"] if quick else ["--sizes", *COMPLEXITY_SIZES]
        say(f"measuring the attention variants' time and memory into {complexity} (a line per size and variant)")
        run_complexity(parser.parse_args(["--out", str(complexity), *sizes]))
        say("measured")

    say("drawing the long-range figures")
    figures = _long_range_figures(long_range, out, dpi)
    say("drawing the grounding figures")
    figures += _grounding_figures(grounding, out, dpi)
    say("drawing the cost curves and the diagrams")
    figures.append(_saved(plot_complexity(complexity), out, "complexity.png", dpi))
    figures.append(_saved(draw_self_attention_block(), out, "self_attention_block.png", dpi))
    figures.append(_saved(draw_cross_attention(), out, "cross_attention.png", dpi))
    diffusion_figures, diffusion_numbers = _diffusion_figures(out, dpi, quick=quick, retrain=retrain, say=say)
    figures += diffusion_figures
    say(f"{len(figures)} figures written to {out}")

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
