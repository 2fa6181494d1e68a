"""``python -m attention_ref explore --out explorer.html``: the attention explorer as one self-contained web page.

``--source`` picks what the page shows:

* ``long-range`` (default): the long-range toy's self-attention block
  (:func:`attention_ref.toys.train_long_range`), trained and at initialisation;
* ``grounding``: the grounding toy's cross-attention block
  (:func:`attention_ref.toys.train_token_grounding`), trained and at initialisation;
* ``diffusion``: the diffusion U-Net's eight attention layers at each of its 25 denoising steps,
  drawing a prompt never seen in training (:func:`attention_ref.toys.diffusion.sample`, shipped weights);
* ``FILE.npz``: a page's data written by :meth:`attention_ref.viz.Explorer.save_npz`.

A new source is one entry ``name: (help text, builder)`` of :data:`SOURCES`, where
``builder(steps=..., seed=...)`` returns the :class:`~attention_ref.viz.Explorer` (``None`` for either: its default).
The page (:mod:`attention_ref.viz.explorer`) holds its data and script inline: open
it in any browser, without a server or a network.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the viz package loads matplotlib: imported when a page is made
    from ..viz import Explorer

__all__ = ["SOURCES", "add_arguments", "diffusion_explorer", "grounding_explorer", "long_range_explorer", "main"]


def long_range_explorer(
    steps: int | None = None, seed: int | None = None, progress_bar: bool | None = None
) -> Explorer:
    """The long-range toy's self-attention on a held-out map, trained and at initialisation.

    The image shows the first three of the 8 code channels as colours, squashed by a sigmoid
    (twins carry the same code, so they look alike); the background is black.
    """
    from ..toys import train_long_range
    from ..viz import Explorer, ExplorerLayer

    result = train_long_range(seed or 0, progress_bar=progress_bar, **({} if steps is None else {"steps": steps}))
    b = 0
    data = result.eval_data
    H, W = data.copy_id.shape[1:]
    code = data.x[b, :, :, :3]  # (H, W, 3): the first three code channels
    image = np.where(data.copy_id[b, :, :, None] >= 0, 1.0 / (1.0 + np.exp(-2.0 * code)), 0.0)
    first = np.argwhere(data.copy_id[b] == 0)[0]  # the top-left pixel of copy 0
    layers = [
        ExplorerLayer("trained", "self", (H, W), result.weights[b][None]),  # (1, heads, N, N)
        ExplorerLayer("at initialisation", "self", (H, W), result.weights_init[b][None]),
    ]
    return Explorer(
        layers=tuple(layers),
        image=image,
        title="Self-attention learns to look half a map away",
        notes=(
            f"A self-attention block trained ({len(result.losses)} Adam steps, {result.seconds:.0f} s) to give "
            "every pixel of a 2×2 pattern the message of its identical twin, at least half the map away. "
            "The input shows three of each pixel's 8 code channels as colours: twins look alike. Hover a "
            "pattern pixel to see where its weight goes. Over the held-out pattern pixels, the mean weight on "
            f"the twin is {result.partner_attention:.2f} trained and {result.partner_attention_init:.2f} at "
            "initialisation (pick that layer to compare)."
        ),
        start_query=((first[0] + 0.5) / H, (first[1] + 0.5) / W),
    )


def grounding_explorer(steps: int | None = None, seed: int | None = None, progress_bar: bool | None = None) -> Explorer:
    """The grounding toy's cross-attention on a held-out scene of three objects, trained and at initialisation.

    The page keeps the prompt's real tokens (the padding, masked out, has weight 0 everywhere).
    """
    from ..toys import train_token_grounding
    from ..viz import Explorer, ExplorerLayer

    result = train_token_grounding(seed or 0, progress_bar=progress_bar, **({} if steps is None else {"steps": steps}))
    scenes = result.eval_scenes
    b = int(np.flatnonzero(scenes.lengths == scenes.lengths.max())[0])  # a scene with three objects
    real = np.flatnonzero(scenes.context_mask[b])
    tokens = [scenes.prompt(b)[t] for t in real]
    H, W = scenes.images.shape[1:3]
    layers = [
        ExplorerLayer(name, "cross", (H, W), w[b][None][..., real])  # (1, heads, N, real tokens)
        for name, w in (("trained", result.weights), ("at initialisation", result.weights_init))
    ]
    rows, cols = np.nonzero(scenes.masks[b, 0])
    ious = ", ".join(f"{w} {v:.2f}" for w, v in result.iou.items())
    return Explorer(
        layers=tuple(layers),
        image=np.clip(scenes.images[b], 0.0, 1.0),
        tokens=tokens,
        title="Cross-attention learns which pixels each word names",
        notes=(
            f"A cross-attention block trained ({len(result.losses)} Adam steps, {result.seconds:.0f} s) to copy "
            "numbers carried by the words of the prompt to the pixels of the objects they name. Click a word "
            "to see which pixels read it. How well each word's thresholded map covers its own objects on held-out "
            f"scenes (IoU, 1 = exactly): {ious}."
        ),
        start_query=((rows.mean() + 0.5) / H, (cols.mean() + 0.5) / W),
    )


def diffusion_explorer(steps: int | None = None, seed: int | None = None, prompt: str | None = None) -> Explorer:
    """The diffusion U-Net (shipped weights) drawing ``prompt``: every attention layer at every DDIM step.

    ``prompt``: default :data:`~attention_ref.toys.diffusion.EXAMPLE_PROMPT`, a pair never drawn together
    in training. ``seed``: the starting noise (default 1000, the first evaluation seed; training never
    draws it). ``steps`` must be None: the model is loaded, not trained.
    """
    from ..toys.diffusion import EXAMPLE_PROMPT, held_out_prompts, load_pretrained, sample, score_samples
    from ..toys.diffusion.evaluate import EVAL_SEEDS
    from ..viz import sample_explorer

    if steps is not None:
        raise ValueError("the diffusion toy loads its shipped weights: --steps (training steps) does not apply")
    prompt = EXAMPLE_PROMPT if prompt is None else prompt
    model = load_pretrained()
    result = sample([prompt], seed=EVAL_SEEDS[0] if seed is None else seed, model=model)
    score = score_samples(result.images, result.prompts, result.word_maps())
    held = model.log.get("evaluation", {}).get("held_out", {})
    overall = (
        f" Over {held['images']} images of the {len(held_out_prompts())} held-out prompts the summed maps "
        f"score IoU {held['iou_colour']:.2f} (colour words) and {held['iou_shape']:.2f} (shape words)."
        if {"images", "iou_colour", "iou_shape"} <= held.keys()
        else ""
    )
    which = "a prompt it never saw" if prompt in held_out_prompts() else "a prompt of its training set"
    notes = (
        f"A small text-to-image diffusion U-Net in NumPy ({sum(v.size for v in model.params.values()):,} "
        f"parameters, trained with the library's own backward passes) draws {which}, in "
        f"{len(result.timesteps)} DDIM steps with guidance {result.guidance:g}. Move the step slider to watch "
        "the maps form as the image does; click a word to see which pixels read it, a pixel to see where "
        f"it looks (self-attention layers keep {len(result.queries)} query pixels). For this image, the word "
        f"maps summed over steps and layers cover their objects with IoU {score['iou_colour']:.2f} (colour "
        f"words) and {score['iou_shape']:.2f} (shape words), 1 being exact.{overall}"
    )
    return sample_explorer(result, 0, notes=notes)


# name → (help, builder): builder(steps=None or the --steps given, seed=...) -> Explorer
SOURCES: dict[str, tuple[str, Callable[..., Explorer]]] = {
    "long-range": ("the long-range toy's self-attention", long_range_explorer),
    "grounding": ("the grounding toy's cross-attention", grounding_explorer),
    "diffusion": ("the diffusion U-Net's attention at every denoising step (shipped weights)", diffusion_explorer),
}


DESCRIPTION = """\
Write the attention explorer: one self-contained web page (no server, no
network) on which you click a pixel to see where it attends, or a word to see
which pixels read it, layer by layer and head by head.

What the page shows comes from --source:
  long-range  a self-attention block trained on the spot (seconds) to read a
              pattern's twin half a map away
  grounding   a cross-attention block trained on the spot (half a minute) to
              tie the words of a prompt to their objects
  diffusion   the NumPy diffusion U-Net (shipped weights) drawing a prompt:
              8 attention layers at each of 25 denoising steps
  FILE.npz    a page's data written before (--npz, or Explorer.save_npz)

The page and the .npz are written only when both succeed, and only into a
folder that exists."""

EPILOG = """\
examples:
  python -m attention_ref explore
      the long-range toy, written to explorer.html
  python -m attention_ref explore --source diffusion --out unet.html
  python -m attention_ref explore --source grounding --steps 300 --seed 1 \\
      --npz grounding.npz
  python -m attention_ref explore --source grounding.npz --out again.html"""


def _source(value: str) -> str:
    """argparse type: a source name or a file name ending in .npz (read when the command runs)."""
    if value in SOURCES or value.endswith(".npz"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither one of {', '.join(SOURCES)} nor a .npz file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options, for ``python -m attention_ref explore``."""
    from .common import non_negative_int, positive_int

    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument(
        "--out", default="explorer.html", metavar="FILE.html", help="the page to write (default: %(default)s)"
    )
    parser.add_argument(
        "--source",
        type=_source,
        default="long-range",
        metavar="SOURCE",
        help=f"{', '.join(SOURCES)} or FILE.npz: what the page shows (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help="training steps of a toy trained on the spot (default: the toy's own, 600 or 1,200)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        metavar="N",
        help="the toy's seed (default 0), or the diffusion U-Net's starting noise (default 1000)",
    )
    parser.add_argument(
        "--npz", metavar="FILE.npz", help="also write the page's data to this file, to open it again later"
    )


def main(args: argparse.Namespace) -> int:
    """Build the page of ``args.source``, write it to ``args.out`` (and ``args.npz``), and say what it holds."""
    from .common import EXIT_USAGE, CommandError, check_output_file, printable, reading, write_all

    start = time.perf_counter()
    if args.steps is not None and args.source not in ("long-range", "grounding"):
        what = "the diffusion toy loads its weights" if args.source == "diffusion" else "not to a .npz file"
        raise CommandError(f"--steps applies to the toys trained on the spot; {what}", EXIT_USAGE)
    outputs = [("--out", check_output_file("--out", args.out), lambda path: page.save(path))]
    if args.npz is not None:
        outputs.append(("--npz", check_output_file("--npz", args.npz), lambda path: page.save_npz(path)))
    if len({target.resolve() for _, target, _ in outputs}) < len(outputs):
        raise CommandError("--out and --npz name the same file", EXIT_USAGE)
    if args.source in SOURCES:
        page = SOURCES[args.source][1](steps=args.steps, seed=args.seed)
    else:
        from ..viz import load_explorer

        with reading(args.source):
            page = load_explorer(args.source)
    write_all(outputs)
    out = outputs[0][1]
    layers = ", ".join(f"{printable(L.name)} ({L.kind}, {L.grid[0]}×{L.grid[1]})" for L in page.layers)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB, layers {layers}; open it in any browser")
    if args.npz is not None:
        print(f"{outputs[1][1]}: the page's data, for --source {outputs[1][1]}")
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
