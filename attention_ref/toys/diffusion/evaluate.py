r"""Scoring generated scenes: does each object have its word's colour and shape, and do the words' maps find it?

**Segmentation.** A pixel of an image in [0, 1] is an object pixel when its largest
channel exceeds 0.5; its colour is that channel (red, green, blue). Objects are the
4-connected components of pixels of one colour with at least :data:`MIN_PIXELS`
pixels (smaller specks are ignored). An object's *dominant colour* is therefore the
channel that is largest on its pixels.

**Shape classifier.** Each object's mask is compared with the raster of every shape
(square, circle, upward triangle; :func:`attention_ref.toys.scenes.shape_mask`) at every
side from 3 to 10 pixels and every placement that overlaps the object's bounding box
by a margin of up to 1 pixel; the shape whose best placement has the highest IoU with
the mask wins. :func:`shape_classifier_accuracy` measures it on true scenes.

**Matching.** The prompt names objects ``(colour, shape)``. Each named object takes the
largest unclaimed segmented object of its colour; a named object left without one takes
the largest unclaimed object of another colour (its colour is then wrong), or nothing
(missing). Segmented objects nobody claims are *extra*. Every named object and every
extra object counts once in the denominators, so missing and extra objects are errors:

* colour accuracy = named objects matched to an object of their colour / (named + extra);
* shape accuracy = named objects matched to an object the classifier calls their shape / (named + extra);
* grounding: for each colour word and each shape word, the IoU between its heat map
  (:meth:`SampleResult.word_maps <attention_ref.toys.diffusion.sample.SampleResult.word_maps>`:
  cross-attention summed over steps and layers, mean over heads), min–max normalised and
  thresholded at 0.5 (:func:`attention_ref.toys.grounding.token_iou`), and the mask of the
  object matched to its named object (0 for a missing one); averaged separately over colour
  words and over shape words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from ..grounding import token_iou
from ..scenes import COLOURS, SHAPES, Scenes, make_scenes, shape_mask
from .data import all_prompts, held_out_prompts, make_diffusion_scenes, prompt_objects
from .model import DiffusionModel
from .sample import DEFAULT_GUIDANCE, sample

__all__ = [
    "MIN_PIXELS",
    "SceneScore",
    "classify_shape",
    "evaluate_model",
    "score_samples",
    "score_scene",
    "segment_objects",
    "shape_classifier_accuracy",
]

MIN_PIXELS = 4
COLOUR_NAMES = tuple(COLOURS)  # channel order: red, green, blue
SIDES = range(3, 11)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a bool ``(H, W)`` mask, each as a bool mask (flood fill)."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    parts = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        part = np.zeros_like(mask)
        stack = [(r0, c0)]
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            part[r, c] = True
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        parts.append(part)
    return parts


def segment_objects(image: np.ndarray, *, min_pixels: int = MIN_PIXELS) -> list[tuple[str, np.ndarray]]:
    """The objects of an ``(H, W, 3)`` image in [0, 1]: ``[(colour, mask (H, W) bool), …]``, largest first."""
    image = np.asarray(image, dtype=np.float64)
    label = np.argmax(image, axis=-1)
    on = image.max(axis=-1) > 0.5
    objects = []
    for channel, colour in enumerate(COLOUR_NAMES):
        for part in _components(on & (label == channel)):
            if part.sum() >= min_pixels:
                objects.append((colour, part))
    objects.sort(key=lambda o: -int(o[1].sum()))
    return objects


@cache
def _templates() -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((shape, shape_mask(shape, side)) for shape in SHAPES for side in SIDES)


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """For each shape, the best IoU of its raster (any side, any placement near the mask) with ``mask``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return {s: 0.0 for s in SHAPES}
    H, W = mask.shape
    pad = 12  # room for a template of the largest side (10) to overhang the mask on any side
    big = np.zeros((H + 2 * pad, W + 2 * pad), dtype=bool)
    big[pad : pad + H, pad : pad + W] = mask
    area = int(mask.sum())
    r0, c0 = rows.min() + pad, cols.min() + pad
    best = {s: 0.0 for s in SHAPES}
    for shape, tmpl in _templates():
        k = tmpl.shape[0]
        t_area = int(tmpl.sum())
        for dr in range(-1, 2 + max(0, rows.max() - rows.min() + 1 - k)):
            for dc in range(-1, 2 + max(0, cols.max() - cols.min() + 1 - k)):
                window = big[r0 + dr : r0 + dr + k, c0 + dc : c0 + dc + k]
                inter = int(np.sum(window & tmpl))
                iou = inter / (area + t_area - inter)
                if iou > best[shape]:
                    best[shape] = iou
    return best


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose raster fits ``mask`` (bool ``(H, W)``) best (module docstring)."""
    scores = shape_scores(mask)
    return max(SHAPES, key=lambda s: scores[s])


def shape_classifier_accuracy(scenes: Scenes) -> float:
    """Fraction of the true objects of ``scenes`` whose shape :func:`classify_shape` gets right.

    Each true object is found by segmenting the image (:func:`segment_objects`) and taking
    the segmented object that overlaps its mask most; an object not found counts as wrong.
    """
    right = total = 0
    for b in range(len(scenes)):
        found = segment_objects(np.clip(scenes.images[b], 0.0, 1.0))
        for t in np.flatnonzero(scenes.token_object[b] >= 0):
            word = scenes.prompt(b)[t]
            if word not in SHAPES:
                continue
            truth = scenes.masks[b, scenes.token_object[b, t]]
            total += 1
            overlaps = [int(np.sum(m & truth)) for _, m in found]
            if overlaps and max(overlaps) > 0:
                right += classify_shape(found[int(np.argmax(overlaps))][1]) == word
    return right / max(total, 1)


@dataclass
class SceneScore:
    """One generated scene's score (module docstring).

    named: objects the prompt names; extra: segmented objects no named object claimed.
    colour_ok, shape_ok: per named object. iou_colour, iou_shape: per named object, its colour
    word's and shape word's map against its matched object (0 if missing).
    found: per named object, ``(colour, shape)`` of the matched object, or ``None``.
    masks: per named object, the matched object's pixels ``(16, 16)`` bool, or ``None``.
    """

    named: list[tuple[str, str]]
    extra: int
    colour_ok: list[bool]
    shape_ok: list[bool]
    iou_colour: list[float]
    iou_shape: list[float]
    found: list[tuple[str, str] | None]
    masks: list[np.ndarray | None]


def score_scene(image: np.ndarray, prompt: str, word_maps: np.ndarray | None = None) -> SceneScore:
    """Score one generated image against its prompt.

    Inputs:
        image: ``(16, 16, 3)`` in [0, 1].
        prompt: e.g. ``"red square and blue circle"``.
        word_maps: ``(16, 16, M)`` the heat map of every token (``<sot>`` at 0, object ``o``'s colour
            word at ``1 + 3o``, its shape word at ``2 + 3o``); ``None``: no grounding scores (NaN).
    """
    named = prompt_objects(prompt)
    objects = segment_objects(image)
    claimed = [False] * len(objects)
    match: list[int | None] = [None] * len(named)
    for i, (colour, _) in enumerate(named):  # first, an object of the named colour
        for j, (c, _) in enumerate(objects):
            if not claimed[j] and c == colour:
                match[i], claimed[j] = j, True
                break
    for i in range(len(named)):  # then, for the rest, any object left
        if match[i] is None:
            for j in range(len(objects)):
                if not claimed[j]:
                    match[i], claimed[j] = j, True
                    break
    score = SceneScore(named, claimed.count(False), [], [], [], [], [], [])
    for o, ((colour, shape), j) in enumerate(zip(named, match, strict=True)):
        if j is None:
            score.found.append(None)
            score.masks.append(None)
            score.colour_ok.append(False)
            score.shape_ok.append(False)
            score.iou_colour.append(0.0)
            score.iou_shape.append(0.0)
            continue
        c, m = objects[j]
        got = classify_shape(m)
        score.found.append((c, got))
        score.masks.append(m)
        score.colour_ok.append(c == colour)
        score.shape_ok.append(got == shape)
        if word_maps is None:
            score.iou_colour.append(float("nan"))
            score.iou_shape.append(float("nan"))
        else:
            score.iou_colour.append(token_iou(word_maps[:, :, 1 + 3 * o], m))
            score.iou_shape.append(token_iou(word_maps[:, :, 2 + 3 * o], m))
    return score


def score_samples(images: np.ndarray, prompts: Sequence[str], word_maps: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy and grounding over many generated scenes (module docstring for the definitions).

    Inputs:
        images: ``(B, 16, 16, 3)`` in [0, 1]; prompts: ``B`` prompts;
        word_maps: ``(B, 16, 16, M)`` or ``None``.

    Returns:
        ``{"colour_accuracy", "shape_accuracy", "iou_colour", "iou_shape", "objects" (named + extra),
        "named", "extra", "missing", "images"}``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, one per image, not one string")
    lengths = {"images": len(images), "prompts": len(prompts)} | (
        {} if word_maps is None else {"word_maps": len(word_maps)}
    )
    if len(set(lengths.values())) != 1:
        raise ValueError(f"score_samples needs one prompt (and word map) per image, got {lengths}")
    scores = [
        score_scene(images[b], prompts[b], None if word_maps is None else word_maps[b]) for b in range(len(prompts))
    ]
    named = sum(len(s.named) for s in scores)
    extra = sum(s.extra for s in scores)
    objects = named + extra
    return {
        "colour_accuracy": sum(sum(s.colour_ok) for s in scores) / max(objects, 1),
        "shape_accuracy": sum(sum(s.shape_ok) for s in scores) / max(objects, 1),
        "iou_colour": float(np.mean([v for s in scores for v in s.iou_colour])) if named else float("nan"),
        "iou_shape": float(np.mean([v for s in scores for v in s.iou_shape])) if named else float("nan"),
        "objects": objects,
        "named": named,
        "extra": extra,
        "missing": sum(f is None for s in scores for f in s.found),
        "images": len(scores),
    }


def evaluate_prompts(
    model: DiffusionModel,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    guidance: float = DEFAULT_GUIDANCE,
    steps: int = 25,
) -> dict[str, Any]:
    """Generate every prompt once per seed (one batch per seed) and :func:`score_samples` them."""
    images, maps, names = [], [], []
    for seed in seeds:
        result = sample(prompts, seed=seed, steps=steps, guidance=guidance, model=model, queries=())
        images.append(result.images)
        maps.append(result.word_maps())
        names += list(prompts)
    return score_samples(np.concatenate(images), names, np.concatenate(maps))


EVAL_SEEDS = tuple(range(1000, 1016))  # sampling seeds; training draws its noise from SeedSequence(0)


def evaluate_model(
    model: DiffusionModel,
    *,
    seeds: Sequence[int] = EVAL_SEEDS,
    guidance: float = DEFAULT_GUIDANCE,
    steps: int = 25,
    baseline: DiffusionModel | None = None,
) -> dict[str, Any]:
    """The full evaluation of the log: held-out prompts, training prompts with new seeds, the untrained baseline.

    Returns:
        ``{"held_out": …, "train_prompts": …, "baseline_held_out": …, "shape_classifier": …, "settings": …}``,
        each scores as in :func:`score_samples`; the baseline is a fresh model of the same config
        (seed 0) unless ``baseline`` is given.
    """
    baseline = baseline or DiffusionModel.fresh(model.config, seed=0, dtype=model.dtype)
    held = held_out_prompts()
    rng = np.random.default_rng(7)
    train = list(rng.choice(all_prompts(2), size=8, replace=False))
    classifier = {
        "toys.scenes (2–3 objects, pixel noise)": shape_classifier_accuracy(make_scenes(np.random.default_rng(1), 500)),
        "diffusion scenes (1–2 objects)": shape_classifier_accuracy(
            make_diffusion_scenes(np.random.default_rng(2), 500)
        ),
    }
    return {
        "settings": {"seeds": list(seeds), "guidance": guidance, "steps": steps, "held_out_prompts": held},
        "held_out": evaluate_prompts(model, held, seeds=seeds, guidance=guidance, steps=steps),
        "train_prompts": evaluate_prompts(model, train, seeds=seeds, guidance=guidance, steps=steps),
        "baseline_held_out": evaluate_prompts(baseline, held, seeds=seeds, guidance=guidance, steps=steps),
        "shape_classifier": classifier,
    }
