"""Data for the grounding toy: scenes of two or three coloured shapes, each with a prompt.

A scene is a ``16×16`` RGB image (float, background 0, light noise on top)
holding two or three non-touching objects. Each object has its own colour —
red, green or blue — and its own shape — square, circle or triangle — and a
side of 5 to 7 pixels. Its prompt lists the objects in random order::

    <sot> blue triangle and red square <eot> <pad> <pad> <pad>

padded to ``PROMPT_LENGTH`` tokens (a mask marks the real ones). The "text
encoder" is frozen: every word is a fixed random vector (:data:`VOCAB` rows of
a table drawn from a fixed seed), the way Stable Diffusion keeps CLIP frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = [
    "COLOURS",
    "PROMPT_LENGTH",
    "SHAPES",
    "SIZE",
    "SPECIAL",
    "VOCAB",
    "Scenes",
    "make_scenes",
    "word_embeddings",
]

SIZE = 16
PROMPT_LENGTH = 10
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
SHAPES = ("square", "circle", "triangle")
SPECIAL = ("<sot>", "<eot>", "<pad>")
VOCAB = (*SPECIAL, "and", *COLOURS, *SHAPES)
EMBEDDING_DIM = 16
NOISE = 0.05


def word_embeddings() -> np.ndarray:
    """``(len(VOCAB), 16)``: the frozen text encoder, one fixed random unit-scale vector per word."""
    return np.random.default_rng(2024).standard_normal((len(VOCAB), EMBEDDING_DIM)) / np.sqrt(EMBEDDING_DIM)


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """``(side, side)`` bool raster of ``shape`` ("square", "circle", "triangle" pointing up)."""
    centre = np.arange(side) + 0.5  # pixel centres
    rows, cols = np.meshgrid(centre, centre, indexing="ij")
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (rows - side / 2) ** 2 + (cols - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "triangle":
        return np.abs(cols - side / 2) <= rows / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes.

    images: ``(B, 16, 16, 3)`` RGB, noise included.
    masks: ``(B, 3, 16, 16)`` bool; object ``o``'s pixels (all False for an absent third object).
    words: ``(B, PROMPT_LENGTH)`` int indices into :data:`VOCAB`.
    token_object: ``(B, PROMPT_LENGTH)`` int; the object a colour or shape word names, else ``-1``.
    lengths: ``(B,)`` number of real tokens (the rest are ``<pad>``).
    """

    images: np.ndarray
    masks: np.ndarray
    words: np.ndarray
    token_object: np.ndarray
    lengths: np.ndarray

    @property
    def context_mask(self) -> np.ndarray:
        """``(B, PROMPT_LENGTH)`` bool, True for real tokens."""
        return np.arange(self.words.shape[1])[None, :] < self.lengths[:, None]

    def prompt(self, b: int) -> list[str]:
        """The words of scene ``b``'s prompt, padding included."""
        return [VOCAB[i] for i in self.words[b]]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: np.ndarray) -> Scenes:
        """The scenes at ``index`` (an int array)."""
        return Scenes(*(a[index] for a in (self.images, self.masks, self.words, self.token_object, self.lengths)))


def _layout(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]] | None:
    """``n`` boxes ``(row, col, side)`` that do not touch, or ``None`` if a box found no room."""
    taken = np.zeros((SIZE, SIZE), dtype=bool)
    boxes = []
    for _ in range(n):
        for _ in range(50):
            side = int(rng.integers(5, 8))
            r, c = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
            if not taken[max(r - 1, 0) : r + side + 1, max(c - 1, 0) : c + side + 1].any():
                break
        else:
            return None
        taken[r : r + side, c : c + side] = True
        boxes.append((r, c, side))
    return boxes


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    n = int(rng.integers(2, 4))
    boxes = None
    while boxes is None:
        boxes = _layout(rng, n)
    colours = rng.permutation(len(COLOURS))[:n]
    shapes = rng.permutation(len(SHAPES))[:n]
    colour_names = list(COLOURS)
    image = np.zeros((SIZE, SIZE, 3))
    masks = np.zeros((3, SIZE, SIZE), dtype=bool)
    for o, (r, c, side) in enumerate(boxes):
        masks[o, r : r + side, c : c + side] = shape_mask(SHAPES[shapes[o]], side)
        image[masks[o]] = COLOURS[colour_names[colours[o]]]
    words, token_object = [VOCAB.index("<sot>")], [-1]
    for i, o in enumerate(rng.permutation(n)):
        if i:
            words.append(VOCAB.index("and"))
            token_object.append(-1)
        words += [VOCAB.index(colour_names[colours[o]]), VOCAB.index(SHAPES[shapes[o]])]
        token_object += [int(o), int(o)]
    words.append(VOCAB.index("<eot>"))
    token_object.append(-1)
    return image, masks, words, token_object


def make_scenes(rng: np.random.Generator, count: int) -> Scenes:
    """``count`` random scenes with their prompts (module docstring), drawn from ``rng``."""
    images = np.zeros((count, SIZE, SIZE, 3))
    masks = np.zeros((count, 3, SIZE, SIZE), dtype=bool)
    words = np.full((count, PROMPT_LENGTH), VOCAB.index("<pad>"))
    token_object = np.full((count, PROMPT_LENGTH), -1)
    lengths = np.zeros(count, dtype=int)
    for b in range(count):
        image, m, w, t = _scene(rng)
        images[b], masks[b] = image, m
        words[b, : len(w)], token_object[b, : len(t)], lengths[b] = w, t, len(w)
    images += NOISE * rng.standard_normal(images.shape)
    return Scenes(images=images, masks=masks, words=words, token_object=token_object, lengths=lengths)
