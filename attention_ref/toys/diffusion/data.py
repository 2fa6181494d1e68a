r"""Training data for the diffusion toy: scenes of one or two coloured shapes, their prompts, the text encoder.

The scenes are those of :mod:`attention_ref.toys.scenes` — 16×16 RGB, red, green or blue
squares, circles and triangles of side 5 to 7, objects that do not touch, a prompt such as
``<sot> blue triangle and red square <eot>`` and the same frozen word embeddings as the
text encoder — with one or two objects instead of two or three, and no added pixel noise
(the diffusion adds its own).

Within a scene, colours differ and shapes differ (as in ``toys.scenes``). There are 9
one-object prompts and 18 unordered pairs of objects; the pairs in :data:`HELD_OUT_PAIRS`
never appear in training, in either order, so the 8 prompts they make test whether the
model composes objects it has only seen in other company. Every object of a held-out
pair appears in training, alone and in other pairs.

**The text encoder** is frozen, as Stable Diffusion's CLIP is, and *contextual*, as CLIP
is: token ``i`` is the word's fixed embedding ``e(w_i)`` (the table of ``toys.scenes``)
joined with the mean of its neighbours' embeddings,

.. math:: c_i = \big[\, e(w_i),\ \tfrac12\big(e(w_{i-1}) + e(w_{i+1})\big) \big] \in \mathbb R^{32}

(a missing or padding neighbour counts as 0). Without the second half the prompt would
reach the U-Net as a *set* of tokens — cross-attention is invariant to the order of its
keys — and "red circle and blue triangle" would be the same input as "red triangle and
blue circle": no model could bind a colour to its shape. With it, "red" in "red circle"
carries "circle" and vice versa, as CLIP's token vectors carry their context.

Images enter the model scaled to ``[−1, 1]`` (:func:`to_model`): background −1, a red
pixel ``(1, −1, −1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..scenes import COLOURS, PROMPT_LENGTH, SHAPES, SIZE, VOCAB, Scenes, shape_mask, word_embeddings

__all__ = [
    "EMPTY_PROMPT",
    "EXAMPLE_PROMPT",
    "HELD_OUT_PAIRS",
    "TEXT_DIM",
    "all_prompts",
    "encode_prompts",
    "from_model",
    "held_out_prompts",
    "make_diffusion_scenes",
    "prompt_objects",
    "text_encoder",
    "to_model",
]

Object = tuple[str, str]  # (colour, shape)

EMPTY_PROMPT = ""  # encodes to "<sot> <eot>", the unconditional prompt of classifier-free guidance

# Unordered pairs of objects never shown together in training; together they use 8 of the 9 objects once.
HELD_OUT_PAIRS: tuple[tuple[Object, Object], ...] = (
    (("red", "circle"), ("blue", "triangle")),
    (("green", "square"), ("red", "triangle")),
    (("blue", "circle"), ("green", "triangle")),
    (("red", "square"), ("green", "circle")),
)

# the prompt the gallery figure and the explorer page draw: the first held-out pair
EXAMPLE_PROMPT = "red circle and blue triangle"


def _pair_key(a: Object, b: Object) -> frozenset[Object]:
    return frozenset((a, b))


_HELD_OUT = {_pair_key(a, b) for a, b in HELD_OUT_PAIRS}


def prompt_text(objects: Sequence[Object]) -> str:
    """``"red square and blue circle"`` for ``[("red", "square"), ("blue", "circle")]``."""
    return " and ".join(f"{c} {s}" for c, s in objects)


def prompt_objects(prompt: str) -> list[Object]:
    """The objects a prompt names: ``"red square and blue circle"`` → ``[("red", "square"), ("blue", "circle")]``.

    ``ValueError`` for words outside the vocabulary or a prompt that is not "colour shape [and colour shape]…".
    """
    words = prompt.split()
    objects = []
    for i in range(0, len(words), 3):
        part = words[i : i + 2]
        if len(part) != 2 or part[0] not in COLOURS or part[1] not in SHAPES:
            raise ValueError(f"prompt {prompt!r}: expected 'colour shape [and colour shape]', colours {list(COLOURS)}")
        if i + 2 < len(words) and words[i + 2] != "and":
            raise ValueError(f"prompt {prompt!r}: objects must be joined by 'and'")
        objects.append((part[0], part[1]))
    if words and words[-1] == "and":
        raise ValueError(f"prompt {prompt!r} ends with 'and'")
    return objects


TEXT_DIM = 2 * word_embeddings().shape[1]  # 32: a word's embedding and its neighbours' mean


def text_encoder(words: np.ndarray) -> np.ndarray:
    """``(B, M)`` token ids → ``(B, M, 32)``: ``[e(w_i), (e(w_{i−1}) + e(w_{i+1}))/2]`` (module docstring).

    Padding tokens keep their own embedding (the mask hides them) but count as 0 for their neighbours.
    """
    table = word_embeddings()
    e = table[words] * (words != VOCAB.index("<pad>"))[..., None]  # (B, M, 16), padding zeroed
    zero = np.zeros_like(e[:, :1])
    # (e(w_{i−1}) + e(w_{i+1})) / 2, with 0 beyond the ends
    neighbours = 0.5 * (np.concatenate([zero, e[:, :-1]], axis=1) + np.concatenate([e[:, 1:], zero], axis=1))
    return np.concatenate([table[words], neighbours], axis=-1)


def encode_prompts(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frozen text encoder: prompts → token vectors.

    Inputs:
        prompts: strings like ``"red square and blue circle"`` (``""`` is the empty prompt).

    Returns:
        context: ``(B, PROMPT_LENGTH, 32)`` the vectors of ``<sot> … <eot> <pad> …`` (:func:`text_encoder`).
        mask: ``(B, PROMPT_LENGTH)`` bool, True for real tokens (``<sot>`` to ``<eot>``).
        words: ``(B, PROMPT_LENGTH)`` int indices into :data:`~attention_ref.toys.scenes.VOCAB`.
    """
    words = np.full((len(prompts), PROMPT_LENGTH), VOCAB.index("<pad>"))
    for b, prompt in enumerate(prompts):
        prompt_objects(prompt)  # validates
        ids = [VOCAB.index("<sot>"), *(VOCAB.index(w) for w in prompt.split()), VOCAB.index("<eot>")]
        if len(ids) > PROMPT_LENGTH:
            raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens, more than {PROMPT_LENGTH}")
        words[b, : len(ids)] = ids
    mask = words != VOCAB.index("<pad>")
    return text_encoder(words), mask, words


def _pairs(held_out: bool) -> list[tuple[Object, Object]]:
    """Ordered pairs of objects with different colours and shapes, held out or not."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    return [
        (a, b)
        for a in objects
        for b in objects
        if a[0] != b[0] and a[1] != b[1] and (_pair_key(a, b) in _HELD_OUT) == held_out
    ]


def all_prompts(objects: int | None = None, *, held_out: bool = False) -> list[str]:
    """Every prompt of the training set (``held_out=False``) or of the held-out set.

    ``objects``: 1 or 2 to list only prompts with that many objects (the held-out set has only pairs).
    """
    single = [] if held_out else [prompt_text([(c, s)]) for c in COLOURS for s in SHAPES]
    pairs = [prompt_text(p) for p in _pairs(held_out)]
    return {1: single, 2: pairs, None: single + pairs}[objects]


def held_out_prompts() -> list[str]:
    """The 8 prompts of :data:`HELD_OUT_PAIRS` (both orders), never seen in training."""
    return all_prompts(held_out=True)


def _place(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """``n`` boxes ``(row, col, side)`` with a free pixel between any two (drawn again until they fit)."""
    while True:
        taken = np.zeros((SIZE, SIZE), dtype=bool)
        boxes = []
        for _ in range(n):
            side = int(rng.integers(5, 8))
            r, c = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
            if taken[max(r - 1, 0) : r + side + 1, max(c - 1, 0) : c + side + 1].any():
                break
            taken[r : r + side, c : c + side] = True
            boxes.append((r, c, side))
        if len(boxes) == n:
            return boxes


def render(rng: np.random.Generator, objects: Sequence[Object]) -> tuple[np.ndarray, np.ndarray]:
    """One scene of ``objects`` at random places and sizes: image ``(16, 16, 3)`` in [0, 1], masks ``(3, 16, 16)``."""
    image = np.zeros((SIZE, SIZE, 3))
    masks = np.zeros((3, SIZE, SIZE), dtype=bool)
    for o, ((r, c, side), (colour, shape)) in enumerate(zip(_place(rng, len(objects)), objects, strict=True)):
        masks[o, r : r + side, c : c + side] = shape_mask(shape, side)
        image[masks[o]] = COLOURS[colour]
    return image, masks


def make_diffusion_scenes(
    rng: np.random.Generator,
    count: int,
    *,
    prompts: Sequence[str] | None = None,
    single_fraction: float = 0.3,
) -> Scenes:
    """``count`` scenes with their prompts, as a :class:`~attention_ref.toys.scenes.Scenes`.

    Inputs:
        rng: every random choice is drawn from it.
        count: number of scenes.
        prompts: draw each scene's prompt uniformly from these; default: the training set,
            a one-object prompt with probability ``single_fraction``, else a training pair.
        single_fraction: see ``prompts``.

    Returns:
        Scenes with ``images (count, 16, 16, 3)`` in [0, 1] (no pixel noise), ``masks (count, 3, 16, 16)``
        (object ``o`` is the ``o``-th object named in the prompt; the third is always empty), ``words``,
        ``token_object`` (the object each colour and shape word names, else −1) and ``lengths``.
    """
    singles, pairs = all_prompts(1), all_prompts(2)
    images = np.zeros((count, SIZE, SIZE, 3))
    masks = np.zeros((count, 3, SIZE, SIZE), dtype=bool)
    chosen = []
    for b in range(count):
        if prompts is not None:
            prompt = prompts[int(rng.integers(len(prompts)))]
        elif rng.random() < single_fraction:
            prompt = singles[int(rng.integers(len(singles)))]
        else:
            prompt = pairs[int(rng.integers(len(pairs)))]
        images[b], masks[b] = render(rng, prompt_objects(prompt))
        chosen.append(prompt)
    _, mask, words = encode_prompts(chosen)
    token_object = np.full(words.shape, -1)
    # tokens: <sot> c₀ s₀ and c₁ s₁ <eot>: the colour and shape words of object o sit at 1 + 3o and 2 + 3o
    for b, prompt in enumerate(chosen):
        for o in range(len(prompt_objects(prompt))):
            token_object[b, 1 + 3 * o : 3 + 3 * o] = o
    return Scenes(images=images, masks=masks, words=words, token_object=token_object, lengths=mask.sum(axis=1))


def to_model(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] → the model's range [−1, 1]: ``2x − 1``."""
    return 2.0 * images - 1.0


def from_model(x: np.ndarray) -> np.ndarray:
    """The model's range → images in [0, 1]: ``(x + 1)/2``, clipped."""
    return np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
